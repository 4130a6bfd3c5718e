"""Where an acceleration plugs in: the backbone network inside a fewstep model, and a model with its backbone replaced.

fewstep's trained models are `DiffusionModel(net, process, ...)` (see `fewstep.nets.model`): the process time t is turned
into the network's noise level c_noise(t) and the backbone `net(x, c_noise)` does the work; a diffusers network comes
as `DiffusersModel` (`fewstep.from_diffusers`), which calls `net(x, timestep=k(t))`. Caching, compiling and
quantizing act on that backbone; the preconditioning around it stays in float and eager. Shapes: as the model's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..integrations.diffusers_model import DiffusersModel
from ..nets.diffusers_unet import DiffusersUNet
from ..nets.model import DiffusionModel
from ..nets.unet import UNet
from .diffusers_split import is_unet2d_condition

CACHEABLE = (UNet, DiffusersUNet)
SUPPORTED_TEXT = (
    "fewstep.nets.UNet and fewstep.nets.DiffusersUNet (alone or in a fewstep DiffusionModel: the shipped and "
    "`fewstep train` models) and a diffusers UNet2DModel or UNet2DConditionModel through fewstep.from_diffusers"
)


def is_unet2d(net: object) -> bool:
    """Whether net is a diffusers `UNet2DModel` (checked by name: diffusers is optional)."""
    return type(net).__name__ == "UNet2DModel" and type(net).__module__.startswith("diffusers")


def backbone_of(model: Callable, what: str = "caching") -> nn.Module:
    """The backbone of `model` (the model itself if it is a backbone); a TypeError naming the supported networks."""
    net = model.net if isinstance(model, (DiffusionModel, DiffusersModel)) else model
    diffusers_unet = is_unet2d(net) or is_unet2d_condition(net)
    if not (isinstance(net, CACHEABLE) or (isinstance(model, DiffusersModel) and diffusers_unet)):
        raise TypeError(f"{what} cannot instrument {type(net).__name__}: supported are {SUPPORTED_TEXT}")
    return net


def with_backbone(model: Callable, net: Callable) -> Callable:
    """`model` with its backbone replaced by `net` (a shallow copy; `model` is unchanged); `net` itself for a backbone."""
    if isinstance(model, DiffusersModel):
        out = copy.copy(model)
        out.net = net
        return out
    if not isinstance(model, DiffusionModel):
        return net
    out = copy.copy(model)
    out._modules = dict(model._modules)  # noqa: SLF001 - a new module table, so that model keeps its own net
    out._modules["net"] = net
    return out


def check_grid(ts: torch.Tensor) -> torch.Tensor:
    """The sampling grid `ts` [n] as float64, checked: one dimension, at least one time, finite."""
    if not isinstance(ts, torch.Tensor):
        ts = torch.as_tensor(ts)
    ts = ts.detach().to("cpu", torch.float64)
    if ts.ndim != 1 or ts.numel() < 1 or not bool(torch.isfinite(ts).all()):
        raise ValueError(
            f"ts must be a 1-D tensor of finite sampling times (e.g. fewstep.accel.sampling_grid), got shape {tuple(ts.shape)}"
        )
    return ts
