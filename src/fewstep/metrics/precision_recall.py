"""k-NN precision and recall of a generated sample against a real one.

Kynkaanniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019.
Each point of a set gets a ball reaching its k-th nearest neighbour within the same set; precision is the
fraction of generated points inside some real ball (fidelity), recall the fraction of real points inside some
generated ball (coverage). Features a: [n, d], b: [m, d].
"""

from __future__ import annotations

import torch

from ._checks import Points, as_pair


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point of x [n, d] to its k-th nearest other point [n]."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (distance 0)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> float:
    """Fraction of `points` inside at least one ball (centres, radii)."""
    inside = [(torch.cdist(p, centres) <= radii).any(dim=1) for p in points.split(chunk)]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real: Points, fake: Points, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of `fake` [m, d] against `real` [n, d] with k-nearest-neighbour balls."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got k={k!r}")
    real, fake = as_pair(real, fake, ("real", "fake"), min_rows=k + 1)
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
