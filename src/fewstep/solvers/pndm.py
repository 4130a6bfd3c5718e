"""PNDM and PLMS: pseudo Runge-Kutta and pseudo linear multistep methods on the DDIM transfer.

Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds", ICLR 2022 (section 3.3,
eqs. 9-13: the transfer part phi is the DDIM step, the gradient part a classical RK4 / 4-step Adams-Bashforth
combination of eps). PLMS as in Stable Diffusion (diffusers' PNDMScheduler with skip_prk_steps=True): the first
step is the pseudo improved Euler step (two evaluations), then Adams-Bashforth of order 2, 3, 4 on eps.

With y = x / alpha and rho = sigma / alpha the probability-flow ODE is dy/drho = eps, and the transfer
x_j = alpha_j (x_i - sigma_i e) / alpha_i + sigma_j e is Euler's method in rho. The fixed RK4/AB4 weights are
therefore fourth order on grids uniform in rho (e.g. time_uniform on EDM); on other grids the weights are not those
of the grid and the observed order is 2 (the order these solvers are registered with). The PRK midpoint is the
midpoint in the process's time. A step from alpha = 0 (where the transfer is singular) or to sigma = 0 is a DDIM
step. Tensors are [batch, ...]; coefficients are Python floats.
"""

import math
from collections.abc import Callable

import torch

from ..parameterization import Prediction
from ._core import Run, register
from ._lagrange import combine

# Adams-Bashforth weights of eps_i, eps_{i-1}, ... for equal steps, orders 1-4.
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
PRK_STEPS = 3  # PNDM warm-up: three pseudo Runge-Kutta steps give the four eps PLMS needs


def transfer(x: torch.Tensor, eps: torch.Tensor, a_from: float, s_from: float, a_to: float, s_to: float) -> torch.Tensor:
    """The DDIM transfer phi: move x from (a_from, s_from) to (a_to, s_to) with the noise estimate eps (a_from > 0).

    a_to (x - s_from eps) / a_from + s_to eps, as two fused kernels.
    """
    ratio = a_to / a_from
    return torch.add(x * ratio, eps, alpha=s_to - ratio * s_from)


def multistep(run: Run, i: int, x: torch.Tensor, pred: Prediction, eps: list[torch.Tensor], order: int) -> torch.Tensor:
    """Adams-Bashforth step i -> i + 1 of order `order` on eps (newest first); order 1 is the DDIM step."""
    if order == 1:
        return run.ddim_step(i, pred)
    e = combine(list(ADAMS_BASHFORTH[order]), eps[:order])
    return transfer(x, e, run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1])


def first_order_only(run: Run, i: int) -> bool:
    """A step from log-SNR -inf (alpha = 0: the transfer is singular) or to sigma = 0 (pure denoising) is DDIM."""
    return run.log_snr[i] == -math.inf or run.sigma[i + 1] == 0


def prk_step(run: Run, i: int, x: torch.Tensor, pred: Prediction) -> torch.Tensor:
    """Pseudo RK4 step i -> i + 1 (four evaluations, the first being `pred` at x): PNDM eq. 13."""
    t_mid = 0.5 * (run.t[i] + run.t[i + 1])
    a_mid, s_mid = float(run.process.alpha(t_mid)), float(run.process.sigma(t_mid))
    a, s, a_next, s_next = run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1]
    e1 = pred.eps
    e2 = run.denoise_at(transfer(x, e1, a, s, a_mid, s_mid), t_mid).eps
    e3 = run.denoise_at(transfer(x, e2, a, s, a_mid, s_mid), t_mid).eps
    e4 = run.denoise_at(transfer(x, e3, a, s, a_next, s_next), run.t[i + 1]).eps
    return transfer(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, a, s, a_next, s_next)


def improved_euler_step(run: Run, i: int, x: torch.Tensor, pred: Prediction) -> torch.Tensor:
    """PLMS's first step: DDIM to t_{i+1}, then the transfer with the mean of both eps (two evaluations)."""
    e_next = run.denoise(run.ddim_step(i, pred), i + 1).eps
    return transfer(x, 0.5 * (pred.eps + e_next), run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1])


WarmupStep = Callable[[Run, int, torch.Tensor, Prediction], torch.Tensor]


def run_linear_multistep(run: Run, x: torch.Tensor, order: int, warmup_steps: int, warmup: WarmupStep | None) -> torch.Tensor:
    """Adams-Bashforth of `order` on eps after `warmup_steps` single steps `warmup(run, i, x, pred)`."""
    eps: list[torch.Tensor] = []
    for i in run.range():
        pred = run.denoise(x, i)
        eps = ([pred.eps] + eps)[:order]
        if i < warmup_steps and not first_order_only(run, i):
            x = warmup(run, i, x, pred)
        else:
            x = multistep(run, i, x, pred, eps, run.order_at(i, order))
        x, eps = run.report(i, x, pred, eps)
    return x


@register("pndm", order=2)
def pndm(run: Run, x: torch.Tensor) -> torch.Tensor:
    """PNDM (F-PNDM): 3 pseudo Runge-Kutta steps (4 NFE each), then PLMS (4-step Adams-Bashforth on eps, 1 NFE)."""
    return run_linear_multistep(run, x, 4, PRK_STEPS, prk_step)


@register("plms", order=2)
def plms(run: Run, x: torch.Tensor) -> torch.Tensor:
    """PLMS (PNDM without Runge-Kutta): pseudo improved Euler first step (2 NFE), then Adams-Bashforth 2, 3, 4."""
    return run_linear_multistep(run, x, 4, 1, improved_euler_step)
