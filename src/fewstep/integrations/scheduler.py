"""`FewstepScheduler`: any fewstep solver as a drop-in diffusers scheduler (`pipe.scheduler = ...from_config(...)`).

diffusers' scheduler contract (SchedulerMixin + ConfigMixin): `set_timesteps(n, device, timesteps=None, sigmas=None)`
lists `timesteps`, one per network evaluation, in the model's convention; the pipeline calls the network at each and
hands its output to `step(model_output, timestep, sample)`, which returns `prev_sample`, the next network input.
Here `step` feeds the output to `fewstep.sample` itself, paused at every evaluation (`handoff.solver_run`: a
greenlet, or a worker thread where greenlet is not installed): the pipeline's loop runs exactly fewstep's solver,
grid and final-step policy, so its output is `fewstep.sample`'s on the same model and grid (multistep,
singlestep/Runge-Kutta with their intermediate times exposed as timesteps, and stochastic solvers drawing from the
`generator` given to `step`). Every `set_timesteps` starts a new run (no state survives; what it plans from its
arguments alone, the grid and evaluation times, is kept for the next call with the same arguments). The model
conventions (betas, prediction type, flow shift, clipping) come from the pipeline's scheduler config
(`conventions`). With `solver="auto"` the solver, steps and grid of each run are `fewstep.tuning.choose`'s
for the NFE budget `num_inference_steps` (a `fewstep tune` result given as `tuning=`, else `fewstep.recommended`).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..budget import plan_for_nfe
from ..checks import check_steps
from ..corrections import Corrections
from ..grids import PARAMETERS, SCHEDULES, Schedule, ScheduleLike, check_grid, time_grid
from ..parameterization import Coefficients, to_x0_eps
from ..processes import Process
from ..sampling import PreparedGrid, prepare_grid
from ..sampling import sample as fewstep_sample
from ..solvers import get_solver
from ..tuning import Tuning, choose, model_key
from .conventions import MODEL_KEYS, Convention, as_mapping, canonical_config, convention, spacing_timesteps
from .flow import FlowShift, shift_time
from .handoff import Ask, Done, EvaluationPlan, SolverGreenlet, SolverThread, evaluation_plan, solver_run

UNSUPPORTED = {
    "dpm_adaptive": "it chooses its steps from the model's outputs, so its timesteps are not known before sampling",
    "time_shift": "it evaluates each sample at its own time, and a diffusers pipeline passes one timestep per batch",
}
BUDGETS = ("steps", "nfe")
AUTO = "auto"  # solver: the tuned configuration per NFE budget (fewstep.tuning.choose)
PIPELINE_SPACING = "diffusers"  # schedule name: the config's timestep_spacing (DiscreteVP) / the shifted grid (flow)
TIMESTEP_TOLERANCE = 1e-5  # relative: a timestep passed to step() must match the expected one this closely
PLANNED_RUNS_KEPT = 8  # set_timesteps results kept per scheduler (a pipeline calls it with the same arguments each time)


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    """step()'s result: `prev_sample` (the next network input, or the final sample) and the data prediction of this
    evaluation under both of diffusers' names, `pred_original_sample` and `denoised`. Shapes: like `sample`."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None
    denoised: torch.Tensor | None = None


class _GeneratorSlot:
    """The generator of the step() in progress, read by the solver's noise source (shared with the worker thread)."""

    def __init__(self):
        self.generator: torch.Generator | list[torch.Generator] | None = None

    def __call__(self, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """Standard normal noise like x, drawn as fewstep's `Run.noise_like` draws from a generator (or a list)."""
        g = self.generator
        if g is None:
            return torch.randn_like(x)
        if isinstance(g, torch.Generator):
            return torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
        if len(g) != x.shape[0]:
            raise ValueError(f"generator is a list of {len(g)} generators but the batch has {x.shape[0]} samples")
        return torch.stack([torch.randn(x.shape[1:], generator=gi, device=gi.device, dtype=x.dtype) for gi in g]).to(x.device)


def _internal_dtype(dtype: torch.dtype) -> torch.dtype:
    """The solver's working dtype: float32 for half-precision pipelines (as diffusers' schedulers upcast)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A fewstep solver as a diffusers scheduler.

    `FewstepScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m", schedule="logsnr")` reads the model's
    conventions (betas or flow shift, prediction type, clipping) from any diffusers scheduler config; the keyword
    arguments choose the sampler: `solver` (any deterministic or stochastic fewstep solver but dpm_adaptive and
    time_shift), `solver_options` (dict), `schedule` (a fewstep grid name; None: the process's default, log-SNR for
    DDPM betas, time-uniform for zero terminal SNR, the shifted time-uniform grid for flows; "diffusers": the config's
    `timestep_spacing`), `rho` (of "karras"/"polyexponential"), `denoise_to_zero` (end on the data prediction at the
    last time: one more evaluation) and `budget` ("steps": num_inference_steps = solver steps, as diffusers; "nfe":
    num_inference_steps = network evaluations; default "steps", "nfe" for solver="auto"). `order` is the number of
    network evaluations per step.

    `solver="auto"`: each `set_timesteps(n)` runs what `fewstep.sample(..., solver="auto", nfe=n, tuning=tuning)`
    runs (`fewstep.tuning.choose`): the entry at NFE n of `tuning` (a `fewstep.tuning.Tuning` or its JSON file, made
    by `fewstep.tune.tune` on `fewstep.from_diffusers(net, config)`), else the fallback `fewstep.recommended(n,
    process)` (which may end the grid early, at log-SNR 2 for NFE 4-5, and then denoise from there); `self.choice`
    records which (the dict of `x.choice`). The scheduler never sees the network, so the tuning's model key is
    checked only when `model=` is given (the UNet/transformer, hashed as `fewstep.tune.tune` hashes it, or the key
    string); the process and prediction are always checked (a mismatch raises `fewstep.tuning.TuningError`).
    `tuning` and `model` are not part of the saved config: pass them again to `from_pretrained`/`from_config`.
    schedule, rho, solver_options and denoise_to_zero belong to the chosen plan and are not taken; explicit
    `timesteps`/`sigmas` are refused.
    """

    order = 1
    ignore_for_config = ["tuning", "model"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        variance_type: str | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        solver: str = "dpmpp_2m",
        schedule: str | None = None,
        rho: float | None = None,
        solver_options: dict[str, Any] | None = None,
        denoise_to_zero: bool = True,
        budget: str | None = None,
        tuning: Tuning | str | os.PathLike | None = None,
        model: Any = None,
    ):
        model_config = {key: getattr(self.config, key) for key in MODEL_KEYS}
        # A dynamic-shift flow gets its shift from set_timesteps(mu=...); shift 1 validates the rest meanwhile.
        self._convention = convention(model_config, shift=1.0 if use_dynamic_shifting else None)
        if solver_options is not None and not isinstance(solver_options, Mapping):
            raise ValueError(f"solver_options must be a dict of options of solver {solver!r}, got {solver_options!r}")
        self._solver, self._options = solver, dict(solver_options or {})
        if solver == AUTO:
            _check_auto(schedule, rho, self._options, budget)
        else:
            _check_solver(solver, self._options)
        self._schedule = _check_schedule(schedule, rho)
        if not isinstance(denoise_to_zero, bool):
            raise ValueError(f"denoise_to_zero must be True or False, got denoise_to_zero={denoise_to_zero!r}")
        if budget is not None and budget not in BUDGETS:
            raise ValueError(f"budget={budget!r} is not known; allowed values: {', '.join(BUDGETS)}")
        self._budget = budget or ("nfe" if solver == AUTO else "steps")
        self._stochastic = solver != AUTO and get_solver(solver).stochastic
        self.choice: dict[str, Any] | None = None
        self._planned_runs: dict[tuple, _PlannedRun] = {}
        self.set_tuning(tuning, model)
        self._reset()
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        process = self._convention.process
        self.init_noise_sigma = float(process.sigma(process.t_max))

    # Configuration ------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """A FewstepScheduler for the model of any diffusers scheduler config (see `conventions.canonical_config`);
        kwargs set the sampler (solver, schedule, rho, solver_options, denoise_to_zero, budget; tuning and model with
        solver="auto") or override keys."""
        allowed = set(cls._get_init_keys(cls)) - {"self"}
        unknown = sorted(set(kwargs) - allowed - {"dtype"})
        if unknown:
            names = ", ".join(sorted(allowed))
            raise ValueError(f"FewstepScheduler.from_config does not take {', '.join(unknown)}; allowed: {names}")
        tuning, net = kwargs.pop("tuning", None), kwargs.pop("model", None)  # not config keys (ignore_for_config)
        config = as_mapping({} if config is None else config, "config")
        model = canonical_config(config)
        if "_class_name" not in config:  # keys of an unnamed class can be neither kept for it nor used: drop them
            config = {key: value for key, value in config.items() if key in allowed or key.startswith("_")}
        merged = {**config, **model}
        merged.pop("_use_default_values", None)  # every key describes the model, default or not
        made = super().from_config(merged, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = made[0] if isinstance(made, tuple) else made
        if tuning is not None or net is not None:
            scheduler.set_tuning(tuning, net)
        return made

    def set_tuning(self, tuning: Tuning | str | os.PathLike | None, model: Any = None) -> None:
        """Use `tuning` (a `fewstep.tuning.Tuning` or its JSON file; solver="auto" only) from the next `set_timesteps`
        on; `model` (the UNet/transformer, a fewstep model with a `tuning_key`, or the key string) lets its model key
        be checked. Raises `fewstep.tuning.TuningError` for a tuning of another model, process or prediction (a
        dynamic-shift flow's process is known, and checked, at `set_timesteps(mu=...)`)."""
        if (tuning is not None or model is not None) and self.config.solver != AUTO:
            raise ValueError(f"tuning and model are used only with solver='auto', not solver={self.config.solver!r}")
        if tuning is not None and not isinstance(tuning, Tuning):
            if not isinstance(tuning, (str, os.PathLike)):
                raise TypeError(f"tuning must be a fewstep Tuning or the path of its JSON file, got {type(tuning).__name__}")
            tuning = Tuning.load(tuning)
        self._tuning, self._keyed, self._model_checked = tuning, _keyed(model, tuning), model is not None
        self._planned_runs = {}  # planned with the previous tuning
        if tuning is not None and not self.config.use_dynamic_shifting:
            conv = self._convention
            tuning.check(model_key(self._keyed), conv.process, conv.prediction)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # State --------------------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Forget any run: the worker, the plan and the step counters."""
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.close()
        self._thread: SolverGreenlet | SolverThread | None = None
        self._plan: EvaluationPlan | None = None
        self._grid: torch.Tensor | None = None
        self._prepared: PreparedGrid | None = None
        self._denoise = self.config.denoise_to_zero
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._handed: torch.Tensor | None = None
        self._generator = _GeneratorSlot()

    @property
    def step_index(self) -> int | None:
        """Index in `timesteps` of the next evaluation (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index in `timesteps` where sampling starts (img2img), None for the start."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at `timesteps[begin_index]` (img2img: `t_start * order`); it must be the first evaluation of a step,
        and the run from that step is `fewstep.sample` from that grid time (a multistep solver warms up again)."""
        if self._plan is None:
            raise ValueError("call set_timesteps before set_begin_index")
        if self._thread is not None:
            raise ValueError("set_begin_index must be called before the first step(); call set_timesteps to start over")
        starts = self._plan.step_starts
        if begin_index not in starts:
            raise ValueError(
                f"begin_index={begin_index!r} is not the first evaluation of a step of solver {self._solver!r}; "
                f"allowed values: {', '.join(map(str, starts))}"
            )
        j = starts.index(begin_index)
        if j > 0:
            sub = self._plan_for(self._grid[j:])
            if sub.times != self._plan.times[begin_index:]:
                raise ValueError(
                    f"solver {self._solver!r} evaluates at other times when it starts at step {j} than the full run "
                    "does from there, so the pipeline's timesteps[begin_index:] would be wrong; use a multistep solver "
                    "(e.g. dpmpp_2m, unipc, deis) for img2img"
                )
        self._begin_index = begin_index

    def _convention_for(self, mu: float | None) -> Convention:
        """The model's convention for this run: a dynamic-shift flow takes its shift from `mu` (as diffusers, `mu`
        is ignored otherwise)."""
        if not self.config.use_dynamic_shifting:
            return self._convention
        if mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True (the pipeline computes it)")
        return convention({key: getattr(self.config, key) for key in MODEL_KEYS}, mu=mu)

    # Timesteps ----------------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Plan a new run (all earlier state is dropped): `num_inference_steps` solver steps (or NFE, budget="nfe";
        solver="auto": the NFE of the chosen plan, recorded in `self.choice`) on the configured grid, or the grid
        given as `timesteps` (model timesteps) or `sigmas` (DDPM models:
        k-diffusion's sigma/alpha, a final 0 dropped; flows: unshifted sigmas, as FlowMatchEulerDiscreteScheduler takes
        them), decreasing; the run ends with the data prediction at the last one (denoise_to_zero), so n given
        values cost n evaluations with a one-evaluation-per-step solver, as in diffusers. `mu`: the dynamic shift of a
        flow (FLUX). `self.timesteps` then lists the model timestep of every network evaluation, in order."""
        self._reset()
        key = _run_key(num_inference_steps, timesteps, sigmas, mu)
        planned = self._planned_runs.get(key) if key is not None else None
        if planned is None:
            planned = self._new_run(num_inference_steps, timesteps, sigmas, mu)
            if key is not None:
                if len(self._planned_runs) >= PLANNED_RUNS_KEPT:
                    self._planned_runs.pop(next(iter(self._planned_runs)))
                self._planned_runs[key] = planned
        self._apply(planned, device)

    def _new_run(self, num_inference_steps, timesteps, sigmas, mu) -> _PlannedRun:
        """Everything a run needs before its first step (grid, evaluation plan, coefficients, timesteps), on the host."""
        conv = self._convention_for(mu)
        self._corrections = None
        if self.config.solver == AUTO:
            if timesteps is not None or sigmas is not None:
                raise ValueError(
                    "solver='auto' chooses its own grid for the NFE budget num_inference_steps; do not pass timesteps "
                    "or sigmas (or choose a named solver to run on them)"
                )
            grid, denoise = self._auto_grid(conv, num_inference_steps)
        elif timesteps is not None or sigmas is not None:
            grid, denoise = self._given_grid(conv, num_inference_steps, timesteps, sigmas), self.config.denoise_to_zero
        else:
            grid, denoise = self._planned_grid(conv, num_inference_steps)
        self._convention, self._denoise = conv, denoise
        plan = self._plan_for(grid)
        times = torch.tensor(plan.times, dtype=torch.float64)
        process = conv.process
        ends_at_data = denoise or float(process.sigma(float(grid[-1]))) == 0
        if self._corrections is not None:  # the network is told each evaluation's shifted time
            if len(plan.times) != self._corrections.nfe:
                raise RuntimeError(f"the tuned corrections hold {self._corrections.nfe} evaluations, the plan {len(plan.times)}")
            model_timesteps = conv.timestep(torch.tensor(self._corrections.network_times(process), dtype=torch.float64))
        else:
            model_timesteps = conv.timestep(times)
        return _PlannedRun(
            convention=conv, grid=grid, prepared=prepare_grid(process, len(grid) - 1, grid), denoise=denoise, plan=plan,
            order=plan.per_step() or 1, solver=self._solver, options=self._options,
            stochastic=self._stochastic, choice=self.choice, coefficients=_coefficients(process, times),
            timestep_values=model_timesteps.tolist(), timesteps=model_timesteps,
            sigmas=_pipeline_sigmas(conv, torch.cat([times, grid[-1:]]), ends_at_data),
            init_noise_sigma=float(process.sigma(float(grid[0]))), corrections=self._corrections,
        )  # fmt: skip

    def _apply(self, planned: _PlannedRun, device: str | torch.device | None) -> None:
        """Make `planned` the current run (the pipeline-visible tensors are fresh copies, on `device`)."""
        self._convention, self._grid, self._denoise, self._plan = planned.convention, planned.grid, planned.denoise, planned.plan
        self._prepared, self._corrections = planned.prepared, planned.corrections
        self._solver, self._options, self._stochastic = planned.solver, planned.options, planned.stochastic
        self.choice = None if planned.choice is None else dict(planned.choice)
        self._coefficients, self._timestep_values = planned.coefficients, planned.timestep_values
        self.num_inference_steps = planned.grid.shape[0] - 1
        self.order = planned.order
        dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64  # no float64 on MPS
        self.timesteps = planned.timesteps.to(device=device, dtype=dtype, copy=True)
        self.sigmas = planned.sigmas.clone()
        self.init_noise_sigma = planned.init_noise_sigma

    def _auto_grid(self, conv: Convention, num_inference_steps: int | None) -> tuple[torch.Tensor, bool]:
        """solver="auto": the grid and final denoising of `choose`'s plan for NFE num_inference_steps; sets the run's
        solver, options and `self.choice`."""
        nfe = check_steps(num_inference_steps, "num_inference_steps")
        if nfe < 2:
            raise ValueError(f"num_inference_steps must be >= 2 with solver='auto' (it is the NFE budget), got {nfe}")
        process = conv.process
        kwargs, record = choose(self._keyed, process, conv.prediction, nfe, tuning=self._tuning)
        plan = dict(kwargs)
        self._corrections = plan.pop("corrections", None)  # learned per-evaluation corrections (fewstep.corrections)
        solver, steps, schedule = plan.pop("solver"), plan.pop("steps"), plan.pop("schedule")
        denoise = plan.pop("denoise_to_zero", True)
        t_start, t_end = plan.pop("t_start", process.t_max), plan.pop("t_end", process.t_min)
        _check_solver(solver, plan)
        self._solver, self._options, self._stochastic = solver, plan, get_solver(solver).stochastic
        if not self._model_checked and record["source"] == "tuned":
            record["reason"] += " (model weights not checked: pass model=)"
        self.choice = record
        return time_grid(process, steps, t_start, t_end, schedule), denoise

    def _plan_for(self, grid: torch.Tensor) -> EvaluationPlan:
        conv = self._convention
        plan = evaluation_plan(conv.process, conv.prediction, self._solver, grid, denoise_to_zero=self._denoise,
                               options=self._options, x0_fn=conv.x0_fn)  # fmt: skip
        if not plan.starts_at_state:
            raise ValueError(
                f"solver {self._solver!r} with solver_options={self._options} changes the state before its first "
                "evaluation (noise churn at the start), which a pipeline cannot feed to the network; change the options"
            )
        return plan

    def _planned_grid(self, conv: Convention, num_inference_steps: int | None) -> tuple[torch.Tensor, bool]:
        n = check_steps(num_inference_steps, "num_inference_steps")
        process, denoise = conv.process, self.config.denoise_to_zero
        if self._budget == "nfe":
            steps, denoise = plan_for_nfe(self._solver, n, process, **self._options)
        else:
            steps = n
        schedule = self._schedule
        if schedule == PIPELINE_SPACING and not conv.flow:
            ks = torch.tensor(spacing_timesteps(self.config, steps), dtype=torch.float64)
            return _checked(process, conv.time(ks), "timestep_spacing"), denoise
        if conv.flow:
            base = "time_uniform" if schedule in (None, PIPELINE_SPACING) else schedule
            schedule = FlowShift(process.shift, base)
        return time_grid(process, steps, process.t_max, process.t_min, schedule), denoise

    def _given_grid(self, conv: Convention, num_inference_steps, timesteps, sigmas) -> torch.Tensor:
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass timesteps or sigmas to set_timesteps, not both")
        name = "timesteps" if timesteps is not None else "sigmas"
        values = torch.as_tensor(timesteps if timesteps is not None else sigmas).detach().to("cpu", torch.float64).flatten()
        if num_inference_steps is not None and num_inference_steps != values.numel():
            count = values.numel()
            raise ValueError(f"num_inference_steps={num_inference_steps} but {name} has {count} values; pass one or the other")
        process = conv.process
        if timesteps is not None:
            ts = conv.time(values)
        elif conv.flow:
            ts = shift_time(values, process.shift)
        else:  # a final sigma 0 (k-diffusion's "end on the data") is what the final denoising does
            sig = values[:-1] if values.numel() > 2 and float(values[-1]) == 0 else values
            ts = process.t_from_log_snr(-torch.log(sig))
        return _checked(process, ts, name)

    # The loop -----------------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network input for `sample`: `sample` itself (fewstep's states are the process's own x_t)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Hand the network's output at (`sample`, `timestep`) to the solver; returns the next network input as
        `prev_sample` (after the last evaluation: the final sample) and this evaluation's data prediction.

        `timestep` must be `timesteps[step_index]`; `sample` the previous `prev_sample` (a pipeline that changes the
        latents between steps, e.g. inpainting, passes the changed tensor, which replaces the solver's state).
        `generator`: the noise of stochastic solvers (as `fewstep.sample(generator=...)`). `eta`: DDIM pipelines pass
        0; a stochastic solver is chosen with `solver=` instead. Shapes: model_output and sample [batch, ...].
        """
        if self._plan is None:
            raise ValueError("call set_timesteps before step")
        if eta:
            hint = f"solver='ddim_eta' with solver_options={{'eta': {eta}}}"
            raise ValueError(f"eta={eta!r} is a DDIMScheduler option; choose {hint}")
        conv = self._convention
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be tensors")
        model_output = conv.take_prediction(model_output, sample.shape[1] if sample.ndim > 1 else 0)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}")
        k = self._index_of(timestep)
        self._generator.generator = generator
        ask = self._start(sample, k) if self._thread is None else self._thread.pending
        x = ask.x
        if sample is not self._handed and sample is not x:
            x.copy_(sample)  # the pipeline's latents are the state (the start, or latents it changed)
        out = model_output if model_output.dtype == x.dtype else model_output.to(x.dtype)
        x0 = to_x0_eps(out, conv.prediction, x, self._coefficients[k])[0]
        x0 = conv.x0_fn(x0) if conv.x0_fn is not None else x0
        message = self._thread.tell(out)
        self._step_index = k + 1
        last = k + 1 == len(self._timestep_values)
        if isinstance(message, Done) != last:
            raise RuntimeError(f"the solver's evaluations diverged from its plan at evaluation {k} (a fewstep bug)")
        prev = message.x if message.x.dtype == sample.dtype else message.x.to(sample.dtype)
        x0 = x0 if x0.dtype == sample.dtype else x0.to(sample.dtype)
        self._handed = prev
        if not return_dict:
            return prev, x0
        return FewstepSchedulerOutput(prev_sample=prev, pred_original_sample=x0, denoised=x0)

    def _index_of(self, timestep: Any) -> int:
        """The evaluation index this step() is for, checking `timestep` against it (host sync only where unavoidable)."""
        n = len(self._timestep_values)
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._first_index(timestep)
        k = self._step_index
        if k >= n:
            raise ValueError(f"all {n} evaluations of this run are done; call set_timesteps to sample again")
        expected = self._timestep_values[k]
        given = self._timestep_value(timestep, k)
        if given is not None and not abs(given - expected) <= TIMESTEP_TOLERANCE * max(1.0, abs(expected)):
            raise ValueError(
                f"timestep={given!r} is not the timestep of evaluation {k} ({expected!r}): step() must be called with "
                "scheduler.timesteps in order, once each, after set_timesteps (and set_begin_index for img2img)"
            )
        return k

    def _timestep_value(self, timestep: Any, k: int) -> float | None:
        """timestep as a float; None when it is element k of `self.timesteps` itself (checked without a device sync)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                shape = tuple(timestep.shape)
                raise ValueError(f"timestep must be one timestep (the whole batch is at one time), got shape {shape}")
            ts = self.timesteps
            if timestep.dtype == ts.dtype and timestep.data_ptr() == ts.data_ptr() + k * ts.element_size():
                return None  # the pipeline's `for t in scheduler.timesteps`: element k itself, nothing to check
            return float(timestep.reshape(()).item())
        if isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
            return float(timestep)
        raise ValueError(f"timestep must be a number or a one-element tensor, got {type(timestep).__name__}")

    def _offset_in_timesteps(self, timestep: Any) -> int | None:
        """The index of `timestep` in `self.timesteps` when it is a one-element view of it (no device sync), else None."""
        ts = self.timesteps
        if not isinstance(timestep, torch.Tensor) or timestep.numel() != 1 or timestep.dtype != ts.dtype:
            return None
        if timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr():
            return None
        return timestep.storage_offset() - ts.storage_offset()

    def _first_index(self, timestep: Any) -> int:
        """Without set_begin_index: the first step start whose timestep is `timestep` (diffusers' _init_step_index)."""
        offset = self._offset_in_timesteps(timestep)
        if offset is not None and offset in self._plan.step_starts:
            if offset:
                self.set_begin_index(offset)
            return offset
        value = self._timestep_value(timestep, -1)  # a float (a Python number is not rounded to float32 first)
        for k in self._plan.step_starts:
            expected = self._timestep_values[k]
            if abs(value - expected) <= TIMESTEP_TOLERANCE * max(1.0, abs(expected)):
                if k:
                    self.set_begin_index(k)
                return k
        raise ValueError(
            f"timestep={value!r} is not the first timestep of any step of this run; call step() with scheduler.timesteps "
            "in order, or set_begin_index(...) for img2img"
        )

    def _start(self, sample: torch.Tensor, k: int) -> Ask:
        """Start fewstep.sample in the worker from `sample` at the grid time of evaluation k; returns its first ask."""
        conv, plan = self._convention, self._plan
        j = plan.step_starts.index(k)
        grid = self._grid[j:]
        schedule = self._prepared if j == 0 else grid
        noise = sample.detach().to(_internal_dtype(sample.dtype)) / self._coefficients[k].sigma  # sigma at grid[0]
        options, denoise, solver = self._options, self._denoise, self._solver
        source = self._generator if self._stochastic else None
        corrections = self._corrections
        if corrections is not None and j != 0:
            raise ValueError("a tuned run with learned corrections starts at its first evaluation: set_begin_index "
                             "(img2img) is not supported with solver='auto' on such a tuning; choose a named solver")  # fmt: skip

        def solve(model):
            prediction = conv.prediction if corrections is None else "x0"  # the corrected model returns a data prediction
            if corrections is not None:
                model = corrections.wrap(model, conv.process, conv.prediction)
            return fewstep_sample(model, noise, process=conv.process, prediction=prediction, solver=solver,
                                  steps=len(grid) - 1, schedule=schedule, denoise_to_zero=denoise, generator=source,
                                  x0_fn=conv.x0_fn, **options)  # fmt: skip

        self._thread = solver_run(solve)
        first = self._thread.start()
        if not isinstance(first, Ask):
            raise RuntimeError("the solver finished without evaluating the model (a fewstep bug)")
        return first

    # Noising (img2img, training) ----------------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise at the model timesteps (a scalar or [batch]); x0, noise [batch, ...]."""
        conv = self._convention
        k = torch.as_tensor(timesteps, device=original_samples.device)
        k = k.to(torch.float32 if k.device.type == "mps" else torch.float64).reshape(-1)
        t = conv.time(k)
        lo, hi = float(t.min()), float(t.max())
        process = conv.process
        if lo < process.t_min - 1e-9 or hi > process.t_max + 1e-9:
            first, last = (float(conv.timestep(v)) for v in (process.t_min, process.t_max))
            got = f"[{float(conv.timestep(lo)):g}, {float(conv.timestep(hi)):g}]"
            raise ValueError(f"timesteps must lie in [{first:g}, {last:g}] (the model's range), got {got}")
        t = t.clamp(process.t_min, process.t_max)
        return process.add_noise(original_samples, t if t.numel() > 1 else t.reshape(()), noise)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor) -> torch.Tensor:
        """FlowMatch schedulers' name for `add_noise` (with its argument order): (1 - sigma) sample + sigma noise."""
        return self.add_noise(sample, noise, timestep)


class _Key:
    """A model known only by its tuning key (what `fewstep.tuning.model_key` reads)."""

    def __init__(self, key: str):
        self.tuning_key = key


def _keyed(model: Any, tuning: Tuning | None) -> Any:
    """What `choose` checks a tuning against: the model (a module or a `tuning_key` model), a key string, or (model
    None) the tuning's own key, so that only its process and prediction are checked."""
    if isinstance(model, str):
        return _Key(model)
    if model is None:
        return _Key(tuning.model) if tuning is not None else None
    model_key(model)  # a TuningError now for a model that has no key
    return model


@dataclass(frozen=True)
class _PlannedRun:
    """What `set_timesteps` computes for one set of arguments, kept for the next call with the same ones (host only)."""

    convention: Convention
    grid: torch.Tensor
    prepared: PreparedGrid  # the grid with fewstep.sample's own per-grid work done (sampling from its start)
    denoise: bool
    plan: EvaluationPlan
    order: int  # evaluations per step (1 where steps differ in cost)
    solver: str
    options: dict[str, Any]
    stochastic: bool
    choice: dict[str, Any] | None
    coefficients: list[Coefficients]
    timestep_values: list[float]
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    init_noise_sigma: float
    corrections: Corrections | None = None  # solver="auto": the tuned entry's learned corrections


def _run_key(num_inference_steps: Any, timesteps: Any, sigmas: Any, mu: Any) -> tuple | None:
    """The set_timesteps arguments as a hashable key (None where they cannot be one: then nothing is kept)."""
    try:
        values = [None if v is None else tuple(torch.as_tensor(v).detach().to("cpu", torch.float64).flatten().tolist())
                  for v in (timesteps, sigmas)]  # fmt: skip
        key = (type(num_inference_steps), num_inference_steps, *values, type(mu), mu)  # 5 and 5.0 / True: not one key
        hash(key)
    except (TypeError, ValueError, RuntimeError):
        return None
    return key


def _check_solver(solver: str, options: dict[str, Any]) -> None:
    """A solver that can run as a scheduler, with valid options (ValueError naming solver / the option)."""
    spec = get_solver(solver)
    if solver in UNSUPPORTED:
        raise ValueError(f"solver={solver!r} cannot run as a diffusers scheduler: {UNSUPPORTED[solver]}")
    spec.check_options(options)


def _check_auto(schedule: Any, rho: Any, options: dict[str, Any], budget: str | None) -> None:
    """solver="auto" chooses grid and options itself and counts num_inference_steps as NFE: refuse the rest."""
    given = [name for name, value in (("schedule", schedule), ("rho", rho), ("solver_options", options)) if value]
    if given:
        raise ValueError(f"solver='auto' chooses the grid and the solver options itself; do not pass {', '.join(given)}")
    if budget == "steps":
        raise ValueError("solver='auto' plans for an NFE budget: budget must be 'nfe' (or left unset), not 'steps'")


def _check_schedule(schedule: Any, rho: float | None) -> ScheduleLike:
    """The configured grid: None, "diffusers", or a fewstep grid name (with rho for karras / polyexponential)."""
    if schedule is None or schedule == PIPELINE_SPACING:
        if rho is not None:
            raise ValueError(f"rho is a parameter of the karras and polyexponential schedules, not of schedule={schedule!r}")
        return schedule
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        allowed = f"None, {PIPELINE_SPACING!r}, {', '.join(SCHEDULES)}"
        raise ValueError(f"schedule={schedule!r} is not known; allowed values: {allowed}")
    if rho is not None and schedule not in PARAMETERS:
        raise ValueError(f"rho is a parameter of the karras and polyexponential schedules, not of schedule={schedule!r}")
    return Schedule(schedule, **({} if rho is None else {"rho": rho}))


def _checked(process: Process, ts: torch.Tensor, name: str) -> torch.Tensor:
    """A grid given as times, validated by fewstep's grid check (a ValueError naming `name`)."""
    if ts.numel() < 2:
        raise ValueError(f"{name} must give at least one step")
    return check_grid(process, ts, ts.numel() - 1, name, "pass decreasing values inside the model's range")


def _pipeline_sigmas(conv: Convention, times: torch.Tensor, ends_at_data: bool) -> torch.Tensor:
    """diffusers' `sigmas` (float32): per time the flow sigma t, or k-diffusion's sigma/alpha for DDPM models; the
    last entry is 0 where the run ends on the data."""
    sigmas = times.clone() if conv.flow else conv.process.sigma(times) / conv.process.alpha(times)
    if ends_at_data:
        sigmas[-1] = 0.0
    return sigmas.to(torch.float32)


def _coefficients(process: Process, times: torch.Tensor) -> list[Coefficients]:
    """Coefficients (Python floats) at each of the float64 times [n], computed in one pass."""
    columns = (process.alpha(times), process.sigma(times), process.dalpha_dt(times), process.dsigma_dt(times))
    return [Coefficients(*c) for c in zip(*(col.tolist() for col in columns), strict=True)]
