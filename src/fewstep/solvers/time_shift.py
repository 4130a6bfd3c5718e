"""Time-Shift Sampler: query the network at the time whose noise level matches the current sample's variance.

Li, Qu, Yao, Sun & Moens, "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time
Steps", ICLR 2024 (Algorithm 1, TS-DDIM and TS with higher-order solvers).

Exposure bias: during sampling, x at the nominal time t_i does not have the statistics the network saw in
training at t_i. At each step with t_i > `cutoff` the sampler measures the variance of every sample (over its
coordinates) and, among `candidates` times spread uniformly in log-SNR over [lambda_i - window, lambda_i + window]
(kept inside the process range and within 0.45 of the gaps to the neighbouring grid points, so that
shifted times stay ordered), picks the one whose marginal variance
alpha^2 * data_var + sigma^2 is closest. The sample is then treated as lying at that time: the network is queried
there and the base step (DDIM or DPM-Solver++(2M)) runs from it to t_{i+1}. `window` is in log-SNR units (the
paper counts discrete timesteps); `data_var` is the per-coordinate variance of the data (the paper's Var(x_0);
the default 0.25 suits images scaled to [-1, 1]). The variance of one sample over few coordinates is a noisy
estimate: on 2-D ring2d at 10 steps (window 0.3) it lowers DDIM's error on DiscreteVP with a time-uniform grid
(0.110 -> 0.078, data_var 0.51) but not with a log-SNR grid (0.064 -> 0.076), and raises it on EDM (0.077 -> 0.30),
whose sigmas go up to 80.

The choice is per sample and made on the device (argmin over candidates, a gather, a model call with a [batch]
time vector): no host synchronisation. A step whose window holds only its own time is the plain base step, so
window = 0 (or a cutoff above every step) is exactly the base solver. x [batch, ...].
"""

from __future__ import annotations

import math

import torch

from ..parameterization import Prediction
from ._core import Run, register
from ._lagrange import data_step
from ._options import check_choice, check_int, check_number
from .momentum import dpmpp_mean

BASES = ("ddim", "dpmpp_2m")


def candidate_log_snrs(run: Run, i: int, window: float, candidates: int) -> list[float]:
    """Log-SNRs searched at step i: uniform in [lambda_i - window, lambda_i + window], inside the range, < lambda_{i+1}."""
    lam, lam_next = run.log_snr[i], run.log_snr[i + 1]
    if window == 0 or not math.isfinite(lam):
        return [lam]
    lo = max(lam - window, float(run.process.log_snr(run.process.t_max)))
    if i > 0 and math.isfinite(run.log_snr[i - 1]):  # windows of neighbouring steps never meet
        lo = max(lo, lam - 0.45 * (lam - run.log_snr[i - 1]))
    hi = min(lam + window, lam + 0.45 * (lam_next - lam))
    return sorted({min(max(lam - window + 2 * window * k / (candidates - 1), lo), hi) for k in range(candidates)} | {lam})


def select(x: torch.Tensor, log_snrs: torch.Tensor, alphas: torch.Tensor, sigmas: torch.Tensor, data_var: float) -> torch.Tensor:
    """Per-sample index of the candidate whose marginal variance alpha^2 data_var + sigma^2 best matches Var(x)."""
    var = x.flatten(1).var(dim=1, unbiased=False)
    expected = alphas**2 * data_var + sigmas**2
    return (var[:, None] - expected[None, :]).abs().argmin(dim=1)


def denoise_per_sample(run: Run, x: torch.Tensor, t: torch.Tensor, i: int) -> Prediction:
    """One checked network evaluation with a per-sample time vector t [batch] (float64) near grid point i."""
    return run.denoiser.at_times(x, t, run.t[i])


def _expm1(z: float | torch.Tensor) -> float | torch.Tensor:
    return torch.expm1(z) if isinstance(z, torch.Tensor) else math.expm1(z)


class _Candidates:
    """Candidate times of one step as device tensors, built once before the sampling loop."""

    def __init__(self, run: Run, lams: list[float], device: torch.device, dtype: torch.dtype):
        lam64 = torch.tensor(lams, dtype=torch.float64)
        t64 = run.process.t_from_log_snr(lam64)
        self.t = t64.to(device)
        self.lam = lam64.to(device, dtype)
        self.alpha = run.process.alpha(t64).to(device, dtype)
        self.sigma = run.process.sigma(t64).to(device, dtype)


@register("time_shift", order=1)
def time_shift(
    run: Run,
    x: torch.Tensor,
    *,
    base: str = "ddim",
    window: float = 0.0,
    cutoff: float | None = None,
    candidates: int = 9,
    data_var: float = 0.25,
) -> torch.Tensor:
    """Time-Shift Sampler on DDIM or DPM-Solver++(2M): per-sample network time matched to the sample variance."""
    check_choice("base", base, BASES)
    window = check_number("window", window, 0.0, 100.0)
    candidates = check_int("candidates", candidates, 2, 1001)
    data_var = check_number("data_var", data_var, 0.0, 1e6)
    if cutoff is not None:
        cutoff = check_number("cutoff", cutoff)
    order = 2 if base == "dpmpp_2m" else 1
    steps: list[_Candidates | None] = []
    for i in range(run.steps):
        lams = candidate_log_snrs(run, i, window, candidates) if cutoff is None or run.t[i] > cutoff else [run.log_snr[i]]
        steps.append(_Candidates(run, lams, x.device, x.dtype) if len(lams) > 1 else None)
    prev_x0, prev_lam = None, None
    for i in run.range():
        k = run.order_at(i, order)
        cand = steps[i]
        if cand is None and not isinstance(prev_lam, torch.Tensor):  # the base solver's own step
            pred = run.denoise(x, i)
            x_next = run.ddim_step(i, pred) if k == 1 else data_step(run, i, x, dpmpp_mean(run, i, 2, pred.x0, prev_x0))
            lam = run.log_snr[i]
        else:
            if cand is None:
                pred, lam = run.denoise(x, i), run.log_snr[i]
            else:
                idx = select(x, cand.lam, cand.alpha, cand.sigma, data_var)
                pred = denoise_per_sample(run, x, cand.t[idx], i)
                lam = cand.lam[idx].reshape((-1,) + (1,) * (x.ndim - 1))
            x_next = run.ddim_step(i, pred)  # DDIM from the (shifted) time: alpha_{i+1} x0 + sigma_{i+1} eps
            if k == 2:  # plus the DPM-Solver++(2M) term with the (shifted) log-SNRs of this and the last evaluation
                h = run.log_snr[i + 1] - lam
                x_next = x_next - run.alpha[i + 1] * _expm1(-h) * (pred.x0 - prev_x0) * h / (2 * (lam - prev_lam))
        x, prev_x0, prev_lam = x_next, pred.x0, lam
        x, prev_x0, prev_lam = run.report(i, x, pred, prev_x0, prev_lam)
    return x
