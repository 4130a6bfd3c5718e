"""DMD2's GAN head: a small classifier on the fake-score network's bottleneck features, real digits vs generator
samples, both noised to the same level; non-saturating softplus losses.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024, section 4.3: the
fake-score ("guidance") network doubles as the discriminator's trunk; its bottleneck feature (the output of the
UNet's middle block) feeds a small head that outputs one logit per sample. In the fake-score update the head and the
network are trained on softplus(-D(real_t)) + softplus(D(fake_t)) (added to the denoising loss with weight
`gan_fake_weight`); the generator adds softplus(-D(G_t)) with weight `gan_weight` to its distribution-matching loss,
differentiating through the frozen network and head into its sample.

The feature is read with a forward hook on the network's bottleneck module (`bottleneck_module`: the last block of
the built-in UNet's middle, the built-in MLP's last residual block, the diffusers UNet's mid_block), active only
inside `BottleneckHead.capture()`, so the network itself is not changed. Shapes: x_t [batch, ...], t [batch];
features [batch, C, H, W] (UNet) or [batch, width] (MLP); logits [batch].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..train.config import ConfigError


def bottleneck_module(net: nn.Module) -> nn.Module:
    """The module of `net` (a fewstep network: the DiffusionModel's `.net`) whose output is its bottleneck feature.

    ConfigError("distill.gan_weight") for a network without a known bottleneck."""
    from ..nets.mlp import MLP
    from ..nets.unet import UNet

    if isinstance(net, UNet):
        return net.mid[-1]
    if isinstance(net, MLP):
        return net.blocks[-1]
    unet = getattr(net, "unet", None)
    if unet is not None and isinstance(getattr(unet, "mid_block", None), nn.Module):
        return unet.mid_block
    raise ConfigError(
        "distill.gan_weight",
        f"distill.gan_weight > 0 needs a fake-score network with a known bottleneck (unet, mlp, diffusers_unet); "
        f"got {type(net).__name__}",
    )


def _groups(channels: int) -> int:
    """GroupNorm's group count: the largest divisor of `channels` <= min(32, channels / 8) (>= 8 channels a group:
    the head's maps are small, 2 x 2 on the 8 x 8 digits)."""
    return max(g for g in range(1, max(1, min(32, channels // 8)) + 1) if channels % g == 0)


def head_for(feature: torch.Tensor) -> nn.Module:
    """A classifier head for features shaped like `feature` ([batch, C, H, W] or [batch, width]) -> logits [batch, 1].

    Images: conv 3x3 stride 2 (DMD2 halves the bottleneck), GroupNorm, SiLU, global mean, linear. Vectors: LayerNorm,
    SiLU, linear, SiLU, linear."""
    if feature.ndim == 4:
        c = feature.shape[1]
        return nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1))  # fmt: skip
    if feature.ndim == 2:
        w = feature.shape[1]
        return nn.Sequential(nn.Linear(w, w), nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, 1))
    raise ConfigError("distill.gan_weight", f"the bottleneck feature has shape {tuple(feature.shape)}; need [batch, C, H, W] "
                      "or [batch, width]")  # fmt: skip


class BottleneckHead(nn.Module):
    """The head on `model`'s bottleneck (hooked, not forked): `capture()` records the feature of every forward of
    `model` (or of a wrapper that calls it) inside the block; `head(feature)` -> logits [batch]."""

    def __init__(self, model: nn.Module, probe: Callable[[], object]):
        super().__init__()
        self._feature: torch.Tensor | None = None
        self._on = False
        self._handle = bottleneck_module(model.net).register_forward_hook(self._keep)
        with torch.no_grad(), self.capture():
            probe()  # one forward of `model` to size the head
            feature = self.take()
        self.head = head_for(feature)

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if self._on:
            self._feature = output

    @contextmanager
    def capture(self) -> Iterator[None]:
        self._on, self._feature = True, None
        try:
            yield
        finally:
            self._on = False

    def take(self) -> torch.Tensor:
        """The last captured feature (once); RuntimeError when no forward ran inside `capture()`."""
        feature, self._feature = self._feature, None
        if feature is None:
            raise RuntimeError("no bottleneck feature was captured: call the network inside capture()")
        return feature

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """The logits [batch] of bottleneck features [batch, ...]."""
        return self.head(feature.float()).reshape(len(feature)).float()

    def features(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor, t: torch.Tensor):
        """The bottleneck feature of `model(x_t, t)` (the model's output is discarded)."""
        with self.capture():
            model(x_t, t)
            return self.take()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """softplus(-D(real_t)) + softplus(D(fake_t)) per pair [batch] (the non-saturating GAN's discriminator loss)."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """softplus(-D(G_t)) per sample [batch] (the non-saturating generator loss)."""
    return F.softplus(-fake_logits)
