"""Forecast a cached feature at a new time from its last few computed values, instead of reusing the last one.

TaylorSeer (Liu et al., 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers", ICCV):
features change smoothly along the sampling trajectory, so a cache that extrapolates them with a Taylor polynomial
whose derivatives are finite differences of the last computed features keeps far more accuracy at a given reuse
rate than plain reuse (order 0). Here the polynomial is Newton's through the last `order + 1` computed features at
their own times (so non-uniform grids and Heun-type stage calls are handled exactly; on a uniform grid it is
TaylorSeer's backward-difference expansion).
Shapes: times [k] floats, features k tensors of one shape [batch, ...], t a float -> a tensor of that shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def newton_extrapolate(times: Sequence[float], features: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """The polynomial of degree len(times) - 1 through (times[i], features[i]), at t (times distinct)."""
    if len(times) != len(features) or not times:
        raise ValueError("newton_extrapolate needs as many times as features, at least one")
    diffs = list(features)  # diffs[i] becomes the divided difference f[times[0..i]] in place
    for level in range(1, len(times)):
        for i in range(len(times) - 1, level - 1, -1):
            diffs[i] = (diffs[i] - diffs[i - 1]) / (times[i] - times[i - level])
    value = diffs[-1]
    for i in range(len(times) - 2, -1, -1):
        value = diffs[i] + (t - times[i]) * value
    return value
