"""DPM-Solver++(2M): second-order multistep exponential integrator in data prediction.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022, Algorithm 2.
"""

import math

import torch

from ._core import Run, register


@register("dpmpp_2m", order=2)
def dpmpp_2m(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M): one evaluation per step, the previous data prediction gives the second-order term."""
    prev = None
    for i in run.range():
        pred = run.denoise(x, i)
        if run.order_at(i, 2) == 1:
            x_next = run.ddim_step(i, pred)
        else:
            h = run.log_snr[i + 1] - run.log_snr[i]
            r = (run.log_snr[i] - run.log_snr[i - 1]) / h
            x0 = pred.x0 + (pred.x0 - prev.x0) / (2 * r)
            x_next = run.sigma[i + 1] / run.sigma[i] * x - run.alpha[i + 1] * math.expm1(-h) * x0
        x = x_next
        prev = pred
        run.report(i, x, pred)
    return x
