"""DDIM (deterministic), identical to DPM-Solver-1 and DPM-Solver++(1).

Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021; Lu et al., "DPM-Solver", NeurIPS 2022.
"""

import torch

from ._core import Run, register


@register("ddim", order=1)
def ddim(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DDIM / DPM-Solver-1: x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps, one evaluation per step."""
    for i in run.range():
        pred = run.denoise(x, i)
        x = run.ddim_step(i, pred)
        x = run.report(i, x, pred)
    return x
