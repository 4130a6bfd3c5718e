"""Recommended solver and grid per NFE budget (the fallback of `fewstep.sample(..., solver="auto")`), chosen from
measurements on exact Gaussian mixtures and on learned models.

The grid depends on how far the process reaches into pure noise. Where the log-SNR at the start is moderate
(>= NOISY_END_LOG_SNR = -6: DDPM linear betas, -5.1; EDM, VE, continuous VP), a log-SNR grid: DEIS order 3 up to 8
evaluations (Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023; identical here
to multistep DPM-Solver-3 in noise prediction), iPNDM from 9 on (fourth-order Adams-Bashforth on eps with the DDIM
transfer, same paper). Where it is finite but far lower (the Improved-DDPM cosine betas, clipped at 0.999: -9.9 at
t = 1), a log-SNR grid spends most of its steps where the data is invisible (digits_cosine_v at 7 steps: 4 of them
above t = 0.98), so iPNDM on the quadratic grid (t quadratic in the step index) at every budget: worst ratio to the
best fixed configuration at NFE 3-15 of 1.3-1.7 on the learned cosine model and 1.0-1.4 on exact mixtures, where
the log-SNR rule gave 1.3-3.5 and 2.5-6.4 (README, "Recommended defaults"). The threshold -6 lies between the two
measured schedules; schedules in between are not measured. Where the log-SNR is -inf at the start of a VP process
(zero terminal SNR) the log-SNR rule runs on a time-uniform grid.

Rectified flow (log-SNR -inf at t_max) gets UniPC-2 (bh2, Zhao et al., NeurIPS 2023) on the time-uniform grid
starting at log-SNR FLOW_START_LOG_SNR = -6.9 (t = 0.999, from x = 0.999 * noise), diffusers' flow configuration:
from t_max the first evaluation (log-SNR -inf) cannot enter a multistep formula, so the second step is first order
and the corrector skips the first step; from a finite log-SNR both hold. Measured (`scripts/flow_start.py`, ratio
to the best diffusers configuration at equal NFE 3-20): held-out exact mixtures 0.96-1.02 except ring2d at NFE
8-15 (1.10, 1.34, 1.58; the former rule, DEIS / iPNDM from t_max: 1.15, 1.21, 1.28, and 1.05-1.68 elsewhere);
learned digits_flow, calibration seed 0: 0.96-0.99 at NFE 3-15 (the former rule 1.04-1.69). iPNDM from log-SNR -5
is better on the network (0.86-0.96) but 1.1-1.35 on the mixtures. Heun on a log-SNR grid wins the
exact problems at 5 evaluations, but its two huge steps send a learned model far out of distribution (digits FD 158
against 10 for DEIS): never a default.

From QUADRATIC_FROM_NFE = 20 evaluations on, a VP process (DiscreteVP, VP) gets the quadratic grid: iPNDM there
was better than on the log-SNR grid in every measured cell at NFE 20 / 30 / 50 (exact mixtures on linear DiscreteVP
and continuous VP: 1.0-3.5x lower error; learned digits_vp at NFE 20: 0.0078 against 0.0335), mixed at 15-16.
Not on EDM / VE, where time is sigma and the quadratic grid is 10-50x worse.

Where the grid ends: at EARLY_END_NFES = 4-5 evaluations on a process whose log-SNR at t_min is finite (VP, EDM,
VE), the grid stops at log-SNR EARLY_END_LOG_SNR = 2 and the final evaluation denoises from there (as diffusers'
few-step grids do, which stop at t = 0.1-0.2): the last steps of a short grid are too long for the solver near the
data, and one data prediction from log-SNR 2 is more accurate than more extrapolated steps. Measured with the
fallback's own solver and grid (`scripts/early_end.py`, RMS error to the model's 200-step reference, FD in
brackets): digits_vp NFE 4 0.365 (FD 122) -> 0.194 (25), NFE 5 0.192 (24) -> 0.161 (15); digits_cosine_v NFE 4
0.264 (49) -> 0.179 (17), NFE 5 0.183 (22) -> 0.134 (13); on held-out exact mixtures better in 4 of 6 cells at NFE
4 and 3 of 6 at NFE 5 (worst 1.05x). Not at NFE 3 (digits_vp: FD 43 -> 162; linear-beta mixtures up to 1.3x
worse), not from 6 on (cosine-beta mixtures up to 1.4x worse), and not on rectified flow (digits_flow NFE 5:
0.091 -> 0.097, FD 7.8 -> 8.6).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .checks import MAX_STEPS
from .processes import Process, RectifiedFlow, _VPBase

# (largest NFE of the band, solver, grid, solver options); every solver here costs one evaluation per step
RECOMMENDED: tuple[tuple[float, str, str, dict[str, Any]], ...] = (
    (8, "deis", "logsnr", {}),
    (math.inf, "ipndm", "logsnr", {}),
)
# where the process starts deep in pure noise (a finite log-SNR below NOISY_END_LOG_SNR at t_start)
NOISY_END_LOG_SNR = -6.0
RECOMMENDED_NOISY_END: tuple[tuple[float, str, str, dict[str, Any]], ...] = ((math.inf, "ipndm", "quadratic", {}),)
# rectified flow: UniPC on the time-uniform grid from log-SNR FLOW_START_LOG_SNR (module doc)
RECOMMENDED_FLOW: tuple[tuple[float, str, str, dict[str, Any]], ...] = ((math.inf, "unipc", "time_uniform", {}),)
FLOW_START_LOG_SNR = -6.9
# few-step grids on VP processes end early (module doc)
QUADRATIC_FROM_NFE = 20  # VP processes from here on: the quadratic grid (module doc)
EARLY_END_NFES = range(4, 6)
EARLY_END_LOG_SNR = 2.0


def recommended(nfe: int, process: Process, *, t_start: float | None = None, t_end: float | None = None) -> dict[str, Any]:
    """Keyword arguments for `fewstep.sample` that use exactly `nfe` evaluations with the recommended solver and grid.

    Returns solver, steps, schedule, denoise_to_zero and options, e.g. `fewstep.sample(model, noise,
    process=process, **fewstep.recommended(10, process))`. Every recommended solver costs one evaluation per step,
    so the plan needs no dry run: nfe - 1 steps and the final denoising where sigma(t_end) > 0, else nfe steps
    (tests/test_recommend.py checks the count on every process). Without `t_end`, a VP grid of at most
    4-5 evaluations ends at log-SNR EARLY_END_LOG_SNR (returned as t_end); without `t_start`, a rectified-flow grid
    starts at log-SNR FLOW_START_LOG_SNR (returned as t_start; see the module doc).
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 2 <= nfe <= MAX_STEPS:
        raise ValueError(f"nfe must be an integer >= 2 (and <= {MAX_STEPS}) for a recommendation, got nfe={nfe!r}")
    lo = process.check_time(process.t_min if t_end is None else t_end, "t_end")
    hi = process.check_time(process.t_max if t_start is None else t_start, "t_start")
    start_log_snr, end_log_snr = float(process.log_snr(hi)), float(process.log_snr(lo))
    if t_end is None and nfe in EARLY_END_NFES and math.isfinite(end_log_snr) and start_log_snr < EARLY_END_LOG_SNR < end_log_snr:
        t_end = lo = float(process.t_from_log_snr(torch.tensor(EARLY_END_LOG_SNR, dtype=torch.float64)))
    noisy_end = math.isfinite(start_log_snr) and start_log_snr < NOISY_END_LOG_SNR
    bands = RECOMMENDED_NOISY_END if noisy_end else RECOMMENDED
    if isinstance(process, RectifiedFlow):
        bands = RECOMMENDED_FLOW
        if t_start is None and start_log_snr < FLOW_START_LOG_SNR:
            t_start = hi = float(process.t_from_log_snr(torch.tensor(FLOW_START_LOG_SNR, dtype=torch.float64)))
            start_log_snr = FLOW_START_LOG_SNR
    solver, schedule, options = next((s, g, o) for top, s, g, o in bands if nfe <= top)
    if nfe >= QUADRATIC_FROM_NFE and isinstance(process, _VPBase):
        schedule = "quadratic"
    if schedule == "logsnr" and not (math.isfinite(start_log_snr) and math.isfinite(float(process.log_snr(lo)))):
        schedule = "time_uniform"  # a log-SNR grid needs a finite log-SNR at both ends
    if schedule == "quadratic" and lo < 0:
        schedule = "time_uniform"  # the quadratic grid needs t >= 0
    denoise = float(process.sigma(lo)) > 0  # the final data prediction costs one more evaluation
    kwargs = dict(solver=solver, steps=nfe - 1 if denoise else nfe, schedule=schedule, denoise_to_zero=denoise, **options)
    kwargs.update({k: v for k, v in (("t_start", t_start), ("t_end", t_end)) if v is not None})
    return kwargs
