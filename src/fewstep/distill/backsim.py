"""Multi-step generators for distribution matching: fixed generator times, backward simulation of their inputs, and
the stored sampling times of the student.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024, section 4.4: a
K-step generator G has fixed times t_0 > ... > t_{K-1}; sampling starts at x_{t_0} = sigma(t_0) z_0 and alternates
x0_j = G(x_{t_j}, t_j), x_{t_{j+1}} = alpha(t_{j+1}) x0_j + sigma(t_{j+1}) z_{j+1} (fresh noise: the consistency
sampler with gamma = 1, `fewstep.solvers.consistency`), ending on x0_{K-1}. Training draws a step index k per
sample and builds x_{t_k} by running the current generator through its first k steps without gradient ("backward
simulation"), so the inputs the generator is trained on are the ones it meets at inference (not the teacher's
forward-noised data). Every step's output x0_k is a sample that the distribution-matching loss applies to.
Shapes: z, noises[j], x [batch, ...]; k [batch] int64; times lists of Python floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..processes import Process
from ..train.config import ConfigError

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t float64 [batch]) -> data prediction


def check_generator_times(times: Sequence[float], process: Process) -> list[float]:
    """`times` as a list if strictly decreasing within (t_min, t_max]; else ConfigError("distill.generator_times")."""
    times = [float(t) for t in times]
    inside = all(process.t_min < t <= process.t_max for t in times)
    if not times or not inside or list(times) != sorted(set(times), reverse=True):
        raise ConfigError(
            "distill.generator_times",
            f"distill.generator_times = {times} must be strictly decreasing times in (t_min, t_max] = "
            f"({process.t_min}, {process.t_max}] of {process!r}",
        )
    return times


def resolve_generator_times(
    steps: int | None, times: Sequence[float] | None, stored: dict[int, list[float]], process: Process, what: str
) -> list[float] | None:
    """The K generator times: `times` if given, else the first K of `stored[K]` (the init_generator's K-step sampling
    times, `what` names it), else None for one step (the caller's default start time). ConfigError when K > 1 has
    neither."""
    if times is not None:
        return check_generator_times(times, process)
    k = steps or 1
    if k in stored and len(stored[k]) == k + 1:
        return check_generator_times(stored[k][:k], process)
    if k == 1:
        return None
    counts = ", ".join(str(n) for n in sorted(stored)) or "none"
    raise ConfigError(
        "distill.generator_times",
        f"distill.generator_steps = {k} needs distill.generator_times (a list of {k} decreasing times) or an "
        f"init_generator that stores {k}-step times; {what} stores times for step counts: {counts}",
    )


def sub_grids(times: Sequence[float], t_end: float) -> dict[int, list[float]]:
    """Sampling times per step count n = 1..K: the generator times of indices round(j K / n), j < n, then t_end.

    Only trained times are stored (n = K: all of them; n = 1: t_0; for K = 4, n = 2: t_0, t_2).
    """
    k = len(times)
    return {n: [float(times[round(j * k / n)]) for j in range(n)] + [float(t_end)] for n in range(1, k + 1)}


def path_draws(prefix: str, n: int, shape: Sequence[int], dtype: torch.dtype, steps: int, generator: torch.Generator):
    """The randomness of n backward simulations of a `steps`-step generator: `<prefix>k` [n] int64 (the step index of
    each sample, uniform over 0..steps-1) and `<prefix>z<j>` [n, *shape] for j = 1..steps-1 (the re-noising of step j)."""
    out = {f"{prefix}k": torch.randint(0, steps, (n,), generator=generator)}
    for j in range(1, steps):
        out[f"{prefix}z{j}"] = torch.randn((n, *shape), generator=generator, dtype=dtype)
    return out


def path_noises(draws: dict[str, torch.Tensor], prefix: str, steps: int) -> list[torch.Tensor]:
    """The re-noising tensors z_1..z_{steps-1} of `path_draws` from a (sharded) draws dict."""
    return [draws[f"{prefix}z{j}"] for j in range(1, steps)]


@torch.no_grad()
def backward_simulate(
    x0_fn: X0Fn, process: Process, times: Sequence[float], z: torch.Tensor, k: torch.Tensor, noises: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{t_k}, t_k) per sample: x_{t_0} = sigma(t_0) z, then for j < k the generator step and re-noising with
    noises[j] (= z_{j+1}); only the samples still on their way are evaluated at each step. No gradient.

    x0_fn: the generator's data prediction (x, t float64 [batch]) -> x0; k [batch] in 0..len(times)-1.
    Returns x [batch, ...] in z's dtype and t float64 [batch]."""
    t_all = torch.tensor(list(times), dtype=torch.float64, device=z.device)
    alpha = process.alpha(t_all).tolist()
    sigma = process.sigma(t_all).tolist()
    k = k.to(z.device)
    x = sigma[0] * z
    for j in range(len(times) - 1):
        on = (k > j).nonzero().flatten()
        if len(on) == 0:
            break
        t_j = torch.full((len(on),), times[j], dtype=torch.float64, device=z.device)
        x0 = x0_fn(x[on], t_j).to(z.dtype)
        x = x.index_copy(0, on, alpha[j + 1] * x0 + sigma[j + 1] * noises[j][on].to(z))
    return x, t_all[k]
