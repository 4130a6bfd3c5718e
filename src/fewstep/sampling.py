"""The public entry point `fewstep.sample`: solve the probability-flow ODE (or SDE) from noise to data."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .checks import check_steps
from .grids import ScheduleLike, time_grid
from .parameterization import Denoiser, Model, check_convertible, check_prediction
from .processes import Process
from .solvers import GridValues, Run, get_solver, grid_values, reindex, solver_specs
from .tuning import Tuning, choose

LOWER_ORDER_FINAL_BELOW = 15  # steps; as diffusers' DPMSolverMultistepScheduler (lower_order_final)


def solvers() -> list[str]:
    """Names of all registered solvers."""
    return list(solver_specs())


def sample(
    model: Model,
    noise: torch.Tensor,
    *,
    process: Process,
    prediction: str = "eps",
    solver: str = "dpmpp_2m",
    steps: int = 10,
    schedule: ScheduleLike = None,
    t_start: float | None = None,
    t_end: float | None = None,
    denoise_to_zero: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    differentiable: bool = False,
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    nfe: int | None = None,
    tuning: Tuning | str | os.PathLike | None = None,
    model_kwargs: dict[str, Any] | None = None,
    steering: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Sample from a diffusion or flow model with `steps` solver steps; returns x0 [batch, ...].

    model: callable `model(x, t) -> Tensor` predicting `prediction` ("eps", "x0", "v", "velocity", "score"),
        with x [batch, ...] and t [batch] in the process's own time.
    noise: standard normal [batch, ...]; sampling starts at x = sigma(t_start) * noise, t_start = process.t_max.
    schedule: a grid name (see `fewstep.SCHEDULES`), a `fewstep.Schedule(name, rho=...)` with parameters, a
        decreasing tensor of steps + 1 times, a searched schedule (`fewstep.optimize_schedule`), a `PreparedGrid`
        (`prepare_grid`: a grid validated once for many runs), or None for the process's default.
    denoise_to_zero: finish with the data prediction at t_end (one more evaluation, skipped where sigma(t_end) = 0,
        and for a solver whose last step returns the data prediction itself, "consistency").
        Otherwise multistep solvers lower their order over the last steps when steps < 15.
    differentiable: keep the autograd graph through the solver: gradients with respect to the model's parameters
        or the noise (e.g. for distillation); the grid times are constants.
    x0_fn: post-processing of every data prediction, x0 [batch, ...] -> x0 (thresholding or clipping, see
        `fewstep.guidance`); the noise prediction is made consistent with it.
    options: solver-specific options (see `fewstep solvers`).
    model_kwargs: keyword arguments passed to every model call, `model(x, t, **model_kwargs)` (conditioning: class
        labels, text embeddings): tensors of shape [batch, ...] (per sample; sliced with the samples where a solver
        runs each sample on its own) or [1, ...] (broadcast). t_start and t_end are numbers: per-sample times are not
        supported (group the samples by time).
    solver="auto": fewstep chooses solver, steps and grid for the budget `nfe` (required then; `steps`, `schedule`
        and options are not used): the model's tuned configuration at that NFE (`fewstep tune`; `tuning` = a
        `fewstep.Tuning` or its file, else the tuning a loaded checkpoint carries) when it matches the model, process
        and prediction, else `fewstep.recommended(nfe, process)`. The result's attribute `choice` says which, and why.
    steering: a particle method, `fewstep.steer.FK(reward, lam=..., particles=K)` (Feynman-Kac steering): noise then
        holds B * K particles, the solver must be stochastic, and the result is [B, ...] (see `fewstep.steer`).
    The result carries the number of network evaluations used as the attribute `nfe`.
    """
    if steering is not None:  # the particle method calls sample itself, on its particles
        if not callable(getattr(steering, "steer", None)):
            raise TypeError(f"steering must be None or a fewstep.steer.FK, got {type(steering).__name__}")
        if nfe is not None or tuning is not None:
            raise ValueError("steering needs a named stochastic solver and steps; nfe and tuning are not used with it")
        return steering.steer(model, noise, process=process, prediction=prediction, solver=solver, steps=steps,
                              schedule=schedule, t_start=t_start, t_end=t_end, denoise_to_zero=denoise_to_zero,
                              generator=generator, callback=callback, progress=progress, differentiable=differentiable,
                              x0_fn=x0_fn, model_kwargs=model_kwargs, **options)  # fmt: skip
    _check_scalar_time("t_start", t_start)
    _check_scalar_time("t_end", t_end)
    if solver == "auto":
        return _sample_auto(model, noise, process, prediction, nfe, tuning, schedule, t_start, t_end, options,
                            denoise_to_zero=denoise_to_zero, generator=generator, callback=callback, progress=progress,
                            differentiable=differentiable, x0_fn=x0_fn, model_kwargs=model_kwargs)  # fmt: skip
    if nfe is not None or tuning is not None:
        raise ValueError("nfe and tuning are used only with solver='auto'; with a named solver, pass steps")
    spec = get_solver(solver)
    spec.check_options(options)
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    check_prediction(prediction)
    if x0_fn is not None and not callable(x0_fn):
        raise TypeError(f"x0_fn must be None or a callable x0 -> x0 (e.g. fewstep.StaticClipping()), got {type(x0_fn).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or a callable taking a dict, got {type(callback).__name__}")
    if not callable(model):
        raise TypeError(f"model must be a callable model(x, t) -> Tensor, got {type(model).__name__}")
    steps = check_steps(steps)
    _check_noise(noise)
    _check_generator(generator, noise.shape[0])
    if model_kwargs is not None:
        model = KeywordModel(model, model_kwargs, noise.shape[0])
        if options.get("per_sample") and noise.shape[0] > 1:  # one solver run per sample: one call of sample each
            return _per_sample(model, noise, process=process, prediction=prediction, solver=solver, steps=steps,
                               schedule=schedule, t_start=t_start, t_end=t_end, denoise_to_zero=denoise_to_zero,
                               generator=generator, callback=callback, progress=progress, differentiable=differentiable,
                               x0_fn=x0_fn, **options)  # fmt: skip
    for name, flag in (("denoise_to_zero", denoise_to_zero), ("progress", progress), ("differentiable", differentiable)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {name}={flag!r}")
    if isinstance(schedule, PreparedGrid):
        grid = schedule.checked(process, steps, t_start, t_end)
    else:  # validates the times, their order and the grid
        grid = prepare_grid(process, steps, schedule, t_start=t_start, t_end=t_end)
    ts, sigma_end = grid.ts, grid.sigma_end
    final_denoise = denoise_to_zero and sigma_end > 0 and not spec.returns_x0  # a consistency sampler ends on x0
    denoiser = Denoiser(model, process, prediction, x0_fn=x0_fn, solver=solver)
    run = Run(
        denoiser,
        ts,
        values=grid.values,
        lower_order_final=not final_denoise and sigma_end > 0 and steps < LOWER_ORDER_FINAL_BELOW,
        generator=generator,
        callback=callback,
        progress=progress,
    )
    _check_evaluation_times(run, grid.values, prediction, final_denoise)
    with torch.enable_grad() if differentiable else torch.no_grad():
        x = run.sigma[0] * noise
        x = spec.fn(run, x, **options)
        if final_denoise:
            denoiser.step = run.steps
            x = run.denoise(x, run.steps).x0
        denoiser.flag_state(x, run.steps, run.t[-1])
    denoiser.raise_if_not_finite()
    x.nfe = denoiser.nfe
    return x


class PreparedGrid(NamedTuple):
    """A time grid ts [steps + 1] validated for a process, with what `sample` computes from it (`GridValues`, the
    sigma at its end): `sample(..., schedule=prepare_grid(...))` skips that work, for many runs on one grid (as
    `FewstepScheduler` makes at every `set_timesteps`). It sets t_start and t_end itself (its first and last time)."""

    ts: torch.Tensor
    values: GridValues
    sigma_end: float

    def checked(self, process: Process, steps: int, t_start: float | None = None, t_end: float | None = None) -> PreparedGrid:
        """Itself, or a ValueError naming `schedule` when it was prepared for another process or step count (or naming
        t_start / t_end when they are given: the prepared grid fixes them)."""
        if t_start is not None or t_end is not None:
            raise ValueError("t_start and t_end are set by the grid when schedule is a PreparedGrid; prepare it with them")
        if self.values.process is not process:
            raise ValueError(f"schedule is a PreparedGrid of {self.values.process!r}, not of process={process!r}")
        if len(self.values.t) != steps + 1:
            n = len(self.values.t) - 1
            raise ValueError(f"schedule is a PreparedGrid of {n} steps but steps={steps}; pass steps={n}")
        return self


def prepare_grid(
    process: Process, steps: int, schedule: ScheduleLike = None, *, t_start: float | None = None, t_end: float | None = None
) -> PreparedGrid:
    """The `PreparedGrid` of `time_grid(process, steps, t_start, t_end, schedule)`, with `sample`'s defaults
    (t_start = process.t_max, t_end = process.t_min); raises what `time_grid` raises."""
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    t_start = process.t_max if t_start is None else t_start
    t_end = process.t_min if t_end is None else t_end
    ts = time_grid(process, steps, t_start, t_end, schedule)
    return PreparedGrid(ts, grid_values(process, ts), float(process.sigma(float(ts[-1]))))


class KeywordModel:
    """`model(x, t, **kwargs)` as a fewstep model `(x, t) -> Tensor` (the `model_kwargs` of `sample`).

    kwargs: conditioning for a batch of `batch` samples; tensors of shape [batch, ...] are passed as they are, tensors
    of shape [1, ...] are broadcast (expanded, no copy), other values and 0-d tensors are passed unchanged; nested
    dicts (diffusers' `added_cond_kwargs`) likewise. The model's `nfe_per_call` (guidance) is forwarded.
    """

    def __init__(self, model: Callable[..., torch.Tensor], kwargs: dict[str, Any], batch: int, name: str = "model_kwargs"):
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError(f"{name} must be a dict of keyword arguments for the model, got {type(kwargs).__name__}")
        self.model, self.batch = model, batch
        self.kwargs = _broadcast_kwargs(kwargs, batch, name)

    @property
    def nfe_per_call(self) -> int:
        return getattr(self.model, "nfe_per_call", 1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch:
            raise ValueError(
                f"model_kwargs hold conditioning for {self.batch} samples but the solver evaluated {x.shape[0]}; "
                "pass the conditioning of exactly the samples in noise"
            )
        return self.model(x, t, **self.kwargs)


def _broadcast_kwargs(kwargs: dict[str, Any], batch: int, name: str) -> dict[str, Any]:
    """kwargs with [1, ...] tensors expanded to [batch, ...]; a ValueError naming `name[key]` for another batch size."""
    out = {}
    for key, value in kwargs.items():
        where = f"{name}[{key!r}]"
        if isinstance(value, dict):
            value = _broadcast_kwargs(value, batch, where)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1:
            if value.shape[0] == 1 and batch != 1:
                value = value.expand(batch, *value.shape[1:])
            elif value.shape[0] != batch:
                raise ValueError(
                    f"{where} has shape {tuple(value.shape)}: its first axis must be the batch of noise ({batch}) or 1 "
                    "(broadcast to every sample)"
                )
        out[key] = value
    return out


def _check_scalar_time(name: str, value: Any) -> None:
    """t_start / t_end: None or one number; a ValueError saying so for a tensor or sequence of several times."""
    several = isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.numel() > 1)
    if several:
        raise ValueError(
            f"{name} must be a number; per-sample times ({name} as a tensor or list of shape [batch]) are not supported "
            f"by fewstep.sample: call it once per group of samples that share {name}"
        )


def _per_sample(model: KeywordModel, noise: torch.Tensor, *, generator, **common) -> torch.Tensor:
    """`sample` of a per-sample solver (dpm_adaptive(per_sample=True)) with model_kwargs: one run per sample, each
    with its own rows of the conditioning."""
    rows, nfe = [], 0
    for b in range(noise.shape[0]):
        g = generator[b : b + 1] if isinstance(generator, (list, tuple)) else generator
        model_b = KeywordModel(model.model, reindex(model.kwargs, torch.tensor([b]), noise.shape[0]), 1)
        x = sample(model_b, noise[b : b + 1], generator=g, **common)
        rows.append(x)
        nfe += x.nfe
    x = torch.cat(rows)
    x.nfe = nfe
    return x


def _sample_auto(model, noise, process, prediction, nfe, tuning, schedule, t_start, t_end, options, **common) -> torch.Tensor:
    """`sample(..., solver="auto")`: run the configuration `fewstep.tuning.choose` picks; x.choice records it."""
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise ValueError(f"solver='auto' picks solver, steps and grid for an NFE budget: pass nfe=<int >= 2>, got nfe={nfe!r}")
    if schedule is not None or options:
        given = ["schedule"] * (schedule is not None) + sorted(options)
        raise ValueError(f"solver='auto' chooses the grid and the solver options itself; do not pass {', '.join(given)}")
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    check_prediction(prediction)
    kwargs, record = choose(model, process, prediction, nfe, tuning=tuning, t_start=t_start, t_end=t_end)
    if "denoise_to_zero" in kwargs:  # part of the plan: it decides the evaluation count
        common.pop("denoise_to_zero")
    corrections = kwargs.pop("corrections", None)
    if corrections is not None:  # learned per-evaluation corrections (fewstep.corrections): a fresh wrapper per run
        model, prediction = corrections.wrap(model, process, prediction), "x0"
    x = sample(model, noise, process=process, prediction=prediction, **kwargs, **common)
    x.choice = record
    return x


def _check_noise(noise: torch.Tensor) -> None:
    """noise: a finite floating-point tensor [batch, ...] with batch >= 1 (one host sync, before sampling)."""
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        got = f"a {noise.dtype} tensor of shape {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise TypeError(f"noise must be a floating-point tensor of shape [batch, ...], got {got}")
    if noise.shape[0] == 0 or noise.numel() == 0:
        raise ValueError(f"noise must hold at least one sample with at least one value, got shape {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise.detach()).all()):
        raise ValueError("noise contains NaN or Inf: sampling needs finite standard normal noise (the model was not called)")


def _check_generator(generator: Any, batch: int) -> None:
    """generator: None, a torch.Generator, a list of `batch` generators, or a noise source callable(x, t_from, t_to)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator as a list must hold one torch.Generator per sample ({batch}), got {len(generator)}")
        return
    if not callable(generator):
        raise TypeError(
            "generator must be None, a torch.Generator, a list of per-sample generators or a noise source "
            f"callable(x, t_from, t_to); got {type(generator).__name__}"
        )


def _check_evaluation_times(run: Run, values: GridValues, prediction: str, final_denoise: bool) -> None:
    """Reject up front a prediction that cannot give (x0, eps) at a grid time where the solvers evaluate the model.

    Solvers evaluate at the grid points 0..steps-1 (and at steps with the final denoising); off-grid stage times lie
    strictly inside a step, where alpha and sigma are positive.
    """
    last = run.steps if final_denoise else run.steps - 1
    for i in range(last + 1):
        name = "t_start" if i == 0 else "t_end" if i == run.steps else f"schedule[{i}]"
        check_convertible(prediction, run.process, run.t[i], name, values.coefficients[i])
