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

Overrides are "key=value" strings with a TOML value and dotted keys for tables ("net.channels=[32, 64]").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class TrainConfig:
    """Everything a training run needs; see the module doc for the TOML layout."""

    data: str = "ring"
    data_options: dict[str, Any] = field(default_factory=dict)
    net: dict[str, Any] = field(default_factory=dict)  # empty: chosen from the data's shape (`default_net`)
    process: dict[str, Any] = field(default_factory=lambda: {"type": "discrete_vp", "schedule": "linear"})
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

    def model_config(self, data_shape: tuple[int, ...]) -> dict[str, Any]:
        """The model part of the checkpoint config (net, prediction, precond, sigma_data)."""
        net = dict(self.net) if self.net else default_net(data_shape)
        return {"net": net, "prediction": self.prediction, "precond": self.precond, "sigma_data": self.sigma_data}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """Apply "key=value" overrides (TOML values, dotted keys into tables) to a config dict; returns a new dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. steps=500 or net.width=128)")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        target = out
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a table")
        target[leaf] = _parse_value(text.strip())
    return out


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a dict, with a clear error for unknown keys."""
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
            values = tomllib.load(f)
    return make_config(apply_overrides(values, overrides or []))
