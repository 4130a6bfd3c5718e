"""`distill_config`: a training config for distilling a teacher, with process, network, prediction and data taken
from the teacher's checkpoint unless given (so that they match it)."""

from __future__ import annotations

import os
from typing import Any

from ..train.checkpoint import LoadedCheckpoint
from ..train.config import TrainConfig, make_config
from ..train.process_config import process_config
from .teacher import Teacher, load_teacher


def _teacher_values(teacher: Any) -> tuple[dict[str, Any], str | None]:
    """(config values that make a student match `teacher`, the name to record as distill.teacher or None)."""
    if isinstance(teacher, (str, os.PathLike)):
        from ..shipped import load_model

        loaded, name = load_model(teacher), str(teacher)
    elif isinstance(teacher, LoadedCheckpoint):
        loaded, name = teacher, None
    else:
        t: Teacher = load_teacher(teacher)
        values = {"process": process_config(t.process), "prediction": t.prediction}
        if t.model_config is not None:
            values.update({k: t.model_config[k] for k in ("precond", "sigma_data") if k in t.model_config})
        return values, None
    model, train = loaded.config["model"], loaded.config.get("train", {})
    values = {"process": loaded.config["process"], "net": model["net"], "prediction": model.get("prediction", "eps"),
              "precond": model.get("precond", "none"), "sigma_data": model.get("sigma_data", 0.5)}  # fmt: skip
    if "data" in train:
        values.update(data=train["data"], data_options=train.get("data_options", {}))
    return values, name


def distill_config(method: str, teacher: Any, *, distill: dict[str, Any] | None = None, **values: Any) -> TrainConfig:
    """A `TrainConfig` that distils `teacher` (shipped name, checkpoint path, LoadedCheckpoint, model or Teacher) with
    `method` ("cd", "ct", "ect", "pd"); `distill`: further options of the distill table; `values`: any other config
    keys (they win over the teacher's). An in-memory teacher is not recorded in the config: pass it to the Trainer
    again, `Trainer(config, teacher=teacher)`."""
    base, name = _teacher_values(teacher)
    table = {"method": method, **({"teacher": name} if name is not None else {}), **(distill or {})}
    return make_config({**base, **values, "distill": table})
