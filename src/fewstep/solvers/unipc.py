"""UniPC: the unified predictor (UniP) and corrector (UniC) in data prediction, B(h) variants bh1 and bh2.

Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
NeurIPS 2023, section 3 (UniC, UniP and their multistep combination UniPC, here in the data-prediction form of
DPM-Solver++).

With h = lambda_{i+1} - lambda_i, r_k = (lambda_{i-k} - lambda_i) / h and D_k = (x0_{i-k} - x0_i) / r_k, one step is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} expm1(-h) x0_i - alpha_{i+1} B(h) sum_k rho_k D_k,

B(h) = -h ("bh1") or expm1(-h) ("bh2"). UniP-p uses the p - 1 past differences, UniC-p adds the difference to the
evaluation at the new point, which the next step needs anyway: the corrector costs no evaluation and raises the
order from p to p + 1. The rho solve the Vandermonde systems of the paper; like the official code (and diffusers)
UniP-2 and UniC-1 use rho = 1/2, which has the same order. The evaluation at the predicted point is kept as the
next step's x0 (the corrected point is not re-evaluated). A corrector whose step starts at alpha = 0 (log-SNR -inf,
h infinite) is skipped; steps from there or to sigma = 0 are first order (`Run.order_at`), so every coefficient
stays finite. Tensors are [batch, ...]; coefficients are Python floats.
"""

import math

import numpy as np
import torch

from ._core import Run, register
from ._expint import phi
from ._lagrange import combine, data_step
from ._options import check_choice, check_int

VARIANTS = ("bh1", "bh2")
MAX_ORDER = 3


def _b_h(hh: float, variant: str) -> float:
    """B(h) evaluated at hh = -h (data prediction): hh for bh1, e^hh - 1 for bh2."""
    return hh if variant == "bh1" else math.expm1(hh)


def rhos(rks: list[float], hh: float, variant: str, corrector: bool) -> list[float]:
    """UniP (corrector=False) or UniC (corrector=True) weights for the ratios r_k of the past points.

    The system has rows j = 0.. of r_k^j and right-hand side b_j = hh phi_{j+1}(hh) j! / B(h), j = 1..; the
    corrector appends the new point (r = 1) to the unknowns.
    """
    nodes = rks + [1.0] if corrector else rks
    n = len(nodes)
    if n == 1:  # UniP-2 and UniC-1: rho = 1/2 (official code, diffusers)
        return [0.5]
    bh = _b_h(hh, variant)
    matrix = np.array([[r**j for r in nodes] for j in range(n)], dtype=np.float64)
    rhs = np.array([hh * phi(j + 1, hh) * math.factorial(j) / bh for j in range(1, n + 1)], dtype=np.float64)
    return np.linalg.solve(matrix, rhs).tolist()


def update(
    run: Run, i: int, x: torch.Tensor, x0s: list[torch.Tensor], order: int, variant: str, x0_new: torch.Tensor | None
) -> torch.Tensor:
    """One UniP step i -> i + 1 of `order` from x (x0_new None), or the UniC correction of it (x0_new = x0_{i+1}).

    x0s: data predictions at grid points i - order + 1 .. i (newest last), each [batch, ...].
    """
    h = run.log_snr[i + 1] - run.log_snr[i]
    m0 = x0s[-1]
    x_next = data_step(run, i, x, m0)
    rks = [(run.log_snr[i - k] - run.log_snr[i]) / h for k in range(1, order)]
    diffs = [(x0s[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    if x0_new is not None:
        diffs.append(x0_new - m0)
    if not diffs:
        return x_next
    weights = rhos(rks, -h, variant, corrector=x0_new is not None)
    return x_next - run.alpha[i + 1] * _b_h(-h, variant) * combine(weights, diffs)


@register("unipc", order=3)
def unipc(run: Run, x: torch.Tensor, *, order: int = 2, variant: str = "bh2", corrector: bool = True) -> torch.Tensor:
    """UniPC-p (multistep, data prediction): UniP-p predictor, UniC-p corrector on (order p + 1), one NFE per step.

    order 1-3: default 2 (UniPC-2, third order), the authors' recommendation for guided sampling, where higher
    orders are less stable at large guidance (3 is recommended for unconditional models); it is also diffusers'
    default. variant "bh2" (default) or "bh1" (recommended for unconditional sampling under 10 steps); B(h) only
    matters where rho = 1/2 is used (UniP-2, UniC-1), the solved rho scale with 1/B(h). corrector: apply UniC after
    every step but the last. Order 1 without corrector is DDIM.
    """
    order = check_int("order", order, 1, MAX_ORDER)
    check_choice("variant", variant, VARIANTS)
    if not isinstance(corrector, bool):
        raise ValueError(f"corrector must be True or False, got corrector={corrector!r}")
    x0s: list[torch.Tensor] = []
    x_prev, order_prev = x, 1
    for i in run.range():
        pred = run.denoise(x, i)
        # UniC for the previous step, skipped where its start has log-SNR -inf (h infinite; alpha = 0 there).
        if corrector and i > 0 and run.log_snr[i - 1] != -math.inf:
            x = update(run, i - 1, x_prev, x0s[-order_prev:], order_prev, variant, pred.x0)
        x0s = (x0s + [pred.x0])[-order:]
        p = run.order_at(i, order)
        x_prev, order_prev = x, p
        x = update(run, i, x, x0s[-p:], p, variant, None)
        x, x_prev, x0s = run.report(i, x, pred, x_prev, x0s)
    return x
