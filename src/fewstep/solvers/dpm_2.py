"""DPM-2: a second-order midpoint step in sigma/alpha space with the midpoint taken in log sigma/alpha.

Crowson, k-diffusion `sample_dpm_2` (after Lu et al., "DPM-Solver", NeurIPS 2022): an Euler step to the
geometric mean sigma_mid = sqrt(sigma_i sigma_{i+1}) (log-SNR midpoint), then a full step with the slope eps
there; 2 evaluations per step. A step that ends at sigma = 0 or starts at alpha = 0 is an Euler (DDIM) step.
x [batch, ...].
"""

import math

import torch

from ..parameterization import Coefficients
from ._core import Run, register


def midpoints(run: Run) -> list[tuple[float, Coefficients] | None]:
    """(t, its coefficients) at the log-SNR midpoint of every step; None where a log-SNR is infinite."""
    out = []
    for i in range(run.steps):
        lam = 0.5 * (run.log_snr[i] + run.log_snr[i + 1])
        t = float(run.process.t_from_log_snr(lam)) if math.isfinite(lam) else None
        out.append(None if t is None else (t, Coefficients.at(run.process, t)))
    return out


@register("dpm_2", order=2)
def dpm_2(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-2: Euler to the log-SNR midpoint, then the full step with the midpoint's eps."""
    mids = midpoints(run)
    for i in run.range():
        pred = run.denoise(x, i)
        if mids[i] is None:
            x = run.ddim_step(i, pred)
        else:
            t_mid, c = mids[i]
            eps_mid = run.denoise_at(c.alpha * pred.x0 + c.sigma * pred.eps, t_mid).eps
            alpha_to, sigma_to = run.alpha[i + 1], run.sigma[i + 1]
            x = (alpha_to / run.alpha[i]) * x + (sigma_to - alpha_to * run.sigma[i] / run.alpha[i]) * eps_mid
        x = run.report(i, x, pred)
    return x
