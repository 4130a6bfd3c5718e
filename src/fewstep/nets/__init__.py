"""Networks for training: a residual MLP, a small UNet, a diffusers UNet2DModel adapter, and `DiffusionModel`.

A backbone is `net(x, c_noise) -> tensor like x` with c_noise = -log_snr(t)/4 (see `embedding`); `DiffusionModel`
turns it into a fewstep model `model(x, t)` for a process (optionally EDM-preconditioned, Karras et al., 2022).
`build_network({"type": "mlp" | "unet" | "diffusers_unet", **options})` builds a backbone from a config dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..processes import Process
from .diffusers_unet import DiffusersUNet
from .embedding import NoiseEmbedding, c_noise
from .mlp import MLP
from .model import (
    PRECONDITIONINGS,
    ConsistencyCoefficients,
    DiffusionModel,
    EDMCoefficients,
    consistency_coefficients,
    edm_coefficients,
)
from .unet import UNet

NETWORKS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "unet": UNet, "diffusers_unet": DiffusersUNet}


def build_network(config: dict[str, Any]) -> nn.Module:
    """A backbone from {"type": name, **options}; e.g. {"type": "unet", "channels": [32, 64], "attention": [1]}."""
    options = dict(config)
    kind = options.pop("type", None)
    if kind not in NETWORKS:
        raise ValueError(f"net type={kind!r} is not known; allowed values: {', '.join(NETWORKS)}")
    try:
        return NETWORKS[kind](**options)
    except TypeError as err:
        raise ValueError(f"bad options for net type {kind!r}: {err}") from err


MODEL_KEYS = ("net", "prediction", "precond", "sigma_data", "inner_prediction", "inner_precond")


def build_model(config: dict[str, Any], process: Process) -> DiffusionModel:
    """A `DiffusionModel` from {"net": {...}, "prediction": ..., "precond": ..., "sigma_data": ...} (a consistency
    student adds "inner_prediction" and "inner_precond")."""
    unknown = sorted(set(config) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model config key(s) {', '.join(unknown)}; allowed: {', '.join(MODEL_KEYS)}")
    if "net" not in config:
        raise ValueError("the model config needs a 'net' table, e.g. {'type': 'mlp', 'dim': 2}")
    return DiffusionModel(
        build_network(config["net"]),
        process,
        prediction=config.get("prediction", "eps"),
        precond=config.get("precond", "none"),
        sigma_data=config.get("sigma_data", 0.5),
        inner_prediction=config.get("inner_prediction"),
        inner_precond=config.get("inner_precond", "none"),
    )


__all__ = [
    "MLP",
    "MODEL_KEYS",
    "ConsistencyCoefficients",
    "NETWORKS",
    "PRECONDITIONINGS",
    "DiffusersUNet",
    "DiffusionModel",
    "EDMCoefficients",
    "NoiseEmbedding",
    "UNet",
    "build_model",
    "build_network",
    "c_noise",
    "consistency_coefficients",
    "edm_coefficients",
]
