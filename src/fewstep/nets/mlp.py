"""A residual MLP denoiser for low-dimensional data (2-D toy sets, Gaussian mixtures).

Conditioning by adding the noise embedding to every block, as in the time embedding of DDPM (Ho et al., 2020).
Shapes: x [batch, dim], c_noise [batch] -> [batch, dim].
"""

from __future__ import annotations

import torch
from torch import nn

from .embedding import NoiseEmbedding


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.act(self.norm(h) + emb))))


class MLP(nn.Module):
    """Residual MLP `net(x, c_noise)`: dim -> width, `depth` residual blocks, -> dim (zero-initialised output)."""

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 3, emb_features: int = 64):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"dim, width and depth must be >= 1, got dim={dim}, width={width}, depth={depth}")
        self.dim = dim
        self.embed = NoiseEmbedding(width, emb_features)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        emb = self.embed(noise_level)
        h = self.inp(x.reshape(shape[0], -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).reshape(shape)
