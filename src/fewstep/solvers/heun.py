"""Heun's second-order method on the probability-flow ODE in the process's own time.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 1
(deterministic). A step that ends at sigma = 0 is an Euler step, as in the paper.
"""

import torch

from ._core import Run, register


@register("heun", order=2)
def heun(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector): two evaluations per step, one on a step that ends at sigma = 0."""
    for i in run.range():
        dt = run.t[i + 1] - run.t[i]
        pred = run.denoise(x, i)
        d = run.velocity(pred, i)
        x_euler = x + dt * d
        if run.sigma[i + 1] == 0:
            x = x_euler
        else:
            d_next = run.velocity(run.denoise(x_euler, i + 1), i + 1)
            x = x + dt * 0.5 * (d + d_next)
        run.report(i, x, pred)
    return x
