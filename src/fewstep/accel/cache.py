"""DeepCache: reuse a UNet's deep features between sampling steps and recompute only the shallow branch.

Ma, Fang & Wang (2024), "DeepCache: Accelerating Diffusion Models for Free" (CVPR), sections 3.2-3.3: adjacent
denoising steps have nearly equal high-level features, so the output of the deep branch (everything below the skip
connection at `depth`) is computed at refresh steps only and reused at the others, where just the shallow branch
(input convolution, the first `depth` skips, their up-blocks and the head) runs. Unlike the reference implementation,
which finds the step by `timesteps.index(t)` and so miscounts Heun-type stage evaluations, a call refreshes when its
own time t is a refresh point of the planned grid (`plan(ts)`); calls at other grid points or off the grid (solver
stages) reuse. With interval 1 every call refreshes and the output is bit-identical to the model's. `FeatureCache`
holds what DeepCache shares with adaptive caching (`adaptive.AdaptiveCache`): the split backbone, grid and counts, and
the optional forecast of the reused feature from the last computed ones (`forecast.newton_extrapolate`).
Shapes: x [batch, C, H, W], t [batch] -> [batch, C, H, W].
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..nets.diffusers_unet import DiffusersUNet
from ..processes import Process
from .backbone import backbone_of, check_grid, is_unet2d, with_backbone
from .diffusers_split import check_splittable, is_unet2d_condition, unet2d_forward_split
from .forecast import newton_extrapolate
from .refresh import REFRESH_RULES, match_grid, refresh_indices, reuses

MAX_FORECAST = 3  # the forecast's highest polynomial degree
Policy = Callable[[torch.Tensor, bool], bool]  # (the deep branch's input, refresh forced) -> whether to refresh


class _CachedNet(nn.Module):
    """The backbone run split at `depth`: full (remembering the deep feature) or shallow, reusing the remembered one.

    Without a `policy` a call is full when `refresh` is set (DeepCache decides by time before the call); with one,
    the policy decides inside the call from the deep branch's input (adaptive caching), `refresh` forcing a full pass.
    """

    def __init__(self, net: nn.Module, depth: int, order: int = 0):
        super().__init__()
        self.net, self.depth, self.order = net, depth, order
        self.refresh = True
        self.time = 0.0  # the time t of the current call (set by FeatureCache), for forecasting
        self.history: list[tuple[float, torch.Tensor]] = []  # (t, deep feature) of the last refreshes
        self.policy: Policy | None = None
        self.deep: torch.Tensor | None = None
        self.counts = {"refresh": 0, "reuse": 0}
        self.split_fn: Callable = self.split  # replaced by a compiled version in DeepCache.compile
        self.encoder_hidden_states: torch.Tensor | None = None  # a UNet2DConditionModel's text conditioning, per call

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """net(x, noise_level), or a diffusers UNet's call net(x, timestep=..., encoder_hidden_states=...) (then a
        1-tuple, as return_dict=False)."""
        timestep = kwargs.pop("timestep", None)
        self.encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
        if kwargs:
            raise TypeError(
                f"feature caching passes only encoder_hidden_states (text conditioning) to the network: got "
                f"{', '.join(sorted(kwargs))}"
            )
        level = noise_level if timestep is None else torch.as_tensor(timestep, device=x.device)
        first = self.deep[0] if isinstance(self.deep, list) else self.deep  # encoder propagation keeps a list
        stale = first is None or first.shape[0] != x.shape[0] or first.dtype != x.dtype
        force = self.refresh or stale
        decided: list[bool] = []

        def choose(h: torch.Tensor) -> torch.Tensor | None:
            decided.append(self.policy(h, force) or force)  # a forced refresh stays one whatever the policy says
            return None if decided[-1] else self.reused()

        if self.policy is not None:
            deep = choose
        else:
            deep = None if force else self.reused()
        out, feature = self.split_fn(x, level, deep)
        refresh = decided[0] if decided else force
        if refresh:
            self.deep = feature
            if self.order:  # the last order + 1 computed features, at distinct times (a repeated time replaces)
                kept = [] if stale else [(t, f) for t, f in self.history if t != self.time][-self.order :]
                self.history = kept + [(self.time, feature)]
        self.counts["refresh" if refresh else "reuse"] += 1
        return (out,) if timestep is not None else out

    def reused(self) -> torch.Tensor | None:
        """The deep feature a reusing call takes: the last computed one (order 0), or its forecast at `time` by the
        polynomial through the last order + 1 computed ones (fewer while fewer exist)."""
        if not self.order or len(self.history) < 2:
            return self.deep
        return newton_extrapolate([t for t, _ in self.history], [f for _, f in self.history], self.time)

    def split(self, x: torch.Tensor, noise_level: torch.Tensor, deep: torch.Tensor | Callable | None):
        """(output, deep feature) of the backbone split at `depth`; the deep branch skipped where `deep` is given."""
        if is_unet2d(self.net) or is_unet2d_condition(self.net):
            return unet2d_forward_split(self.net, x, noise_level, self.depth, deep, self.encoder_hidden_states)
        if isinstance(self.net, DiffusersUNet):
            return unet2d_forward_split(self.net.unet, x, self.net.timestep_scale * noise_level, self.depth, deep)
        return self.net.forward_split(x, noise_level, self.depth, deep)


class _PropagatedNet(_CachedNet):
    """The backbone with its encoder features (all skips) kept at refresh calls and reused, x unseen, at the others."""

    def split(self, x: torch.Tensor, noise_level: torch.Tensor, skips: list[torch.Tensor] | None):
        return self.net.forward_propagated(x, noise_level, skips)


class FeatureCache:
    """What DeepCache and AdaptiveCache share: the backbone split at `depth` (checked), the planned sampling grid, the
    refresh / reuse counts, the call `cache(x, t)` that forces a full pass where `is_refresh(t)`.

    model: a fewstep UNet or DiffusersUNet, a DiffusionModel wrapping one (the shipped digits models), or a diffusers
    UNet2DModel / UNet2DConditionModel as `fewstep.from_diffusers(unet, scheduler_config)[0]` (text conditioning as
    `cache(x, t, encoder_hidden_states=...)`, e.g. through `fewstep.cfg_kwargs(cache, cond, uncond, scale)`).
    """

    net_class: type[_CachedNet] = _CachedNet

    def __init__(self, model: Callable, depth: int, forecast: int = 0):
        name = type(self).__name__
        net = backbone_of(model, name)
        if is_unet2d(net) or is_unet2d_condition(net) or isinstance(net, DiffusersUNet):
            branch_points = check_splittable(net.unet if isinstance(net, DiffusersUNet) else net)
        else:
            branch_points = net.skips
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= branch_points:
            raise ValueError(f"depth must be an integer in 1..{branch_points} for this network, got depth={depth!r}")
        if isinstance(forecast, bool) or not isinstance(forecast, int) or not 0 <= forecast <= MAX_FORECAST:
            raise ValueError(f"forecast must be an integer in 0..{MAX_FORECAST} (0 = reuse), got forecast={forecast!r}")
        self.depth, self.forecast = depth, forecast
        self._net = self.net_class(net, depth, forecast)
        self.model = with_backbone(model, self._net)
        self.process: Process | None = getattr(model, "process", None)
        self.prediction = getattr(model, "prediction", None)
        self._ts: torch.Tensor | None = None

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._net.counts)

    def _set_grid(self, ts: torch.Tensor) -> torch.Tensor:
        """Check and keep the sampling grid ts [steps + 1] and clear the cache; the grid as float64."""
        self._ts = check_grid(ts)
        self.reset()
        return self._ts

    def _grid(self) -> torch.Tensor:
        if self._ts is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the sampling grid first: cache.plan(fewstep.accel.sampling_grid(process, steps))"
            )
        return self._ts

    def reset(self) -> None:
        """Forget the cached features and the call counts (the plan stays)."""
        self._net.deep, self._net.history = None, []
        self._net.counts = {"refresh": 0, "reuse": 0}

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self._ts = None
        self._net.deep, self._net.history = None, []

    def is_refresh(self, t: float) -> bool:
        """Whether a call at time t must recompute the deep features."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        t = torch.as_tensor(t)
        self._net.time = float(t.reshape(-1)[0])  # the call's time: for the refresh decision, forecasts and traces
        self._net.refresh = self.is_refresh(self._net.time)
        return self.model(x, t, **model_kwargs)


class DeepCache(FeatureCache):
    """`DeepCache(model, interval=3, depth=1, refresh="uniform", forecast=2)`: a fewstep model `cache(x, t)` with
    feature caching.

    model: see `FeatureCache`.
    interval: about one refresh per `interval` grid points (1 = no caching, bit-identical). depth: the branch
    point, 1..(number of skips for UNet, down blocks for DiffusersUNet); larger = more recomputed, less error.
    refresh: "uniform" (every interval-th grid point) or "log_snr" (as many points, spread evenly over the log-SNR the
    grid travels; see `refresh`). Before sampling, plan the grid: `with cache.plan(ts): fewstep.sample(cache, ...)`
    with the sampler's own grid (`fewstep.accel.sampling_grid(process, steps, schedule)`). `counts` holds the refresh
    / reuse calls so far. Of the conditioning (model_kwargs) only a diffusers UNet's encoder_hidden_states passes.
    forecast: 0 = a reusing call takes the last computed deep feature (DeepCache as published); k >= 1 = its forecast
    at the call's time by the degree-k polynomial through the last k + 1 computed ones (TaylorSeer, Liu et al., 2025;
    see `forecast`). Default 2. FD / plain of interval 2, depth 1 (DPM-Solver++(2M)) for forecast 0 / 1 / 2: digits_vp
    (2,048 samples) 1.29 / 1.02 / 1.04 at 50 steps and 3.75 / 1.88 / 1.21 at 20; the 28x28 MNIST UNet (1,024 samples)
    1.32 / 1.05 / 1.01 at 50 steps and 2.02 / 1.37 / 1.20 at 20 (order 3: 1.00, 1.16; on digits at 20 steps 1.33).
    """

    def __init__(self, model: Callable, interval: int = 3, depth: int = 1, refresh: str = "uniform", forecast: int = 2):
        super().__init__(model, depth, forecast)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = no caching), got interval={interval!r}")
        if refresh not in REFRESH_RULES:
            raise ValueError(f"refresh={refresh!r} is not known; allowed values: {', '.join(REFRESH_RULES)}")
        self.interval, self.refresh = interval, refresh
        self._refresh: set[int] = set()

    def plan(self, ts: torch.Tensor, process: Process | None = None) -> DeepCache:
        """Set the sampling grid ts [steps + 1] (decreasing times) and clear the cache; usable as a context manager.

        Warns where caching cannot help: fewer than 2 * interval steps, or no grid point left to reuse the cache.
        """
        ts = check_grid(ts)
        self._refresh = set(refresh_indices(ts, self.interval, self.refresh, process or self.process))
        self._set_grid(ts)
        steps = ts.numel() - 1
        if self.interval > 1 and (steps < 2 * self.interval or reuses(ts.numel(), sorted(self._refresh)) == 0):
            warnings.warn(
                f"{type(self).__name__}(interval={self.interval}) on a grid of {steps} steps refreshes {len(self._refresh)} of "
                f"{ts.numel()} grid points: caching saves little or nothing here; use interval <= steps / 2 or no cache",
                stacklevel=2,
            )
        return self

    def refresh_times(self) -> list[float]:
        """The planned grid times whose calls refresh the cache."""
        if self._ts is None:
            return []
        return [float(self._ts[i]) for i in sorted(self._refresh)]

    def is_refresh(self, t: float) -> bool:
        """Whether a call at time t recomputes the deep features (interval 1: always; off-grid times: never)."""
        ts = self._grid()
        if self.interval == 1:
            return True
        return match_grid(ts, t) in self._refresh

    def compile(self, mode: str | None = "default", **options) -> DeepCache:
        """Compile the split backbone (one graph for refresh calls, one for reuse calls); options as `compile_model`."""
        from .compile import FastNet

        self._net.split_fn = FastNet(self._net.split, mode, **options)
        return self


class EncoderPropagation(DeepCache):
    """`EncoderPropagation(model, interval=2, refresh="uniform")`: Faster Diffusion's encoder propagation (Li et al.,
    2024, NeurIPS) as a fewstep model: at refresh grid points the whole UNet runs and its encoder features (input
    convolution and down path: every skip) are kept; at the other calls only the decoder (middle blocks, up path,
    head) runs, at the call's own noise level, on the kept features, so the call does not look at x. Plan the grid as
    for DeepCache; interval 1 is bit-identical to the model. For fewstep's UNet (alone or in a DiffusionModel).
    """

    net_class = _PropagatedNet

    def __init__(self, model: Callable, interval: int = 2, refresh: str = "uniform"):
        net = backbone_of(model, "EncoderPropagation")
        if not hasattr(net, "forward_propagated"):
            raise TypeError(
                f"EncoderPropagation needs fewstep's UNet (alone or in a DiffusionModel), got {type(net).__name__}; "
                "use DeepCache for diffusers UNets"
            )
        super().__init__(model, interval=interval, depth=1, refresh=refresh, forecast=0)  # its features are a list
