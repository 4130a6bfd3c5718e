"""Input checks shared by the metrics: two point clouds [n, d] with the same feature dimension."""

from __future__ import annotations

import numpy as np
import torch

Points = torch.Tensor | np.ndarray


def as_points(x: Points, name: str, min_rows: int = 2) -> torch.Tensor:
    """x as a float64 CPU tensor [n, d]; rejects other ranks, too few rows and non-finite values."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} points, got {x.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def as_pair(a: Points, b: Points, names: tuple[str, str] = ("a", "b"), min_rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two point clouds with the same dimension d."""
    a, b = as_points(a, names[0], min_rows), as_points(b, names[1], min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    return a, b
