"""Exponential-integrator weights for data prediction from Lagrange interpolation in log-SNR.

The exact step in data prediction (Lu et al., "DPM-Solver++", 2022) from grid point i to i + 1 is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} h phi_1(-h) * D,   D = weighted mean of x0 over the step,

with weight e^{lambda} on [lambda_i, lambda_{i+1}] and h = lambda_{i+1} - lambda_i. Interpolating x0 by the
polynomial through the data predictions at a set of grid points (`nodes`) and integrating it exactly turns D into
sum_j w_j x0_j. With past nodes this is the exponential Adams-Bashforth (multistep predictor) of DPM-Solver++ /
DEIS / UniPC; with the new point i + 1 among the nodes it is the exponential Adams-Moulton corrector (UniC,
Zhao et al., 2023). The weights are Python floats (no device tensors) and sum to 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._core import Run
from ._expint import phi


def moments(h: float, count: int) -> list[float]:
    """Mean of theta^m, m < count, under the weight e^{h (theta - 1)} on theta in [0, 1] (theta = (lambda - lambda_i)/h)."""
    p1 = phi(1, -h)
    return [math.factorial(m) * phi(m + 1, -h) / p1 for m in range(count)]


def weights(run: Run, i: int, nodes: list[int]) -> list[float]:
    """Weights w_j (one per grid point in `nodes`) with D = sum_j w_j x0_j for the step i -> i + 1."""
    if len(nodes) == 1:
        return [1.0]
    h = run.log_snr[i + 1] - run.log_snr[i]
    theta = np.array([(run.log_snr[j] - run.log_snr[i]) / h for j in nodes])
    vandermonde = np.vander(theta, len(nodes), increasing=True).T  # row m: theta_j^m
    return np.linalg.solve(vandermonde, np.array(moments(h, len(nodes)))).tolist()


def combine(w: list[float], values: list[torch.Tensor]) -> torch.Tensor:
    """sum_j w_j values_j."""
    out = values[0] * w[0]
    for wj, vj in zip(w[1:], values[1:], strict=True):
        out.add_(vj, alpha=wj)  # fused multiply-add into the fresh tensor `out`
    return out


def data_step(run: Run, i: int, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} expm1(-h) D: the exponential step with mean data prediction D.

    Finite at alpha_i = 0 (h = inf) and at sigma_{i+1} = 0 (then x_{i+1} = alpha_{i+1} D).
    """
    h = run.log_snr[i + 1] - run.log_snr[i]
    return run.sigma[i + 1] / run.sigma[i] * x - run.alpha[i + 1] * math.expm1(-h) * d
