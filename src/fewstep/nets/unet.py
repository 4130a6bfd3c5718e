"""A small UNet for images (8x8 digits, 28x28 MNIST, any size): residual blocks, noise embedding, optional attention.

The architecture follows the DDPM UNet (Ho et al., 2020, "Denoising Diffusion Probabilistic Models"): per level
`blocks` residual blocks with GroupNorm and the noise embedding added, skip connections by concatenation,
self-attention at chosen levels. Downsampling by stride-2 convolution and upsampling to the skip's exact size,
so odd sizes (28 -> 14 -> 7 -> 4) work. Shapes: x [batch, channels, H, W], c_noise [batch] -> [batch, channels, H, W].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import NoiseEmbedding

Reuse = Callable[[torch.Tensor], "torch.Tensor | None"]  # the deep branch's input -> the cached feature, or None


def _norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the noise embedding added in between, 1x1 shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} must be divisible by heads={heads}")
        self.norm = _norm(channels)
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """UNet `net(x, c_noise)`; `channels[i]` is the width of level i, `attention` the levels with self-attention.

    `mid_attention` adds self-attention between the two middle residual blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        blocks: int = 1,
        attention: Sequence[int] = (),
        heads: int = 1,
        dropout: float = 0.0,
        emb_features: int = 64,
        mid_attention: bool = True,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1 or blocks < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths and blocks >= 1, got {channels}, {blocks}")
        bad = [a for a in attention if not 0 <= a < len(channels)]
        if bad:
            raise ValueError(f"attention levels {bad} are out of range; allowed values: 0..{len(channels) - 1}")
        emb_dim = 4 * channels[0]
        self.in_channels = in_channels
        self.embed = NoiseEmbedding(emb_dim, emb_features)
        self.inp = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c = [channels[0]], channels[0]
        for level, width in enumerate(channels):
            for _ in range(blocks):
                layers = [ResBlock(c, width, emb_dim, dropout)] + ([SelfAttention(width, heads)] if level in attention else [])
                self.down.append(nn.ModuleList(layers))
                c = width
                skips.append(c)
            if level < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        mid = [ResBlock(c, c, emb_dim, dropout)] + ([SelfAttention(c, heads)] if mid_attention else [])
        self.mid = nn.ModuleList(mid + [ResBlock(c, c, emb_dim, dropout)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(channels))):
            width = channels[level]
            for _ in range(blocks + 1):
                layers = [ResBlock(c + skips.pop(), width, emb_dim, dropout)]
                layers += [SelfAttention(width, heads)] if level in attention else []
                self.up.append(nn.ModuleList(layers))
                c = width
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.blocks, self.levels = blocks, len(channels)

    @staticmethod
    def _run_layers(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    @property
    def skips(self) -> int:
        """The number of skip connections: the branch points of `forward_split` (depth 1..skips)."""
        return self.levels * (self.blocks + 1)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        return self.forward_split(x, noise_level)[0]

    def forward_split(
        self, x: torch.Tensor, noise_level: torch.Tensor, depth: int | None = None, deep: torch.Tensor | Reuse | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward pass split at a skip connection, for feature caching (Ma et al., 2024, "DeepCache").

        The shallow branch at `depth` holds the first `depth` skips (0 = the input convolution), the up-blocks that
        take them and the output head; the deep branch is everything else, and its output is the feature entering
        the up-block that takes skip `depth - 1`. Returns (output, deep feature) [the feature is None for depth
        None]; with `deep` given (a feature returned earlier), the deep branch is not computed and `deep` is used.
        `deep` may also be a function of the deep branch's input (the last shallow skip) returning the feature to
        use or None to compute it: adaptive caching decides there (Liu et al., 2025, "TeaCache"; First-Block Cache).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [batch, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if (depth is not None and not 1 <= depth <= self.skips) or (deep is not None and depth is None):
            raise ValueError(f"depth must be in 1..{self.skips} (and given with deep), got depth={depth!r}")
        emb = self.embed(noise_level)
        hs = self._encode([self.inp(x)], emb, self.skips if deep is None else depth)
        if callable(deep):
            deep = deep(hs[-1])
        split = 0 if depth is None else self.skips - depth
        if deep is None:
            h = self._run_layers(self.mid, self._encode(hs, emb, self.skips)[-1], emb)
            deep = self._decode(h, hs, emb, 0, split)  # the deep branch's output (h itself where nothing is split)
        return self.out(self._decode(deep, hs, emb, split, len(self.up))), None if depth is None else deep

    def forward_propagated(
        self, x: torch.Tensor, noise_level: torch.Tensor, skips: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output, skips): the encoder (input convolution and down path) run on x, or its `skips` from an earlier call
        reused without looking at x, then the decoder (middle blocks, up path, head) at this call's noise level.

        Encoder propagation of Li et al., 2024, "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion
        Model Inference" (NeurIPS): encoder features change little between adjacent steps, decoder features much.
        With skips None the output equals `forward`'s bit for bit."""
        emb = self.embed(noise_level)
        hs = self._encode([self.inp(x)], emb, self.skips) if skips is None else list(skips)
        kept = list(hs)
        h = self._run_layers(self.mid, hs[-1], emb)
        return self.out(self._decode(h, hs, emb, 0, len(self.up))), kept

    def _decode(self, h: torch.Tensor, hs: list[torch.Tensor], emb: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Up-blocks start..stop-1 on h, each taking the last skip of hs (popped)."""
        for j in range(start, stop):
            h = self._run_layers(self.up[j], torch.cat([h, hs.pop()], dim=1), emb)
            i, r = divmod(j, self.blocks + 1)
            if r == self.blocks and i < self.levels - 1:
                h = self.upsample[i](F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest"))
        return h

    def _encode(self, hs: list[torch.Tensor], emb: torch.Tensor, stop: int) -> list[torch.Tensor]:
        """The skips hs (hs[0]: the input convolution's output) extended along the down path until `stop` are stored."""
        while len(hs) < stop:
            level, r = divmod(len(hs) - 1, self.blocks + 1)  # skip k > 0: a block's output, or a level's downsample
            if r == self.blocks:
                hs.append(self.downsample[level](hs[-1]))
            else:
                hs.append(self._run_layers(self.down[level * self.blocks + r], hs[-1], emb))
        return hs
