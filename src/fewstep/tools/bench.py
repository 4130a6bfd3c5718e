"""Benchmarks: solver error against the exact Gaussian-mixture ODE solution vs NFE, and per-step solver overhead.

Everything here is measured, never tabulated: `accuracy` solves the probability-flow ODE of a shipped mixture
exactly (`GaussianMixture.ode_solution`) and runs every solver x grid at equal NFE; `overhead` times the sampling
loop with a model that costs nothing, beside diffusers' `DPMSolverMultistepScheduler.step()` in the same process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..accuracy import solver_error
from ..budget import plan_for_nfe
from ..gmm import problem
from ..io import save_figure
from ..processes import Process
from ..sampling import sample


@dataclass
class AccuracyRow:
    """One solver x grid: RMS error against the exact solution at each NFE (NaN where the NFE is unreachable)."""

    problem: str
    process: str
    solver: str
    schedule: str
    errors: dict[int, float]


def accuracy(
    problems: Sequence[str],
    process: Process,
    prediction: str,
    solvers: Sequence[str],
    schedules: Sequence[str],
    nfes: Sequence[int],
    *,
    samples: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> list[AccuracyRow]:
    """Error against the exact probability-flow ODE solution for every problem x solver x grid x NFE."""
    from tqdm.auto import tqdm

    rows = []
    total = len(problems) * len(solvers) * len(schedules) * len(nfes)
    with tqdm(total=total, desc="bench accuracy", disable=not progress) as bar:
        for name in problems:
            mixture = problem(name)
            noise = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            reference = mixture.ode_solution(noise, process)
            for solver in solvers:
                for schedule in schedules:
                    errors = {}
                    for nfe in nfes:
                        bar.update(1)
                        try:
                            steps, denoise = plan_for_nfe(solver, nfe, process)
                            err, used = solver_error(
                                mixture, process, noise, reference, prediction=prediction, solver=solver, steps=steps,
                                schedule=schedule, denoise_to_zero=denoise,
                            )  # fmt: skip
                            if used != nfe:
                                raise RuntimeError(f"{solver} used {used} evaluations, expected {nfe}")
                        except ValueError:  # NFE not reachable by this solver, or grid not defined on this range
                            err = math.nan
                        errors[nfe] = err
                    rows.append(AccuracyRow(name, repr(process), solver, schedule, errors))
    return rows


def accuracy_markdown(rows: Iterable[AccuracyRow], nfes: Sequence[int]) -> str:
    """A markdown table: one line per problem x solver x grid, one column per NFE; the best per column in bold."""
    rows = list(rows)
    lines = []
    for name in dict.fromkeys(r.problem for r in rows):
        group = [r for r in rows if r.problem == name]
        best = {n: min((r.errors[n] for r in group if not math.isnan(r.errors[n])), default=math.nan) for n in nfes}
        lines.append(f"\n**{name}** on {group[0].process} (RMS error vs exact ODE solution)\n")
        lines.append("| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("|---|---|" + "---|" * len(nfes))
        for r in group:
            cells = []
            for n in nfes:
                e = r.errors[n]
                cell = "-" if math.isnan(e) else f"{e:.2e}"
                cells.append(f"**{cell}**" if e == best[n] else cell)
            lines.append(f"| {r.solver} | {r.schedule} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def accuracy_plot(rows: Sequence[AccuracyRow], path: Path) -> None:
    """Log-log error vs NFE, one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.problem for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for r in (r for r in rows if r.problem == name):
            nfes = [n for n, e in r.errors.items() if not math.isnan(e)]
            ax.loglog(nfes, [r.errors[n] for n in nfes], marker="o", label=f"{r.solver} / {r.schedule}")
        ax.set(title=f"{name}: {rows[0].process}", xlabel="NFE", ylabel="RMS error vs exact ODE solution")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


@dataclass
class OverheadResult:
    """Per-step solver overhead in microseconds (median over repeats) for a zero-cost model."""

    fewstep_us: dict[str, float]
    diffusers_us: float | None
    batch_shape: tuple[int, ...]
    steps: int


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def overhead(
    solvers: Sequence[str] = ("dpmpp_2m",),
    *,
    batch_shape: tuple[int, ...] = (64, 1, 8, 8),
    steps: int = 50,
    repeats: int = 30,
    device: str = "cpu",
) -> OverheadResult:
    """Solver time per step with a model that returns a preallocated zero tensor (so only the solver is timed).

    fewstep: `fewstep.sample` on DiscreteVP.linear() (grid construction, conversions, the NaN flags and the
    update included). diffusers, when installed: `set_timesteps` + the loop of `DPMSolverMultistepScheduler.step()`
    with the same batch, in the same process. Both divide the loop's wall time by the number of steps.
    """
    from ..processes import DiscreteVP

    process = DiscreteVP.linear()
    noise = torch.randn(batch_shape, device=device)
    zero = torch.zeros_like(noise)

    def zero_model(x, t):
        return zero

    from tqdm.auto import tqdm

    result = {}
    for solver in tqdm(solvers, desc="bench overhead", leave=False):
        sample(zero_model, noise, process=process, solver=solver, steps=steps, denoise_to_zero=False)  # warm-up
        seconds = _median_time(
            lambda s=solver: sample(zero_model, noise, process=process, solver=s, steps=steps, denoise_to_zero=False),
            repeats,
        )
        result[solver] = seconds / steps * 1e6
    diffusers_us = None
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:  # diffusers is optional (dev extra): report fewstep alone
        DPMSolverMultistepScheduler = None
    if DPMSolverMultistepScheduler is not None:
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")

        def diffusers_loop():
            scheduler.set_timesteps(steps, device=device)
            x = noise
            for t in scheduler.timesteps:
                x = scheduler.step(zero, t, x).prev_sample
            return x

        diffusers_loop()
        diffusers_us = _median_time(diffusers_loop, repeats) / steps * 1e6
    return OverheadResult(result, diffusers_us, tuple(batch_shape), steps)


def overhead_markdown(result: OverheadResult) -> str:
    lines = [
        f"Per-step solver overhead, zero-cost model, batch {result.batch_shape}, {result.steps} steps (median):\n",
        "| sampler | µs / step | ratio to diffusers DPMSolverMultistep |",
        "|---|---|---|",
    ]
    for name, us in result.fewstep_us.items():
        ratio = f"{us / result.diffusers_us:.2f}" if result.diffusers_us else "-"
        lines.append(f"| fewstep {name} | {us:.1f} | {ratio} |")
    if result.diffusers_us is not None:
        lines.append(f"| diffusers DPMSolverMultistepScheduler.step() | {result.diffusers_us:.1f} | 1.00 |")
    else:
        lines.append("| diffusers | not installed | - |")
    return "\n".join(lines) + "\n"
