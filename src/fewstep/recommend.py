"""Recommended solver and grid per NFE budget, chosen from measurements (`fewstep bench accuracy --peers`, README).

Measured on the exact Gaussian-mixture problems (ring2d, mixture16d; DiscreteVP linear betas, eps model: error
against the exact flow map for every deterministic solver x six grids at NFE 5-20) and checked on the shipped
digits model (FD). Up to 8 evaluations: DEIS order 3 on a log-SNR grid (Zhang & Chen, "Fast Sampling of Diffusion
Models with Exponential Integrator", ICLR 2023; identical here to multistep DPM-Solver-3 in noise prediction);
from 9 on: iPNDM (fourth-order Adams-Bashforth on eps with the DDIM transfer and lower-order warm-up, same paper)
on a log-SNR grid. Heun on a log-SNR grid is more accurate on the exact problems at 5 evaluations, but its two
huge steps send a learned model far out of distribution (digits FD 158 against 10 for DEIS), so it is not
recommended. Where the log-SNR is infinite at an end of the time range (RectifiedFlow from t = 1), the grid falls
back to "time_uniform".
"""

from __future__ import annotations

import math
from typing import Any

from .checks import MAX_STEPS
from .processes import Process

# (largest NFE of the band, solver, grid, solver options)
RECOMMENDED: tuple[tuple[float, str, str, dict[str, Any]], ...] = (
    (8, "deis", "logsnr", {}),
    (math.inf, "ipndm", "logsnr", {}),
)


def recommended(nfe: int, process: Process, *, t_start: float | None = None, t_end: float | None = None) -> dict[str, Any]:
    """Keyword arguments for `fewstep.sample` that use exactly `nfe` evaluations with the recommended solver and grid.

    Returns solver, steps, schedule, denoise_to_zero and options, e.g. `fewstep.sample(model, noise,
    process=process, **fewstep.recommended(10, process))`. Every recommended solver costs one evaluation per step,
    so the plan needs no dry run: nfe - 1 steps and the final denoising where sigma(t_end) > 0, else nfe steps
    (tests/test_recommend.py checks the count on every process).
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 2 <= nfe <= MAX_STEPS:
        raise ValueError(f"nfe must be an integer >= 2 (and <= {MAX_STEPS}) for a recommendation, got nfe={nfe!r}")
    solver, schedule, options = next((s, g, o) for top, s, g, o in RECOMMENDED if nfe <= top)
    lo = process.check_time(process.t_min if t_end is None else t_end, "t_end")
    hi = process.check_time(process.t_max if t_start is None else t_start, "t_start")
    if not (math.isfinite(float(process.log_snr(lo))) and math.isfinite(float(process.log_snr(hi)))):
        schedule = "time_uniform"
    denoise = float(process.sigma(lo)) > 0  # the final data prediction costs one more evaluation
    kwargs = dict(solver=solver, steps=nfe - 1 if denoise else nfe, schedule=schedule, denoise_to_zero=denoise, **options)
    kwargs.update({k: v for k, v in (("t_start", t_start), ("t_end", t_end)) if v is not None})
    return kwargs
