"""Sliced Wasserstein distance between two point clouds: the mean 1-D Wasserstein distance over random directions.

Rabin, Peyre, Delon & Bernot, "Wasserstein Barycenter and its Application to Texture Mixing", SSVM 2011;
Bonneel et al., "Sliced and Radon Wasserstein Barycenters of Measures", JMIV 2015.
SW_p(a, b) = (E_theta W_p^p(theta.a, theta.b))^(1/p), theta uniform on the sphere; each 1-D W_p is exact
(quantile functions of the two empirical measures, any sizes). a: [n, d], b: [m, d].
"""

from __future__ import annotations

import torch

from ._checks import Points, as_pair


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Exact W_p^p between uniform empirical measures on rows: u [k, n], v [k, m] -> [k]."""
    u, v = u.sort(dim=1).values, v.sort(dim=1).values
    n, m = u.shape[1], v.shape[1]
    levels = torch.cat([torch.arange(1, n + 1, dtype=u.dtype) / n, torch.arange(1, m + 1, dtype=u.dtype) / m]).unique()
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    # the quantile function of an n-point empirical measure on (l - w, l] is its ceil(l n)-th sorted value
    iu = (torch.ceil(levels * n - 1e-9).long() - 1).clamp(0, n - 1)
    iv = (torch.ceil(levels * m - 1e-9).long() - 1).clamp(0, m - 1)
    return ((u[:, iu] - v[:, iv]).abs() ** p * widths).sum(dim=1)


def sliced_wasserstein(
    a: Points, b: Points, *, projections: int = 256, p: float = 2.0, generator: torch.Generator | None = None
) -> float:
    """Sliced p-Wasserstein distance between a [n, d] and b [m, d] over `projections` random directions."""
    if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
        raise ValueError(f"projections must be an integer >= 1, got {projections!r}")
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got p={p!r}")
    a, b = as_pair(a, b, min_rows=1)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return float(wasserstein_1d((a @ theta).T, (b @ theta).T, p).mean() ** (1 / p))
