"""Real models in, real pipelines out: diffusers schedulers and models, k-diffusion denoisers.

- `FewstepScheduler` (`scheduler`, needs diffusers): any fewstep solver as a drop-in diffusers scheduler.
- `from_diffusers`, `cfg_kwargs` (`diffusers_model`): a diffusers UNet/transformer as a fewstep model; guidance
  over keyword conditioning.
- `to_k_diffusion`, `from_k_diffusion` (`k_diffusion`): k-diffusion's denoiser convention, both ways.
- `conventions`: a scheduler config's process, prediction and timestep map; `flow`: the flow time shift.
- `handoff`: fewstep.sample driven one network evaluation at a time (a greenlet, or a worker thread without greenlet).
- `overhead`: FewstepScheduler.step() timed against diffusers' DPMSolverMultistepScheduler.step()
  (`python -m fewstep.integrations.overhead`).
diffusers is imported only by `scheduler` (loaded on first use of `FewstepScheduler`).
"""

from typing import Any

from .conventions import Convention, convention
from .diffusers_model import DiffusersModel, cfg_kwargs, from_diffusers
from .flow import FlowShift, ShiftedFlow
from .k_diffusion import from_k_diffusion, to_k_diffusion

__all__ = [
    "Convention",
    "DiffusersModel",
    "FewstepScheduler",
    "FlowShift",
    "ShiftedFlow",
    "cfg_kwargs",
    "convention",
    "from_diffusers",
    "from_k_diffusion",
    "to_k_diffusion",
]


def __getattr__(name: str) -> Any:
    if name in ("FewstepScheduler", "FewstepSchedulerOutput"):
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
