"""Adapter: a diffusers `UNet2DModel` (von Platen et al., diffusers library) as a fewstep network `net(x, c_noise)`.

The UNet is built from a config dict (never downloaded). Its sinusoidal timestep embedding is fed
`timestep_scale * c_noise` so that the embedding frequencies resolve the noise level (c_noise is ~[-3, 3]).
Shapes: x [batch, C, H, W], c_noise [batch] -> [batch, C, H, W].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DiffusersUNet(nn.Module):
    """Wraps `diffusers.UNet2DModel(**config)`; trained and sampled exactly like the built-in networks."""

    def __init__(self, timestep_scale: float = 250.0, **config: Any):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the 'diffusers_unet' network needs diffusers: pip install diffusers") from err
        self.unet = UNet2DModel(**config)
        self.timestep_scale = float(timestep_scale)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        return self.unet(x, self.timestep_scale * noise_level).sample
