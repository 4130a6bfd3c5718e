"""SDE-DPM-Solver++ of orders 1-3 (DPM++ 2M/3M SDE with eta = 1): multistep solvers of the reverse diffusion SDE.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022, appendix B
(SDE-DPM-Solver++1 and -2M); the third-order update as in k-diffusion's sample_dpmpp_3m_sde and diffusers'
algorithm_type="sde-dpmsolver++". Each step adds exact Gaussian noise sigma_t sqrt(1 - e^{-2h}) z with z from
`run.noise_like(x, i)`. x: [batch, ...].
"""

import torch

from ._core import Run, register
from .dpm_multistep import multistep


@register("sde_dpmpp_1", order=1, stochastic=True)
def sde_dpmpp_1(run: Run, x: torch.Tensor) -> torch.Tensor:
    """SDE-DPM-Solver++1: first-order exponential integrator of the reverse SDE, one evaluation per step."""
    return multistep(run, x, order=1, kind="sde")


@register("sde_dpmpp_2m", order=2, stochastic=True)
def sde_dpmpp_2m(run: Run, x: torch.Tensor) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (DPM++ 2M SDE, midpoint): second-order multistep, one evaluation per step."""
    return multistep(run, x, order=2, kind="sde")


@register("sde_dpmpp_3m", order=3, stochastic=True)
def sde_dpmpp_3m(run: Run, x: torch.Tensor, *, third_order: str = "taylor") -> torch.Tensor:
    """SDE-DPM-Solver++(3M) (DPM++ 3M SDE): third-order multistep, one evaluation per step."""
    return multistep(run, x, order=3, kind="sde", third_order=third_order)
