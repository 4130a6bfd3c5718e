"""T-Stitch: a small model for the early, noisy part of the trajectory and the large model after the switch.

Pan, Zhuang, Liu, Li, Cai, Tao & Zhuang (2024), "T-Stitch: Accelerating Sampling in Pre-Trained Diffusion Models with
Trajectory Stitching" (section 3): at high noise both models agree on the coarse structure, so the first fraction of the
steps can run on a cheaper network. The dispatch is by the call's own time t (t > switch time: small; a call at the
switch time runs large), so it works with every solver, stage evaluations included. Both models must predict the
same thing for the same process.
Shapes: x [batch, ...], t [batch] -> [batch, ...].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .backbone import check_grid


class Stitch:
    """`Stitch(small, large, fraction=0.4)` or `Stitch(small, large, time=t_s)`: a fewstep model `stitch(x, t)`.

    fraction: the share of the grid's steps run on `small` (needs `plan(ts)`; the switch time is ts[round(fraction *
    steps)]); time: the switch time itself, in the process's time (no plan needed). Calls at t >= the switch time use
    `small`, the others `large`. `counts` holds the calls of each.
    """

    def __init__(self, small: Callable, large: Callable, *, fraction: float | None = None, time: float | None = None):
        if not callable(small) or not callable(large):
            raise TypeError("small and large must be fewstep models model(x, t) -> Tensor")
        if (fraction is None) == (time is None):
            raise ValueError("give exactly one of fraction (share of steps on the small model, 0..1) or time (switch time)")
        if fraction is not None and not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got fraction={fraction!r}")
        self.small, self.large = small, large
        self.fraction = None if fraction is None else float(fraction)
        self.switch_time: float | None = None if time is None else float(time)
        self.process, self.prediction = getattr(large, "process", None), getattr(large, "prediction", None)
        self.counts = {"small": 0, "large": 0}

    def plan(self, ts: torch.Tensor) -> Stitch:
        """Set the switch time from the sampling grid ts [steps + 1] and `fraction` (fraction 0: all large)."""
        ts = check_grid(ts)
        if self.fraction is None:
            return self
        steps = ts.numel() - 1
        k = round(self.fraction * steps)
        self.switch_time = float("inf") if k == 0 else float(ts[k]) if k <= steps - 1 else float("-inf")
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.switch_time is None:
            raise RuntimeError("Stitch(fraction=...) needs the sampling grid first: stitch.plan(ts)")
        t = torch.as_tensor(t)
        tol = 1e-6 * abs(self.switch_time) if math.isfinite(self.switch_time) else 0.0  # float32 rounding of t
        use_small = float(t.reshape(-1)[0]) > self.switch_time + tol
        self.counts["small" if use_small else "large"] += 1
        return (self.small if use_small else self.large)(x, t)
