"""Linear multistep (Adams-Bashforth) on the ODE d(x/alpha)/d(sigma/alpha) = eps, non-uniform steps.

Crowson, k-diffusion `sample_lms` (diffusers' LMSDiscrete): the step integrates the Lagrange polynomial through the
last `order` values of eps over [s_i, s_{i+1}], s = sigma/alpha (Adams-Bashforth, Hairer, Norsett & Wanner,
"Solving Ordinary Differential Equations I", III.1). The weights are exact (Gauss-Legendre), computed on the host in
float64. Warm-up, infinite log-SNR and final-step rules as `Run.order_at`. x [batch, ...].
"""

import math

import numpy as np
import torch

from ._core import Run, register
from ._options import check_int


def lagrange_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """w_j = integral over [a, b] of the Lagrange basis polynomial of node j (nodes distinct)."""
    u, w = np.polynomial.legendre.leggauss(len(nodes))  # exact for degree <= 2n - 1
    half, mid = 0.5 * (b - a), 0.5 * (a + b)
    s = [mid + half * float(uq) for uq in u]
    weights = []
    for j, nj in enumerate(nodes):
        total = 0.0
        for sq, wq in zip(s, w, strict=True):
            term = float(wq)
            for m, nm in enumerate(nodes):
                if m != j:
                    term *= (sq - nm) / (nj - nm)
            total += term
        weights.append(half * total)
    return weights


@register("lms", order=4)
def lms(run: Run, x: torch.Tensor, *, order: int = 4) -> torch.Tensor:
    """LMS: one evaluation per step; the last `order` eps values (1 <= order <= 4) give the step."""
    order = check_int("order", order, 1, 4)
    eps_history: list[torch.Tensor] = []
    for i in run.range():
        pred = run.denoise(x, i)
        eps_history = [pred.eps, *eps_history[: order - 1]]
        k = run.order_at(i, order)
        if k == 1:
            x = run.ddim_step(i, pred)
        else:
            s = [math.exp(-run.log_snr[i - j]) for j in range(k)]  # sigma/alpha at i, i-1, ...
            weights = lagrange_weights(s, s[0], math.exp(-run.log_snr[i + 1]))
            alpha_to = run.alpha[i + 1]
            x = (alpha_to / run.alpha[i]) * x + sum(alpha_to * w * e for w, e in zip(weights, eps_history[:k], strict=True))
        x, eps_history = run.report(i, x, pred, eps_history)
    return x
