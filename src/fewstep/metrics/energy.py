"""Energy distance between two samples, V-statistic estimate (the one that is >= 0 for every pair of samples).

Szekely & Rizzo, "Energy statistics: A class of statistics based on distances", J. Stat. Plan. Inference, 2013:
E(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, zero iff the distributions are equal.
a: [n, d], b: [m, d]; Euclidean distances in float64.
"""

from __future__ import annotations

import torch

from ._checks import Points, as_pair


def energy_distance(a: Points, b: Points) -> float:
    """Energy distance between the distributions of a [n, d] and b [m, d] (V-statistic: every pair, diagonals included)."""
    a, b = as_pair(a, b)
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
