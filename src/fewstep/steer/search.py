"""Search over initial noises with a verifier: best-of-N (random search) and zero-order search around the best noise.

Ma, Tong, Jia, Hu, Su, Zhang, Yang, Li, Jaakkola, Jia & Xie, "Inference-Time Scaling for Diffusion Models beyond
Scaling Denoising Steps", 2025, section 3.2: random search samples N noises and keeps the one whose sample the
verifier scores highest; zero-order search draws N candidates in a neighbourhood of a pivot noise, moves the pivot
to the best candidate when it beats the pivot, and repeats. The neighbourhood here is the preconditioned
Crank-Nicolson move sqrt(1 - radius^2) n + radius z, which keeps every candidate exactly standard normal.
Works with every solver (a deterministic one makes a noise's score reproducible). Accounting: nfe (network
evaluations, per batched call as in `fewstep.sample`), reward_calls (verifier calls), reward_evaluations (samples
scored).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import check_int, check_real
from ..parameterization import Model
from ..sampling import sample
from .rewards import Reward, check_reward_fn, evaluate_reward


def best_of_n(model: Model, noise: torch.Tensor, reward: Reward, *, n: int, **sample_kwargs: Any) -> torch.Tensor:
    """Random search: noise [B * n, ...] holds B groups of n candidate noises; returns the best sample of each group
    [B, ...] with attributes nfe, reward_calls, reward_evaluations, rewards [B], noise [B, ...] (the chosen noises)."""
    check_reward_fn(reward)
    n = check_int(n, "n", minimum=1)
    groups = _groups(noise, n, "n")
    x = sample(model, noise, **sample_kwargs)
    r = evaluate_reward(reward, x)
    best = r.view(groups, n).argmax(dim=1) + n * torch.arange(groups)
    out = x.index_select(0, best.to(x.device))
    _record(out, nfe=x.nfe, calls=1, evaluations=x.shape[0], rewards=r[best], noise=noise.index_select(0, best.to(noise.device)))
    return out


def zero_order_search(
    model: Model,
    noise: torch.Tensor,
    reward: Reward,
    *,
    neighbours: int = 4,
    rounds: int = 3,
    radius: float = 0.5,
    seed: int | None = None,
    **sample_kwargs: Any,
) -> torch.Tensor:
    """Zero-order search from the pivots noise [B, ...]: `rounds` rounds of `neighbours` candidates each around every
    pivot (radius in (0, 1]: the share of fresh noise); returns the best sample per pivot [B, ...] with nfe,
    reward_calls, reward_evaluations, rewards [B], noise [B, ...] and history (the mean best reward after each round)."""
    check_reward_fn(reward)
    neighbours = check_int(neighbours, "neighbours", minimum=1)
    rounds = check_int(rounds, "rounds", minimum=0)
    radius = check_real(radius, "radius", positive=True)
    if radius > 1:
        raise ValueError(f"radius must be in (0, 1] (the share of fresh noise in a candidate), got radius={radius!r}")
    groups = _groups(noise, 1, "pivots")
    generator = None if seed is None else torch.Generator().manual_seed(check_int(seed, "seed", minimum=0))
    pivot = noise
    x = sample(model, pivot, **sample_kwargs)
    r = evaluate_reward(reward, x)
    nfe, calls, evaluations, history = x.nfe, 1, groups, [float(r.mean())]
    for _ in range(rounds):
        fresh = torch.randn(pivot.shape[0] * neighbours, *pivot.shape[1:], generator=generator, dtype=torch.float64)
        candidates = math.sqrt(1 - radius * radius) * pivot.repeat_interleave(neighbours, 0) + radius * fresh.to(pivot)
        xc = sample(model, candidates, **sample_kwargs)
        rc = evaluate_reward(reward, xc).view(groups, neighbours)
        nfe, calls, evaluations = nfe + xc.nfe, calls + 1, evaluations + xc.shape[0]
        best_r, best = rc.max(dim=1)
        better = best_r > r
        index = best + neighbours * torch.arange(groups)
        pivot = torch.where(_rows(better, pivot), candidates[index.to(pivot.device)], pivot)
        x = torch.where(_rows(better, x), xc[index.to(x.device)], x)
        r = torch.where(better, best_r, r)
        history.append(float(r.mean()))
    _record(x, nfe=nfe, calls=calls, evaluations=evaluations, rewards=r, noise=pivot)
    x.history = history
    return x


def _groups(noise: torch.Tensor, n: int, name: str) -> int:
    """B = rows / n for noise [B * n, ...]; a ValueError otherwise."""
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or noise.shape[0] == 0 or noise.shape[0] % n:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must have a positive multiple of {name}={n} rows, got shape {shape}")
    return noise.shape[0] // n


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] mask shaped to broadcast over like [B, ...]."""
    return mask.to(like.device).reshape((-1,) + (1,) * (like.ndim - 1))


def _record(x: torch.Tensor, *, nfe: int, calls: int, evaluations: int, rewards: torch.Tensor, noise: torch.Tensor) -> None:
    x.nfe, x.reward_calls, x.reward_evaluations, x.rewards, x.noise = nfe, calls, evaluations, rewards, noise
