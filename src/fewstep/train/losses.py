"""Denoising objectives for any process and prediction type, with loss weightings.

The regression target of a prediction type is `from_x0_eps(x0, eps, prediction)` (the core conversions), so eps-,
x0-, v- (Salimans & Ho, 2022) and velocity (flow matching; Lipman et al., 2023) losses are one function.
Weightings, defined on the x0 error and moved to the prediction's own error through the exact sensitivity
|d prediction / d x0| at fixed x_t (again from `from_x0_eps`):
- "none": plain MSE of the prediction (DDPM's simple loss for eps; Ho et al., 2020);
- "min_snr": min(SNR, gamma) on the x0 error (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy"); for eps this is min(SNR, gamma) / SNR and for VP v-prediction min(SNR, gamma) / (SNR + 1);
- "edm": lambda = (s^2 + sd^2) / (s sd)^2 on the x0 error, s = sigma / alpha (Karras et al., 2022, table 1).
Shapes: x0, eps [batch, ...], t [batch] -> per-sample losses [batch].
"""

from __future__ import annotations

import torch
from torch import nn

from ..parameterization import Coefficients, from_x0_eps
from ..processes import Process

WEIGHTINGS = ("none", "min_snr", "edm")


def x0_sensitivity(process: Process, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """|d prediction / d x0| at fixed x_t = alpha x0 + sigma eps (so d eps / d x0 = -alpha / sigma); float64 [batch]."""
    c = Coefficients.of(process, t.to(torch.float64), t.to(torch.float64))
    one = torch.ones_like(c.alpha)
    return from_x0_eps(one, -c.alpha / c.sigma, prediction, c).abs()


def loss_weight(
    process: Process, t: torch.Tensor, prediction: str, weighting: str = "none", *, gamma: float = 5.0, sigma_data: float = 0.5
) -> torch.Tensor:
    """Per-sample weight [batch] (float64) of the squared prediction error for `weighting`."""
    if weighting == "none":
        return torch.ones_like(t, dtype=torch.float64)
    t = t.to(torch.float64)
    alpha, sigma = process.alpha(t), process.sigma(t)
    if weighting == "min_snr":
        x0_weight = torch.clamp((alpha / sigma) ** 2, max=gamma)
    elif weighting == "edm":
        s2 = (sigma / alpha) ** 2
        x0_weight = (s2 + sigma_data**2) / (s2 * sigma_data**2)
    else:
        raise ValueError(f"weighting={weighting!r} is not known; allowed values: {', '.join(WEIGHTINGS)}")
    return x0_weight / x0_sensitivity(process, t, prediction) ** 2


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    *,
    process: Process,
    prediction: str,
    weighting: str = "none",
    gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Weighted squared error of `model(x_t, t)` against the `prediction` target, mean over features: [batch]."""
    t64 = t.to(torch.float64)
    x_t = process.add_noise(x0, t64, eps)
    target = from_x0_eps(x0, eps, prediction, Coefficients.of(process, t64, x0))
    out = model(x_t, t64.to(x0.dtype))
    err = (out.float() - target.float()).pow(2).reshape(len(x0), -1).mean(1)
    return err * loss_weight(process, t64, prediction, weighting, gamma=gamma, sigma_data=sigma_data).to(err)
