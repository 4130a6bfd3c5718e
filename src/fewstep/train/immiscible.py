"""Immiscible noise assignment: pair each data point of a batch with a nearby noise sample.

- `immiscible_assign`: Li et al. (2024), "Immiscible Diffusion: Accelerating Diffusion Training with Noise
  Assignment": a linear assignment (scipy.optimize.linear_sum_assignment) of the batch's noise samples to its
  data points minimising the total L2 distance; the noise marginal stays standard normal.
- `knn_noise`: the KNN variant of "Improved Immiscible Diffusion" (Li et al., 2025): for each data point draw k
  noise samples and keep the nearest; cheap for large batches.
Shapes: x0, noise [batch, ...]; returns a permutation [batch] or noise [batch, ...].
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

IMMISCIBLE = ("none", "assign", "knn")


def immiscible_assign(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The permutation p minimising sum_i ||x0_i - noise_{p_i}||; use `noise[p]` as the batch's noise."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    cost = torch.cdist(x0.reshape(len(x0), -1).double(), noise.reshape(len(noise), -1).double())
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(len(x0), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(x0.device)


def knn_noise(x0: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each x0_i the nearest of k fresh standard-normal samples: noise [batch, ...]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    candidates = torch.randn((k, *x0.shape), generator=generator, dtype=x0.dtype).to(x0.device)
    dist = (candidates - x0[None]).reshape(k, len(x0), -1).pow(2).sum(-1)  # [k, batch]
    best = dist.argmin(0)
    return candidates[best, torch.arange(len(x0), device=x0.device)]
