"""Compiled, low-precision inference of a fewstep model: `torch.compile` of the backbone, bf16 autocast, channels_last.

`torch.compile` (Ansel et al., 2024, "PyTorch 2", ASPLOS) traces the backbone `net(x, c_noise)` once: the noise level
is a tensor input, not a Python number, so a sampling run compiles one graph for all its steps (dynamic=False: a new
batch shape compiles another). The preconditioning and the solver stay eager. bf16 autocast runs matmuls and
convolutions in bfloat16 (AMX units on recent x86) and returns the input's dtype. Shapes: as the model's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..nets.model import DiffusionModel
from .backbone import with_backbone

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = {None: None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16}  # fmt: skip


def check_options(mode: str | None, dtype: str | None, backend: Any) -> None:
    """ValueErrors naming the allowed compile modes and dtypes; a RuntimeError where torch.compile cannot run."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"mode={mode!r} is not known; allowed values: None (eager), {', '.join(COMPILE_MODES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not known; allowed values: {', '.join(str(k) for k in DTYPES)}")
    if mode is not None and isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            f"backend={backend!r} is not available; allowed here: {', '.join(torch._dynamo.list_backends(exclude_tags=()))}"
        )


class FastNet(nn.Module):
    """`net(x, c_noise, ...)` compiled and/or under bf16 autocast and channels_last; returns x's dtype, contiguous."""

    def __init__(self, net: Callable, mode: str | None = "default", dtype: str | None = None, channels_last: bool = False,
                 backend: Any = "inductor", dynamic: bool = False):  # fmt: skip
        super().__init__()
        check_options(mode, dtype, backend)
        self.net = net
        self.dtype, self.channels_last = DTYPES[dtype], bool(channels_last)
        if self.channels_last and isinstance(net, nn.Module):
            net = copy.deepcopy(net).to(memory_format=torch.channels_last)  # the caller's network stays as it is
        self.fn = net if mode is None else torch.compile(net, mode=mode, backend=backend, dynamic=dynamic)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(x.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        with autocast:
            out = self.fn(x, *args, **kwargs)
        return _restore(out, x.dtype)


def _restore(out: Any, dtype: torch.dtype) -> Any:
    """Tensors (also inside a tuple) in `dtype` and contiguous; None and other values unchanged."""
    if isinstance(out, tuple):
        return tuple(_restore(o, dtype) for o in out)
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return out.to(dtype).contiguous()
    return out


def compile_model(model: Callable, mode: str | None = "default", *, dtype: str | None = None, channels_last: bool = False,
                  backend: Any = "inductor", dynamic: bool = False) -> Callable:  # fmt: skip
    """A fewstep model `model(x, t)` whose backbone is compiled (mode None: eager) and run in `dtype` (None: as x).

    model: a DiffusionModel (its backbone is compiled; the preconditioning stays eager) or any nn.Module model(x, t)
    (compiled whole). backend: a torch.compile backend ("inductor"; "eager"/"aot_eager" to test tracing). A `DeepCache`
    is compiled with `cache.compile(...)`.
    """
    if isinstance(model, DiffusionModel):
        return with_backbone(model, FastNet(model.net, mode, dtype, channels_last, backend, dynamic))
    if isinstance(model, nn.Module):
        return FastNet(model, mode, dtype, channels_last, backend, dynamic)
    raise TypeError(
        f"compile_model needs a fewstep DiffusionModel or an nn.Module model(x, t), got {type(model).__name__}; "
        "for a DeepCache use cache.compile(...)"
    )
