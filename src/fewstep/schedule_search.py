"""Schedule search: optimise the interior times of a solver's grid at a fixed NFE against a reference solution.

In the spirit of solver-schedule search (Liu et al., "A Unified Sampling Framework for Solver Searching of
Diffusion Probabilistic Models" (USF / S^3), ICLR 2024; Li et al., "AutoDiffusion: Training-Free Optimization of
Time Steps and Architectures for Automated Diffusion Model Acceleration", ICCV 2023): the grid is parameterised
monotone by construction, as softmax-weighted positive increments of the log-SNR (or of the time itself where the
log-SNR is infinite at an endpoint), with both endpoints exact, and the RMS error of the solver's output against a
high-accuracy reference on a calibration batch is minimised with Adam.

The core precomputes each grid point's coefficients as Python floats (no device syncs in the solver loop), so
autograd cannot differentiate through the times; the gradient is taken by central finite differences in the
steps - 1 free logits (2 (steps - 1) solver runs per iteration, O(h^2) accurate on a smooth objective).
Shapes: calibration_noise and reference [batch, ...].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .accuracy import rms_error
from .budget import steps_for_nfe
from .checks import typed_key
from .grids import SCHEDULES, GridSource, Schedule, ScheduleLike, time_grid
from .io import atomic_write_text
from .parameterization import Model, check_prediction
from .processes import Process
from .sampling import sample
from .solvers import get_solver

FORMAT = "fewstep.searched_schedule/1"


@dataclass(eq=False)
class SearchedSchedule:
    """A searched grid of `steps + 1` times for one solver, NFE and process; pass it as `schedule=`.

    `sample_kwargs()` gives the matching `fewstep.sample` keywords (solver, steps, schedule, options).
    """

    times: torch.Tensor
    process: str
    solver: str
    nfe: int
    steps: int
    prediction: str = "eps"
    denoise_to_zero: bool = True
    solver_options: dict[str, Any] = field(default_factory=dict)
    init: str = ""
    error_init: float = math.nan
    error: float = math.nan
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.times = torch.as_tensor(self.times, dtype=torch.float64).detach().cpu().flatten()
        if self.times.numel() != self.steps + 1:
            raise ValueError(f"times must hold steps + 1 = {self.steps + 1} values, got {self.times.numel()}")
        if not bool((self.times[1:] < self.times[:-1]).all()):
            raise ValueError("times must be strictly decreasing (from noise to data)")

    def grid(self, process: Process, steps: int, t_start: float, t_end: float) -> torch.Tensor:
        """The searched times; checks that the process and step count are the ones it was searched for."""
        if repr(process) != self.process:
            raise ValueError(f"this schedule was searched for process {self.process}, not {process!r}")
        if steps != self.steps:
            raise ValueError(
                f"this schedule has {self.steps} steps (solver {self.solver!r}, NFE {self.nfe}); pass steps={self.steps}"
            )
        return self.times.clone()

    def sample_kwargs(self) -> dict[str, Any]:
        """Keywords for `fewstep.sample` that reproduce the searched run: solver, steps, schedule, options."""
        return {
            "solver": self.solver,
            "steps": self.steps,
            "schedule": self,
            "prediction": self.prediction,
            "denoise_to_zero": self.denoise_to_zero,
            **self.solver_options,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "times": self.times.tolist(),
            "process": self.process,
            "solver": self.solver,
            "nfe": self.nfe,
            "steps": self.steps,
            "prediction": self.prediction,
            "denoise_to_zero": self.denoise_to_zero,
            "solver_options": self.solver_options,
            "init": self.init,
            "error_init": self.error_init,
            "error": self.error,
            "history": self.history,
        }

    _FIELD_TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "times": (list,),
        "process": (str,),
        "solver": (str,),
        "nfe": (int,),
        "steps": (int,),
        "prediction": (str,),
        "denoise_to_zero": (bool,),
        "solver_options": (dict,),
        "init": (str,),
        "error_init": (int, float),
        "error": (int, float),
        "history": (list,),
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "searched schedule") -> SearchedSchedule:
        """The schedule `to_dict` wrote; ValueError naming `source` (the file) and the key when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: must hold a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a searched schedule: format={data.get('format')!r}, expected {FORMAT!r}")
        fields = {k: v for k, v in data.items() if k != "format"}
        unknown = sorted(set(fields) - set(cls._FIELD_TYPES))
        if unknown:
            raise ValueError(f"{source}: searched schedule has unknown field(s) {', '.join(unknown)}")
        for key in ("times", "process", "solver", "nfe", "steps"):
            typed_key(fields, key, cls._FIELD_TYPES[key], where=source)  # required
        for key in fields:
            typed_key(fields, key, cls._FIELD_TYPES[key], where=source)
        for key in ("times", "history"):
            values = fields.get(key, [])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{source}: key {key!r} must be a list of numbers")
        if not all(math.isfinite(v) for v in fields["times"]):
            raise ValueError(f"{source}: key 'times' must hold finite numbers")
        if fields["steps"] < 1 or fields["nfe"] < 1:
            raise ValueError(f"{source}: keys 'steps' and 'nfe' must be >= 1, got {fields['steps']} and {fields['nfe']}")
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"{source}: key 'times': {err}") from err

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (a temporary file in the same folder, then os.replace)."""
        path = Path(path)
        try:
            text = json.dumps(self.to_dict(), indent=2, allow_nan=True)
        except TypeError as err:
            raise ValueError(f"solver_options must be JSON-serialisable to save the schedule: {err}") from err
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchedSchedule:
        """Read a schedule `save` wrote; ValueError naming the file (and the key) when it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"searched schedule file {path} is not valid JSON: {err}") from err
        return cls.from_dict(data, f"searched schedule file {path}")


class _Warp:
    """The coordinate the increments live in: log-SNR where finite at both endpoints, else the time itself."""

    def __init__(self, process: Process, t_start: float, t_end: float):
        self.process = process
        lam = process.log_snr(torch.tensor([t_start, t_end], dtype=torch.float64))
        self.log_snr = bool(torch.isfinite(lam).all())
        self.t_start, self.t_end = t_start, t_end

    def forward(self, ts: torch.Tensor) -> torch.Tensor:
        return self.process.log_snr(ts) if self.log_snr else ts

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        ts = self.process.t_from_log_snr(u) if self.log_snr else u
        ts = ts.to(torch.float64).clone()
        ts[0], ts[-1] = self.t_start, self.t_end
        return ts


LOGIT_BOUND = 12.0  # keeps every increment above ~e^-24 of the span, so the grid stays strictly decreasing


class _Parameterisation:
    """Free logits theta [steps - 1] -> strictly decreasing times with exact endpoints (last logit fixed at 0)."""

    def __init__(self, warp: _Warp, init_times: torch.Tensor):
        self.warp = warp
        u = warp.forward(init_times)
        self.u0, self.span = float(u[0]), float(u[-1] - u[0])
        inc = (u[1:] - u[:-1]) / self.span
        if not bool((inc > 0).all()):
            raise ValueError("the initial grid is not strictly monotone in the search coordinate")
        logits = torch.log(inc)
        self.theta0 = (logits[:-1] - logits[-1]).clamp(-LOGIT_BOUND, LOGIT_BOUND)
        self.init_times = init_times

    def times(self, theta: torch.Tensor) -> torch.Tensor:
        if torch.equal(theta, self.theta0):  # the initial grid exactly, without a round trip through the warp
            return self.init_times.clone()
        logits = torch.cat([theta.clamp(-LOGIT_BOUND, LOGIT_BOUND), theta.new_zeros(1)])
        fractions = torch.cat([theta.new_zeros(1), torch.cumsum(torch.softmax(logits, 0), 0)])
        return self.warp.inverse(self.u0 + self.span * fractions)


def optimize_schedule(
    model: Model,
    process: Process,
    solver: str,
    nfe: int,
    calibration_noise: torch.Tensor,
    *,
    prediction: str = "eps",
    init: ScheduleLike | Sequence[ScheduleLike] = None,
    reference: torch.Tensor | None = None,
    iters: int = 100,
    lr: float = 0.2,
    t_start: float | None = None,
    t_end: float | None = None,
    denoise_to_zero: bool = True,
    reference_solver: str = "heun",
    reference_steps: int = 256,
    reference_schedule: ScheduleLike = None,
    fd_step: float = 1e-3,
    seed: int = 0,
    **solver_options: Any,
) -> SearchedSchedule:
    """Search the interior times of `solver`'s grid at exactly `nfe` evaluations; returns a SearchedSchedule.

    model: as for `fewstep.sample`, predicting `prediction`; calibration_noise: standard normal [B, ...].
    init: the starting grid (a schedule name, `Schedule` or tensor; default the process's default schedule), or a
        list of them: the search starts from the one with the lowest calibration error (the objective has local
        minima, so a good start matters).
    reference: the target output for calibration_noise [B, ...]; default: `model` sampled with `reference_solver`
        over `reference_steps` steps of `reference_schedule` (default "karras" where the log-SNR is finite at both
        endpoints, else the process's default grid; about 5e-5 RMS from the exact ODE solution on ring2d).
    iters, lr: Adam iterations and learning rate (cosine-decayed) on the logits; the best grid seen is returned.
    fd_step: the finite-difference step in the logits. seed: the generator seed of a stochastic solver (common
        random numbers for every evaluation).
    """
    spec = get_solver(solver)
    spec.check_options(solver_options)
    check_prediction(prediction)
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= 100_000:
        raise ValueError(f"iters must be an integer >= 0 and <= 100000, got iters={iters!r}")
    for name, value, high in (("lr", lr, 10.0), ("fd_step", fd_step, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= high:
            raise ValueError(f"{name} must be a positive number <= {high}, got {name}={value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got seed={seed!r}")
    if not isinstance(denoise_to_zero, bool):
        raise ValueError(f"denoise_to_zero must be True or False, got denoise_to_zero={denoise_to_zero!r}")
    if not callable(model):
        raise TypeError(f"model must be a callable model(x, t) -> Tensor, got {type(model).__name__}")
    get_solver(reference_solver)
    if not isinstance(calibration_noise, torch.Tensor) or not calibration_noise.is_floating_point():
        raise TypeError("calibration_noise must be a floating-point tensor of shape [batch, ...]")
    candidates = _init_candidates(init, process)
    t_start = process.check_time(process.t_max if t_start is None else t_start, "t_start")
    t_end = process.check_time(process.t_min if t_end is None else t_end, "t_end")
    steps = steps_for_nfe(solver, nfe, process, t_start=t_start, t_end=t_end, denoise_to_zero=denoise_to_zero, **solver_options)
    common = dict(process=process, prediction=prediction, t_start=t_start, t_end=t_end, denoise_to_zero=denoise_to_zero)
    warp = _Warp(process, t_start, t_end)
    if reference is None:
        if reference_schedule is None:
            reference_schedule = "karras" if warp.log_snr else process.default_schedule
        kwargs = dict(solver=reference_solver, steps=reference_steps, schedule=reference_schedule, **common)
        reference = sample(model, calibration_noise, **kwargs)
    elif not isinstance(reference, torch.Tensor) or reference.shape != calibration_noise.shape:
        raise ValueError(
            f"reference must be a tensor shaped like calibration_noise {tuple(calibration_noise.shape)}, "
            f"got {tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__}"
        )
    elif not reference.is_floating_point() or not bool(torch.isfinite(reference).all()):
        raise ValueError("reference must be a finite floating-point tensor (no NaN or Inf)")

    def error_of(times: torch.Tensor) -> float:
        generator = torch.Generator().manual_seed(seed) if spec.stochastic else None
        kwargs = dict(solver=solver, steps=steps, schedule=times, generator=generator, **common, **solver_options)
        x = sample(model, calibration_noise, **kwargs)
        return rms_error(x, reference)

    try:
        grids = [time_grid(process, steps, t_start, t_end, c) for c in candidates]
    except ValueError as err:
        raise ValueError(f"init: {err}") from None
    start = min(range(len(grids)), key=lambda k: error_of(grids[k])) if len(grids) > 1 else 0
    init, param = candidates[start], _Parameterisation(warp, grids[start])
    theta, best, history = _adam_finite_differences(lambda th: error_of(param.times(th)), param.theta0, iters, lr, fd_step)
    return SearchedSchedule(
        times=param.times(theta),
        process=repr(process),
        solver=solver,
        nfe=nfe,
        steps=steps,
        prediction=prediction,
        denoise_to_zero=denoise_to_zero,
        solver_options=dict(solver_options),
        init="tensor" if isinstance(init, torch.Tensor) else repr(init),
        error_init=history[0],
        error=best,
        history=history,
    )


def _init_candidates(init: Any, process: Process) -> list[ScheduleLike]:
    """The starting grids of a search (None: the process's default), each a schedule name, Schedule, tensor or grid source."""
    candidates = list(init) if isinstance(init, (list, tuple)) else [init]
    if not candidates:
        raise ValueError("init must be a schedule or a non-empty list of schedules, got an empty list")
    for c in candidates:
        if not (c is None or isinstance(c, (torch.Tensor, Schedule, GridSource)) or (isinstance(c, str) and c in SCHEDULES)):
            raise ValueError(
                f"init={c!r} is not a schedule; allowed values: {', '.join(SCHEDULES)}, a fewstep.Schedule, a tensor of "
                "times, an object with a grid() method, None (the process's default), or a list of these"
            )
    return [process.default_schedule if c is None else c for c in candidates]


def _adam_finite_differences(
    objective, theta0: torch.Tensor, iters: int, lr: float, h: float
) -> tuple[torch.Tensor, float, list[float]]:
    """Adam (Kingma & Ba, 2015) on central-difference gradients with a cosine learning-rate decay.

    Returns the best parameters seen, their objective, and the objective at each iterate (history[0]: initial).
    """
    theta = theta0.clone()
    best_theta, best = theta.clone(), objective(theta)
    history = [best]
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    beta1, beta2, eps = 0.9, 0.999, 1e-12
    for k in range(1, iters + 1):
        if theta.numel() == 0:
            break
        grad = torch.empty_like(theta)
        for j in range(theta.numel()):
            step = torch.zeros_like(theta)
            step[j] = h
            grad[j] = (objective(theta + step) - objective(theta - step)) / (2 * h)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        rate = lr * 0.5 * (1 + math.cos(math.pi * (k - 1) / iters))
        theta = (theta - rate * (m / (1 - beta1**k)) / ((v / (1 - beta2**k)).sqrt() + eps)).clamp(-LOGIT_BOUND, LOGIT_BOUND)
        value = objective(theta)
        history.append(value)
        if value < best:
            best_theta, best = theta.clone(), value
    return best_theta, best, history
