"""Multistep consistency sampling with CTM's gamma: denoise with the model, re-noise to the next time, end on x0.

Song et al., "Consistency Models", ICML 2023, Algorithm 1 (gamma = 1: fresh noise at every step); Kim et al.,
"Consistency Trajectory Models", ICLR 2024, section 5 (gamma sampling: gamma = 0 is deterministic, i.e. DDIM with the
model's data prediction). Step i evaluates x0 = model(x, t_i) and, unless it is the last, moves to
x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} (sqrt(1 - gamma^2) eps_hat + gamma z), eps_hat = (x - alpha_i x0) / sigma_i.
The last step returns x0 (the grid's last time t_end is where that prediction lives and is never evaluated), so
`steps` steps cost `steps` evaluations and `sample` adds no final denoising. Any grid, any process. x [batch, ...].
"""

import math

import torch

from ._core import Run, register
from ._options import check_number


@register("consistency", order=1, stochastic=True, returns_x0=True)
def consistency(run: Run, x: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Consistency / CTM gamma sampling: x0 = f(x, t_i), re-noised to t_{i+1} with gamma of fresh noise (0 <= gamma <= 1)."""
    gamma = check_number("gamma", gamma, 0.0, 1.0)
    for i in run.range():
        pred = run.denoise(x, i)
        if i == run.steps - 1:
            x = pred.x0
        else:
            x = run.alpha[i + 1] * pred.x0 + run.sigma[i + 1] * _mixed_noise(run, i, x, pred.eps, gamma)
        x = run.report(i, x, pred)
    return x


def _mixed_noise(run: Run, i: int, x: torch.Tensor, eps: torch.Tensor, gamma: float) -> torch.Tensor:
    """sqrt(1 - gamma^2) eps + gamma z (no draw when gamma = 0, no eps_hat when gamma = 1)."""
    if gamma == 0:
        return eps
    z = run.noise_like(x, i)
    return z if gamma == 1 else math.sqrt(1.0 - gamma * gamma) * eps + gamma * z
