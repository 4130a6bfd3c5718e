"""Euler's method on the probability-flow ODE, in the process's own time or in EDM (sigma/alpha) space.

space="time": dx/dt = alpha'(t) x0 + sigma'(t) eps in the process's time; on EDM (alpha = 1, sigma = t) this is the
Euler sampler of Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022;
on RectifiedFlow it is the flow-matching Euler sampler.
space="edm": d(x/alpha)/d(sigma/alpha) = eps, the ODE that k-diffusion (Crowson) and diffusers' EulerDiscrete
integrate for every model; its Euler step is x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps, i.e. DDIM (Song et al.,
ICLR 2021), finite at alpha = 0. x [batch, ...].
"""

import torch

from ._core import Run, register
from ._options import check_choice

SPACES = ("time", "edm")


@register("euler", order=1)
def euler(run: Run, x: torch.Tensor, *, space: str = "time") -> torch.Tensor:
    """Euler: x_{i+1} = x_i + (t_{i+1} - t_i) dx/dt(x_i, t_i), one evaluation per step; space "time" or "edm"."""
    check_choice("space", space, SPACES)
    for i in run.range():
        pred = run.denoise(x, i)
        if space == "edm":
            x = run.ddim_step(i, pred)
        else:
            x = x + (run.t[i + 1] - run.t[i]) * run.velocity(pred, i)
        x = run.report(i, x, pred)
    return x
