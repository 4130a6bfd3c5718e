"""Inversion, data -> noise: a deterministic solver run backwards, or BDIA, exact up to round-off.

- method="solver": the solver (default DDIM) on the reversed time grid, t_end -> t_start ("DDIM inversion", Song et
  al., ICLR 2021, section 4.3; Dhariwal & Nichol, 2021). Its error shrinks at the solver's order but is not zero: the
  model is evaluated where the backward step starts, the forward step where it ends.
- method="bdia": BDIA-DDIM (Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via Bi-directional Integration
  Approximation", ECCV 2024). Sampling keeps two states and takes x_{i+1} = gamma (x_{i-1} - D(x_i; t_i -> t_{i-1}))
  + D(x_i; t_i -> t_{i+1}), with D(x; t_i -> s) = alpha_s x0(x, t_i) + sigma_s eps(x, t_i) the DDIM map evaluated
  at x_i only (gamma = 0 is DDIM; the first step is DDIM). Each step solves exactly for x_{i-1}, so inverting from
  the pair (x_{N-1}, x_N) and regenerating reproduce the data to round-off. The latent is the pair (x_0, x_1): the
  noise z = x_0 / sigma_0 plus the state x_1 (`z.companion`), which `regenerate` uses.

x0: the state at the last grid time t_end [batch, ...] (what `fewstep.sample(..., denoise_to_zero=False)` returns);
the result is noise z [batch, ...] with `fewstep.sample(model, z, ...)` ~ x0. Every operation is per sample, so the
result does not depend on the batch. Attributes: nfe, method, companion (BDIA: the state at t_1, else None).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_real, check_steps
from ..grids import ScheduleLike, time_grid
from ..parameterization import Coefficients, Denoiser, Model, check_convertible
from ..processes import Process
from ..sampling import sample
from ..solvers import Run, get_solver

METHODS = ("solver", "bdia")
# plans, controllers or searches tied to decreasing t; lms: its Adams steps in sigma / alpha are unstable backwards
NOT_REVERSIBLE = ("dpm_adaptive", "dpm_solver_v3", "dc_solver", "time_shift", "lms")
# solvers whose backward run stays finite on a grid with sigma(t_end) = 0 or alpha(t_start) = 0 (log-SNR steps infinite)
ENDPOINT_SAFE = ("ddim", "euler", "heun", "dpm_solver_2", "dpmpp_2s", "ipndm")


def invert(
    model: Model,
    x0: torch.Tensor,
    *,
    process: Process,
    prediction: str = "eps",
    solver: str = "ddim",
    steps: int = 10,
    schedule: ScheduleLike = None,
    t_start: float | None = None,
    t_end: float | None = None,
    method: str = "solver",
    gamma: float = 1.0,
    x0_fn: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Noise z [batch, ...] whose sample (with the same settings) is x0 [batch, ...] (see the module doc).

    method "solver": any deterministic solver but dpm_adaptive, dpm_solver_v3, dc_solver and time_shift, with its
    options; "bdia": exact, solver must be "ddim" (BDIA-DDIM), 0 < gamma <= 1 (1: no amplification of round-off).
    """
    run, gamma = _setup(model, x0, process, prediction, solver, steps, schedule, t_start, t_end, method, gamma, x0_fn, options)
    with torch.no_grad():
        if method == "solver":
            back = Run(run.denoiser, torch.tensor(run.t[::-1], dtype=torch.float64))
            x = get_solver(solver).fn(back, x0, **options)
            z, companion = x / run.sigma[0], None
        else:
            z, companion = _bdia_invert(run, x0, gamma)
    run.denoiser.raise_if_not_finite()
    z.nfe, z.method, z.companion = run.denoiser.nfe, method, companion
    return z


def regenerate(
    model: Model,
    z: torch.Tensor,
    *,
    process: Process,
    prediction: str = "eps",
    solver: str = "ddim",
    steps: int = 10,
    schedule: ScheduleLike = None,
    t_start: float | None = None,
    t_end: float | None = None,
    method: str = "solver",
    gamma: float = 1.0,
    x0_fn: Any = None,
    companion: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """The state at t_end from noise z [batch, ...]: `fewstep.sample(..., denoise_to_zero=False)` for "solver", the
    BDIA sampler for "bdia" from the pair (sigma_0 z, companion); companion defaults to `z.companion` (None: a DDIM
    first step, plain BDIA sampling). Returns x [batch, ...] with attribute nfe."""
    if method == "solver":
        _setup(model, z, process, prediction, solver, steps, schedule, t_start, t_end, method, gamma, x0_fn, options)
        return sample(model, z, process=process, prediction=prediction, solver=solver, steps=steps, schedule=schedule,
                      t_start=t_start, t_end=t_end, denoise_to_zero=False, x0_fn=x0_fn, **options)  # fmt: skip
    run, gamma = _setup(model, z, process, prediction, solver, steps, schedule, t_start, t_end, method, gamma, x0_fn, options)
    companion = getattr(z, "companion", None) if companion is None else companion
    if companion is not None and (not isinstance(companion, torch.Tensor) or companion.shape != z.shape):
        raise ValueError(f"companion must be the state at t_1 shaped like z {tuple(z.shape)} (from invert(method='bdia'))")
    with torch.no_grad():
        x = _bdia_sample(run, run.sigma[0] * z, companion, gamma)
    run.denoiser.raise_if_not_finite()
    x.nfe = run.denoiser.nfe
    return x


def _bdia_sample(run: Run, x: torch.Tensor, companion: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """BDIA-DDIM from x_0 (and x_1 = companion, else one DDIM step) to x_N."""
    x_prev, x = x, companion if companion is not None else run.ddim_step(0, run.denoise(x, 0))
    for i in range(1, run.steps):
        run.begin_step(i)
        pred = run.denoise(x, i)
        x_prev, x = x, gamma * (x_prev - run.ddim_step(i, pred, i - 1)) + run.ddim_step(i, pred, i + 1)
    return x


def _bdia_invert(run: Run, x_end: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z = x_0 / sigma_0, x_1) from x_N: x_{N-1} by one backward DDIM step, then each BDIA step solved for x_{i-1}."""
    n = run.steps
    run.begin_step(n)
    x_next, x = x_end, run.ddim_step(n, run.denoise(x_end, n), n - 1)
    for i in range(n - 1, 0, -1):
        run.begin_step(i)
        pred = run.denoise(x, i)
        x_next, x = x, (x_next - run.ddim_step(i, pred, i + 1)) / gamma + run.ddim_step(i, pred, i - 1)
    return x / run.sigma[0], x_next


def _setup(model, x, process, prediction, solver, steps, schedule, t_start, t_end, method, gamma, x0_fn, options):
    """Checks the arguments once; the forward Run (decreasing grid) with a fresh Denoiser, and gamma as a float."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; allowed values: {', '.join(METHODS)}")
    spec = get_solver(solver)
    if spec.stochastic or spec.returns_x0:
        raise ValueError(
            f"inversion needs a deterministic solver: {solver!r} draws fresh noise every step, so no noise maps to the "
            "data exactly; use solver='ddim' (or another ODE solver), or method='bdia'"
        )
    if method == "solver" and solver in NOT_REVERSIBLE:
        raise ValueError(f"solver={solver!r} cannot run backwards (data -> noise); use ddim, dpmpp_2m, unipc, deis, heun ...")
    if method == "bdia":
        if solver != "ddim" or options:
            raise ValueError(f"method='bdia' is BDIA-DDIM: pass solver='ddim' and no solver options, got solver={solver!r}")
        gamma = check_real(gamma, "gamma", positive=True)
        if gamma > 1:
            raise ValueError(f"gamma must be in (0, 1] (BDIA's weight of the backward step), got gamma={gamma!r}")
    spec.check_options(options)
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.VP()), got {type(process).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[0] == 0:
        raise TypeError("x0 / z must be a floating-point tensor of shape [batch, ...] with batch >= 1")
    if not callable(model):
        raise TypeError(f"model must be a callable model(x, t) -> Tensor, got {type(model).__name__}")
    steps = check_steps(steps)
    t_start = process.t_max if t_start is None else t_start
    ts = time_grid(process, steps, t_start, process.t_min if t_end is None else t_end, schedule)
    run = Run(Denoiser(model, process, prediction, x0_fn=x0_fn, solver=solver), ts)
    if method == "solver" and solver not in ENDPOINT_SAFE and (run.sigma[-1] == 0 or run.alpha[0] == 0):
        raise ValueError(
            f"solver={solver!r} cannot invert on a grid that ends at sigma = 0 or starts at alpha = 0 (infinite log-SNR "
            f"steps, e.g. RectifiedFlow's default grid): use one of {', '.join(ENDPOINT_SAFE)}, method='bdia', or "
            "t_end / t_start strictly inside the process's time range"
        )
    for i in range(1, run.steps + 1):  # inversion evaluates at t_1 .. t_N, sampling at t_0 .. t_{N-1}: check them all
        for j in (i - 1, i):
            name = "t_start" if j == 0 else "t_end" if j == run.steps else f"schedule[{j}]"
            c = Coefficients(run.alpha[j], run.sigma[j], run.dalpha[j], run.dsigma[j])
            check_convertible(prediction, process, run.t[j], name, c)
    return run, gamma
