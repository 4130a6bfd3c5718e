"""The ancestral step shared by DDPM, DDIM with eta > 0 and Euler ancestral: a DDIM step plus fresh noise.

For x_t = alpha_t x0 + sigma_t eps, the posterior q(x_s | x_t, x0) of a less noisy time s has mean
alpha_s x0 + sqrt(r) sigma_s eps and variance (1 - r) sigma_s^2 with r = exp(2 (lambda_t - lambda_s)) (Ho et al.,
"Denoising Diffusion Probabilistic Models", NeurIPS 2020, eq. 7, written for any alpha/sigma). DDIM's eta family
(Song et al., "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12) keeps the marginals with noise
eta * sqrt(1 - r) sigma_s; k-diffusion's `get_ancestral_step` (Crowson) is the same in sigma/alpha space.
Written in (x0, eps) every step is finite at alpha_t = 0 and at sigma_s = 0.
"""

from __future__ import annotations

import math

import torch

from ..parameterization import Prediction
from ._core import Run


def posterior_ratio(run: Run, i: int) -> float:
    """r = exp(2 (lambda_i - lambda_{i+1})) in [0, 1]; 0 when alpha_i = 0 or sigma_{i+1} = 0."""
    lam_from, lam_to = run.log_snr[i], run.log_snr[i + 1]
    if lam_from == -math.inf or lam_to == math.inf:
        return 0.0
    return math.exp(2.0 * (lam_from - lam_to))


def eta_coefficients(run: Run, i: int, eta: float) -> tuple[float, float]:
    """(eps coefficient, noise std) of the eta step i -> i + 1: noise min(1, eta sqrt(1 - r)) sigma_{i+1}."""
    sigma_to = run.sigma[i + 1]
    up = min(1.0, eta * math.sqrt(max(0.0, 1.0 - posterior_ratio(run, i))))
    return sigma_to * math.sqrt(1.0 - up * up), sigma_to * up


def ancestral_step(
    run: Run, i: int, x: torch.Tensor, pred: Prediction, eps_coef: float, noise_std: float, part: int = 0, parts: int = 1
) -> torch.Tensor:
    """alpha_{i+1} x0 + eps_coef eps + noise_std z with z = run.noise_like(x, i, part, parts) (no draw when 0).

    A whole step (parts = 1) from sigma_i > 0 is recorded in `run.transition`: with eps = (x - alpha_i x0) / sigma_i
    the mean moves by x0_coef = alpha_{i+1} - eps_coef alpha_i / sigma_i per unit of x0."""
    x_next = run.alpha[i + 1] * pred.x0 + eps_coef * pred.eps
    noise = noise_std * run.noise_like(x, i, part, parts) if noise_std > 0 else None
    if noise is not None:
        x_next = x_next + noise
    if parts == 1 and run.sigma[i] > 0:
        x0_coef = run.alpha[i + 1] - eps_coef * run.alpha[i] / run.sigma[i]
        run.transition = {"x0_coef": x0_coef, "std": noise_std, "noise": noise}
    return x_next
