"""Singlestep DPM-Solver-1/2/3 (noise prediction) and DPM-Solver++(2S) (data prediction).

Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps",
NeurIPS 2022, Algorithms 1 and 2 (DPM-Solver-2 with r1 = 1/2, DPM-Solver-3 with r1 = 1/3, r2 = 2/3);
Lu et al., "DPM-Solver++", 2022, Algorithm 1 (DPM-Solver++(2S)). x: [batch, ...].

Options: `solver_type` "dpmsolver" (the papers' updates) or "taylor" (the full Taylor-expansion updates of the
authors' code, = diffusers solver_type "heun"); `intermediate` "logsnr" (each of the `steps` steps places its
intermediate points at the fractions r of its log-SNR interval, `order` evaluations per step) or "grid" (the
grid's own points are the intermediate points: consecutive groups of `order` grid intervals form one step, a last
shorter group is a lower-order step, one evaluation per grid point; as diffusers' DPMSolverSinglestepScheduler
with lower_order_final). A step with an infinite log-SNR at an end (alpha = 0 or sigma = 0) is first order.
In "grid" mode the callback is called once per step (after its last grid interval). The multistep rule
`lower_order_final` of `fewstep.sample` does not apply to these solvers.

The second intermediate point of DPM-Solver-3 is the papers' second-order update from s to s2 for both solver
types, as in the authors' code; diffusers' order-3 "midpoint" uses its midpoint update there instead (both are
third order), so it matches diffusers' solver_type "heun" (= "taylor") but not "midpoint".
"""

import torch

from ..parameterization import Prediction
from ._core import Run, register
from ._dpm import Node, finite, grid_node, log_snr_node, model_output, step
from ._options import check_choice

SOLVER_TYPES = ("dpmsolver", "taylor")
INTERMEDIATES = ("logsnr", "grid")
FRACTIONS = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def second_derivs(m_s: torch.Tensor, m_1: torch.Tensor, r1: float, solver_type: str) -> list[torch.Tensor]:
    """D_k of a second-order step from outputs at s and at the fraction r1 of the log-SNR step."""
    d1 = (m_1 - m_s) / r1
    return [m_s + 0.5 * d1] if solver_type == "dpmsolver" else [m_s, d1]


def third_derivs(ms: list[torch.Tensor], r1: float, r2: float, solver_type: str) -> list[torch.Tensor]:
    """D_k of a third-order step from outputs at s and at the fractions r1 < r2 of the log-SNR step."""
    d1_0, d1_1 = (ms[1] - ms[0]) / r1, (ms[2] - ms[0]) / r2
    if solver_type == "dpmsolver":
        return [ms[0], d1_1]
    return [ms[0], (r2 * d1_0 - r1 * d1_1) / (r2 - r1), 2.0 * (d1_1 - d1_0) / (r2 - r1)]


def singlestep_update(
    run: Run, x: torch.Tensor, pred: Prediction, nodes: list[Node], kind: str, solver_type: str, *, with_lower: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One singlestep step of order len(nodes) - 1 from nodes[0] to nodes[-1] through the intermediate nodes.

    pred: the evaluation at nodes[0]; the intermediate evaluations are made here. All nodes need a finite
    log-SNR. With `with_lower`, also returns the solution of one order lower built from the same evaluations
    (the embedded pair of the adaptive solver).
    """
    s, t = nodes[0], nodes[-1]
    ms = [model_output(pred, kind)]
    h = t.lam - s.lam
    rs = [(n.lam - s.lam) / h for n in nodes[1:-1]]
    lower = higher = step(x, s, t, ms, kind)
    if len(nodes) >= 3:
        u1 = step(x, s, nodes[1], ms, kind)
        ms.append(model_output(run.denoise_at(u1, nodes[1].t), kind))
        lower, higher = higher, step(x, s, t, second_derivs(ms[0], ms[1], rs[0], solver_type), kind)
    if len(nodes) == 4:
        # second intermediate point: the papers' second-order update from s to s2 (both solver types)
        u2 = step(x, s, nodes[2], second_derivs(ms[0], ms[1], rs[0] / rs[1], "taylor"), kind)
        ms.append(model_output(run.denoise_at(u2, nodes[2].t), kind))
        lower, higher = higher, step(x, s, t, third_derivs(ms, rs[0], rs[1], solver_type), kind)
    return (higher, lower) if with_lower else higher


def _group_size(run: Run, i: int, order: int) -> int:
    """Grid intervals of the step that starts at grid point i ("grid" mode); shortened at infinite log-SNR."""
    g = 1 if run.log_snr[i] == -float("inf") else min(order, run.steps - i)
    while g > 1 and run.log_snr[i + g] == float("inf"):
        g -= 1
    return g


def _logsnr_nodes(run: Run, i: int, order: int) -> list[Node]:
    """Start, intermediate points at the log-SNR fractions of the order, and end of step i ("logsnr" mode)."""
    s, t = grid_node(run, i), grid_node(run, i + 1)
    if not finite(s, t):
        return [s, t]
    return [s] + [log_snr_node(run, s.lam + r * (t.lam - s.lam)) for r in FRACTIONS[order]] + [t]


def singlestep(run: Run, x: torch.Tensor, *, order: int, kind: str, solver_type: str, intermediate: str) -> torch.Tensor:
    """Singlestep DPM-Solver(++) of `order` over the grid (see the module docstring for the options)."""
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("intermediate", intermediate, INTERMEDIATES)
    i = 0
    while i < run.steps:
        run.begin_step(i)
        pred = run.denoise(x, i)
        if intermediate == "grid":
            g = _group_size(run, i, order)
            nodes = [grid_node(run, j) for j in range(i, i + g + 1)]
        else:
            g, nodes = 1, _logsnr_nodes(run, i, order)
        if len(nodes) == 2:
            x = run.ddim_step(i, pred, i + g)
        else:
            x = singlestep_update(run, x, pred, nodes, kind, solver_type)
        i += g
        x = run.report(i - 1, x, pred)
    run.begin_step(run.steps)
    return x


@register("dpm_solver_1", order=1)
def dpm_solver_1(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-1 (= DDIM): first-order exponential integrator, one evaluation per step."""
    return singlestep(run, x, order=1, kind="noise", solver_type="dpmsolver", intermediate="logsnr")


@register("dpm_solver_2", order=2)
def dpm_solver_2(run: Run, x: torch.Tensor, *, solver_type: str = "dpmsolver", intermediate: str = "logsnr") -> torch.Tensor:
    """DPM-Solver-2: singlestep second order in noise prediction, r1 = 1/2, two evaluations per step."""
    return singlestep(run, x, order=2, kind="noise", solver_type=solver_type, intermediate=intermediate)


@register("dpm_solver_3", order=3)
def dpm_solver_3(run: Run, x: torch.Tensor, *, solver_type: str = "dpmsolver", intermediate: str = "logsnr") -> torch.Tensor:
    """DPM-Solver-3: singlestep third order in noise prediction, r1 = 1/3, r2 = 2/3, three evaluations per step."""
    return singlestep(run, x, order=3, kind="noise", solver_type=solver_type, intermediate=intermediate)


@register("dpmpp_2s", order=2)
def dpmpp_2s(run: Run, x: torch.Tensor, *, solver_type: str = "dpmsolver", intermediate: str = "logsnr") -> torch.Tensor:
    """DPM-Solver++(2S): singlestep second order in data prediction, r = 1/2, two evaluations per step."""
    return singlestep(run, x, order=2, kind="data", solver_type=solver_type, intermediate=intermediate)
