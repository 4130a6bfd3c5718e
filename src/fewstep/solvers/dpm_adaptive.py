"""Adaptive-step DPM-Solver-12 and DPM-Solver-23: embedded singlestep pairs with error control in log-SNR.

Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps",
NeurIPS 2022, section 4.2 / Algorithm 4 (noise prediction). A step of log-SNR length h computes the order-k
solution x_high and the order-(k-1) solution x_low from the same k evaluations (k = `order`, intermediate points
at r1 = 1/2 for k = 2 and r1 = 1/3, r2 = 2/3 for k = 3); it is accepted when
E = max over samples of RMS((x_high - x_low) / max(atol, rtol * max(|x_low|, |x_low_prev|))) <= 1, and the next
h is min(h * clip(theta * E^(-1/k), 0.2, 5), the rest of the log-SNR range), theta = 0.9. x: [batch, ...].
The clip bounds the change of h per attempt as usual for embedded pairs (Hairer, Norsett & Wanner, "Solving
Ordinary Differential Equations I", II.4); the authors' code leaves it unbounded, and then on long, nearly linear
stretches of log-SNR (RectifiedFlow near t = 1) h alternates between tiny accepted and huge rejected steps.

The solver chooses its own steps: the time grid only gives t_start and t_end (its length is ignored) and the
result's `nfe` reports the evaluations used. Each step reads E on the host (one device sync per step). Where the
log-SNR is infinite at an end (alpha = 0 at t_start or sigma = 0 at t_end, e.g. RectifiedFlow), that end is joined
to log-SNR -+L, L = -log(atol), by one first-order step, whose error is O(e^(-2L)) = O(atol^2).

Batch invariance: by default (`per_sample=False`) one controller steps the whole batch (E above is the max over
samples): one network call per evaluation, but a sample's result depends on the batch it is in (up to ~1e-2 between
batch 1 and 8 at the default tolerances). `per_sample=True` runs one controller per sample, evaluated as batches of
one, so a sample's result is that of the sample alone (bit for bit on a row-wise model); `nfe` is then the total
number of network calls over the batch (the sum of the samples' evaluations). It is not the default: each sample
is then controlled by its own local error estimate only, which on ring2d / RectifiedFlow at rtol = atol = 1e-3
misses the tolerance (RMS error 1.9e-3, one sample 2e-2; the batch maximum holds every sample to 1e-4), and batch-
one calls are slow on a GPU. Error messages count the adaptive steps as "step".
"""

import math

import torch

from ..parameterization import SolverError
from ._core import Run, register
from ._dpm import Node, grid_node, log_snr_node
from ._options import check_number
from .dpm_singlestep import FRACTIONS, singlestep_update

THETA = 0.9
FACTOR_MIN, FACTOR_MAX = 0.2, 5.0  # bounds on the step-size change per attempt


def _error_norm(x_high: torch.Tensor, x_low: torch.Tensor, x_prev: torch.Tensor, rtol: float, atol: float) -> float:
    """max over samples of the RMS over features of the scaled difference (one host read)."""
    delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
    ratio = ((x_high - x_low) / delta).reshape(x_high.shape[0], -1)
    return float(ratio.square().mean(dim=1).sqrt().max())


def _check(order: int, rtol: float, atol: float, h_init: float, per_sample: bool) -> tuple[int, float, float, float]:
    """The options, typed and range-checked (each error names its option)."""
    if isinstance(order, bool) or not isinstance(order, int) or order not in (2, 3):
        raise ValueError(f"order={order!r} is not supported by dpm_adaptive; allowed values: 2, 3")
    if not isinstance(per_sample, bool):
        raise ValueError(f"per_sample must be True or False, got per_sample={per_sample!r}")
    rtol = check_number("rtol", rtol, 0.0, 1.0)
    atol = check_number("atol", atol, 1e-12, 1.0)
    h_init = check_number("h_init", h_init, 1e-6, 100.0)
    return order, rtol, atol, h_init


def _adaptive(run: Run, x: torch.Tensor, s: Node, end: Node, order: int, rtol: float, atol: float, h: float) -> torch.Tensor:
    """Integrate from node s to node end (finite log-SNRs) with the embedded pair of `order`."""
    x_prev, pred, accepted = x, None, 0
    while s.lam < end.lam:
        run.begin_step(accepted)
        last = h >= end.lam - s.lam - 1e-9
        if h < 1e-9 and not last:
            raise SolverError(
                f"dpm_adaptive: the log-SNR step fell to {h:.3g} at step {accepted}, t={s.t:.6g}; rtol/atol too tight"
            )
        if pred is None:
            pred = run.denoise_at(x, s.t)
        t = end if last else log_snr_node(run, s.lam + h)
        nodes = [s] + [log_snr_node(run, s.lam + r * (t.lam - s.lam)) for r in FRACTIONS[order]] + [t]
        x_high, x_low = singlestep_update(run, x, pred, nodes, "noise", "dpmsolver", with_lower=True)
        err = _error_norm(x_high, x_low, x_prev, rtol, atol)
        if not math.isfinite(err):
            run.denoiser.raise_if_not_finite()
            raise SolverError(f"dpm_adaptive: error estimate {err} at step {accepted}, evaluation {run.denoiser.nfe}, t={s.t}")
        if err <= 1.0:
            x, x_prev, s, pred, accepted = x_high, x_low, t, None, accepted + 1
        factor = THETA * err ** (-1.0 / order) if err > 0 else FACTOR_MAX
        h = min(h * min(max(factor, FACTOR_MIN), FACTOR_MAX), end.lam - s.lam)
    return x


def _solve(run: Run, x: torch.Tensor, order: int, rtol: float, atol: float, h_init: float) -> torch.Tensor:
    """The adaptive solve of x [batch, ...] from t[0] to t[-1] with one controller for the batch."""
    first, end = grid_node(run, 0), grid_node(run, run.steps)
    clip = -math.log(atol)
    run.begin_step(0)
    if first.lam == -math.inf:
        s = log_snr_node(run, min(-clip, end.lam - 1.0))
        pred = run.denoise_at(x, first.t)
        x = s.alpha * pred.x0 + s.sigma * pred.eps
    else:
        s = first
    stop = log_snr_node(run, max(clip, s.lam + 1.0)) if end.lam == math.inf else end
    x = _adaptive(run, x, s, stop, order, rtol, atol, h_init)
    if stop is not end:
        x = run.denoise_at(x, stop.t).x0
    return x


@register("dpm_adaptive", order=3)
def dpm_adaptive(
    run: Run,
    x: torch.Tensor,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    per_sample: bool = False,
) -> torch.Tensor:
    """Adaptive DPM-Solver-12 (order=2) or -23 (order=3): chooses its own log-SNR steps to meet rtol/atol.

    order in {2, 3}; 0 <= rtol <= 1; 1e-12 <= atol <= 1; 1e-6 <= h_init <= 100 (the first log-SNR step);
    per_sample: one controller per sample (batch-invariant results) or one for the batch (default).
    """
    order, rtol, atol, h_init = _check(order, rtol, atol, h_init, per_sample)
    if per_sample and x.shape[0] > 1:
        x = torch.cat([_solve(run, x[b : b + 1], order, rtol, atol, h_init) for b in range(x.shape[0])])
    else:
        x = _solve(run, x, order, rtol, atol, h_init)
    x = run.report(run.steps - 1, x, None)
    return x
