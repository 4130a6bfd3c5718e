"""Shared pieces of exponential integrators in log-SNR: the phi functions.

The exact solution of the probability-flow ODE in lambda = log(alpha/sigma) (Lu et al., "DPM-Solver", 2022;
"DPM-Solver++", 2022; Zhang & Chen, "DEIS", 2023; Zhao et al., "UniPC", 2023) is, in data prediction,

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^{lambda} x0(lambda) d lambda,

and every multistep/singlestep method approximates x0(lambda) by a polynomial in lambda, which turns the integral
into phi functions phi_k(z) = sum_{j>=0} z^j / (j + k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z).
With h = lambda_t - lambda_s, data prediction uses z = -h and noise prediction z = h.
"""

from __future__ import annotations

import math


def phi(k: int, z: float) -> float:
    """phi_k(z) for k >= 0 in float64, accurate for small |z| (Taylor series) and at z = -inf (phi_k = 0, k >= 1)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got k={k}")
    if k == 0:
        return math.exp(z)
    if z == -math.inf:
        return 0.0
    if abs(z) < 0.5:  # 20 terms: truncation < 0.5^20 / 20! relative
        return sum(z**j / math.factorial(j + k) for j in range(20))
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value
