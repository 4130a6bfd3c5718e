"""Exponential moving average of model weights with warm-up.

warmup "none": constant decay; "power": decay_n = min(decay, (1 + n) / (10 + n)) (the warm-up of TensorFlow's
ExponentialMovingAverage with num_updates, used by diffusers' EMAModel); "karras": EDM's half-life form
(Karras et al., 2022, "Elucidating the Design Space...", training config): decay_n = 0.5 ** (1 / h_n) with the
half-life h_n = min(halflife, rampup * n) steps. Here n counts the updates already made.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

EMA_WARMUPS = ("none", "power", "karras")


class EMA:
    """Shadow copy `ema.module` of a model, updated by `ema.update(model)` after each optimiser step."""

    def __init__(
        self, model: nn.Module, decay: float = 0.999, warmup: str = "power", halflife: float = 500.0, rampup: float = 0.05
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got decay={decay}")
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"warmup={warmup!r} is not known; allowed values: {', '.join(EMA_WARMUPS)}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.halflife, self.rampup = float(decay), warmup, float(halflife), float(rampup)
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates
        if self.warmup == "none":
            return self.decay
        if self.warmup == "power":
            return min(self.decay, (1 + n) / (10 + n))
        h = min(self.halflife, self.rampup * n) if self.rampup > 0 else self.halflife
        return 0.5 ** (1.0 / h) if h > 0 else 0.0

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(EMA params, model params, EMA buffers, model buffers), matched by name at the first update with `model`.

        Call `rebind()` after moving or converting the model (which replaces its buffer tensors).
        """
        if getattr(self, "_cached_for", None) is not model:
            src, src_buffers = dict(model.named_parameters()), dict(model.named_buffers())
            params = [(p, src[n]) for n, p in self.module.named_parameters()]
            buffers = [(b, src_buffers[n]) for n, b in self.module.named_buffers()]
            self._cache = ([p for p, _ in params], [q for _, q in params], [b for b, _ in buffers], [c for _, c in buffers])
            self._cached_for = model
        return self._cache

    def rebind(self) -> None:
        """Forget the cached tensor pairs (after `model.to(...)`)."""
        self._cached_for = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = d * ema + (1 - d) * model for parameters; buffers are copied."""
        d = self.current_decay()
        ema_params, params, ema_buffers, buffers = self._pairs(model)
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - d)
        for b, c in zip(ema_buffers, buffers, strict=True):
            b.copy_(c)
        self.updates += 1
