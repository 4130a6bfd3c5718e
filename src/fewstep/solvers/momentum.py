"""Heavy-ball momentum (HB) and Generalized Heavy Ball (GHVB) on DPM-Solver++-style data-prediction steps.

Wizadwongsa, Chinchuthakun, Khungurn, Raj & Suwajanakorn, "Diffusion Sampling with Momentum for Mitigating
Divergence Artifacts", ICLR 2024 (section 4, Algorithms 1-2, Theorems 1-2).

Both act on the data-prediction ODE d(x/sigma)/d(alpha/sigma) = x0, where DPM-Solver++ steps are
x/sigma += delta * D with D a mean data prediction (`_lagrange`).
- HB (eq. 14): the velocity v <- (1 - beta) v + beta D is an exponential moving average of the solver's own D,
  and the step uses v. beta = 1 is the underlying solver; beta < 1 widens the stability region and makes the
  method first order (Theorem 1). The velocity starts at the first D (as the authors' code does).
- GHVB (eqs. 15-19): the average is taken first, v <- (1 - beta) v + beta x0, and a k-th order multistep formula
  is applied to the velocities. On a uniform grid the formula is (1/beta) T_k[(beta + (1 - beta) Nabla) A(Nabla)]
  with A the Adams-Bashforth operator and T_k the truncation to k terms (eq. 16). On a variable log-SNR grid we
  use the same operator identity with A the step's exponential Adams-Bashforth weights written in backward
  differences (frozen at the step); the local error stays O(h^{k+1}), so GHVB of momentum number r has order
  k = ceil(r) (Theorem 2) with beta = r - (k - 1). Integer r is exponential Adams-Bashforth of order r exactly.
Shapes: x [batch, ...]; coefficients are Python floats.
"""

from __future__ import annotations

import math

import torch

from ._core import Run, register
from ._lagrange import combine, data_step, weights
from ._options import check_int

MAX_GHVB_ORDER = 4
MIN_DAMPING = 1e-3  # GHVB weights grow like 1 / beta


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"beta must be a damping coefficient in (0, 1], got beta={beta!r}")
    return float(beta)


def dpmpp_mean(run: Run, i: int, order: int, x0: torch.Tensor, prev_x0: torch.Tensor | None) -> torch.Tensor:
    """DPM-Solver++(1) / (2M) mean data prediction D of step i (Lu et al., 2022b, Algorithm 2)."""
    if order == 1:
        return x0
    r = (run.log_snr[i] - run.log_snr[i - 1]) / (run.log_snr[i + 1] - run.log_snr[i])
    return x0 + (x0 - prev_x0) / (2 * r)


@register("hb", order=1)
def hb(run: Run, x: torch.Tensor, *, beta: float = 0.8, order: int = 2) -> torch.Tensor:
    """DPM-Solver++(1 or 2M) with heavy-ball momentum: v <- (1 - beta) v + beta D; beta = 1 is the plain solver."""
    beta = _check_beta(beta)
    order = check_int("order", order, 1, 2)  # DPM-Solver++(1) or (2M)
    v = prev = None
    for i in run.range():
        pred = run.denoise(x, i)
        d = dpmpp_mean(run, i, run.order_at(i, order), pred.x0, None if prev is None else prev.x0)
        v = d if v is None else (1 - beta) * v + beta * d
        x = data_step(run, i, x, v)
        prev = pred
        x, v, prev = run.report(i, x, pred, v, prev)
    return x


def ghvb_split(order: float) -> tuple[int, float]:
    """Momentum number r -> (method order k = ceil(r), damping beta = r - (k - 1))."""
    if isinstance(order, bool) or not isinstance(order, (int, float)) or not 0 < order <= MAX_GHVB_ORDER:  # NaN fails
        raise ValueError(f"order must be a momentum number in (0, {MAX_GHVB_ORDER}] (e.g. 1.5, 2.8), got order={order!r}")
    k = math.ceil(order)
    beta = float(order) - (k - 1)
    if k >= 2 and beta < MIN_DAMPING:
        raise ValueError(
            f"order={order!r} is too close above the integer {k - 1}: its damping {beta:.3g} < {MIN_DAMPING} makes the "
            f"weights overflow; use order={k - 1} or order >= {k - 1 + MIN_DAMPING}"
        )
    return k, beta


def ghvb_weights(base: list[float], beta: float) -> list[float]:
    """Weights on v_{n+1}, v_n, ... from base multistep weights on x0_n, x0_{n-1}, ... (eq. 16, variable steps).

    base A = sum_j a_j (1 - Nabla)^j in backward differences; P = T_k[(1 + c Nabla) A], c = (1 - beta)/beta.
    """
    k = len(base)
    c = (1 - beta) / beta
    a = [sum(w * math.comb(j, m) * (-1) ** m for j, w in enumerate(base)) for m in range(k)]
    p = [a[m] + (c * a[m - 1] if m else 0.0) for m in range(k)]
    return [sum(p[m] * (-1) ** q * math.comb(m, q) for m in range(q, k)) for q in range(k)]


@register("ghvb", order=2)
def ghvb(run: Run, x: torch.Tensor, *, order: float = 1.8) -> torch.Tensor:
    """Generalized Heavy Ball of momentum number `order` (order ceil(r), damping r - ceil(r) + 1); integer r = plain."""
    k, beta = ghvb_split(order)
    velocities: list[torch.Tensor] = []  # v_{n+1}, v_n, ... (newest first)
    for i in run.range():
        pred = run.denoise(x, i)
        v = pred.x0 if not velocities else (1 - beta) * velocities[0] + beta * pred.x0
        velocities = [v, *velocities[: k - 1]]
        ke = run.order_at(i, k)
        base = weights(run, i, [i - j for j in range(ke)])
        x = data_step(run, i, x, combine(ghvb_weights(base, beta), velocities[:ke]))
        x, velocities = run.report(i, x, pred, velocities)
    return x
