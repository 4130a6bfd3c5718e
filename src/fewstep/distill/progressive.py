"""Progressive distillation on the Trainer: rounds that halve the student's steps, each round's teacher the previous
round's student.

Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022, Algorithm 2, for any
process and any named grid: in a round with N student steps the teacher walks the grid of 2N steps over [t_min, t_max]
(`fewstep.time_grid`, so every other point is the student's grid of N); a sample draws k in 0..N-1, t = g[2k],
t' = g[2k+1], t'' = g[2k+2], and the student's data prediction at (x_t, t) regresses on the closed-form target of
two teacher DDIM steps (`targets.progressive_target`), weighted by max(SNR(t), 1) ("truncated SNR", their eq. 9).
After `steps_per_round` steps the student's EMA becomes the teacher (a frozen copy, checkpointed as
"objective.teacher.*"), and the student and its EMA restart from it. Shapes: x0, eps [batch, ...]; t, t_mid, t_next [batch].
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..grids import time_grid
from ..parameterization import Coefficients, to_x0_eps
from ..processes import Process
from ..train.checkpoint import CheckpointError, load_state, section
from ..train.config import ConfigError, TrainConfig
from ..train.objective import Objective
from .clock import TrainClock
from .consistency import resolve_teacher
from .options import ProgressiveOptions, parse_table
from .student import grid_times, initialise_from_teacher, inner_config, student_record
from .targets import prediction_pair, progressive_target
from .teacher import check_data_shape, check_process

if TYPE_CHECKING:
    from ..train.trainer import Trainer


def truncated_snr(process: Process, t: torch.Tensor) -> torch.Tensor:
    """max(alpha^2 / sigma^2, 1) [batch] (float64)."""
    return torch.exp(2.0 * process.log_snr(t.to(torch.float64))).clamp_min(1.0)


class ProgressiveObjective(Objective):
    """PD rounds start_steps -> ... -> end_steps, `steps_per_round` training steps each (the last round runs on)."""

    name = "pd"

    def __init__(self, config: TrainConfig, process: Process, data: torch.Tensor, teacher: Any = None):
        options = parse_table(config.distill)
        assert isinstance(options, ProgressiveOptions)
        self.options, self.config, self.process = options, config, process
        self.teacher = resolve_teacher(teacher, options, required=True)
        check_process(self.teacher, process)
        check_data_shape(self.teacher, data)
        self.rounds = options.rounds
        self.steps_per_round = options.steps_per_round or max(1, math.ceil(config.steps / len(self.rounds)))
        self.grid = options.grid or process.default_schedule
        try:
            self._grids = {n: time_grid(process, n, process.t_max, process.t_min, self.grid) for n in self.rounds}
            self._grids.update({2 * n: time_grid(process, 2 * n, process.t_max, process.t_min, self.grid) for n in self.rounds})
        except ValueError as err:
            raise ConfigError("distill.grid", f"distill.grid={self.grid!r} does not fit {process!r}: {err}") from err
        self.round = 0
        self.round_teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        self.clock = TrainClock()

    def model_config(self, config: TrainConfig, data_shape: tuple[int, ...]) -> dict[str, Any]:
        return inner_config(config, self.teacher, data_shape)

    def setup(self, trainer: Trainer) -> None:
        self.student = trainer.model
        self.teacher.freeze(trainer.device)
        initialise_from_teacher(trainer.model, self.teacher, self.options.init_from_teacher)

    # Rounds ----------------------------------------------------------------------------------------------------

    def round_at(self, step: int) -> int:
        return min(step // self.steps_per_round, len(self.rounds) - 1)

    @property
    def student_steps(self) -> int:
        """The student's step count in the current round."""
        return self.rounds[self.round]

    def begin_step(self, trainer: Trainer) -> None:
        self.clock.tick()
        while self.round < self.round_at(trainer.step):
            self._next_round(trainer)

    def after_step(self, trainer: Trainer) -> None:
        self.clock.tick()

    def round_checkpoint(self, out_dir: Path, steps: int) -> Path:
        """Where the student of the round with `steps` steps is kept when the round ends."""
        return Path(out_dir) / f"student-{steps}steps.json"

    def _next_round(self, trainer: Trainer) -> None:
        """Keep the round's student (`round_checkpoint`); its EMA weights, the student that is sampled and kept,
        become the frozen teacher, and the trained weights and the EMA restart from them.

        Not the raw weights: on digits_flow, lr 2e-4, the raw 16-step student had FD 0.45 against its EMA's 0.31, and
        distilling from the raw weights made the next round's student worse after 900 steps than after 300.
        """
        trainer.save(self.round_checkpoint(trainer.out_dir, self.student_steps))
        self.round += 1
        self.round_teacher = self._frozen_copy(trainer.ema.module)
        trainer.model.load_state_dict(trainer.ema.module.state_dict())
        trainer.ema.updates = 0

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).eval().requires_grad_(False)

    def _teacher_fn(self):
        if self.round_teacher is None:
            return prediction_pair(self.teacher.model, self.teacher.prediction, self.process)
        return prediction_pair(self.round_teacher, self.student.prediction, self.process)

    # Randomness and loss ---------------------------------------------------------------------------------------

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        """t = g[2k], t_mid = g[2k+1], t_next = g[2k+2] on the teacher's grid g of 2N steps, k uniform in 0..N-1."""
        n = self.rounds[self.round_at(step)]
        grid = self._grids[2 * n]
        k = torch.randint(0, n, (len(x0),), generator=generator)
        return {"t": grid[2 * k], "t_mid": grid[2 * k + 1], "t_next": grid[2 * k + 2]}

    def loss(self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        t = draws["t"]
        x_t = self.process.add_noise(x0, t, eps)
        with torch.no_grad():
            target = progressive_target(self._teacher_fn(), self.process, x_t, t, draws["t_mid"], draws["t_next"])
        out = model(x_t, t.to(x0.dtype)).to(x_t.dtype)
        x0_hat, _ = to_x0_eps(out, self.student.prediction, x_t, Coefficients.of(self.process, t, x_t))
        err = (x0_hat.float() - target.float()).pow(2).reshape(len(x0), -1).mean(1)
        weight = truncated_snr(self.process, t) if self.options.weighting == "truncated_snr" else torch.ones_like(t)
        return err * weight.to(err)

    # State -----------------------------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {} if self.round_teacher is None else {f"teacher.{k}": v for k, v in self.round_teacher.state_dict().items()}
        return tensors, {"round": self.round, **self.clock.state()}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any], where: str) -> None:
        round_ = values.get("round", 0)
        if isinstance(round_, bool) or not isinstance(round_, int) or not 0 <= round_ < len(self.rounds):
            raise CheckpointError(
                f"{where}: key 'extra.objective.round' must be a round in [0, {len(self.rounds) - 1}], got {round_!r}"
            )
        self.clock.load(values, where)
        self.round = round_
        self.round_teacher = None
        if round_ > 0:
            self.round_teacher = self._frozen_copy(self.student)
            load_state(self.round_teacher, section(tensors, "teacher"), f"round teacher in {where}")

    def checkpoint_extra(self) -> dict[str, Any]:
        n = self.student_steps
        record = student_record({n: grid_times(self.process, n, self.grid)}, 0.0)
        return {**record, "pd_round": self.round, **self.clock.extra()}

    def sampling(self, config: TrainConfig) -> dict[str, Any]:
        n = self.student_steps
        return {"solver": "consistency", "steps": n, "schedule": self._grids[n], "gamma": 0.0}
