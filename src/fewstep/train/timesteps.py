"""Training-time sampling for any process: uniform time, logit-normal time, EDM log-normal sigma, uniform log-SNR.

- "uniform": t ~ U(t_min, t_max) (continuous-time DDPM/VP training, Song et al., 2021);
- "discrete": a uniform integer timestep of a DiscreteVP, t = (k + 1) / N (Ho et al., 2020);
- "logit_normal": t = t_min + (t_max - t_min) sigmoid(mean + std z), for flows (Esser et al., 2024, "Scaling
  Rectified Flow Transformers", section 3.1);
- "edm": ln(sigma / alpha) ~ N(p_mean, p_std^2) (Karras et al., 2022, table 1: P_mean = -1.2, P_std = 1.2),
  mapped to the process's time through its log-SNR and clamped to [t_min, t_max];
- "logsnr_uniform": log-SNR uniform between its values at t_max and t_min (Kingma et al., 2021, VDM).
All return float64 [n] from a torch.Generator, so the draw is reproducible and resumable.
"""

from __future__ import annotations

import torch

from ..processes import DiscreteVP, Process

TIME_SAMPLINGS = ("uniform", "discrete", "logit_normal", "edm", "logsnr_uniform")


def sample_time(
    n: int,
    process: Process,
    method: str = "uniform",
    generator: torch.Generator | None = None,
    *,
    mean: float | None = None,
    std: float | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """n training times in the process's range [t_min, t_max] (float64 [n]); mean/std for logit_normal/edm.

    eps keeps uniform/logit-normal draws off the ends where a prediction type can be undefined (e.g. sigma = 0).
    """
    lo, hi = process.t_min, process.t_max
    if method == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return lo + (hi - lo) * (eps + (1 - 2 * eps) * u)
    if method == "discrete":
        if not isinstance(process, DiscreteVP):
            raise ValueError(f"time sampling 'discrete' needs a DiscreteVP process, got {process!r}")
        k = torch.randint(0, process.num_timesteps, (n,), generator=generator)
        return process.time_from_timestep(k.to(torch.float64))
    if method == "logit_normal":
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.sigmoid((0.0 if mean is None else mean) + (1.0 if std is None else std) * z)
        return lo + (hi - lo) * (eps + (1 - 2 * eps) * u)
    if method == "edm":
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        log_sigma = (-1.2 if mean is None else mean) + (1.2 if std is None else std) * z
        return process.t_from_log_snr(-log_sigma).clamp(lo, hi)
    if method == "logsnr_uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        t_hi, t_lo = hi - eps * (hi - lo), lo + eps * (hi - lo)
        l_min, l_max = float(process.log_snr(t_hi)), float(process.log_snr(t_lo))
        return process.t_from_log_snr(l_min + (l_max - l_min) * u).clamp(lo, hi)
    raise ValueError(f"time sampling method={method!r} is not known; allowed values: {', '.join(TIME_SAMPLINGS)}")
