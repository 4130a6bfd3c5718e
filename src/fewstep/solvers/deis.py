"""DEIS: the multistep exponential integrator in noise prediction, eps extrapolated by a polynomial in log-SNR.

Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023 (DEIS, section 4: the
multistep "AB" exponential integrators). The paper's tAB / rhoAB fit the polynomial in t / rho = sigma / alpha; this
is the variant of diffusers' DEISMultistepScheduler (solver_type="logrho"), which fits it in log(rho) = -lambda.

With y = x / alpha the probability-flow ODE is dy/drho = eps exactly, so with v = lambda_{i+1} - lambda,

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} integral_0^h e^v eps(lambda_{i+1} - v) dv,

and eps is replaced by the Lagrange polynomial through the last `order` evaluations. The integrals of the Lagrange
basis are computed once per run by numerical quadrature (SciPy) in float64. Tensors are [batch, ...].
"""

import math

import torch
from scipy.integrate import quad

from ._core import Run, register
from ._lagrange import combine
from ._options import check_int

MAX_ORDER = 3


def lagrange_integrals(nodes: list[float], h: float) -> list[float]:
    """integral_0^h e^v l_j(v) dv for the Lagrange basis l_j on `nodes` (the v = lambda_{i+1} - lambda_{i-j})."""

    def basis(j: int, v: float) -> float:
        return math.prod((v - nodes[m]) / (nodes[j] - nodes[m]) for m in range(len(nodes)) if m != j)

    return [quad(lambda v, j=j: math.exp(v) * basis(j, v), 0.0, h, epsabs=0.0, epsrel=1e-13)[0] for j in range(len(nodes))]


def coefficients(run: Run, order: int) -> list[list[float]]:
    """Per step i, the weights of eps_i, eps_{i-1}, ... (empty for a first-order step, which is DDIM)."""
    table = []
    for i in range(run.steps):
        p = run.order_at(i, order)
        if p == 1:
            table.append([])
            continue
        lam_next = run.log_snr[i + 1]
        nodes = [lam_next - run.log_snr[i - j] for j in range(p)]
        table.append(lagrange_integrals(nodes, lam_next - run.log_snr[i]))
    return table


@register("deis", order=3)
def deis(run: Run, x: torch.Tensor, *, order: int = 3) -> torch.Tensor:
    """DEIS (log-SNR polynomial, "logrho"), multistep order 1-3 (default 3, the paper's highest; diffusers: 2), 1 NFE per step."""
    order = check_int("order", order, 1, MAX_ORDER)
    table = coefficients(run, order)
    eps: list[torch.Tensor] = []
    for i in run.range():
        pred = run.denoise(x, i)
        eps = ([pred.eps] + eps)[:order]  # newest first
        weights = table[i]
        if not weights:
            x = run.ddim_step(i, pred)
        else:
            x = run.alpha[i + 1] / run.alpha[i] * x - run.sigma[i + 1] * combine(weights, eps[: len(weights)])
        x, eps = run.report(i, x, pred, eps)
    return x
