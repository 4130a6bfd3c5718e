"""iPNDM: improved PNDM, Adams-Bashforth on eps with lower-order multistep warm-up instead of Runge-Kutta.

Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023 (DEIS), appendix
"improved PNDM"; the transfer and the Adams-Bashforth weights are those of PNDM (Liu et al., ICLR 2022), see
`pndm.py`. One evaluation per step. Second order on the usual grids; on grids uniform in rho = sigma / alpha the
Adams-Bashforth body is of order `order`, but the first (Euler) step's local O(h^2) error bounds the asymptotic
order by 2 there too. Tensors are [batch, ...].
"""

import torch

from ._core import Run, register
from ._options import check_int
from .pndm import ADAMS_BASHFORTH, run_linear_multistep


@register("ipndm", order=2)
def ipndm(run: Run, x: torch.Tensor, *, order: int = 4) -> torch.Tensor:
    """iPNDM: Adams-Bashforth of order 1-4 (default 4) on eps with the DDIM transfer; warm-up by lower orders."""
    order = check_int("order", order, 1, max(ADAMS_BASHFORTH))
    return run_linear_multistep(run, x, order, 0, None)
