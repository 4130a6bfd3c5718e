"""Euler's method on the probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps in the process's own time.

On EDM (alpha = 1, sigma = t) this is the Euler sampler of Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022; on RectifiedFlow it is the flow-matching Euler sampler.
"""

import torch

from ._core import Run, register


@register("euler", order=1)
def euler(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Euler: x_{i+1} = x_i + (t_{i+1} - t_i) dx/dt(x_i, t_i), one evaluation per step."""
    for i in run.range():
        pred = run.denoise(x, i)
        x = x + (run.t[i + 1] - run.t[i]) * run.velocity(pred, i)
        run.report(i, x, pred)
    return x
