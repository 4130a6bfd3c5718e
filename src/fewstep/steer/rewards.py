"""Rewards for steering and search: any callable `reward(x0) -> [batch]`, checked at every call; two shipped forms.

A reward scores data (or data predictions) x0 [batch, ...] with one real number per sample, higher is better. Used
by Feynman-Kac steering (Singhal et al., "A General Framework for Inference-time Scaling and Steering of Diffusion
Models", 2025) and noise search with a verifier (Ma et al., "Inference-Time Scaling for Diffusion Models beyond
Scaling Denoising Steps", 2025).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reward = Callable[[torch.Tensor], torch.Tensor]


def check_reward_fn(reward: object, name: str = "reward") -> Reward:
    """`reward` must be callable (a TypeError naming `name` otherwise)."""
    if not callable(reward):
        raise TypeError(f"{name} must be a callable reward(x0) -> Tensor [batch], got {type(reward).__name__}")
    return reward  # type: ignore[return-value]


def evaluate_reward(reward: Reward, x0: torch.Tensor, name: str = "reward") -> torch.Tensor:
    """reward(x0) as float64 [batch] on the CPU; a ValueError naming `name` for a wrong shape, a non-real dtype or NaN.

    One host synchronisation per call: steering and search decide on the host anyway. +-inf is allowed (a hard
    constraint: -inf removes a particle), NaN is not.
    """
    with torch.no_grad():
        r = reward(x0)
    batch = x0.shape[0]
    if not isinstance(r, torch.Tensor) or not (r.is_floating_point() or r.dtype in (torch.int32, torch.int64)):
        got = f"a {r.dtype} tensor" if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"{name} must return a real tensor of shape [{batch}] (one value per sample), got {got}")
    if r.shape != (batch,):
        raise ValueError(f"{name} returned shape {tuple(r.shape)} for {batch} samples; it must return shape [{batch}]")
    r = r.detach().to("cpu", torch.float64)
    if bool(torch.isnan(r).any()):
        raise ValueError(f"{name} returned NaN for {int(torch.isnan(r).sum())} of {batch} samples")
    if bool((r == torch.inf).any()):
        raise ValueError(f"{name} returned +inf: rewards must be finite or -inf (a forbidden sample)")
    return r


def linear(w: torch.Tensor) -> Reward:
    """The linear reward r(x) = w . x for x [batch, D] (w [D]): the exact-bed reward, whose tilt of a Gaussian mixture
    is again a Gaussian mixture (`tilted_mixture`)."""
    w = torch.as_tensor(w, dtype=torch.float64).flatten()

    def reward(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(torch.float64) @ w.to(x.device)

    return reward


def class_log_prob(classifier: Callable[[torch.Tensor], torch.Tensor], k: int) -> Reward:
    """log p(class k | x0) under `classifier(x0) -> logits [batch, classes]`: class-conditional generation from an
    unconditional model (the digits classifier: `fewstep.tools.bench_steer.digits_class_reward`)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a class index (an integer >= 0), got k={k!r}")

    def reward(x0: torch.Tensor) -> torch.Tensor:
        logits = classifier(x0)
        if logits.ndim != 2 or not k < logits.shape[1]:
            raise ValueError(f"class k={k} is not among the classifier's {logits.shape[-1]} classes")
        return torch.log_softmax(logits.to(torch.float64), dim=1)[:, k]

    return reward
