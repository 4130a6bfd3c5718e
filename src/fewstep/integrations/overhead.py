"""`FewstepScheduler.step()` overhead against diffusers' `DPMSolverMultistepScheduler.step()` (issue 9's target: <= 0.5x).

Both schedulers run a diffusers pipeline's loop with a zero-cost model (a preallocated zero tensor), so only the
scheduler is timed: `set_timesteps(steps)` and then `step()` at every timestep (fewstep: `FewstepScheduler`, which
drives `fewstep.sample` one evaluation at a time; diffusers: DPM-Solver++(2M), its default multistep scheduler).
`fewstep.sample` with the same zero model is timed too: the solver's own cost, the floor of the scheduler's. Where
diffusers has a scheduler for the same method (`COUNTERPARTS`: UniPCMultistepScheduler for unipc, DDIMScheduler for
ddim), `--counterparts` times its loop too and adds a table of the ratios to it (the target stays the ratio to
DPMSolverMultistepScheduler). The loops are timed in turn, round after round, so that a change in the machine's load
hits all of them alike; each number is the median over rounds of (loop time / steps), and beside it the minimum (the
least disturbed round). A ratio is the median over rounds of each round's own ratio (the loops ran within
milliseconds of each other), which cancels the load drift of a shared machine better than a ratio of medians. Run:
`python -m fewstep.integrations.overhead`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

REFERENCE = "DPMSolverMultistepScheduler"  # the target's reference: diffusers' default multistep scheduler
COUNTERPARTS = {"dpmpp_2m": REFERENCE, "unipc": "UniPCMultistepScheduler", "ddim": "DDIMScheduler"}  # same method


@dataclass(frozen=True)
class SchedulerOverhead:
    """Microseconds per step (median over rounds): per fewstep solver the scheduler loop and fewstep.sample alone,
    and diffusers' DPMSolverMultistepScheduler loop; by loop name ("scheduler:<solver>", "sample:<solver>",
    "diffusers", "diffusers:<class>" for a counterpart): `medians`, `minima` (the fastest round), `ratios` (the median
    over rounds of the round's time over diffusers' DPMSolverMultistepScheduler's) and, when counterparts were timed,
    `counterpart_ratios`, the same over the solver's diffusers counterpart (`COUNTERPARTS`; others are absent)."""

    scheduler_us: dict[str, float]
    sample_us: dict[str, float]
    diffusers_us: float
    batch_shape: tuple[int, ...]
    steps: int
    rounds: int
    minima: dict[str, float]
    ratios: dict[str, float]
    medians: dict[str, float] = field(default_factory=dict)
    counterpart_ratios: dict[str, float] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            f"Per-step scheduler overhead, zero-cost model, batch {self.batch_shape}, {self.steps} steps, "
            f"set_timesteps included (median and minimum over {self.rounds} interleaved rounds):\n",
            "| sampler | µs / step (median) | µs / step (min) | ratio to diffusers DPMSolverMultistep (per round, median) |",
            "|---|---|---|---|",
        ]
        for solver, us in self.scheduler_us.items():
            rows = (
                (f"scheduler:{solver}", f"FewstepScheduler({solver!r}).step()", us),
                (f"sample:{solver}", f"fewstep.sample({solver!r}) alone", self.sample_us[solver]),
            )
            for name, label, value in rows:
                lines.append(f"| {label} | {value:.1f} | {self.minima[name]:.1f} | {self.ratios[name]:.2f} |")
        low = self.minima["diffusers"]
        lines.append(f"| diffusers {REFERENCE}.step() | {self.diffusers_us:.1f} | {low:.1f} | 1.00 |")
        return "\n".join(lines + self._counterpart_lines()) + "\n"

    def _counterpart_lines(self) -> list[str]:
        """The second table (only when counterparts were timed): each loop against diffusers' scheduler of its method."""
        if not self.counterpart_ratios:
            return []
        lines = [
            "\nAgainst diffusers' scheduler of the same method (per round, median):\n",
            "| sampler | diffusers scheduler | its µs / step (median) | ratio |",
            "|---|---|---|---|",
        ]
        for name, ratio in self.counterpart_ratios.items():
            kind, solver = name.split(":", 1)
            label = f"FewstepScheduler({solver!r}).step()" if kind == "scheduler" else f"fewstep.sample({solver!r}) alone"
            other = COUNTERPARTS[solver]
            us = self.diffusers_us if other == REFERENCE else self.medians[f"diffusers:{other}"]
            lines.append(f"| {label} | {other} | {us:.1f} | {ratio:.2f} |")
        return lines


def _pipeline_loop(scheduler, noise: torch.Tensor, zero: torch.Tensor, steps: int) -> Callable[[], torch.Tensor]:
    def loop() -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(zero, t, x, return_dict=False)[0]
        return x

    return loop


def scheduler_overhead(
    solvers: Sequence[str] = ("dpmpp_2m",),
    *,
    batch_shape: tuple[int, ...] = (64, 1, 8, 8),
    steps: int = 50,
    rounds: int = 30,
    counterparts: bool = False,
) -> SchedulerOverhead:
    """Time the loops (module doc) on the CPU; needs diffusers. `counterparts`: also time diffusers' scheduler of each
    solver's method (`COUNTERPARTS`). Shapes: the batch is `batch_shape`."""
    import diffusers

    from ..processes import DiscreteVP
    from ..sampling import sample
    from .scheduler import FewstepScheduler

    noise = torch.randn(batch_shape)
    zero = torch.zeros_like(noise)
    config = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    process = DiscreteVP.linear()
    loops: dict[str, Callable[[], torch.Tensor]] = {
        "diffusers": _pipeline_loop(getattr(diffusers, REFERENCE)(**config), noise, zero, steps)
    }
    for solver in solvers:
        loops[f"scheduler:{solver}"] = _pipeline_loop(FewstepScheduler(**config, solver=solver), noise, zero, steps)
        loops[f"sample:{solver}"] = lambda s=solver: sample(lambda x, t: zero, noise, process=process, solver=s, steps=steps)
    matched = [s for s in solvers if s in COUNTERPARTS] if counterparts else []
    for name in sorted({COUNTERPARTS[s] for s in matched} - {REFERENCE}):
        loops[f"diffusers:{name}"] = _pipeline_loop(getattr(diffusers, name)(**config), noise, zero, steps)
    times: dict[str, list[float]] = {name: [] for name in loops}
    with torch.no_grad():
        for loop in loops.values():
            loop()  # warm-up (and set_timesteps' first planning, kept by the scheduler as in a pipeline's reuse)
        for _ in range(rounds):
            for name, loop in loops.items():
                start = time.perf_counter()
                loop()
                times[name].append((time.perf_counter() - start) / steps * 1e6)
    med = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: _ratio(values, times["diffusers"]) for name, values in times.items()}
    same = {f"{kind}:{s}": _ratio(times[f"{kind}:{s}"], times["diffusers" if COUNTERPARTS[s] == REFERENCE
                                                              else f"diffusers:{COUNTERPARTS[s]}"])
            for s in matched for kind in ("scheduler", "sample")}  # fmt: skip
    return SchedulerOverhead({s: med[f"scheduler:{s}"] for s in solvers}, {s: med[f"sample:{s}"] for s in solvers},
                             med["diffusers"], tuple(batch_shape), steps, rounds,
                             {name: min(values) for name, values in times.items()}, ratios, med, same)  # fmt: skip


def _ratio(values: list[float], reference: list[float]) -> float:
    """The median over rounds of each round's time over the reference loop's time in the same round."""
    return statistics.median(a / b for a, b in zip(values, reference, strict=True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solvers", default="dpmpp_2m,unipc,ddim", help="comma-separated fewstep solvers")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", default="64,1,8,8", help="batch shape, comma-separated")
    parser.add_argument("--counterparts", action="store_true", help="also time diffusers' scheduler of each method")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = scheduler_overhead(args.solvers.split(","), batch_shape=tuple(int(v) for v in args.batch.split(",")),
                                steps=args.steps, rounds=args.rounds, counterparts=args.counterparts)  # fmt: skip
    print(result.markdown())


if __name__ == "__main__":
    main()
