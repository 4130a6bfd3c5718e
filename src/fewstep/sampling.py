"""The public entry point `fewstep.sample`: solve the probability-flow ODE (or SDE) from noise to data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .grids import ScheduleLike, time_grid
from .parameterization import Denoiser, Model, check_prediction
from .processes import Process
from .solvers import Run, get_solver, solver_specs

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
    **options: Any,
) -> torch.Tensor:
    """Sample from a diffusion or flow model with `steps` solver steps; returns x0 [batch, ...].

    model: callable `model(x, t) -> Tensor` predicting `prediction` ("eps", "x0", "v", "velocity", "score"),
        with x [batch, ...] and t [batch] in the process's own time.
    noise: standard normal [batch, ...]; sampling starts at x = sigma(t_start) * noise, t_start = process.t_max.
    schedule: a grid name (see `fewstep.SCHEDULES`), a `fewstep.Schedule(name, rho=...)` with parameters, a
        decreasing tensor of steps + 1 times, a searched schedule (`fewstep.optimize_schedule`), or None for the
        process's default.
    denoise_to_zero: finish with the data prediction at t_end (one more evaluation, skipped where sigma(t_end) = 0).
        Otherwise multistep solvers lower their order over the last steps when steps < 15.
    differentiable: keep the autograd graph through the solver: gradients with respect to the model's parameters
        or the noise (e.g. for distillation); the grid times are constants.
    x0_fn: post-processing of every data prediction, x0 [batch, ...] -> x0 (thresholding or clipping, see
        `fewstep.guidance`); the noise prediction is made consistent with it.
    options: solver-specific options (see `fewstep solvers`).
    The result carries the number of network evaluations used as the attribute `nfe`.
    """
    spec = get_solver(solver)
    spec.check_options(options)
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    check_prediction(prediction)
    if x0_fn is not None and not callable(x0_fn):
        raise TypeError(f"x0_fn must be None or a callable x0 -> x0 (e.g. fewstep.StaticClipping()), got {type(x0_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise TypeError("noise must be a floating-point tensor of shape [batch, ...]")
    t_start = process.check_time(process.t_max if t_start is None else t_start, "t_start")
    t_end = process.check_time(process.t_min if t_end is None else t_end, "t_end")
    if not t_start > t_end:
        raise ValueError(f"need t_start > t_end (sampling runs from noise to data), got t_start={t_start}, t_end={t_end}")
    ts = time_grid(process, steps, t_start, t_end, schedule)
    sigma_end = float(process.sigma(float(ts[-1])))
    final_denoise = denoise_to_zero and sigma_end > 0
    denoiser = Denoiser(model, process, prediction, x0_fn=x0_fn)
    run = Run(
        denoiser,
        ts,
        lower_order_final=not final_denoise and sigma_end > 0 and steps < LOWER_ORDER_FINAL_BELOW,
        generator=generator,
        callback=callback,
        progress=progress,
    )
    with torch.enable_grad() if differentiable else torch.no_grad():
        x = run.sigma[0] * noise
        x = spec.fn(run, x, **options)
        if final_denoise:
            x = run.denoise(x, run.steps).x0
    denoiser.raise_if_not_finite()
    x.nfe = denoiser.nfe
    return x
