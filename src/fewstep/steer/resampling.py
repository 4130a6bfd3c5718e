"""Particle weights in log space: effective sample size and systematic / multinomial resampling, per group.

Doucet & Johansen, "A Tutorial on Particle Filtering and Smoothing", 2009 (sections 3.4-3.5: ESS, systematic and
multinomial resampling); Douc, Cappe & Moulines, "Comparison of Resampling Schemes for Particle Filtering", 2005.
Weights are [groups, particles] float64 log-weights; nothing exponentiates an unnormalised weight.
"""

from __future__ import annotations

import math

import torch

SCHEMES = ("systematic", "multinomial")


def normalized(log_w: torch.Tensor) -> torch.Tensor:
    """Normalised weights [G, K] from log-weights [G, K] (a group with all weights -inf gets uniform weights)."""
    lse = torch.logsumexp(log_w, dim=1, keepdim=True)
    w = torch.exp(log_w - lse)
    dead = ~torch.isfinite(lse.squeeze(1))
    if bool(dead.any()):
        w[dead] = 1.0 / log_w.shape[1]
    return w


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size [G] = (sum w)^2 / sum w^2 of each group of log-weights [G, K], in [1, K]."""
    w = normalized(log_w)
    return 1.0 / (w * w).sum(dim=1)


def log_mean_weight(log_w: torch.Tensor) -> torch.Tensor:
    """log((1/K) sum_k exp(log_w)) per group [G]: the group's increment of the log normalising-constant estimate."""
    return torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1])


def ancestors(log_w: torch.Tensor, scheme: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices [G, K] in 0..K-1, drawn with probabilities exp(log_w) normalised per group.

    "systematic": one uniform per group, K evenly spaced points (lower variance, the default); "multinomial": K
    independent draws.
    """
    w = normalized(log_w)
    groups, k = w.shape
    if scheme == "multinomial":
        return torch.multinomial(w, k, replacement=True, generator=generator)
    u = torch.rand(groups, 1, generator=generator, dtype=torch.float64)
    points = (u + torch.arange(k, dtype=torch.float64)[None]) / k
    cdf = torch.cumsum(w, dim=1)
    return torch.searchsorted(cdf, points).clamp_(max=k - 1)
