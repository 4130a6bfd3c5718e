"""fewstep: few-step diffusion sampling, training and distillation on one exact core."""

from .budget import nfe_for_steps, steps_for_nfe
from .gmm import GaussianMixture, mixture_nd, problem, ring2d
from .grids import SCHEDULES, Schedule, time_grid
from .guidance import DynamicThresholding, StaticClipping, cfg
from .integrations import FlowShift, ShiftedFlow, cfg_kwargs, from_diffusers, from_k_diffusion, to_k_diffusion
from .noise import BrownianTreeNoise
from .parameterization import PREDICTIONS, Denoiser, ModelError, Prediction, SolverError, convert
from .processes import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow
from .recommend import recommended
from .sampling import sample, solvers
from .schedule_search import SearchedSchedule, optimize_schedule
from .solvers.dc_solver import dc_calibrate
from .solvers.dpmv3 import ModelStatistics, v3_statistics
from .steer import FK, invert

__version__ = "0.1.0"


def __getattr__(name: str):
    """`fewstep.FewstepScheduler` on first use (it imports diffusers, an optional dependency)."""
    if name == "accel":  # fewstep.accel (caching, compile, quantization, stitching) on first use: it imports the nets
        import importlib

        return importlib.import_module(".accel", __name__)
    if name == "FewstepScheduler":
        from .integrations.scheduler import FewstepScheduler

        return FewstepScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BrownianTreeNoise",
    "EDM",
    "FewstepScheduler",
    "FK",
    "FlowShift",
    "PREDICTIONS",
    "SCHEDULES",
    "VE",
    "VP",
    "Denoiser",
    "DiscreteVP",
    "DynamicThresholding",
    "GaussianMixture",
    "ModelError",
    "ModelStatistics",
    "Prediction",
    "Process",
    "RectifiedFlow",
    "Schedule",
    "SearchedSchedule",
    "ShiftedFlow",
    "SolverError",
    "StaticClipping",
    "cfg",
    "cfg_kwargs",
    "convert",
    "dc_calibrate",
    "from_diffusers",
    "from_k_diffusion",
    "invert",
    "mixture_nd",
    "nfe_for_steps",
    "optimize_schedule",
    "problem",
    "ring2d",
    "recommended",
    "sample",
    "solvers",
    "steps_for_nfe",
    "time_grid",
    "to_k_diffusion",
    "v3_statistics",
]
