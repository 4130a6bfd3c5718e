"""Processes as plain config dicts (for TOML files and checkpoints) and back: `build_process`, `process_config`.

{"type": "discrete_vp", "schedule": "linear" | "scaled_linear" | "cosine", "num_timesteps": 1000, ...} or with
explicit "betas"; {"type": "vp", "schedule": "linear" | "cosine", ...}; {"type": "ve", ...}; {"type": "edm", ...};
{"type": "rectified_flow"}. Processes as in Ho et al. (2020), Song et al. (2021), Karras et al. (2022), Liu et al. (2023).
"""

from __future__ import annotations

from typing import Any

from ..processes import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow

PROCESS_TYPES = ("discrete_vp", "vp", "ve", "edm", "rectified_flow")
_DISCRETE_SCHEDULES = {"linear": DiscreteVP.linear, "scaled_linear": DiscreteVP.scaled_linear, "cosine": DiscreteVP.cosine}


def _call(kind: str, fn, options: dict[str, Any]) -> Process:
    try:
        return fn(**options)
    except TypeError as err:
        raise ValueError(f"bad options for process type {kind!r}: {err}") from err


def build_process(config: dict[str, Any] | str) -> Process:
    """A process from a config dict (or just its type name)."""
    if not isinstance(config, (dict, str)):
        raise ValueError(f"a process config must be a table like {{type = 'discrete_vp'}} or a type name, got {config!r}")
    options = {"type": config} if isinstance(config, str) else dict(config)
    kind = options.pop("type", None)
    if not isinstance(kind, str) or kind not in PROCESS_TYPES:
        raise ValueError(f"process type={kind!r} is not known; allowed values: {', '.join(PROCESS_TYPES)}")
    if kind == "discrete_vp":
        if "betas" in options:
            return _call(kind, DiscreteVP, options)
        schedule = options.pop("schedule", "linear")
        if not isinstance(schedule, str) or schedule not in _DISCRETE_SCHEDULES:
            raise ValueError(f"discrete_vp schedule={schedule!r} is not known; allowed values: {', '.join(_DISCRETE_SCHEDULES)}")
        return _call(kind, _DISCRETE_SCHEDULES[schedule], options)
    constructors = {"vp": VP, "ve": VE, "edm": EDM, "rectified_flow": RectifiedFlow}
    return _call(kind, constructors[kind], options)


def process_config(process: Process) -> dict[str, Any]:
    """The config dict that rebuilds `process` exactly (DiscreteVP by its betas)."""
    if isinstance(process, DiscreteVP):
        return {"type": "discrete_vp", "betas": process.betas.tolist()}
    if isinstance(process, VP):
        keys = ("schedule", "beta_min", "beta_max", "s", "t_min", "t_max")
        return {"type": "vp", **{k: getattr(process, k) for k in keys}}
    if isinstance(process, VE):
        return {"type": "ve", "sigma_min": process.sigma_min, "sigma_max": process.sigma_max}
    if isinstance(process, EDM):
        return {"type": "edm", "sigma_min": process.t_min, "sigma_max": process.t_max}
    if isinstance(process, RectifiedFlow):
        return {"type": "rectified_flow"}
    raise TypeError(f"cannot describe process {process!r} as a config; supported types: {', '.join(PROCESS_TYPES)}")
