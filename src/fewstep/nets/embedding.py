"""Noise-level conditioning: the well-scaled network input c_noise(t) and its sinusoidal embedding.

Networks see c_noise = -log_snr(t) / 4 (for alpha = 1 this is EDM's c_noise = ln(sigma) / 4; Karras et al., 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", table 1), never the raw process time, so
one architecture works for every process. The embedding is the Fourier/sinusoidal time embedding of
Vaswani et al. (2017) as used by Ho et al. (2020). Shapes: t [batch] -> c_noise [batch] -> embedding [batch, dim].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..processes import Process

# log-SNR is +-inf at the ends of some processes (rectified flow at t = 0 and 1); the net sees a finite value, and one
# inside the range networks are trained on: every process here spans log-SNR -9.9..6.2 (DiscreteVP cosine at t = 1,
# EDM at sigma_min); rectified-flow training never draws |log-SNR| > 10 (t within 4.5e-5 of an end). With a clamp of
# 40 the rectified-flow model was evaluated at t = 1 with c_noise = 10, far outside what it learned: its first
# velocity was wrong, and DPM-Solver++(2M) at 10 steps on digits_flow had 7.6x the error it has with 10 (0.22 vs
# 0.029 RMS against a reference started at t = 0.9999).
LOG_SNR_CLAMP = 10.0


def c_noise(process: Process, t: torch.Tensor) -> torch.Tensor:
    """The network's noise-level input -log_snr(t) / 4, clamped to be finite; t [batch] -> float32/64 [batch]."""
    log_snr = process.log_snr(t.to(torch.float64)).clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP)
    return (-0.25 * log_snr).to(t.dtype if t.is_floating_point() else torch.float32)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise at geometric frequencies, then a 2-layer MLP: [batch] -> [batch, dim]."""

    def __init__(self, dim: int, features: int = 64, min_freq: float = 0.25, max_freq: float = 256.0):
        super().__init__()
        if features % 2:
            raise ValueError(f"features must be even, got features={features}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), features // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        angle = noise_level.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.sin(angle), torch.cos(angle)], dim=1))
