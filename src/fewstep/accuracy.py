"""Error of a solver against the exact probability-flow ODE solution of a Gaussian mixture, and empirical order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .gmm import GaussianMixture
from .processes import Process
from .sampling import sample


def rms_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square error per coordinate between two batches [batch, ...]."""
    return float((x.to(torch.float64) - reference.to(torch.float64)).pow(2).mean().sqrt())


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
