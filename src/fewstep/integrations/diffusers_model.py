"""A diffusers UNet or transformer as a fewstep model, and classifier-free guidance over keyword conditioning.

`from_diffusers(net, scheduler_config)` reads the model's conventions from its scheduler config (`conventions`) and
returns (model, process, prediction) for `fewstep.sample`, schedule search and distillation: `model(x, t, **kwargs)`
calls `net(x, timestep=k(t), **kwargs)` with diffusers' timestep k (DiscreteVP: t N - 1; flow: N t) and returns its
`.sample`. `cfg_kwargs` guides such a model with conditional and unconditional keyword arguments (Ho & Salimans,
"Classifier-Free Diffusion Guidance", 2022), batched into one call that counts as 2 NFE (`fewstep.guidance`).
Shapes: x [batch, C, ...], t [batch]; conditioning tensors [batch, ...] or [1, ...].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..guidance import GuidedModel
from ..processes import Process
from ..tuning import model_key
from .conventions import Convention, convention


class DiffusersModel:
    """`net(x, timestep=k(t), **kwargs).sample` as a fewstep model `model(x, t, **kwargs)` predicting `prediction`.

    The input is cast to the network's dtype and the output back to x's (sample in float32 with a float16 network);
    learned-variance channels are dropped; `encoder_hidden_states` is checked against the network's
    `cross_attention_dim` and `class_labels` against its batch.
    """

    def __init__(self, net: Callable[..., Any], conv: Convention):
        if not callable(net):
            raise TypeError(f"net must be a diffusers model (UNet or transformer), got {type(net).__name__}")
        self.net, self.convention = net, conv

    @property
    def process(self) -> Process:
        return self.convention.process

    @property
    def prediction(self) -> str:
        return self.convention.prediction

    @property
    def tuning_key(self) -> str:
        """The key `fewstep.tune` / `solver="auto"` match tunings by: the SHA-256 of the network's weights (cached)."""
        if not isinstance(self.net, torch.nn.Module):
            raise AttributeError("tuning_key: the network is not a torch module; pass model_key= to fewstep.tune")
        return model_key(self.net)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        _check_conditioning(self.net, x, kwargs)
        dtype = getattr(self.net, "dtype", x.dtype)
        out = self.net(x.to(dtype), timestep=self.convention.timestep(t), **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return self.convention.take_prediction(out, x.shape[1]).to(x.dtype)

    def __repr__(self) -> str:
        return f"DiffusersModel({type(self.net).__name__}, {self.process!r}, prediction={self.prediction!r})"


def _check_conditioning(net: Any, x: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
    """ValueError naming model_kwargs[key] for conditioning whose shape the network cannot take (host metadata only):
    text embeddings against the width the network's config declares (UNet: `encoder_hid_dim`, else
    `cross_attention_dim`; SD3/FLUX transformers: `joint_attention_dim`), pooled projections against
    `pooled_projection_dim`, class labels against the batch."""
    config = getattr(net, "config", {})
    config = config if isinstance(config, Mapping) else {}
    for key in ("encoder_hid_dim", "cross_attention_dim", "joint_attention_dim"):
        dim = config.get(key)
        if dim is not None:
            break
    states = kwargs.get("encoder_hidden_states")
    if isinstance(states, torch.Tensor) and isinstance(dim, int):
        if states.ndim != 3 or states.shape[0] != x.shape[0] or states.shape[-1] != dim:
            raise ValueError(
                f"model_kwargs['encoder_hidden_states'] must have shape [batch={x.shape[0]}, tokens, {dim}] "
                f"(the network's {key}), got {tuple(states.shape)}"
            )
    pooled, dim = kwargs.get("pooled_projections"), config.get("pooled_projection_dim")
    if isinstance(pooled, torch.Tensor) and isinstance(dim, int) and tuple(pooled.shape) != (x.shape[0], dim):
        raise ValueError(
            f"model_kwargs['pooled_projections'] must have shape [batch={x.shape[0]}, {dim}] (the network's "
            f"pooled_projection_dim), got {tuple(pooled.shape)}"
        )
    labels = kwargs.get("class_labels")
    if isinstance(labels, torch.Tensor) and (labels.ndim != 1 or labels.shape[0] != x.shape[0]):
        raise ValueError(f"model_kwargs['class_labels'] must have shape [batch={x.shape[0]}], got {tuple(labels.shape)}")


def from_diffusers(
    net: Callable[..., Any], scheduler_config: Any, *, shift: float | None = None, mu: float | None = None
) -> tuple[DiffusersModel, Process, str]:
    """(model, process, prediction) for `fewstep.sample` from a diffusers network and its scheduler's config.

    net: a diffusers UNet2DModel / UNet2DConditionModel / transformer (anything called as net(x, timestep=k, ...)).
    scheduler_config: the pipeline's `scheduler.config` (or the scheduler, or a dict): betas (DiscreteVP, zero
        terminal SNR included) or flow matching (ShiftedFlow), prediction type, clipping (see `conventions`).
    shift, mu: a flow model's time shift (mu: diffusers' dynamic shifting, as `set_timesteps(mu=...)`); they only
        set the process's default grid.
    Conditioning goes through `fewstep.sample(..., model_kwargs={...})`, or `cfg_kwargs` for guidance. A config with
    clip_sample/thresholding also implies an x0_fn: `conventions.convention(config).x0_fn`.
    """
    conv = convention(scheduler_config, shift=shift, mu=mu)
    return DiffusersModel(net, conv), conv.process, conv.prediction


class _Rows:
    """`model(x, t, rows)` for GuidedModel: the keyword conditioning of each sample is row `rows[b]` of a table."""

    def __init__(self, model: Callable[..., torch.Tensor], table: dict[str, Any]):
        self.model, self.table = model, table

    def __call__(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, **_take(self.table, rows))


def _take(table: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            value = _take(value, rows)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1:
            value = value.index_select(0, rows.to(value.device))
        out[key] = value
    return out


def _stack(cond: Mapping[str, Any], uncond: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """One table [cond rows; uncond rows] per conditioning tensor; other values must agree between the two."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond{where} and uncond{where} must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    table = {}
    for key in cond:
        a, b, here = cond[key], uncond[key], f"{where}[{key!r}]"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            table[key] = _stack(a, b, here)
        elif isinstance(a, torch.Tensor) and a.ndim >= 1:
            if not isinstance(b, torch.Tensor) or b.shape[1:] != a.shape[1:]:
                got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(
                    f"cond{here} and uncond{here} must be tensors of one shape after the batch axis, "
                    f"got {tuple(a.shape)} and {got}"
                )
            table[key] = torch.cat([a, b.to(a.device, a.dtype)])
        elif a is b or (not isinstance(a, torch.Tensor) and a == b):
            table[key] = a
        else:
            raise ValueError(f"cond{here} and uncond{here} differ but are not batched tensors: pass them as tensors [batch, ...]")
    return table


def _tensors(kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The batched tensors (ndim >= 1) in kwargs, nested dicts included."""
    found = []
    for value in kwargs.values():
        if isinstance(value, Mapping):
            found += _tensors(value)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1:
            found.append(value)
    return found


def _batch(kwargs: Mapping[str, Any], name: str) -> tuple[int, torch.device]:
    """The batch size and device of the conditioning `name` (1 and CPU without tensors); one batch size for all."""
    tensors = _tensors(kwargs)
    sizes = sorted({v.shape[0] for v in tensors})
    if len(sizes) > 1:
        raise ValueError(f"the tensors in {name} must share one batch size (or all be of batch 1), got batch sizes {sizes}")
    return (sizes[0], tensors[0].device) if tensors else (1, torch.device("cpu"))


def cfg_kwargs(
    model: Callable[..., torch.Tensor],
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
) -> GuidedModel:
    """Classifier-free guidance of `model(x, t, **kwargs)` (e.g. `from_diffusers`'s) with keyword conditioning.

    cond, uncond: keyword arguments of the conditional and unconditional calls (e.g. {"encoder_hidden_states": ...}),
        tensors of shape [batch, ...] or [1, ...] (broadcast), with the same keys. Returns `fewstep.guidance`'s
        GuidedModel: out = uncond + scale (cond - uncond), both halves in one network call (2 NFE; 1 where `scale` is
        1 or 0, or outside `interval`), so `x.nfe` and the NFE budget helpers (`guidance=`) count it.
    """
    if not isinstance(cond, Mapping) or not isinstance(uncond, Mapping):
        raise TypeError(f"cond and uncond must be dicts of keyword arguments, got {type(cond).__name__}, {type(uncond).__name__}")
    table = _stack(cond, uncond)
    (n_cond, device), (n_uncond, _) = _batch(cond, "cond"), _batch(uncond, "uncond")
    rows = torch.arange(n_cond + n_uncond, device=device)
    return GuidedModel(_Rows(model, table), rows[:n_cond], rows[n_cond:], scale, interval)
