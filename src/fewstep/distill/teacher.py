"""The frozen teacher of a distillation run: loaded from a shipped name or checkpoint, or given in memory; checks
that it fits the student (process, data shape, prediction type).

`Teacher(model, process, prediction)` wraps any `model(x, t) -> prediction` (an exact Gaussian mixture's model, a
`DiffusionModel`); `model_config`, when known (a checkpoint), describes its network so that a student of the same
architecture can be built and initialised from its weights. Shapes: x [batch, ...], t [batch].
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..parameterization import check_prediction
from ..processes import Process
from ..train.checkpoint import LoadedCheckpoint
from ..train.config import ConfigError
from ..train.process_config import process_config


@dataclass
class Teacher:
    """A frozen teacher: `model(x, t)` predicts `prediction` on `process`; `model_config` as in a checkpoint, or None."""

    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    process: Process
    prediction: str
    model_config: dict[str, Any] | None = None
    name: str = "teacher"

    def __post_init__(self) -> None:
        check_prediction(self.prediction, "teacher prediction")
        if not isinstance(self.process, Process):
            raise ValueError(f"the teacher's process must be a fewstep Process, got {type(self.process).__name__}")
        if not callable(self.model):
            raise ValueError(f"the teacher's model must be a callable model(x, t), got {type(self.model).__name__}")

    @property
    def module(self) -> nn.Module | None:
        """The teacher as an nn.Module (its weights can initialise a student), else None."""
        return self.model if isinstance(self.model, nn.Module) else None

    def freeze(self, device: torch.device) -> None:
        """Eval mode, no gradients, on `device` (a module teacher)."""
        if self.module is not None:
            self.model = self.module.to(device).eval().requires_grad_(False)


def load_teacher(spec: Any) -> Teacher:
    """A Teacher from a shipped model name or checkpoint path (`fewstep.shipped.load_model`), a LoadedCheckpoint, a
    `DiffusionModel` (anything with `process` and `prediction` attributes) or a Teacher."""
    from ..shipped import load_model

    if isinstance(spec, Teacher):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        try:
            loaded = load_model(spec)
        except ValueError as err:
            raise ConfigError("distill.teacher", f"distill.teacher={str(spec)!r}: {err}") from err
        return _from_checkpoint(loaded, str(spec))
    if isinstance(spec, LoadedCheckpoint):
        return _from_checkpoint(spec, "checkpoint")
    if (
        callable(spec)
        and isinstance(getattr(spec, "process", None), Process)
        and isinstance(getattr(spec, "prediction", None), str)
    ):
        config = _module_config(spec)
        return Teacher(spec, spec.process, spec.prediction, config, type(spec).__name__)
    raise ConfigError(
        "distill.teacher",
        "the teacher must be a shipped model name, a checkpoint path, a LoadedCheckpoint, a model with `process` and "
        f"`prediction` attributes, or fewstep.distill.Teacher(model, process, prediction); got {type(spec).__name__}",
    )


def _from_checkpoint(loaded: LoadedCheckpoint, name: str) -> Teacher:
    return Teacher(loaded.model, loaded.process, loaded.prediction, dict(loaded.config["model"]), name)


def _module_config(model: Any) -> dict[str, Any] | None:
    """The model config of an in-memory DiffusionModel without its net table (unknown), or None for other models."""
    if not hasattr(model, "precond"):
        return None
    return {"prediction": model.prediction, "precond": model.precond, "sigma_data": getattr(model, "sigma_data", 0.5)}


def same_process(a: Process, b: Process) -> bool:
    """Whether two processes have the same config; numbers (DiscreteVP betas) equal to 1e-6 relative, since a betas
    list rebuilt by `build_process` goes through float32 (torch.as_tensor of a list)."""
    return _close(process_config(a), process_config(b))


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6 * max(abs(a), abs(b))
    return a == b


def check_process(teacher: Teacher, process: Process) -> None:
    """ConfigError("process") when the student's process is not the teacher's."""
    if not same_process(teacher.process, process):
        theirs = process_config(teacher.process)
        hint = theirs if theirs.get("type") != "discrete_vp" else "the teacher's process table"
        raise ConfigError(
            "process", f"the student's process {process!r} differs from the teacher's {teacher.process!r}; set process = {hint}"
        )


def check_prediction_matches(teacher: Teacher, prediction: str, what: str) -> None:
    """ConfigError("prediction") when the student's (inner) prediction type is not the teacher's."""
    if prediction != teacher.prediction:
        raise ConfigError(
            "prediction",
            f"prediction={prediction!r}: the {what} must predict what the teacher predicts ({teacher.prediction!r}); "
            f"set prediction = {teacher.prediction!r}",
        )


def check_data_shape(teacher: Teacher, data: torch.Tensor) -> None:
    """ConfigError("data") when the teacher cannot take samples of the data's shape (one probe evaluation)."""
    device = _device_of(teacher.model)
    x = data[:2].to(device, torch.float32)
    t = torch.full((len(x),), 0.5 * (teacher.process.t_min + teacher.process.t_max), dtype=torch.float32, device=device)
    try:
        with torch.no_grad():
            out = teacher.model(x, t)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ConfigError(
            "data", f"samples of shape {tuple(data.shape[1:])} do not fit the teacher {teacher.name}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            "data", f"samples of shape {tuple(data.shape[1:])} do not fit the teacher {teacher.name}: it returned {got}"
        )


def _device_of(model: Any) -> torch.device:
    """Where a module's parameters are (CPU for other callables)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")
