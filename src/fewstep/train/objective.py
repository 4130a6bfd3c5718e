"""Training objectives: what the Trainer minimises, as one object with hooks around its single training loop.

The Trainer owns data, optimiser, EMA, checkpoints and DDP; an objective says which model to build, which randomness
it needs per global batch (drawn from the trainer's noise generator before eps, then sharded like x0 and eps, so N
processes reproduce one and a resume is exact), the per-sample loss, what to do around each step and what state to
checkpoint. `DiffusionObjective` is the denoising loss of `fewstep.train.losses` (Ho et al., 2020; Karras et al.,
2022); distillation objectives (`fewstep.distill`) register themselves in `OBJECTIVES` under their method names and
are selected by the config table `distill = {method = ...}`. Shapes: x0, eps [batch, ...]; draws [batch] each.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..processes import Process
from .config import ConfigError, TrainConfig
from .losses import diffusion_loss
from .timesteps import sample_time

if TYPE_CHECKING:
    from .trainer import Trainer


class Objective:
    """Base class: the hooks the Trainer calls; every default does nothing (or builds the configured model)."""

    name = "objective"

    def model_config(self, config: TrainConfig, data_shape: tuple[int, ...]) -> dict[str, Any]:
        """The model part of the checkpoint config of the model to train."""
        return config.model_config(data_shape)

    def setup(self, trainer: Trainer) -> None:
        """Called once the model, EMA and optimiser exist (before any resume)."""

    def begin_step(self, trainer: Trainer) -> None:
        """Called at the start of every step, before the batch is drawn."""

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        """Randomness for the global batch x0 [N, ...] other than eps: tensors [N] (drawn before eps)."""
        return {}

    def loss(self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample losses [batch] on this process's shard."""
        raise NotImplementedError

    def after_step(self, trainer: Trainer) -> None:
        """Called after the optimiser step and the EMA update."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able values) to checkpoint: stored under "objective.*" and extra["objective"]."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any], where: str) -> None:
        """Restore what `state` returned (CheckpointError naming `where` when it does not fit)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Further extra keys of every checkpoint (a student's recommended times)."""
        return {}

    def sampling(self, config: TrainConfig) -> dict[str, Any]:
        """`fewstep.sample` arguments (solver, steps, schedule, options) for the figures written during training."""
        return {"solver": config.sample_solver, "steps": config.sample_steps}


class DiffusionObjective(Objective):
    """The weighted denoising loss for the configured prediction type, with times from `sample_time`."""

    name = "diffusion"

    def __init__(self, config: TrainConfig, process: Process):
        self.config = config
        self.process = process

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        c = self.config
        return {"t": sample_time(len(x0), self.process, c.time_sampling, generator, mean=c.time_mean, std=c.time_std)}

    def loss(self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        return diffusion_loss(model, x0, draws["t"], eps, process=self.process, prediction=c.prediction, weighting=c.weighting,
                              gamma=c.min_snr_gamma, sigma_data=c.sigma_data)  # fmt: skip


ObjectiveFactory = Callable[[TrainConfig, Process, torch.Tensor, Any], Objective]
OBJECTIVES: dict[str, ObjectiveFactory] = {}  # distillation methods, filled by `fewstep.distill` when imported
TABLE_CHECKS: list[Callable[[TrainConfig], None]] = []  # checks of the `distill` table, filled by `fewstep.distill`


def register_objective(method: str, factory: ObjectiveFactory) -> None:
    """Make `distill = {method = <method>}` build `factory(config, process, data, teacher)`."""
    OBJECTIVES[method] = factory


def _load_methods() -> None:
    if not OBJECTIVES:
        importlib.import_module("fewstep.distill")  # lazily: the distill package sits above train and fills the registry


def check_distill_table(config: TrainConfig) -> None:
    """Validate `config.distill` (ConfigError naming the key) when it is not empty."""
    if not config.distill:
        return
    _load_methods()
    for check in TABLE_CHECKS:
        check(config)


def build_objective(config: TrainConfig, process: Process, data: torch.Tensor, teacher: Any = None) -> Objective:
    """The objective `config` selects: diffusion training, or the distillation method of `config.distill`."""
    if not config.distill:
        if teacher is not None:
            raise ConfigError("distill", "a teacher was given but the config has no distill table; set distill.method")
        return DiffusionObjective(config, process)
    _load_methods()
    method = config.distill.get("method")
    if method not in OBJECTIVES:
        raise ConfigError("distill.method", f"distill.method={method!r} is not known; allowed values: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[method](config, process, data, teacher)
