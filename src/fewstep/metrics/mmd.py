"""Maximum mean discrepancy with a Gaussian (RBF) kernel, unbiased U-statistic estimate.

Gretton et al., "A Kernel Two-Sample Test", JMLR 2012, eq. (3) (MMD^2_u).
k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2)); default bandwidth: the median pairwise distance of the pooled sample.
a: [n, d], b: [m, d]. The unbiased estimate has mean 0 for equal distributions and can be slightly negative.
"""

from __future__ import annotations

import torch

from ._checks import Points, as_pair


def median_bandwidth(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median heuristic: the median distance between distinct points of the pooled sample."""
    pooled = torch.cat([a, b])
    d = torch.cdist(pooled, pooled)
    off = d[~torch.eye(len(pooled), dtype=torch.bool)]
    return float(off.median())


def mmd_rbf(a: Points, b: Points, *, bandwidth: float | None = None) -> float:
    """Unbiased estimate of MMD^2 between the distributions of a [n, d] and b [m, d] (RBF kernel)."""
    a, b = as_pair(a, b)
    if bandwidth is None:
        bandwidth = median_bandwidth(a, b)
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got bandwidth={bandwidth!r}")
    gamma = 1.0 / (2 * bandwidth**2)
    n, m = len(a), len(b)
    kaa = torch.exp(-gamma * torch.cdist(a, a) ** 2)
    kbb = torch.exp(-gamma * torch.cdist(b, b) ** 2)
    kab = torch.exp(-gamma * torch.cdist(a, b) ** 2)
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())
