"""Resolution-dependent time shift of flow-matching models (SD3, FLUX): a grid warp and the process that carries it.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), 2024, section 5.3.2:
sigma = s(u) = shift u / (1 + (shift - 1) u) maps a grid u (uniform in time, by default) to the sampling times,
as diffusers' FlowMatchEulerDiscreteScheduler does. In log-SNR it is a constant offset, lambda = lambda_u - log(shift),
so grids that are uniform in log-SNR are only moved at their ends. diffusers' dynamic shifting (FLUX) uses
shift = exp(mu) ("exponential") or shift = mu ("linear"). The process time stays sigma (RectifiedFlow, alpha = 1 - t,
sigma = t), the time that diffusers' flow models are conditioned on (timestep = 1000 sigma).
"""

from __future__ import annotations

import math

import torch

from ..checks import check_real
from ..grids import ScheduleLike, time_grid
from ..processes import Process, RectifiedFlow, Time, _as_tensor

TIME_SHIFT_TYPES = ("exponential", "linear")


def check_shift(shift: float, name: str = "shift") -> float:
    """A shift: a positive finite number (1 = no shift)."""
    return check_real(shift, name, positive=True)


def shift_from_mu(mu: float, time_shift_type: str = "exponential") -> float:
    """diffusers' dynamic shift (`set_timesteps(mu=...)`) as a plain shift: exp(mu) ("exponential") or mu ("linear")."""
    mu = check_real(mu, "mu")
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type={time_shift_type!r} is not known; allowed values: {', '.join(TIME_SHIFT_TYPES)}")
    return check_shift(math.exp(mu) if time_shift_type == "exponential" else mu, "shift from mu")


def shift_time(u: Time, shift: float) -> torch.Tensor:
    """s(u) = shift u / (1 + (shift - 1) u), u in [0, 1] (increasing, s(0) = 0, s(1) = 1)."""
    u = _as_tensor(u)
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_time(sigma: Time, shift: float) -> torch.Tensor:
    """The inverse of `shift_time`: u = sigma / (shift - (shift - 1) sigma)."""
    sigma = _as_tensor(sigma)
    return sigma / (shift - (shift - 1.0) * sigma)


class FlowShift:
    """A grid warped by the flow time shift: `base` (any fewstep grid, default time-uniform) in u, then sigma = s(u).

    With the default base this is diffusers' FlowMatchEulerDiscreteScheduler grid for `sigmas=linspace(1, 1/n, n)`
    (the FLUX/SD3 pipelines' choice) followed by its terminal sigma 0. Pass it as `schedule=` to `fewstep.sample`.
    """

    def __init__(self, shift: float, base: ScheduleLike = "time_uniform"):
        self.shift = check_shift(shift)
        if base is None or isinstance(base, torch.Tensor):
            raise ValueError("base must be a schedule name, a fewstep.Schedule or a grid source, not None or a tensor")
        self.base = base

    def grid(self, process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor:
        """steps + 1 decreasing times from t_start to t_end: s(u) on the base grid from u(t_start) to u(t_end)."""
        u_start, u_end = (float(unshift_time(t, self.shift)) for t in (t_start, t_end))
        ts = shift_time(time_grid(RectifiedFlow(), steps, u_start, u_end, self.base), self.shift)
        ts[0], ts[-1] = t_start, t_end
        return ts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowShift) and (self.shift, self.base) == (other.shift, other.base)

    def __hash__(self) -> int:
        return hash((self.shift, repr(self.base)))

    def __repr__(self) -> str:
        return f"FlowShift({self.shift!r}, base={self.base!r})"


class ShiftedFlow(RectifiedFlow):
    """RectifiedFlow (alpha = 1 - t, sigma = t) whose default grid is the shifted one, `FlowShift(shift)`.

    The model is the same at every shift (it is conditioned on sigma); the shift is the resolution-dependent choice of
    sampling times that SD3/FLUX-style models were trained and tuned with.
    """

    def __init__(self, shift: float = 1.0):
        super().__init__()
        self.shift = check_shift(shift)
        self.default_schedule = FlowShift(self.shift)

    def __repr__(self) -> str:
        return f"ShiftedFlow(shift={self.shift!r})"
