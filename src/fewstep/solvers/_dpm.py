"""Shared pieces of the DPM-Solver family: log-SNR nodes and the Taylor exponential-integrator step.

Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps",
NeurIPS 2022 (noise prediction, eq. 3.4 and appendix B); Lu et al., "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", 2022 (data prediction, eq. 8, and the SDE solver of appendix B).

With h = lambda_t - lambda_s and D_k ~ h^k m^(k)(lambda_s) (the k-th log-SNR derivative of the model output m,
scaled by h^k), every member of the family is the step

    x_t = a x_s + sum_k c_k D_k,     c_k = scale * h * phi_{k+1}(z),

    noise prediction (ODE):  a = alpha_t / alpha_s,            scale = -sigma_t,    z = h
    data prediction (ODE):   a = sigma_t / sigma_s,            scale = alpha_t,     z = -h
    data prediction (SDE):   a = sigma_t / sigma_s * e^{-h},   scale = 2 alpha_t,   z = -2h
                             plus sigma_t sqrt(1 - e^{-2h}) * standard normal noise.

The methods differ only in how they form the D_k from model evaluations. Steps with an infinite log-SNR at an
end (alpha = 0 or sigma = 0) are left to `Run.ddim_step`, the first-order step that is finite there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..parameterization import Coefficients, Prediction
from ._core import Run
from ._expint import phi


class Node(NamedTuple):
    """A time with its alpha, sigma and log-SNR lambda (Python floats)."""

    t: float
    alpha: float
    sigma: float
    lam: float


def grid_node(run: Run, i: int) -> Node:
    """The node of grid point i."""
    return Node(run.t[i], run.alpha[i], run.sigma[i], run.log_snr[i])


def log_snr_node(run: Run, lam: float) -> Node:
    """The node at log-SNR lam (an off-grid stage time); alpha and sigma are recomputed from its time."""
    t = float(run.process.t_from_log_snr(lam))
    c = Coefficients.at(run.process, t)
    return Node(t, c.alpha, c.sigma, lam)


def finite(*nodes: Node) -> bool:
    """Whether every node has a finite log-SNR (else only a first-order step is defined)."""
    for n in nodes:  # a loop, not all(...): no generator in the sampling loop
        if not math.isfinite(n.lam):
            return False
    return True


def _h_phi(k: int, h: float, z: float) -> float:
    """h * phi_k(z) for z = +-h or -2h; phi_1 through expm1 for accuracy."""
    if k == 1:
        return h / z * math.expm1(z)
    return h * phi(k, z)


def step(x: torch.Tensor, s: Node, t: Node, derivs: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """The deterministic part of x_t = a x_s + sum_k c_k D_k for kind "noise", "data" or "sde" (see module doc)."""
    h = t.lam - s.lam
    if kind == "noise":
        a, scale, z = t.alpha / s.alpha, -t.sigma, h
    elif kind == "data":
        a, scale, z = t.sigma / s.sigma, t.alpha, -h
    else:
        a, scale, z = t.sigma / s.sigma * math.exp(-h), 2.0 * t.alpha, -2.0 * h
    out = x * a
    for k, d in enumerate(derivs):
        out.add_(d, alpha=scale * _h_phi(k + 1, h, z))  # fused multiply-add into the fresh tensor `out`
    return out


def sde_noise_scale(s: Node, t: Node) -> float:
    """Standard deviation sigma_t sqrt(1 - e^{-2h}) of the exact noise of one SDE-DPM-Solver++ step."""
    return t.sigma * math.sqrt(-math.expm1(-2.0 * (t.lam - s.lam)))


def model_output(pred: Prediction, kind: str) -> torch.Tensor:
    """The model output the method integrates: eps for noise prediction, x0 for data prediction (ODE or SDE)."""
    return pred.eps if kind == "noise" else pred.x0
