"""Euler ancestral: an Euler step in sigma/alpha space to sigma_down, then fresh noise of size sigma_up.

Crowson, k-diffusion `sample_euler_ancestral` / `get_ancestral_step`; on VP models it is the EulerAncestral
sampler of diffusers. In (x0, eps) it is the DDIM eta step (see `_ancestral`), with eta > 1 allowed (noise capped
at sigma_{i+1}) and `s_noise` scaling the added noise (Karras et al., NeurIPS 2022). x [batch, ...].
"""

import torch

from ._ancestral import ancestral_step, eta_coefficients
from ._core import Run, register
from ._options import check_number


@register("euler_ancestral", order=1, stochastic=True)
def euler_ancestral(run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler ancestral: one evaluation per step; eta >= 0 sets the noise (0 gives DDIM), s_noise scales it."""
    eta = check_number("eta", eta, 0.0)
    s_noise = check_number("s_noise", s_noise, 0.0, 10.0)
    for i in run.range():
        pred = run.denoise(x, i)
        eps_coef, noise_std = eta_coefficients(run, i, eta)
        x = ancestral_step(run, i, x, pred, eps_coef, s_noise * noise_std)
        x = run.report(i, x, pred)
    return x
