"""Rewards for steering and search: any callable `reward(x0) -> [batch]`, checked at every call; two shipped forms.

A reward scores data (or data predictions) x0 [batch, ...] with one real number per sample, higher is better. Used
by Feynman-Kac steering (Singhal et al., "A General Framework for Inference-time Scaling and Steering of Diffusion
Models", 2025) and noise search with a verifier (Ma et al., "Inference-Time Scaling for Diffusion Models beyond
Scaling Denoising Steps", 2025).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..processes import Process

Reward = Callable[[torch.Tensor], torch.Tensor]
Twist = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # twist(x_t [batch, ...], t [batch]) -> [batch]


def check_reward_fn(reward: object, name: str = "reward") -> Reward:
    """`reward` must be callable (a TypeError naming `name` otherwise)."""
    if not callable(reward):
        raise TypeError(f"{name} must be a callable reward(x0) -> Tensor [batch], got {type(reward).__name__}")
    return reward  # type: ignore[return-value]


def evaluate_reward(reward: Reward, x0: torch.Tensor, name: str = "reward") -> torch.Tensor:
    """reward(x0) as float64 [batch] on the CPU; a ValueError naming `name` for a wrong shape, a non-real dtype or NaN.
    (A twist is evaluated as `evaluate_reward(lambda x: twist(x, t), x_t, "twist")`.)

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


def noisy_class_log_prob(classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k: int, process: Process) -> Twist:
    """The twist log p(class k | x_t) under a noise-conditional `classifier(x, log_snr [batch]) -> logits [batch,
    classes]` that sees x_t scaled to alpha^2 + sigma^2 = 1 (so one classifier serves VP, flow and VE-like processes):
    classifier guidance (Dhariwal & Nichol, NeurIPS 2021) and the twist of class-conditional FK steering (`FK(...,
    twist=...)`; the digits one is `fewstep.tools.bench_steer.digits_class_twist`). Returns twist(x_t, t [batch])."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a class index (an integer >= 0), got k={k!r}")
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process, got {type(process).__name__}")

    def twist(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = process.alpha(t).to(x), process.sigma(t).to(x)
        scale = (alpha * alpha + sigma * sigma).rsqrt().view(-1, *[1] * (x.ndim - 1))
        logits = classifier(x * scale, process.log_snr(t).to(x))
        if logits.ndim != 2 or not k < logits.shape[1]:
            raise ValueError(f"class k={k} is not among the classifier's {logits.shape[-1]} classes")
        return torch.log_softmax(logits.to(torch.float64), dim=1)[:, k]

    return twist
