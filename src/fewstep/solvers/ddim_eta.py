"""DDIM with eta > 0: the stochastic members of the DDIM family (eta = 1 is DDPM's posterior sampling).

Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12 and 16, with
sigma_t(eta) = eta sqrt(1 - r) sigma_s, r = exp(2 (lambda_t - lambda_s)), on any process. x [batch, ...].
The deterministic eta = 0 sampler is `ddim`.
"""

import torch

from ._ancestral import ancestral_step, eta_coefficients
from ._core import Run, register
from ._options import check_number


@register("ddim_eta", order=1, stochastic=True)
def ddim_eta(run: Run, x: torch.Tensor, *, eta: float = 1.0) -> torch.Tensor:
    """DDIM(eta): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, c = eta sqrt(1 - r) sigma_s, 0 <= eta <= 1."""
    eta = check_number("eta", eta, 0.0, 1.0)
    for i in run.range():
        pred = run.denoise(x, i)
        x = ancestral_step(run, i, x, pred, *eta_coefficients(run, i, eta))
        x = run.report(i, x, pred)
    return x
