"""Time grids (step schedules): decreasing times t_0 = t_start > ... > t_steps = t_end for any process.

Each named grid is uniform in some transform of time:
- "time_uniform":    t itself (DDIM, Song et al., 2021a);
- "logsnr":          the log-SNR lambda(t) (DPM-Solver, Lu et al., 2022);
- "exponential":     k-diffusion's name for the same grid (uniform in log sigma/alpha = -lambda), an alias of "logsnr";
- "quadratic":       sqrt(t), i.e. t quadratic in the step index (DDIM/DPM-Solver "time_quadratic"; t >= 0);
- "karras":          sigma/alpha raised to 1/rho, rho = 7 by default (EDM, Karras et al., 2022);
- "polyexponential": lambda = lambda_end + (lambda_start - lambda_end) r^rho with r uniform from 1 to 0, rho = 1
                     by default (k-diffusion, Crowson; rho = 1 is "exponential").
A grid with parameters is written `Schedule("karras", rho=5.0)`; a user tensor of times, or any object with a
method `grid(process, steps, t_start, t_end) -> Tensor` (e.g. a searched schedule), is accepted as well.
Endpoints are exactly t_start and t_end. Every grid, named or given, is validated the same way (`check_grid`): finite,
inside the process's range, strictly decreasing with times and log-SNRs that differ by more than round-off (a solver
divides by their differences).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from .checks import check_steps
from .processes import Process

SCHEDULES = ("time_uniform", "logsnr", "exponential", "quadratic", "karras", "polyexponential")
ALIASES = {"exponential": "logsnr"}  # k-diffusion's name -> fewstep's name
PARAMETERS: dict[str, dict[str, float]] = {"karras": {"rho": 7.0}, "polyexponential": {"rho": 1.0}}  # defaults


@runtime_checkable
class GridSource(Protocol):
    """Anything that makes its own grid of `steps + 1` decreasing times (a searched schedule, say)."""

    def grid(self, process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor: ...


class Schedule:
    """A named grid with its parameters, e.g. `Schedule("polyexponential", rho=2.0)`; pass it as `schedule=`.

    name: one of SCHEDULES; params: the schedule's parameters (only "rho", for "karras" and "polyexponential").
    """

    def __init__(self, name: str, **params: float):
        if not isinstance(name, str) or name not in SCHEDULES:
            raise ValueError(f"schedule={name!r} is not known; allowed values: {', '.join(SCHEDULES)}, or a tensor of times")
        defaults = PARAMETERS.get(ALIASES.get(name, name), {})
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            allowed = ", ".join(defaults) if defaults else "none"
            raise ValueError(f"schedule {name!r} does not take parameter(s) {', '.join(unknown)}; allowed: {allowed}")
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a positive finite number, got {key}={value!r}")
        self.name = name
        self.params = {**defaults, **{k: float(v) for k, v in params.items()}}

    def grid(self, process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor:
        """The `steps + 1` decreasing times from t_start to t_end (float64, CPU, endpoints exact), validated."""
        return time_grid(process, steps, t_start, t_end, self)

    def _raw_grid(self, process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor:
        """The grid's formula, before validation; t_start and t_end already checked."""
        ts = _GRIDS[ALIASES.get(self.name, self.name)](process, steps, t_start, t_end, **self.params)
        ts = ts.to(torch.float64).clone()
        ts[0], ts[-1] = t_start, t_end
        return ts

    def _hint(self) -> str:
        """What to change when this schedule gives a degenerate grid."""
        defaults = PARAMETERS.get(ALIASES.get(self.name, self.name), {})
        if "rho" in defaults and self.params["rho"] != defaults["rho"]:
            return f"use a rho closer to the default {defaults['rho']:g} (got rho={self.params['rho']:g}) or fewer steps"
        return "use fewer steps or t_start and t_end further apart"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and (self.name, self.params) == (other.name, other.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Schedule({self.name!r}{params})"


ScheduleLike = str | Schedule | GridSource | torch.Tensor | None


def _uniform(start: float, end: float, steps: int) -> torch.Tensor:
    return torch.linspace(start, end, steps + 1, dtype=torch.float64)


def _finite_log_snr(process: Process, t: float, name: str, schedule: str) -> float:
    value = float(process.log_snr(t))
    if abs(value) == float("inf"):
        raise ValueError(
            f"schedule={schedule!r} needs a finite log-SNR at {name}={t}, but {process!r} has log-SNR {value} there; "
            f"pass a {name} strictly inside ({process.t_min}, {process.t_max}) or use schedule='time_uniform'"
        )
    return value


def _time_uniform(process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    return _uniform(t_start, t_end, steps)


def _quadratic(process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    if t_end < 0:
        raise ValueError(f"schedule='quadratic' needs t_end >= 0, got t_end={t_end}")
    return _uniform(t_start**0.5, t_end**0.5, steps) ** 2


def _logsnr(process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    lam = _uniform(
        _finite_log_snr(process, t_start, "t_start", "logsnr"),
        _finite_log_snr(process, t_end, "t_end", "logsnr"),
        steps,
    )
    return process.t_from_log_snr(lam)


def _karras(process: Process, steps: int, t_start: float, t_end: float, *, rho: float) -> torch.Tensor:
    # uniform in (sigma/alpha)^(1/rho) = exp(-lambda/rho)
    start = float(torch.exp(-process.log_snr(t_start) / rho))
    if start == float("inf"):
        _finite_log_snr(process, t_start, "t_start", "karras")
    end = float(torch.exp(-process.log_snr(t_end) / rho))
    return process.t_from_log_snr(-rho * torch.log(_uniform(start, end, steps)))


def _polyexponential(process: Process, steps: int, t_start: float, t_end: float, *, rho: float) -> torch.Tensor:
    lam_start = _finite_log_snr(process, t_start, "t_start", "polyexponential")
    lam_end = _finite_log_snr(process, t_end, "t_end", "polyexponential")
    ramp = _uniform(1.0, 0.0, steps) ** rho
    return process.t_from_log_snr(lam_end + (lam_start - lam_end) * ramp)


_GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "time_uniform": _time_uniform,
    "logsnr": _logsnr,
    "quadratic": _quadratic,
    "karras": _karras,
    "polyexponential": _polyexponential,
}


def time_grid(
    process: Process,
    steps: int,
    t_start: float,
    t_end: float,
    schedule: ScheduleLike = None,
    *,
    rho: float | None = None,
) -> torch.Tensor:
    """The grid of `steps + 1` decreasing times from t_start to t_end as a float64 CPU tensor, validated by `check_grid`.

    schedule: a name in SCHEDULES, a `Schedule`, a tensor of `steps + 1` decreasing times, an object with a
    `grid(process, steps, t_start, t_end)` method, or None for the process's default. `rho` sets the parameter
    of a named "karras" (default 7) or "polyexponential" (default 1) grid. steps: an integer in [1, MAX_STEPS];
    t_start > t_end: real numbers inside the process's time range.
    """
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    steps = check_steps(steps)
    t_start, t_end = process.check_time(t_start, "t_start"), process.check_time(t_end, "t_end")
    if schedule is None:
        schedule = process.default_schedule
    if isinstance(schedule, str):
        schedule = Schedule(schedule, **({} if rho is None else {"rho": rho}))
    elif rho is not None:
        raise ValueError("rho is only used with a schedule name; put it in the Schedule instead: Schedule(name, rho=...)")
    if not isinstance(schedule, (torch.Tensor, Schedule, GridSource)):
        raise ValueError(
            f"schedule={schedule!r} is not known; allowed values: {', '.join(SCHEDULES)}, a fewstep.Schedule, "
            "a tensor of times, or an object with a grid(process, steps, t_start, t_end) method"
        )
    if isinstance(schedule, torch.Tensor):  # the tensor is the whole grid: t_start and t_end are not used
        return check_grid(process, schedule, steps, "schedule tensor", "pass strictly decreasing times, from noise to data")
    # each parameter is checked on its own before their combination, so an error names the parameter at fault
    if not t_start > t_end:
        raise ValueError(f"need t_start > t_end (sampling runs from noise to data), got t_start={t_start}, t_end={t_end}")
    where = f"schedule={schedule!r} from t_start={t_start!r} to t_end={t_end!r}"
    if isinstance(schedule, Schedule):
        return check_grid(process, schedule._raw_grid(process, steps, t_start, t_end), steps, where, schedule._hint())
    ts = schedule.grid(process, steps, t_start, t_end)
    return check_grid(process, ts, steps, where, "its grid() must return strictly decreasing times")


ROUNDOFF = 16 * torch.finfo(torch.float64).eps  # successive times (and log-SNRs) must differ by more, relative to max(|.|, 1)


def check_grid(process: Process, ts: torch.Tensor, steps: int, where: str = "schedule", hint: str = "") -> torch.Tensor:
    """A grid [steps + 1] as float64 CPU, or a ValueError naming `where` and why, with `hint` on what to change.

    Valid: real, finite, inside the process's range, strictly decreasing, successive times and (where finite)
    log-SNRs differing by more than ROUNDOFF * max(|value|, 1), and the log-SNR strictly increasing.
    """
    if not isinstance(ts, torch.Tensor) or ts.is_complex() or ts.dtype == torch.bool:
        raise ValueError(f"{where} must be a real tensor of times, got {type(ts).__name__}")
    ts = ts.detach().to("cpu", torch.float64).flatten()
    if ts.numel() != steps + 1:
        n = ts.numel() - 1
        raise ValueError(f"{where} has {n + 1} times ({n} steps) but steps={steps}; pass steps={n}")
    suffix = f"; {hint}" if hint else ""
    bad = ~torch.isfinite(ts)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{where} gives non-finite times at {steps} steps (t[{i}]={float(ts[i])}){suffix}")
    process.check_time(ts[0], "schedule[0]")
    process.check_time(ts[-1], "schedule[-1]")
    lam = process.log_snr(ts).to(torch.float64)
    pairs = f"successive times must differ by more than round-off ({ROUNDOFF:.1e} relative) for the solvers"
    checks = (
        (ts[1:] > ts[:-1], "must be strictly decreasing (from noise to data)"),
        (
            ~(ts[:-1] - ts[1:] > ROUNDOFF * torch.maximum(ts[:-1].abs(), ts[1:].abs()).clamp(min=1)),
            f"gives repeated or near-equal times: {pairs}",
        ),
        (~(lam[1:] > lam[:-1]), f"gives times whose log-SNRs under {process!r} do not strictly increase"),
        (
            torch.isfinite(lam[1:] - lam[:-1])
            & ~(lam[1:] - lam[:-1] > ROUNDOFF * torch.maximum(lam[:-1].abs(), lam[1:].abs()).clamp(min=1)),
            f"gives times whose log-SNRs under {process!r} are equal within round-off: {pairs}",
        ),
    )
    for bad, problem in checks:
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"{where} {problem}; at {steps} steps t[{i}]={float(ts[i])!r} and t[{i + 1}]={float(ts[i + 1])!r}{suffix}"
            )
    return ts
