"""UniPC: the unified predictor (UniP) and corrector (UniC) in data prediction, B(h) variants bh1 and bh2.

Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
NeurIPS 2023, section 3 (UniC, UniP and their multistep combination UniPC, here in the data-prediction form of
DPM-Solver++).

With h = lambda_{i+1} - lambda_i, r_k = (lambda_{i-k} - lambda_i) / h and D_k = (x0_{i-k} - x0_i) / r_k, one step is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} expm1(-h) x0_i - alpha_{i+1} B(h) sum_k rho_k D_k,

B(h) = -h ("bh1") or expm1(-h) ("bh2"). UniP-p uses the p - 1 past differences, UniC-p adds the difference to the
evaluation at the new point, which the next step needs anyway: the corrector costs no evaluation and raises the
order from p to p + 1. The rho solve the Vandermonde systems of the paper; like the official code (and diffusers)
UniP-2 and UniC-1 use rho = 1/2, which has the same order. The evaluation at the predicted point is kept as the
next step's x0 (the corrected point is not re-evaluated). A corrector whose step starts at alpha = 0 (log-SNR -inf,
h infinite) is skipped; steps from there or to sigma = 0 are first order (`Run.order_at`), so every coefficient
stays finite. Tensors are [batch, ...]; coefficients are Python floats.
"""

import math
from typing import NamedTuple

import numpy as np
import torch

from ._core import Run, register
from ._expint import phi
from ._lagrange import combine, data_step
from ._options import check_choice, check_int

VARIANTS = ("bh1", "bh2")
MAX_ORDER = 3


class StepPlan(NamedTuple):
    """Step i's order p, ratios r_k (k = 1..p-1), scale alpha_{i+1} B(h) of the rho sum and weights: UniP's (None for
    a first-order step) and UniC's (None where the step is not corrected). They depend on the grid only, so
    `plan_steps` computes them before the loop."""

    order: int
    rks: list[float]
    scale: float
    predictor: list[float] | None
    corrector: list[float] | None


class Parts(NamedTuple):
    """What UniP step i and its UniC correction share: the first-order step x_next and the differences D_k [batch, ...]."""

    x_next: torch.Tensor
    diffs: list[torch.Tensor]


def _b_h(hh: float, variant: str) -> float:
    """B(h) evaluated at hh = -h (data prediction): hh for bh1, e^hh - 1 for bh2."""
    return hh if variant == "bh1" else math.expm1(hh)


def _system(nodes: list[float], hh: float, variant: str) -> tuple[list[list[float]], list[float]]:
    """The Vandermonde system of the rho: rows j = 0.. of r_k^j, right-hand side b_j = hh phi_{j+1}(hh) j! / B(h)."""
    n, bh = len(nodes), _b_h(hh, variant)
    matrix = [[r**j for r in nodes] for j in range(n)]
    rhs = [hh * phi(j + 1, hh) * math.factorial(j) / bh for j in range(1, n + 1)]
    return matrix, rhs


def rhos(rks: list[float], hh: float, variant: str, corrector: bool) -> list[float]:
    """UniP (corrector=False) or UniC (corrector=True) weights for the ratios r_k of the past points.

    The system has rows j = 0.. of r_k^j and right-hand side b_j = hh phi_{j+1}(hh) j! / B(h), j = 1..; the
    corrector appends the new point (r = 1) to the unknowns.
    """
    return rhos_many([(rks, hh, corrector)], variant)[0]


def rhos_many(queries: list[tuple[list[float], float, bool]], variant: str) -> list[list[float]]:
    """`rhos` of every (rks, hh, corrector) in `queries`, with one batched solve per system size (numpy runs the same
    LAPACK solve on each system of a batch, so the weights are those of one solve per system, bit for bit)."""
    out: list[list[float]] = []
    systems: dict[int, tuple[list[int], list[list[list[float]]], list[list[float]]]] = {}
    for q, (rks, hh, corrector) in enumerate(queries):
        nodes = rks + [1.0] if corrector else rks
        out.append([0.5] if len(nodes) == 1 else [])  # UniP-2 and UniC-1: rho = 1/2 (official code, diffusers)
        if len(nodes) > 1:
            index, matrices, rhs = systems.setdefault(len(nodes), ([], [], []))
            matrix, b = _system(nodes, hh, variant)
            index.append(q)
            matrices.append(matrix)
            rhs.append(b)
    for index, matrices, rhs in systems.values():
        solved = np.linalg.solve(np.array(matrices, dtype=np.float64), np.array(rhs, dtype=np.float64)[..., None])
        for q, weights in zip(index, solved[..., 0].tolist(), strict=True):
            out[q] = weights
    return out


def plan_steps(run: Run, order: int, variant: str, corrector: bool) -> list[StepPlan]:
    """Every step's `StepPlan`: its order (`Run.order_at`) and weights. A step is corrected (UniC, applied at the
    next evaluation) unless it is the last or starts at log-SNR -inf (h infinite; alpha = 0 there)."""
    queries: list[tuple[list[float], float, bool]] = []
    steps: list[tuple[int, list[float], float, bool]] = []
    for i in range(run.steps):
        p = run.order_at(i, order)
        h = run.log_snr[i + 1] - run.log_snr[i]
        rks = [(run.log_snr[i - k] - run.log_snr[i]) / h for k in range(1, p)]
        corrected = corrector and i + 1 < run.steps and run.log_snr[i] != -math.inf
        steps.append((p, rks, run.alpha[i + 1] * _b_h(-h, variant), corrected))
        if p > 1:
            queries.append((rks, -h, False))
        if corrected:
            queries.append((rks, -h, True))
    solved = iter(rhos_many(queries, variant))  # in the order asked: each step's UniP weights, then its UniC weights
    return [StepPlan(p, rks, scale, next(solved) if p > 1 else None, next(solved) if corrected else None)
            for p, rks, scale, corrected in steps]  # fmt: skip


def predictor_parts(run: Run, i: int, x: torch.Tensor, x0s: list[torch.Tensor], step: StepPlan) -> Parts:
    """The first-order step from x with x0_i and the differences D_k of the past points (x0s as in `update`)."""
    m0 = x0s[-1]
    diffs = [(x0s[-1 - k] - m0) / step.rks[k - 1] for k in range(1, step.order)]
    return Parts(data_step(run, i, x, m0), diffs)


def update(
    run: Run,
    i: int,
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    step: StepPlan,
    x0_new: torch.Tensor | None,
    parts: Parts | None = None,
) -> torch.Tensor:
    """One UniP step i -> i + 1 from x (x0_new None), or the UniC correction of it (x0_new = x0_{i+1}).

    x0s: data predictions at grid points i - p + 1 .. i (newest last, p = step.order), each [batch, ...]. `parts`:
    this step's `predictor_parts` when already computed (the corrector reuses the predictor's), else computed here.
    """
    x_next, diffs = predictor_parts(run, i, x, x0s, step) if parts is None else parts
    if x0_new is not None:
        diffs = diffs + [x0_new - x0s[-1]]
    if not diffs:
        return x_next
    return x_next - step.scale * combine(step.predictor if x0_new is None else step.corrector, diffs)


@register("unipc", order=3)
def unipc(run: Run, x: torch.Tensor, *, order: int = 2, variant: str = "bh2", corrector: bool = True) -> torch.Tensor:
    """UniPC-p (multistep, data prediction): UniP-p predictor, UniC-p corrector on (order p + 1), one NFE per step.

    order 1-3: default 2 (UniPC-2, third order), the authors' recommendation for guided sampling, where higher
    orders are less stable at large guidance (3 is recommended for unconditional models); it is also diffusers'
    default. variant "bh2" (default) or "bh1" (recommended for unconditional sampling under 10 steps); B(h) only
    matters where rho = 1/2 is used (UniP-2, UniC-1), the solved rho scale with 1/B(h). corrector: apply UniC after
    every step but the last. Order 1 without corrector is DDIM.
    """
    order = check_int("order", order, 1, MAX_ORDER)
    check_choice("variant", variant, VARIANTS)
    if not isinstance(corrector, bool):
        raise ValueError(f"corrector must be True or False, got corrector={corrector!r}")
    plans = plan_steps(run, order, variant, corrector)
    x0s: list[torch.Tensor] = []
    x_prev, parts = x, None
    for i in run.range():
        pred = run.denoise(x, i)
        if i > 0 and plans[i - 1].corrector is not None:  # UniC for the previous step
            x = update(run, i - 1, x_prev, x0s[-plans[i - 1].order :], plans[i - 1], pred.x0, parts)
        x0s = (x0s + [pred.x0])[-order:]
        step, x_prev = plans[i], x
        # The corrector reuses the predictor's parts (the same arithmetic on the same tensors), unless a callback
        # could change those tensors in between or (order 1) the predicted state itself is one of them.
        reuse = step.corrector is not None and step.order > 1 and run.callback is None
        parts = predictor_parts(run, i, x, x0s[-step.order :], step) if reuse else None
        x = update(run, i, x, x0s[-step.order :], step, None, parts)
        x, x_prev, x0s = run.report(i, x, pred, x_prev, x0s)
    return x
