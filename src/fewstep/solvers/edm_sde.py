"""The EDM stochastic sampler: "churn" noise raises sigma by a factor 1 + gamma, then a Heun step in EDM space.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 2:
gamma = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma/alpha <= S_tmax (else 0), noise of std
S_noise sqrt(sigma_hat^2 - sigma^2) added in sigma/alpha space, then the Heun step of `heun(space="edm")` from
sigma_hat. On any process: sigma here is sigma/alpha, the churned time is t(sigma_hat) and sigma_hat is capped at
sigma/alpha of t_max. Defaults: the paper's ImageNet-64 settings (Table 5) with S_noise = 1 (right for an exact
denoiser). x [batch, ...].
"""

import math

import torch

from ..parameterization import Coefficients
from ._core import Run, register
from ._options import check_number
from .heun import edm_heun_step


def churned_points(run: Run, gamma: float, s_tmin: float, s_tmax: float) -> list[tuple[float, Coefficients] | None]:
    """Per step: (t_hat, its coefficients) where sigma/alpha is raised to (1 + gamma) sigma/alpha, else None.

    Churn applies where S_tmin <= sigma/alpha <= S_tmax (finite); sigma_hat is capped at sigma/alpha of t_max.
    """
    process = run.process
    edm_sigma_max = math.exp(-float(process.log_snr(process.t_max)))
    points: list[tuple[float, Coefficients] | None] = []
    for i in range(run.steps):
        edm_sigma = math.exp(-run.log_snr[i])
        churn = gamma > 0 and math.isfinite(edm_sigma) and s_tmin <= edm_sigma <= s_tmax
        edm_sigma_hat = min(edm_sigma * (1.0 + gamma), edm_sigma_max) if churn else edm_sigma
        if edm_sigma_hat > edm_sigma:
            t_hat = min(float(process.t_from_log_snr(-math.log(edm_sigma_hat))), process.t_max)
            points.append((t_hat, Coefficients.at(process, t_hat)))
        else:
            points.append(None)
    return points


@register("edm_sde", order=1, stochastic=True)
def edm_sde(
    run: Run,
    x: torch.Tensor,
    *,
    s_churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """EDM Algorithm 2: churn, then Heun; about 2 evaluations per step (1 on the last step to sigma = 0)."""
    s_churn = check_number("s_churn", s_churn, 0.0)
    s_tmin = check_number("s_tmin", s_tmin, 0.0, finite=False)
    s_tmax = check_number("s_tmax", s_tmax, 0.0, finite=False)
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmax must be >= s_tmin (the churned range of sigma/alpha), got s_tmin={s_tmin}, s_tmax={s_tmax}")
    s_noise = check_number("s_noise", s_noise, 0.0, 10.0)
    churn = churned_points(run, min(s_churn / run.steps, math.sqrt(2.0) - 1.0), s_tmin, s_tmax)
    for i in run.range():
        if churn[i] is None:
            pred = run.denoise(x, i)
            x = edm_heun_step(run, i, x, pred, run.alpha[i], run.sigma[i])
        else:
            t_hat, c = churn[i]
            std = s_noise * math.sqrt(max(0.0, (c.sigma / c.alpha) ** 2 - math.exp(-2.0 * run.log_snr[i])))
            x = (c.alpha / run.alpha[i]) * x + (c.alpha * std) * run.noise_like(x, i)
            pred = run.denoise_at(x, t_hat)
            x = edm_heun_step(run, i, x, pred, c.alpha, c.sigma)
        x = run.report(i, x, pred)
    return x
