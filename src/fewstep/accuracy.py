"""Error of a solver against the exact probability-flow ODE solution of a Gaussian mixture, and empirical order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .checks import check_int
from .gmm import GaussianMixture
from .processes import Process
from .sampling import sample


def rms_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square error per coordinate between two batches [batch, ...]."""
    return float((x.to(torch.float64) - reference.to(torch.float64)).pow(2).mean().sqrt())


def squared_errors(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample [batch] (float64) between two batches [batch, ...]; `rms_error` is the square
    root of its mean."""
    return (x.to(torch.float64) - reference.to(torch.float64)).flatten(1).pow(2).mean(1)


def rms_ratio_interval(
    errors: torch.Tensor, baseline: torch.Tensor, *, level: float = 0.95, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of RMS(errors) / RMS(baseline) from per-sample squared errors [batch] of
    two runs on the same noise (`squared_errors`; Efron & Tibshirani, "An Introduction to the Bootstrap", 1993).

    Both runs are resampled with the same indices, so a sample that is hard for both (near a boundary between modes,
    where a few samples can carry most of the squared error) moves both RMS errors together."""
    errors, baseline = errors.to(torch.float64).flatten(), baseline.to(torch.float64).flatten()
    if errors.shape != baseline.shape or errors.numel() < 2:
        raise ValueError(f"errors and baseline must hold the same number (>= 2) of per-sample errors, got "
                         f"{errors.numel()} and {baseline.numel()}")  # fmt: skip
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got level={level!r}")
    draws = check_int(draws, "draws", minimum=1, maximum=1_000_000)
    index = torch.randint(errors.numel(), (draws, errors.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = (errors[index].mean(1) / baseline[index].mean(1)).sqrt()
    tail = (1 - level) / 2
    low, high = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def solver_error(
    mixture: GaussianMixture,
    process: Process,
    noise: torch.Tensor,
    reference: torch.Tensor,
    *,
    prediction: str = "eps",
    **sample_kwargs: Any,
) -> tuple[float, int]:
    """(RMS error against `reference`, NFE) of `fewstep.sample` on the exact model of `mixture`."""
    x = sample(mixture.model(process, prediction), noise, process=process, prediction=prediction, **sample_kwargs)
    return rms_error(x, reference), x.nfe


def empirical_order(steps: Sequence[int], errors: Sequence[float]) -> float:
    """Least-squares slope of -log(error) against log(steps): the observed convergence order."""
    if len(steps) != len(errors) or len(steps) < 2:
        raise ValueError("need at least two (steps, error) pairs of equal length")
    xs = [math.log(s) for s in steps]
    ys = [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
