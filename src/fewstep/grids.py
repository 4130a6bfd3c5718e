"""Time grids (step schedules): decreasing times t_0 = t_start > ... > t_steps = t_end for any process.

Each named grid is uniform in some transform of time:
- "time_uniform": t itself (DDIM, Song et al., 2021a);
- "logsnr":       the log-SNR lambda(t) (DPM-Solver, Lu et al., 2022);
- "quadratic":    sqrt(t), i.e. t quadratic in the step index (DDIM/DPM-Solver "time_quadratic"; t >= 0);
- "karras":       sigma/alpha raised to 1/rho, rho = 7 by default (EDM, Karras et al., 2022).
A user tensor of times is accepted as well. Endpoints are exactly t_start and t_end.
"""

from __future__ import annotations

import torch

from .processes import Process

SCHEDULES = ("time_uniform", "logsnr", "quadratic", "karras")

Schedule = str | torch.Tensor | None


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


def time_grid(
    process: Process,
    steps: int,
    t_start: float,
    t_end: float,
    schedule: Schedule = None,
    *,
    rho: float = 7.0,
) -> torch.Tensor:
    """The grid of `steps + 1` decreasing times from t_start to t_end as a float64 CPU tensor."""
    if schedule is None:
        schedule = process.default_schedule
    if isinstance(schedule, torch.Tensor):
        return _check_user_grid(process, schedule, steps)
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not known; allowed values: {', '.join(SCHEDULES)}, or a tensor of times")
    if schedule == "time_uniform":
        ts = _uniform(t_start, t_end, steps)
    elif schedule == "quadratic":
        if t_end < 0:
            raise ValueError(f"schedule='quadratic' needs t_end >= 0, got t_end={t_end}")
        ts = _uniform(t_start**0.5, t_end**0.5, steps) ** 2
    elif schedule == "logsnr":
        lam = _uniform(
            _finite_log_snr(process, t_start, "t_start", schedule),
            _finite_log_snr(process, t_end, "t_end", schedule),
            steps,
        )
        ts = process.t_from_log_snr(lam)
    else:  # karras: uniform in (sigma/alpha)^(1/rho) = exp(-lambda/rho)
        if rho <= 0:
            raise ValueError(f"rho must be positive, got rho={rho}")
        start = float(torch.exp(-process.log_snr(t_start) / rho))
        if start == float("inf"):
            _finite_log_snr(process, t_start, "t_start", schedule)
        end = float(torch.exp(-process.log_snr(t_end) / rho))
        ts = process.t_from_log_snr(-rho * torch.log(_uniform(start, end, steps)))
    ts = ts.to(torch.float64).clone()
    ts[0], ts[-1] = t_start, t_end
    return ts


def _check_user_grid(process: Process, ts: torch.Tensor, steps: int) -> torch.Tensor:
    ts = ts.detach().to("cpu", torch.float64).flatten()
    if ts.numel() != steps + 1:
        raise ValueError(
            f"schedule is a tensor of {ts.numel()} times ({ts.numel() - 1} steps) but steps={steps}; pass steps={ts.numel() - 1}"
        )
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("schedule tensor must be strictly decreasing (from noise to data)")
    process.check_time(float(ts[0]), "schedule[0]")
    process.check_time(float(ts[-1]), "schedule[-1]")
    return ts
