"""The stochastic-interpolant SDE: the probability-flow velocity plus a tunable amount of Langevin noise.

Albergo, Boffi & Vanden-Eijnden, "Stochastic Interpolants: A Unifying Framework for Flows and Diffusions", 2023,
section 2.3: for any eps(t) >= 0, dx = [v - (eps(t) / 2) score] dt + sqrt(eps(t)) dW, run backwards in time (their
dx = [v + (eps/2) score] dt + sqrt(eps) dW with time running from noise to data), has the same marginals as the
ODE dx = v dt. Our choice: eps(t) = diffusion * sigma(t) in the process's own time, so the drift is
v + (diffusion / 2) eps-prediction: finite at t = 1 of RectifiedFlow (alpha = 0, where the diffusion SDE's g^2 is
infinite) and vanishing at sigma = 0; diffusion = 0 is the Euler ODE sampler. x [batch, ...].
"""

import torch

from ._core import Run, register
from ._options import check_number
from .euler_maruyama import reverse_sde_step


@register("interpolant_sde", order=1, stochastic=True)
def interpolant_sde(run: Run, x: torch.Tensor, *, diffusion: float = 1.0) -> torch.Tensor:
    """Euler-Maruyama on the interpolant SDE with eps(t) = diffusion * sigma(t); one evaluation per step."""
    diffusion = check_number("diffusion", diffusion, 0.0, 1000.0)
    for i in run.range():
        pred = run.denoise(x, i)
        x = reverse_sde_step(run, i, x, pred, diffusion * run.sigma[i])
        x = run.report(i, x, pred)
    return x
