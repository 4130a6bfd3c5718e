"""Students: their model config (a consistency function around the teacher's architecture, or the teacher's own),
initialisation from the teacher's weights, recommended time points per step count, and sampling them.

A consistency student's config is {"net": <teacher's>, "prediction": "x0", "precond": "consistency",
"inner_prediction": <teacher's prediction>, "inner_precond": <teacher's precond>}, so `fewstep.train.load_checkpoint`
rebuilds it with no distillation code. Its checkpoint's extra["student_times"] maps a step count ("1", "2", ...) to
the steps + 1 decreasing times of its sampler, extra["student_sampler"] names the solver ("consistency", Song et al.,
2023, with CTM's gamma) and its options.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..grids import time_grid
from ..processes import Process
from ..sampling import sample
from ..train.checkpoint import CheckpointError, LoadedCheckpoint, load_state
from ..train.config import ConfigError, TrainConfig
from .schedules import karras_sigmas, time_of
from .teacher import Teacher, check_prediction_matches

TIMES_KEY = "student_times"
SAMPLER_KEY = "student_sampler"


def inner_config(config: TrainConfig, teacher: Teacher | None, data_shape: tuple[int, ...]) -> dict[str, Any]:
    """The model config of the network a student is built around: the teacher's (checked against `config`), or the
    configured one when the teacher's architecture is unknown (an in-memory model) or there is no teacher."""
    own = config.model_config(data_shape)
    if teacher is None:
        return own
    check_prediction_matches(teacher, config.prediction, "student (or its inner network)")
    if teacher.model_config is None:
        return own
    theirs = {**own, **teacher.model_config}
    if config.net and config.net != theirs["net"]:
        raise ConfigError(
            "net", f"net={config.net} differs from the teacher's {theirs['net']}; leave net empty to use the teacher's"
        )
    if config.precond != theirs["precond"]:
        raise ConfigError("precond", f"precond={config.precond!r}: the teacher uses precond={theirs['precond']!r}; set it so")
    return {k: theirs[k] for k in ("net", "prediction", "precond", "sigma_data")}


def consistency_config(inner: dict[str, Any]) -> dict[str, Any]:
    """A consistency student's model config around the inner model config `inner`."""
    return {"net": inner["net"], "prediction": "x0", "precond": "consistency", "sigma_data": inner.get("sigma_data", 0.5),
            "inner_prediction": inner.get("prediction", "eps"), "inner_precond": inner.get("precond", "none")}  # fmt: skip


def initialise_from_teacher(student: nn.Module, teacher: Teacher | None, wanted: bool | None) -> bool:
    """Copy the teacher's weights into the student (wanted None: when the teacher has weights); True if copied."""
    module = None if teacher is None else teacher.module
    if wanted is False or (wanted is None and module is None):
        return False
    if module is None:
        raise ConfigError(
            "distill.init_from_teacher", "distill.init_from_teacher = true needs a teacher with weights (an nn.Module)"
        )
    try:
        load_state(student, {k: v.detach().clone() for k, v in module.state_dict().items()}, "teacher's weights")
    except CheckpointError as err:
        raise ConfigError("net", f"the student cannot start from the teacher's weights: {err}") from None
    return True


def consistency_times(process: Process, s_min: float, s_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """steps + 1 decreasing times: the Karras grid in s = sigma / alpha from s_max to s_min, ending exactly at t_min."""
    s = karras_sigmas(s_min, s_max, steps, rho).flip(0)
    t = time_of(process, s, s_min)
    t[-1] = process.t_min
    return time_grid(process, steps, float(t[0]), process.t_min, t).tolist()


def grid_times(process: Process, steps: int, grid: str) -> list[float]:
    """steps + 1 decreasing times of a named grid over the process's whole range."""
    return time_grid(process, steps, process.t_max, process.t_min, grid).tolist()


def student_record(times: dict[int, list[float]], gamma: float) -> dict[str, Any]:
    """The extra keys of a student checkpoint: its times per step count and its sampler."""
    return {TIMES_KEY: {str(n): ts for n, ts in sorted(times.items())},
            SAMPLER_KEY: {"solver": "consistency", "options": {"gamma": gamma}}}  # fmt: skip


def stored_times(meta: dict[str, Any]) -> dict[int, list[float]]:
    """A checkpoint's stored student times by step count (empty for an ordinary model)."""
    table = (meta.get("extra") or {}).get(TIMES_KEY) or {}
    return {int(n): list(ts) for n, ts in table.items()}


def student_plan(meta: dict[str, Any], steps: int, schedule: Any = None, solver: str | None = None) -> dict[str, Any]:
    """`fewstep.sample` arguments for a student checkpoint's sidecar `meta` at `steps` steps.

    Without `schedule` the stored times for `steps` are used (ValueError naming the stored step counts if there are
    none); `solver` defaults to the student's own sampler (else "dpmpp_2m" for an ordinary model).
    """
    times = stored_times(meta)
    sampler = (meta.get("extra") or {}).get(SAMPLER_KEY) or {}
    own = solver is None or solver == sampler.get("solver")
    plan: dict[str, Any] = {"solver": solver or sampler.get("solver", "dpmpp_2m"), "steps": steps}
    if own:
        plan.update(sampler.get("options", {}))
    if schedule is not None:
        plan["schedule"] = schedule
    elif times:
        if steps not in times:
            counts = ", ".join(str(n) for n in sorted(times))
            raise ValueError(
                f"steps={steps}: this student stores time points for steps {counts} only; pass one of those or a schedule"
            )
        plan["schedule"] = torch.tensor(times[steps], dtype=torch.float64)
    return plan


def sample_student(
    loaded: LoadedCheckpoint,
    noise: torch.Tensor,
    steps: int = 1,
    *,
    schedule: Any = None,
    solver: str | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> torch.Tensor:
    """Sample a loaded student with its stored times and sampler (`student_plan`); noise [batch, ...] -> x0."""
    plan = {**student_plan(loaded.meta, steps, schedule, solver), **options}
    return sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, generator=generator, **plan)
