"""DDPM ancestral sampling: draw x_s from the Gaussian posterior q(x_s | x_t, x0 = model's x0) on any process.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020, Algorithm 2, with the posterior
written through alpha/sigma (see `_ancestral`), so that it runs on every process and every grid (on DiscreteVP with
all N timesteps it is Algorithm 2 exactly). x [batch, ...].
"""

import math

import torch

from ..parameterization import Prediction
from ._ancestral import ancestral_step, posterior_ratio
from ._core import Run, register
from ._options import check_choice

VARIANCES = ("posterior", "beta")


def ddpm_step(
    run: Run, i: int, x: torch.Tensor, pred: Prediction, variance: str = "posterior", part: int = 0, parts: int = 1
) -> torch.Tensor:
    """Posterior mean alpha_s x0 + sqrt(r) sigma_s eps plus noise sqrt(1 - r) sigma_s ("posterior") or sigma_t ("beta")."""
    r = posterior_ratio(run, i)
    std = 0.0 if run.sigma[i + 1] == 0 else math.sqrt(1.0 - r) * (run.sigma[i + 1] if variance == "posterior" else run.sigma[i])
    return ancestral_step(run, i, x, pred, math.sqrt(r) * run.sigma[i + 1], std, part, parts)


@register("ddpm", order=1, stochastic=True)
def ddpm(run: Run, x: torch.Tensor, *, variance: str = "posterior") -> torch.Tensor:
    """DDPM: posterior mean plus noise; variance "posterior" (beta-tilde) or "beta" (the forward step's, larger)."""
    check_choice("variance", variance, VARIANCES)
    for i in run.range():
        pred = run.denoise(x, i)
        x = ddpm_step(run, i, x, pred, variance)
        x = run.report(i, x, pred)
    return x
