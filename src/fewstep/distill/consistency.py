"""Consistency distillation and training as one objective: d(f(x_t, t), stopgrad f_target(x_r, r)) with orthogonal
settings (`ConsistencyOptions`).

Song et al., "Consistency Models", ICML 2023 (CD with a teacher step and an EMA target network mu; CT); Song &
Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024 (mu = 0, pseudo-Huber, 1/(s_t - s_r),
lognormal levels, N curriculum); Geng et al., "Consistency Models Made Easy", 2024 (continuous r-schedule from the
diffusion loss). x_t = alpha_t x0 + sigma_t eps; x_r = the teacher's DDIM/Heun step from (x_t, t) to r (CD), or
alpha_r x0 + sigma_r eps with the same eps (CT). Both passes of the student see the same dropout masks (the RNG is
forked with the same state); the target is evaluated under no_grad (no gradient reaches it); the student is a
`precond="consistency"` model, exact at t_min. Shapes: x0, eps [batch, ...]; t, r, weight [batch] -> losses [batch].
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..processes import Process
from ..train.checkpoint import load_state, section
from ..train.config import ConfigError, TrainConfig
from ..train.objective import Objective
from .clock import TrainClock
from .options import HUBER_SCALE, ConsistencyOptions, parse_table
from .schedules import draw_continuous, draw_discrete, ect_gap, ict_intervals, karras_sigmas, scaled_sigma, time_of
from .student import consistency_config, consistency_times, initialise_from_teacher, inner_config, student_record
from .targets import prediction_pair, teacher_step
from .teacher import Teacher, check_data_shape, check_process, load_teacher

if TYPE_CHECKING:
    from ..train.trainer import Trainer

SIGMA_MAX = 80.0  # default top of the scaled-sigma range where the process's is larger (Song et al., 2023: T = 80)


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample: [batch, ...] -> [batch]."""
    return (a - b).pow(2).reshape(len(a), -1).mean(1)


def pseudo_huber_distance(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample (Song & Dhariwal, 2023, eq. 9): [batch, ...] -> [batch]."""
    return torch.sqrt((a - b).pow(2).reshape(len(a), -1).sum(1) + c * c) - c


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout draws from on `device`."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def resolve_teacher(spec: Any, options: Any, *, required: bool) -> Teacher | None:
    """The teacher given in memory (`spec`) or named by distill.teacher; ConfigError when `required` and missing."""
    spec = options.teacher if spec is None else spec
    if spec is None:
        if required:
            raise ConfigError(
                "distill.teacher",
                f"method {options.method!r} needs a teacher: distill.teacher = <shipped name or checkpoint path>, or "
                "Trainer(..., teacher=<model>)",
            )
        return None
    return load_teacher(spec)


def scaled_sigma_range(process: Process, options: ConsistencyOptions) -> tuple[float, float]:
    """(s_min, s_max) of a consistency run: s(t_min), and distill.sigma_max or else min(s(t_max), 80)."""
    s_min = float(scaled_sigma(process, process.t_min))
    s_max = options.sigma_max or min(float(scaled_sigma(process, process.t_max)), SIGMA_MAX)
    if not s_max > s_min:
        raise ConfigError("distill.sigma_max", f"distill.sigma_max={s_max} must exceed s(t_min) = {s_min} of {process!r}")
    return s_min, s_max


def training_times(process: Process, options: ConsistencyOptions) -> list[float] | None:
    """The n_max + 1 decreasing times a discrete-schedule student is trained at by the end of its run (the Karras
    grid from s_max to s_min, ending at t_min); None for the continuous schedule, which trains at every time."""
    if options.schedule != "discrete":
        return None
    s_min, s_max = scaled_sigma_range(process, options)
    t = time_of(process, karras_sigmas(s_min, s_max, options.n_max, options.rho).flip(0), s_min)
    t[-1] = process.t_min
    return t.tolist()


def student_times(process: Process, options: ConsistencyOptions) -> dict[int, list[float]]:
    """The stored sampling times per student step count: points of the training grid (`training_times`, indices
    round(j n_max / steps)) where the grid has enough of them, else the Karras grid of `steps` intervals.

    A discrete-schedule student is only trained at its grid times; off them it is worse: on digits_flow (N = 18)
    the 2-step FD was 0.42 with the middle time on the grid (t = 0.3846) and 0.46 / 0.54 at t = 0.39 / 0.37.
    """
    grid = training_times(process, options)
    s_min, s_max = scaled_sigma_range(process, options)
    times = {}
    for n in options.student_steps:
        if grid is not None and n < len(grid):
            times[n] = [grid[round(j * (len(grid) - 1) / n)] for j in range(n + 1)]
        else:
            times[n] = consistency_times(process, s_min, s_max, n, options.rho)
    return times


class ConsistencyObjective(Objective):
    """CD / CT / ECT (method of the distill table) on the Trainer; the student is a consistency function."""

    def __init__(self, config: TrainConfig, process: Process, data: torch.Tensor, teacher: Any = None):
        options = parse_table(config.distill)
        assert isinstance(options, ConsistencyOptions)
        self.options, self.config, self.process, self.name = options, config, process, options.method
        self.teacher = resolve_teacher(teacher, options, required=options.uses_teacher_step)
        if self.teacher is not None:
            check_process(self.teacher, process)
            check_data_shape(self.teacher, data)
        self.s_min, self.s_max = scaled_sigma_range(process, options)
        self.s_floor = max(self.s_min * 1.001, self.s_min + 1e-4)  # smallest s_t of the continuous schedule (s_t > s_r)
        self.huber_c = options.huber_c or HUBER_SCALE * math.sqrt(data[0].numel())
        self.stage_steps = options.stage_steps or max(1, math.ceil(config.steps / 8))
        self.times = student_times(process, options)
        self._grids: dict[int, torch.Tensor] = {}
        self.student: nn.Module | None = None
        self.target: nn.Module | None = None
        self.teacher_fn = None
        self.clock = TrainClock()

    # Model -----------------------------------------------------------------------------------------------------

    def model_config(self, config: TrainConfig, data_shape: tuple[int, ...]) -> dict[str, Any]:
        return consistency_config(inner_config(config, self.teacher, data_shape))

    def setup(self, trainer: Trainer) -> None:
        self.student = trainer.model
        if self.teacher is not None:
            self.teacher.freeze(trainer.device)
            self.teacher_fn = prediction_pair(self.teacher.model, self.teacher.prediction, self.process)
        initialise_from_teacher(trainer.model, self.teacher, self.options.init_from_teacher)
        if self.options.target_decay > 0:  # in train mode like the student: the same dropout masks in both passes
            self.target = copy.deepcopy(trainer.model).requires_grad_(False)

    # Randomness of a global batch ------------------------------------------------------------------------------

    def intervals(self, step: int) -> int:
        """The number of discretisation intervals N at `step` (discrete schedule)."""
        o = self.options
        return ict_intervals(step, self.config.steps, o.n_min, o.n_max)

    def _grid(self, n: int) -> torch.Tensor:
        if n not in self._grids:
            self._grids[n] = karras_sigmas(self.s_min, self.s_max, n, self.options.rho)
        return self._grids[n]

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        """t, r (process times) and the per-sample weight, float64 [N]."""
        o, n = self.options, len(x0)
        if o.schedule == "discrete":
            s_t, s_r = draw_discrete(n, self._grid(self.intervals(step)), o.time_distribution, o.p_mean, o.p_std, generator)
        else:
            s_t = draw_continuous(n, self.process, (self.s_floor, self.s_max), o.time_distribution, o.p_mean, o.p_std, generator)
            s_r = (s_t - ect_gap(s_t, step // self.stage_steps, o.q, o.k, o.b)).clamp_min(self.s_min)
        weight = 1.0 / (s_t - s_r) if o.weighting == "gap" else torch.ones_like(s_t)
        return {"t": time_of(self.process, s_t, self.s_min), "r": time_of(self.process, s_r, self.s_min), "weight": weight}

    # Loss ------------------------------------------------------------------------------------------------------

    def target_point(self, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor):
        """x_r: the teacher's step from (x_t, t) to r (CD), or the same noise at r (CT); no gradient."""
        with torch.no_grad():
            if self.options.uses_teacher_step:
                return teacher_step(self.teacher_fn, self.process, x_t, t, r, self.options.teacher_solver)
            return self.process.add_noise(x0, r, eps)

    def loss(self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        t, r, weight = draws["t"], draws["r"], draws["weight"]
        x_t = self.process.add_noise(x0, t, eps)
        x_r = self.target_point(x0, eps, x_t, t, r)
        state = rng_state(x0.device)
        online = model(x_t, t.to(x0.dtype))
        set_rng_state(x0.device, state)  # the target pass draws the same dropout masks
        network = self.target if self.target is not None else self.student
        with torch.no_grad():
            target = network(x_r, r.to(x0.dtype))
        online, target = online.float(), target.float()
        if self.options.distance == "l2":
            d = l2_distance(online, target)
        else:
            d = pseudo_huber_distance(online, target, self.huber_c)
        return d * weight.to(d)

    def begin_step(self, trainer: Trainer) -> None:
        self.clock.tick()

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        """target <- mu target + (1 - mu) student (parameters; buffers copied)."""
        self.clock.tick()
        if self.target is None:
            return
        mu = self.options.target_decay
        own = dict(trainer.model.named_parameters())
        params = [(p, own[name]) for name, p in self.target.named_parameters()]
        torch._foreach_lerp_([p for p, _ in params], [q.detach() for _, q in params], 1.0 - mu)
        buffers = dict(trainer.model.named_buffers())
        for name, b in self.target.named_buffers():
            b.copy_(buffers[name])

    # State -----------------------------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.target is None:
            return {}, self.clock.state()
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}, self.clock.state()

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any], where: str) -> None:
        self.clock.load(values, where)
        if self.target is not None:
            load_state(self.target, section(tensors, "target"), f"target network in {where}")

    def checkpoint_extra(self) -> dict[str, Any]:
        return {**student_record(self.times, self.options.gamma), **self.clock.extra()}

    def sampling(self, config: TrainConfig) -> dict[str, Any]:
        n = min(self.times)
        return {"solver": "consistency", "steps": n, "schedule": torch.tensor(self.times[n]), "gamma": self.options.gamma}
