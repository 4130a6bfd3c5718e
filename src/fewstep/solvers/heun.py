"""Heun's second-order method on the probability-flow ODE, in the process's own time or in EDM space.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 1
(deterministic). A step that ends at sigma = 0 is an Euler step, as in the paper.
space="time" integrates dx/dt = alpha'(t) x0 + sigma'(t) eps in the process's time; space="edm" integrates
d(x/alpha)/d(sigma/alpha) = eps, as k-diffusion (Crowson) and diffusers' HeunDiscrete do for every model (a step
that starts at alpha = 0, where sigma/alpha is infinite, is an Euler step there). x [batch, ...].
"""

import torch

from ..parameterization import Prediction
from ._core import Run, register
from ._options import check_choice
from .euler import SPACES


def edm_heun_step(run: Run, i: int, x: torch.Tensor, pred: Prediction, alpha: float, sigma: float) -> torch.Tensor:
    """Heun step in sigma/alpha space from x at (alpha, sigma), with its prediction, to grid point i + 1.

    The Euler predictor is the DDIM step alpha_{i+1} x0 + sigma_{i+1} eps; the corrector averages eps at both ends:
    x_{i+1} / alpha_{i+1} = x / alpha + (sigma_{i+1}/alpha_{i+1} - sigma/alpha) (eps + eps') / 2.
    """
    alpha_to, sigma_to = run.alpha[i + 1], run.sigma[i + 1]
    x_euler = alpha_to * pred.x0 + sigma_to * pred.eps
    if sigma_to == 0 or alpha == 0:
        return x_euler
    eps_to = run.denoise(x_euler, i + 1).eps
    return (alpha_to / alpha) * x + (sigma_to - alpha_to * sigma / alpha) * 0.5 * (pred.eps + eps_to)


@register("heun", order=2)
def heun(run: Run, x: torch.Tensor, *, space: str = "time") -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector): two evaluations per step, one on a step that ends at sigma = 0."""
    check_choice("space", space, SPACES)
    for i in run.range():
        pred = run.denoise(x, i)
        if space == "edm":
            x = edm_heun_step(run, i, x, pred, run.alpha[i], run.sigma[i])
            x = run.report(i, x, pred)
            continue
        dt = run.t[i + 1] - run.t[i]
        d = run.velocity(pred, i)
        x_euler = x + dt * d
        if run.sigma[i + 1] == 0:
            x = x_euler
        else:
            d_next = run.velocity(run.denoise(x_euler, i + 1), i + 1)
            x = x + dt * 0.5 * (d + d_next)
        x = run.report(i, x, pred)
    return x
