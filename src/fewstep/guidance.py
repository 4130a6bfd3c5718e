"""Classifier-free guidance with honest NFE counting, guidance intervals, and thresholding of the data prediction.

- `cfg`: classifier-free guidance, out = uncond + scale (cond - uncond), the conditional and unconditional inputs
  batched into one network call that counts as 2 NFE (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022).
  Guidance is affine with weights summing to 1, so it is the same in every parameterization (eps, x0, v, ...).
- `interval=(t_lo, t_hi)`: guide only for t_lo <= t <= t_hi and call only the conditional model (1 NFE) elsewhere
  (Kynkaanniemi et al., "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in
  Diffusion Models", NeurIPS 2024).
- `DynamicThresholding`, `StaticClipping`: `x0_fn` post-processing of the data prediction for `fewstep.sample`
  (Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding" (Imagen), 2022).
Shapes: x [batch, ...], t [batch], conditions [batch, ...] or [1, ...] (broadcast to the batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MAX_SCALE = 1e4  # far beyond useful guidance; larger weights overflow float16/32 outputs

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    return float(value)


class GuidedModel:
    """A model callable `(x, t) -> prediction` applying classifier-free guidance to `model(x, t, condition)`.

    `nfe_per_call` is the cost of the latest call (2 when guided, 1 when only the conditional model ran); the
    Denoiser reads it after each call, so the NFE of `fewstep.sample` counts every network evaluation.
    """

    def __init__(
        self,
        model: ConditionalModel,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        scale: float,
        interval: tuple[float, float] | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable model(x, t, condition), got {type(model).__name__}")
        for name, c in (("cond", cond), ("uncond", uncond)):
            if not isinstance(c, torch.Tensor) or c.ndim < 1:
                raise TypeError(f"{name} must be a tensor of shape [batch, ...] or [1, ...], got {type(c).__name__}")
        if cond.shape[1:] != uncond.shape[1:]:
            raise ValueError(
                f"cond and uncond must have the same shape after the batch axis, got {tuple(cond.shape)}, {tuple(uncond.shape)}"
            )
        self.model = model
        self.cond, self.uncond = cond, uncond
        self.scale = _check_number("scale", scale)
        if abs(self.scale) > MAX_SCALE:
            raise ValueError(f"scale must be a guidance weight with |scale| <= {MAX_SCALE:g}, got scale={scale!r}")
        self.interval = _check_interval(interval)
        self.nfe_per_call = 2

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        cond, uncond = _batched(self.cond, n, "cond"), _batched(self.uncond, n, "uncond")
        inside = None if self.interval is None else (t >= self.interval[0]) & (t <= self.interval[1])  # [batch]
        # only an interval needs the device sync of inside.any(); at scale 1 or 0 one half has weight 0.
        if self.scale == 1.0 or (inside is not None and not bool(inside.any())):
            self.nfe_per_call = 1
            return self.model(x, t, cond)
        if self.scale == 0.0 and inside is None:
            self.nfe_per_call = 1
            return self.model(x, t, uncond)
        out_cond, out_uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
        self.nfe_per_call = 2
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if inside is None:
            return guided
        return torch.where(inside.reshape((n,) + (1,) * (x.ndim - 1)), guided, out_cond)

    def __repr__(self) -> str:
        return f"GuidedModel(scale={self.scale}, interval={self.interval})"


def cfg(
    model: ConditionalModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
) -> GuidedModel:
    """Classifier-free guidance: a model `(x, t) -> uncond + scale (cond - uncond)` for `fewstep.sample`.

    model: `model(x, t, condition)` with x [B, ...], t [B], condition [B, ...]; it is called once per evaluation
        on the doubled batch [cond; uncond] (2 NFE), or on the conditional half only (1 NFE) outside `interval`.
    scale: the guidance weight w (1: the conditional model, 0: the unconditional one; Ho & Salimans use 1 + w).
    interval: (t_lo, t_hi) in the process's time; guidance applies only for t_lo <= t <= t_hi (for EDM, t = sigma).
    """
    return GuidedModel(model, cond, uncond, scale, interval)


def _check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    if interval is None:
        return None
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise ValueError(f"interval must be None or a pair (t_lo, t_hi), got interval={interval!r}")
    lo, hi = (_check_number("interval", v) for v in interval)
    if not lo <= hi:
        raise ValueError(f"interval must have t_lo <= t_hi, got interval={interval!r}")
    return lo, hi


def _batched(c: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if c.shape[0] == n:
        return c
    if c.shape[0] == 1:
        return c.expand((n,) + tuple(c.shape[1:]))
    raise ValueError(f"{name} has batch size {c.shape[0]} but x has {n}; pass a batch of {n} or of 1 (broadcast)")


class StaticClipping:
    """x0 -> clamp(x0, -limit, limit): the static clipping of DDPM/Imagen samplers (data in [-limit, limit])."""

    def __init__(self, limit: float = 1.0):
        self.limit = _check_number("limit", limit)
        if self.limit <= 0:
            raise ValueError(f"limit must be positive, got limit={limit!r}")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.limit, self.limit)

    def __repr__(self) -> str:
        return f"StaticClipping(limit={self.limit})"


class DynamicThresholding:
    """Imagen's dynamic thresholding: per sample s = clamp(quantile(|x0|, percentile), 1, max_value), then
    x0 -> clamp(x0, -s, s) / s (Saharia et al., 2022, section 2.3).

    percentile: a fraction in (0, 1] (Imagen: 0.995); max_value: an upper bound on s (>= 1), or None for none.
    """

    def __init__(self, percentile: float = 0.995, max_value: float | None = None):
        self.percentile = _check_number("percentile", percentile)
        if not 0 < self.percentile <= 1:
            raise ValueError(f"percentile must be a fraction in (0, 1], got percentile={percentile!r}")
        self.max_value = None if max_value is None else _check_number("max_value", max_value)
        if self.max_value is not None and self.max_value < 1:
            raise ValueError(f"max_value must be >= 1 (s >= 1 keeps data inside [-1, 1] unchanged), got max_value={max_value!r}")

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """The per-sample threshold s >= 1, shaped [batch, 1, ...] to broadcast against x0."""
        flat = x0.reshape(x0.shape[0], -1).abs()
        flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(flat, self.percentile, dim=1).clamp(min=1.0, max=self.max_value)
        return s.to(x0.dtype).reshape((x0.shape[0],) + (1,) * (x0.ndim - 1))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        s = self.threshold(x0)
        return torch.minimum(torch.maximum(x0, -s), s) / s

    def __repr__(self) -> str:
        return f"DynamicThresholding(percentile={self.percentile}, max_value={self.max_value})"
