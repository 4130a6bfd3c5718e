"""Euler-Maruyama on the reverse-time SDE of the process, in the process's own time.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021, eq. 6: the
forward SDE dx = f x dt + g dW with f = d log(alpha)/dt and g^2 = d(sigma^2)/dt - 2 f sigma^2 has the marginals
of x_t = alpha x0 + sigma eps; its reverse is dx = [f x - g^2 score] dt + g dW, i.e. drift v - (g^2 / 2) score with v
the probability-flow velocity. x [batch, ...].
"""

import math

import torch

from ..parameterization import Prediction
from ._core import Run, register


def reverse_sde_step(
    run: Run, i: int, x: torch.Tensor, pred: Prediction, diffusion: float, part: int = 0, parts: int = 1
) -> torch.Tensor:
    """One Euler-Maruyama step i -> i + 1 of dx = [v - (diffusion / 2) score] dt + sqrt(diffusion) dW.

    Any diffusion(t) >= 0 keeps the marginals (Albergo, Boffi & Vanden-Eijnden, "Stochastic Interpolants", 2023);
    with score = -eps / sigma the drift is v + diffusion / (2 sigma) eps. A step that ends at sigma = 0 returns the
    data prediction (pure denoising). The noise is `run.noise_like(x, i, part, parts)`.
    """
    if run.sigma[i + 1] == 0:
        return run.ddim_step(i, pred)
    dt = run.t[i + 1] - run.t[i]
    x = x + dt * (run.velocity(pred, i) + (0.5 * diffusion / run.sigma[i]) * pred.eps)
    if diffusion > 0:
        x = x + math.sqrt(diffusion * abs(dt)) * run.noise_like(x, i, part, parts)
    return x


def sde_diffusion(run: Run, i: int) -> float:
    """g(t_i)^2 = 2 sigma (sigma' - f sigma), f = alpha'/alpha, of the process's own forward SDE."""
    if run.alpha[i] == 0:
        raise ValueError(
            f"the reverse SDE of {run.process!r} is singular at t={run.t[i]} (alpha = 0, g^2 infinite); pass "
            "t_start with alpha(t_start) > 0, or use solver='interpolant_sde' or 'ddpm'"
        )
    sigma = run.sigma[i]
    return 2.0 * sigma * (run.dsigma[i] - run.dalpha[i] / run.alpha[i] * sigma)


@register("euler_maruyama", order=1, stochastic=True)
def euler_maruyama(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE: one evaluation per step (weak order 1)."""
    for i in range(run.steps):
        sde_diffusion(run, i)  # fail before any evaluation
    for i in run.range():
        pred = run.denoise(x, i)
        x = reverse_sde_step(run, i, x, pred, sde_diffusion(run, i))
        x = run.report(i, x, pred)
    return x
