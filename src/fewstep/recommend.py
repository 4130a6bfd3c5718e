"""Recommended solver and grid per NFE budget (the fallback of `fewstep.sample(..., solver="auto")`), chosen from
measurements on exact Gaussian mixtures and on learned models.

VP processes (DiscreteVP, VP) below QUADRATIC_FROM_NFE = 25 evaluations follow VP_BANDS / VP_NOISY_BANDS: the grid
stops early, at log-SNR (log alpha/sigma) 1 / 2 / 3 depending on the budget, and the final evaluation denoises from
there. A learned network's trajectory is hardest to follow near the data, where a few-step grid has its longest
steps: one data prediction from a moderate noise level is more accurate than extrapolated steps into it (diffusers'
few-step grids stop at t = 0.1-0.2 for the same reason), and the more evaluations, the later the grid can stop.
Where the process starts at a moderate log-SNR (>= NOISY_END_LOG_SNR = -6: DDPM linear betas, -5.1; continuous VP):
DEIS order 3 on the log-SNR grid (Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator",
ICLR 2023), UniPC-2 on the quadratic grid at 3 evaluations. Where it starts deeper in noise (the Improved-DDPM cosine
betas, clipped at 0.999: -9.9; zero terminal SNR, -inf, started like rectified flow at log-SNR FLOW_START_LOG_SNR):
UniPC-2 (bh2; Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
NeurIPS 2023), time-uniform up to 10 evaluations (its steps at high noise keep samples near a mode boundary in their
mode), then quadratic (uniform in sqrt(t): t_i = (sqrt(t_max) + (sqrt(t_end) - sqrt(t_max)) i / n)^2). Chosen
with `scripts/vp_fallback.py` (noise seed 4; 75 solver x grid x end candidates on digits_vp, digits_cosine_v, two
MLPs and exact mixtures; ratio of the RMS error to the best of diffusers' 15 configurations at equal NFE). No
candidate wins on every network (digits_vp wants the quadratic grid, a moons MLP the log-SNR one); DEIS / log-SNR is
the compromise on linear betas. Held out
(`scripts/vp_rule_heldout.py`, noise seed 2) at NFE 3-20: digits_vp 0.84-1.06 (the former rule, DEIS / iPNDM on the
log-SNR grid to t_min: 0.27-1.60), digits_cosine_v 0.87-1.08 (former, iPNDM on the quadratic grid: 0.99-2.08); a
circles MLP the rule never saw 0.68-1.74; held-out exact mixtures 0.29-1.42 (README, "Recommended defaults"). Heun on
a log-SNR grid wins the exact problems at 5 evaluations, but its two huge steps send a learned model far out of
distribution (digits FD 158 against 10 for DEIS): never a default; neither is iPNDM at 5 evaluations (digits FD 91).

From QUADRATIC_FROM_NFE evaluations on, a VP process gets iPNDM (fourth-order Adams-Bashforth on eps with the DDIM
transfer, same paper) on the quadratic grid to t_min: better than the log-SNR grid in every measured cell at NFE
20 / 30 / 50 (exact mixtures on linear DiscreteVP and continuous VP: 1.0-3.5x lower error; learned digits_vp at NFE
20: 0.0078 against 0.0335); below 25 the early end wins on the MLPs (moons at NFE 20: 1.52x the best peer against
4.50x).

Other processes (EDM, VE) keep the exact-mixture rule: DEIS order 3 up to 8 evaluations, iPNDM from 9, on the
log-SNR grid to t_min; no learned model of theirs is measured.

Rectified flow (log-SNR -inf at t_max) gets UniPC-2 on the time-uniform grid starting at log-SNR FLOW_START_LOG_SNR
= -6.9 (t = 0.999, from x = 0.999 * noise), diffusers' flow configuration: from t_max the first evaluation (log-SNR
-inf) cannot enter a multistep formula, so the second step is first order and the corrector skips the first step;
from a finite log-SNR both hold. Measured (`scripts/flow_start.py`, ratio to the best diffusers configuration at
equal NFE 3-20): held-out exact mixtures 0.96-1.02 except ring2d at NFE 8-15 (1.10, 1.34, 1.58; the former rule,
DEIS / iPNDM from t_max: 1.15, 1.21, 1.28, and 1.05-1.68 elsewhere); learned digits_flow, calibration seed 0:
0.96-0.99 at NFE 3-15 (the former rule 1.04-1.69). The grid ends at t_min (an early end was worse on digits_flow).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .checks import MAX_STEPS
from .processes import Process, RectifiedFlow, _VPBase

# EDM, VE: (largest NFE of the band, solver, grid, solver options); every solver here costs one evaluation per step
RECOMMENDED: tuple[tuple[float, str, str, dict[str, Any]], ...] = (
    (8, "deis", "logsnr", {}),
    (math.inf, "ipndm", "logsnr", {}),
)
# VP processes below QUADRATIC_FROM_NFE: (largest NFE of the band, solver, grid, log-SNR where the grid ends or None
# for t_min); VP_NOISY_BANDS where the process starts below log-SNR NOISY_END_LOG_SNR (module doc)
VP_BANDS: tuple[tuple[int, str, str, float | None], ...] = (
    (3, "unipc", "quadratic", 1.0),
    (10, "deis", "logsnr", 2.0),
    (24, "deis", "logsnr", 3.0),
)
NOISY_END_LOG_SNR = -6.0
VP_NOISY_BANDS: tuple[tuple[int, str, str, float | None], ...] = (
    (4, "unipc", "time_uniform", 1.0),
    (10, "unipc", "time_uniform", 2.0),
    (14, "unipc", "quadratic", 3.0),
    (24, "unipc", "quadratic", None),
)
QUADRATIC_FROM_NFE = 25  # VP processes from here on: iPNDM on the quadratic grid to t_min
# rectified flow: UniPC on the time-uniform grid; it, and a VP process whose log-SNR is -inf at t_max, start at
# log-SNR FLOW_START_LOG_SNR (module doc)
RECOMMENDED_FLOW: tuple[str, str, dict[str, Any]] = ("unipc", "time_uniform", {})
FLOW_START_LOG_SNR = -6.9


def recommended(nfe: int, process: Process, *, t_start: float | None = None, t_end: float | None = None) -> dict[str, Any]:
    """Keyword arguments for `fewstep.sample` that use exactly `nfe` evaluations with the recommended solver and grid.

    Returns solver, steps, schedule, denoise_to_zero and options, e.g. `fewstep.sample(model, noise,
    process=process, **fewstep.recommended(10, process))`. Every recommended solver costs one evaluation per step,
    so the plan needs no dry run: nfe - 1 steps and the final denoising where sigma(t_end) > 0, else nfe steps
    (tests/test_recommend.py checks the count on every process). Without `t_end`, a VP grid of fewer than
    QUADRATIC_FROM_NFE evaluations ends early (VP_BANDS; returned as t_end); without `t_start`, a process whose
    log-SNR is -inf at t_max (rectified flow, zero terminal SNR) starts at log-SNR FLOW_START_LOG_SNR (returned as
    t_start; see the module doc).
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 2 <= nfe <= MAX_STEPS:
        raise ValueError(f"nfe must be an integer >= 2 (and <= {MAX_STEPS}) for a recommendation, got nfe={nfe!r}")
    lo = process.check_time(process.t_min if t_end is None else t_end, "t_end")
    hi = process.check_time(process.t_max if t_start is None else t_start, "t_start")
    start_log_snr, end_log_snr = float(process.log_snr(hi)), float(process.log_snr(lo))
    if t_start is None and start_log_snr == -math.inf and isinstance(process, (RectifiedFlow, _VPBase)):
        t_start = hi = _t_at(process, FLOW_START_LOG_SNR)
        start_log_snr = FLOW_START_LOG_SNR
    if isinstance(process, RectifiedFlow):
        solver, schedule, options = RECOMMENDED_FLOW
    elif isinstance(process, _VPBase) and nfe >= QUADRATIC_FROM_NFE:
        solver, schedule, options = "ipndm", "quadratic", {}
    elif isinstance(process, _VPBase):
        bands = VP_NOISY_BANDS if start_log_snr < NOISY_END_LOG_SNR else VP_BANDS
        solver, schedule, stop = next((s, g, e) for top, s, g, e in bands if nfe <= top)
        options: dict[str, Any] = {}
        if t_end is None and stop is not None and start_log_snr < stop < end_log_snr:
            t_end = lo = _t_at(process, stop)
    else:
        solver, schedule, options = next((s, g, o) for top, s, g, o in RECOMMENDED if nfe <= top)
    if schedule == "logsnr" and not (math.isfinite(start_log_snr) and math.isfinite(float(process.log_snr(lo)))):
        schedule = "time_uniform"  # a log-SNR grid needs a finite log-SNR at both ends
    if schedule == "quadratic" and lo < 0:
        schedule = "time_uniform"  # the quadratic grid needs t >= 0
    denoise = float(process.sigma(lo)) > 0  # the final data prediction costs one more evaluation
    kwargs = dict(solver=solver, steps=nfe - 1 if denoise else nfe, schedule=schedule, denoise_to_zero=denoise, **options)
    kwargs.update({k: v for k, v in (("t_start", t_start), ("t_end", t_end)) if v is not None})
    return kwargs


def _t_at(process: Process, log_snr: float) -> float:
    return float(process.t_from_log_snr(torch.tensor(log_snr, dtype=torch.float64)))
