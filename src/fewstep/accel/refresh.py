"""Which sampling-grid points refresh a feature cache: uniform every `interval` points, or at equal log-SNR travel.

DeepCache (Ma et al., 2024, "DeepCache: Accelerating Diffusion Models for Free", section 3.3) refreshes uniformly or
at non-uniform steps; here the non-uniform choice is the grid's own log-SNR step sizes: the same number of refresh
points as the uniform plan, placed where the log-SNR travelled (the sum of the grid's own |Δ log-SNR| step sizes)
reaches the fractions of the whole that the uniform plan's points are of the grid; on a grid uniform in log-SNR
both plans agree. The first point always refreshes.
Shapes: ts [n] (decreasing times, n = steps + 1) -> a sorted list of grid indices.
"""

from __future__ import annotations

import math

import torch

from ..nets.embedding import LOG_SNR_CLAMP
from ..processes import Process

REFRESH_RULES = ("uniform", "log_snr")


def refresh_indices(ts: torch.Tensor, interval: int, rule: str = "uniform", process: Process | None = None) -> list[int]:
    """Grid indices whose model calls recompute the deep features; the others reuse them."""
    if rule not in REFRESH_RULES:
        raise ValueError(f"refresh={rule!r} is not known; allowed values: {', '.join(REFRESH_RULES)}")
    n = ts.numel()
    uniform = list(range(0, n, interval))
    if rule == "uniform" or interval == 1:
        return uniform
    if process is None:
        raise ValueError("refresh='log_snr' needs the process (the model's `process`, or plan(ts, process=...))")
    lam = process.log_snr(ts.to(torch.float64)).clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP)
    travel = torch.cat([lam.new_zeros(1), (lam[1:] - lam[:-1]).abs().cumsum(0)])  # log-SNR travelled to point i
    targets = travel[-1] * (torch.tensor(uniform, dtype=torch.float64) / (n - 1) - 1e-9)  # the uniform plan, in travel
    chosen = {int(torch.searchsorted(travel, target)) for target in targets.clamp_min(0.0)}
    spare = [i for i in uniform if i not in chosen]  # equal pieces can fall on one point: fill up uniformly
    return sorted(chosen | set(spare[: len(uniform) - len(chosen)]))


def reuses(n: int, refresh: list[int]) -> int:
    """How many of the n grid points reuse the cache."""
    return n - len(set(refresh))


def match_grid(ts: torch.Tensor, t: float) -> int | None:
    """The index of the grid point that t is (to float32 rounding; 1e-3 of the smallest spacing), else None (off-grid)."""
    gaps = (ts[1:] - ts[:-1]).abs()
    tol = 1e-3 * float(gaps.min()) if gaps.numel() else 1e-9
    tol = max(tol, 1e-6 * abs(t))
    i = int((ts - t).abs().argmin())
    return i if math.isclose(float(ts[i]), t, rel_tol=0.0, abs_tol=tol) else None


def sampling_grid(
    process: Process, steps: int, schedule=None, t_start: float | None = None, t_end: float | None = None
) -> torch.Tensor:
    """The grid `fewstep.sample` uses for these arguments (its defaults: t_max to t_min), float64 [steps + 1]."""
    from ..grids import time_grid

    t_start = process.t_max if t_start is None else t_start
    t_end = process.t_min if t_end is None else t_end
    return time_grid(process, steps, t_start, t_end, schedule)
