"""NFE budgets: how many network evaluations a solver run costs, and how many steps fit a given NFE.

Solvers differ in cost per step (Heun: 2, one on a step that ends at sigma = 0; multistep solvers: 1) and the
final data prediction (`denoise_to_zero`) adds 1 where sigma(t_end) > 0, so comparisons "at equal NFE" (Lu et al.,
2022, "DPM-Solver", section 5; Karras et al., 2022, "EDM", section 3) need the map NFE -> steps. The cost is
measured by a dry run of `fewstep.sample` on a zero model of a one-sample batch (exact for every registered
solver, including ones added later, without a per-solver table). For an adaptive step-size solver the count
depends on the model, so the dry run's number says nothing about it. `guidance=` (a `fewstep.cfg` / `cfg_kwargs`
model) counts as `fewstep.sample` does: a guided call is 2 evaluations, 1 at scale 0 or 1 and outside its interval.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from .checks import MAX_STEPS
from .guidance import GuidedModel
from .processes import Process
from .sampling import sample
from .solvers import get_solver

MESSAGE_VALUES = 20  # reachable NFE values listed in an error message


def _zero_v_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # v = 0 converts to finite (x0, eps) at every time, also where alpha = 0 or sigma = 0.
    return torch.zeros_like(x)


def _guidance_key(guidance: Any) -> tuple[float, tuple[float, float] | None] | None:
    """(scale, interval) of a guided model (GuidedModel: what its cost per call depends on), None for none."""
    if guidance is None:
        return None
    if not isinstance(guidance, GuidedModel):
        got = type(guidance).__name__
        raise TypeError(f"guidance must be None or a guided model (fewstep.cfg / fewstep.cfg_kwargs), got {got}")
    return guidance.scale, guidance.interval


def _dry_model(guidance: tuple[float, tuple[float, float] | None] | None):
    """The zero v-model, guided like `guidance` (its cost per call then counts as in a real run)."""
    if guidance is None:
        return _zero_v_model
    zero = torch.zeros(1, 1)
    return GuidedModel(lambda x, t, c: torch.zeros_like(x), zero, zero, guidance[0], guidance[1])


def nfe_for_steps(
    solver: str,
    steps: int,
    process: Process,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    denoise_to_zero: bool = True,
    guidance: Any = None,
    **solver_options: Any,
) -> int:
    """Network evaluations of `fewstep.sample(solver=solver, steps=steps, ...)` on `process` (model cost 1 per call,
    or that of the guided model `guidance`: 2 per guided call)."""
    options = tuple(sorted(solver_options.items()))
    key = (solver, steps, process, t_start, t_end, denoise_to_zero, options, _guidance_key(guidance))
    try:
        hash(key)
    except TypeError:  # an unhashable option value: measure without the cache
        return _dry_run_nfe(*key)
    return _cached_nfe(*key)


def _dry_run_nfe(solver, steps, process, t_start, t_end, denoise_to_zero, options, guidance=None) -> int:
    noise = torch.zeros(1, 1, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = sample(
        _dry_model(guidance),
        noise,
        process=process,
        prediction="v",
        solver=solver,
        steps=steps,
        schedule="time_uniform",
        t_start=t_start,
        t_end=t_end,
        denoise_to_zero=denoise_to_zero,
        generator=generator,
        **dict(options),
    )
    return int(x.nfe)


_cached_nfe = lru_cache(maxsize=1024)(_dry_run_nfe)


def _check_nfe(nfe: int) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= MAX_STEPS:
        raise ValueError(f"nfe must be an integer >= 1 and <= {MAX_STEPS}, got nfe={nfe!r}")
    return nfe


def _first_steps_costing(solver: str, nfe: int, process: Process, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(steps, cost): the fewest steps whose run costs >= nfe (or the most steps tried, nfe, with its cost).

    Bisection over steps in [1, nfe]: the cost never decreases with steps and every step costs at least one
    evaluation, so about log2(nfe) dry runs.
    """
    lo, hi = 1, nfe
    while lo < hi:
        mid = (lo + hi) // 2
        if nfe_for_steps(solver, mid, process, **kwargs) >= nfe:
            hi = mid
        else:
            lo = mid + 1
    return lo, nfe_for_steps(solver, lo, process, **kwargs)


def steps_for_nfe(
    solver: str,
    nfe: int,
    process: Process,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    denoise_to_zero: bool = True,
    guidance: Any = None,
    **solver_options: Any,
) -> int:
    """The number of steps at which `solver` uses exactly `nfe` network evaluations on `process` (guided: see
    `nfe_for_steps`).

    Raises ValueError naming the nearest reachable NFE values when no step count costs exactly `nfe` (Heun with a
    final denoising evaluation, for example, only reaches odd NFE).
    """
    get_solver(solver).check_options(solver_options)
    _check_nfe(nfe)
    kwargs = dict(t_start=t_start, t_end=t_end, denoise_to_zero=denoise_to_zero, guidance=guidance, **solver_options)
    steps, cost = _first_steps_costing(solver, nfe, process, kwargs)
    if cost == nfe:
        return steps
    first = max(1, steps - MESSAGE_VALUES)
    reachable = [str(nfe_for_steps(solver, s, process, **kwargs)) for s in range(first, steps)]
    raise ValueError(
        f"nfe={nfe} is not reachable with solver={solver!r} on {process!r} (denoise_to_zero={denoise_to_zero}); "
        f"reachable values up to it: {'..., ' if first > 1 else ''}{', '.join(reachable) or 'none'}"
    )


def plan_for_nfe(solver: str, nfe: int, process: Process, **kwargs: Any) -> tuple[int, bool]:
    """(steps, denoise_to_zero) that make `solver` use exactly `nfe` evaluations; the final denoising step is
    dropped when that is the only way to reach the budget (Heun: 2 per step, so even NFE without it).
    kwargs: t_start, t_end, solver options. Raises ValueError when neither reaches `nfe`."""
    try:
        return steps_for_nfe(solver, nfe, process, **kwargs), True
    except ValueError:
        return steps_for_nfe(solver, nfe, process, denoise_to_zero=False, **kwargs), False


def steps_within_nfe(solver: str, nfe: int, process: Process, **kwargs) -> int:
    """The most steps whose run costs at most `nfe` evaluations (`fewstep.budget.nfe_for_steps`); kwargs: t_start,
    t_end, denoise_to_zero, solver options. Raises ValueError when even one step costs more."""
    _check_nfe(nfe)
    steps, cost = _first_steps_costing(solver, nfe + 1 if nfe < MAX_STEPS else nfe, process, kwargs)
    best = min(steps - 1 if cost > nfe else steps, nfe)
    if best == 0:
        raise ValueError(f"nfe={nfe} is below the cost of one step of solver={solver!r} on {process!r}")
    return best
