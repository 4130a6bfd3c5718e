"""Training configuration: a dataclass read from a TOML file (tomllib) with command-line overrides.

TOML layout: top-level keys are `TrainConfig` fields; `[net]`, `[process]` and `[data_options]` are tables, e.g.

    data = "digits"
    steps = 10000
    prediction = "eps"
    [net]
    type = "unet"
    channels = [32, 64]
    [process]
    type = "discrete_vp"
    schedule = "linear"

A `[distill]` table turns the run into distillation (`fewstep.distill`): `method = "cd" | "ct" | "ect" | "pd"`,
`teacher = "<shipped name or checkpoint path>"` and the method's options; empty (the default) is plain training.

Overrides are "key=value" strings with a TOML value and dotted keys for tables ("net.channels=[32, 64]").
Every value is checked when the config is made (`TrainConfig.validate`): a `ConfigError` names the key and what it
allows, before any data is loaded or any step is trained.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


MAX_SEED = 2**32 - 1
TRAINABLE_PREDICTIONS = ("eps", "x0", "v", "velocity")
DEVICES = ("cpu", "cuda")
LR_DECAYS = ("none", "cosine")


class ConfigError(ValueError):
    """A training config value that is not allowed; `key` names the config key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class TrainConfig:
    """Everything a training run needs; see the module doc for the TOML layout."""

    data: str = "ring"
    data_options: dict[str, Any] = field(default_factory=dict)
    net: dict[str, Any] = field(default_factory=dict)  # empty: chosen from the data's shape (`default_net`)
    process: dict[str, Any] = field(default_factory=lambda: {"type": "discrete_vp", "schedule": "linear"})
    distill: dict[str, Any] = field(default_factory=dict)  # empty: plain training; else see fewstep.distill
    prediction: str = "eps"
    precond: str = "none"  # "edm": EDM preconditioning (then prediction = "x0")
    sigma_data: float = 0.5
    weighting: str = "none"  # "none" | "min_snr" | "edm"
    min_snr_gamma: float = 5.0
    time_sampling: str = "uniform"  # see fewstep.train.timesteps
    time_mean: float | None = None
    time_std: float | None = None
    immiscible: str = "none"  # "none" | "assign" | "knn"
    knn_k: int = 4
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    lr_warmup: int = 0
    lr_decay: str = "none"  # "none" | "cosine": lr * (1 + cos(pi * step / steps)) / 2 after the warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    ema_warmup: str = "power"  # "none" | "power" | "karras"
    ema_halflife: float = 500.0
    ema_rampup: float = 0.05
    seed: int = 0
    bf16: bool = False
    threads: int | None = None
    device: str = "cpu"  # "cpu" or "cuda" (each process uses cuda:LOCAL_RANK)
    out_dir: str = "runs/fewstep"
    checkpoint_every: int = 1000  # 0: only at the end
    sample_every: int = 0  # 0: only at the end
    sample_count: int = 64
    sample_steps: int = 20
    sample_solver: str = "dpmpp_2m"
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the type and range of every field (and that the process table builds); raises ConfigError naming the key.

        Ints given for float fields become floats. Called on construction, so `TrainConfig(...)`, `make_config`,
        `load_config` and therefore `Trainer` and `fewstep train` all fail before any data is loaded.
        """
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), hints[f.name]))
        self._check_choices()
        self._check_ranges()
        self._check_process()
        self._check_distill()

    def _check_choices(self) -> None:
        from ..data import DATASETS
        from ..nets import PRECONDITIONINGS
        from ..solvers import solver_specs
        from .ema import EMA_WARMUPS
        from .immiscible import IMMISCIBLE
        from .losses import WEIGHTINGS
        from .timesteps import TIME_SAMPLINGS

        preconds = tuple(p for p in PRECONDITIONINGS if p != "consistency")  # a consistency student is made by distill
        choices = {"data": DATASETS, "prediction": TRAINABLE_PREDICTIONS, "precond": preconds, "weighting": WEIGHTINGS,
                   "time_sampling": TIME_SAMPLINGS, "immiscible": IMMISCIBLE, "ema_warmup": EMA_WARMUPS, "device": DEVICES,
                   "lr_decay": LR_DECAYS,
                   "sample_solver": tuple(solver_specs())}  # fmt: skip
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(key, f"{key}={value!r} is not known; allowed values: {', '.join(allowed)}")
        if self.precond == "edm" and self.prediction != "x0":
            raise ConfigError("prediction", f"precond='edm' needs prediction='x0', got prediction={self.prediction!r}")

    def _check_ranges(self) -> None:
        rules = {
            "sigma_data": (_positive, "a finite number > 0"),
            "min_snr_gamma": (_positive, "a finite number > 0"),
            "time_mean": (lambda v: v is None or math.isfinite(v), "a finite number (or absent)"),
            "time_std": (lambda v: v is None or _positive(v), "a finite number > 0 (or absent)"),
            "knn_k": (lambda v: v >= 1, "an integer >= 1"),
            "steps": (lambda v: v >= 1, "an integer >= 1"),
            "batch_size": (lambda v: v >= 1, "an integer >= 1"),
            "lr": (_positive, "a finite number > 0"),
            "lr_warmup": (lambda v: v >= 0, "an integer >= 0"),
            "weight_decay": (_non_negative, "a finite number >= 0"),
            "grad_clip": (_non_negative, "a finite number >= 0 (0 disables clipping)"),
            "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "ema_halflife": (_positive, "a finite number > 0"),
            "ema_rampup": (_non_negative, "a finite number >= 0"),
            "seed": (lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
            "threads": (lambda v: v is None or v >= 1, "an integer >= 1 (or absent)"),
            "out_dir": (lambda v: v.strip() != "", "a non-empty path"),
            "checkpoint_every": (lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
            "sample_every": (lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
            "sample_count": (lambda v: v >= 1, "an integer >= 1"),
            "sample_steps": (lambda v: v >= 1, "an integer >= 1"),
        }
        for key, (ok, rule) in rules.items():
            value = getattr(self, key)
            if not ok(value):
                raise ConfigError(key, f"{key} must be {rule}, got {key}={value!r}")

    def _check_process(self) -> None:
        import torch

        from .process_config import build_process
        from .timesteps import sample_time

        try:
            process = build_process(self.process)
        except (ValueError, TypeError) as err:
            raise ConfigError("process", f"process table {self.process!r}: {err}") from err
        try:
            sample_time(1, process, self.time_sampling, torch.Generator())
        except ValueError as err:
            raise ConfigError("time_sampling", f"time_sampling={self.time_sampling!r} does not fit the process: {err}") from err

    def _check_distill(self) -> None:
        from .objective import check_distill_table

        check_distill_table(self)

    def model_config(self, data_shape: tuple[int, ...]) -> dict[str, Any]:
        """The model part of the checkpoint config (net, prediction, precond, sigma_data)."""
        net = dict(self.net) if self.net else default_net(data_shape)
        return {"net": net, "prediction": self.prediction, "precond": self.precond, "sigma_data": self.sigma_data}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _typed(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against the field type `hint` (int, float, str, bool, dict, or one of them | None)."""
    optional = typing.get_origin(hint) in _UNIONS and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(k for k in typing.get_args(hint) if k is not type(None))
    kind = typing.get_origin(hint) or hint
    if kind is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**1023:
        return float(value)
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}
    raise ConfigError(key, f"{key} must be {names[kind]}{' (or absent)' if optional else ''}, got {key}={value!r}")


_UNIONS = (typing.Union, type(int | None))


def default_net(data_shape: tuple[int, ...]) -> dict[str, Any]:
    """A sensible network for one sample of shape `data_shape`: an MLP for vectors, a UNet for images."""
    if len(data_shape) == 1:
        return {"type": "mlp", "dim": data_shape[0], "width": 256, "depth": 3}
    if len(data_shape) == 3:
        channels = [32, 64] if max(data_shape[1:]) <= 16 else [32, 64, 64]
        return {"type": "unet", "in_channels": data_shape[0], "channels": channels, "attention": [len(channels) - 1]}
    raise ValueError(f"no default network for samples of shape {data_shape}; give a [net] table")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply "key=value" overrides (TOML values, dotted keys into tables) to a config dict; returns a new dict.

    A dotted key into a table the dict lacks starts from the field's default table ("process.num_timesteps=500"
    keeps the default process type).
    """
    fields = dataclasses.fields(TrainConfig)
    defaults = {f.name: f.default_factory() for f in fields if f.default_factory is not dataclasses.MISSING}
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. steps=500 or net.width=128)")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        target = out
        for depth, p in enumerate(parents):
            target = target.setdefault(p, dict(defaults.get(p, {})) if depth == 0 else {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a table")
        target[leaf] = _parse_value(text.strip())
    return out


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a dict, with a clear error for unknown keys and every value checked (`TrainConfig.validate`)."""
    if not isinstance(values, dict):
        raise ConfigError("config", f"a training config must be a table of keys, got {values!r}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return TrainConfig(**values)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML file (optional) and apply overrides (flags win over the file)."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path} is not a valid TOML file: {err}") from err
    return make_config(apply_overrides(values, overrides or []))
