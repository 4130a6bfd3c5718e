"""Noise levels for consistency training in the scaled sigma s = sigma / alpha, for any process; (t, r) pairs per sample.

- Discrete: the iCT curriculum (Song & Dhariwal, 2023, "Improved Techniques for Training Consistency Models",
  section 3.4 and 3.5): N(k) = min(n_min 2^floor(k / K'), n_max) intervals, K' = floor(K / (log2(n_max / n_min) + 1)),
  on the Karras grid s_i = (s_min^(1/rho) + i / N (s_max^(1/rho) - s_min^(1/rho)))^rho, and the interval i drawn
  from the discretised lognormal p(i) ~ erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) /
  (sqrt 2 P_std)), or uniformly; t = s_{i+1}, r = s_i.
- Continuous: ECT (Geng et al., 2024, "Consistency Models Made Easy", section 3): ln s_t ~ N(P_mean, P_std^2) (or t
  uniform), s_r = s_t - s_t q^-floor(k / d) n(s_t), n(s) = 1 + k_n sigmoid(-b s), clamped at s_min; at stage 0
  every s_r <= s_min, so training starts from the diffusion loss.
Times are mapped to the process through its log-SNR (t = t_from_log_snr(-ln s)); s_min = s(t_min) maps to t_min exactly.
Shapes: draws of n samples -> float64 [n].
"""

from __future__ import annotations

import math

import torch

from ..processes import Process


def scaled_sigma(process: Process, t: float | torch.Tensor) -> torch.Tensor:
    """s = sigma / alpha (float64; inf where alpha = 0)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return process.sigma(t) / process.alpha(t)


def time_of(process: Process, s: torch.Tensor, s_min: float) -> torch.Tensor:
    """The process time of scaled sigmas s [n] (float64), exactly t_min where s <= s_min, clamped to the range."""
    s = s.to(torch.float64)
    t = process.t_from_log_snr(-torch.log(s.clamp_min(1e-300))).clamp(process.t_min, process.t_max)
    return torch.where(s <= s_min, torch.full_like(t, process.t_min), t)


def karras_sigmas(s_min: float, s_max: float, intervals: int, rho: float = 7.0) -> torch.Tensor:
    """The Karras et al. (2022) grid of `intervals + 1` increasing scaled sigmas from s_min to s_max (float64)."""
    ramp = torch.linspace(0.0, 1.0, intervals + 1, dtype=torch.float64)
    lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
    s = (lo + ramp * (hi - lo)) ** rho
    s[0], s[-1] = s_min, s_max
    return s


def ict_intervals(step: int, total_steps: int, n_min: int, n_max: int) -> int:
    """iCT's N(k): n_min doubled every K' steps up to n_max (Song & Dhariwal, 2023, eq. 8, with s0 = n_min, s1 = n_max)."""
    if n_min >= n_max:
        return n_max
    stages = math.floor(math.log2(n_max / n_min)) + 1
    per_stage = max(1, total_steps // stages)
    return min(n_min * 2 ** (step // per_stage), n_max)


def lognormal_interval_weights(s: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """Probabilities [N] of the intervals (s_i, s_{i+1}] under ln s ~ N(p_mean, p_std^2) (iCT, eq. 10)."""
    cdf = torch.erf((torch.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    weights = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
    if not float(weights.sum()) > 0:  # every interval far in a tail: fall back to uniform
        return torch.full_like(weights, 1.0 / len(weights))
    return weights / weights.sum()


def draw_discrete(n: int, grid: torch.Tensor, distribution: str, p_mean: float, p_std: float, generator: torch.Generator):
    """(s_t, s_r) [n] each: a random interval (s_i, s_{i+1}] of the increasing grid, lognormal or uniform."""
    if distribution == "lognormal":
        index = torch.multinomial(lognormal_interval_weights(grid, p_mean, p_std), n, replacement=True, generator=generator)
    else:
        index = torch.randint(0, len(grid) - 1, (n,), generator=generator)
    return grid[index + 1], grid[index]


def ect_gap(s_t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    """ECT's s_t - s_r = s_t q^-stage n(s_t), n(s) = 1 + k sigmoid(-b s) (Geng et al., 2024, section 3.2)."""
    return s_t * q ** (-stage) * (1.0 + k * torch.sigmoid(-b * s_t))


def draw_continuous(
    n: int,
    process: Process,
    s_range: tuple[float, float],
    distribution: str,
    p_mean: float,
    p_std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """s_t [n] from ln s ~ N(p_mean, p_std^2) or t uniform in the process's range, clamped to s_range = (lo, hi)."""
    lo, hi = s_range
    if distribution == "lognormal":
        s = torch.exp(p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64))
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        s = scaled_sigma(process, process.t_min + (process.t_max - process.t_min) * u)
    return s.clamp(lo, hi)
