"""Choosing a student's sampling times: a coordinate search of the interior times on held-out noise.

The consistency sampler's intermediate times (the "ts" that openai/consistency_models users tune by hand; Song et al.,
2023, section 6 chose theirs by greedy search against FID) are not learned: for 2 and 4 steps each interior time
t_i is tried in turn at every value strictly between its neighbours that the student was trained at (a discrete
schedule's grid: off it the student is worse), or else at `points` evenly spaced values, keeping a move only when
the score improves, for `sweeps` passes; the first and last time stay. The score is any `score(samples) -> float`
(lower is better), e.g. FD on held-out noise; samples are drawn from the same noise and the same sampler noise for
every candidate (common random numbers), so that candidates differ only by their times.

    python -m fewstep.distill.times out/distill/cd_flow/checkpoint.json --steps 2,4 --n 5000 --seed 11 --write

rewrites the checkpoint's stored times (extra["student_times"]) and records the search under
extra["student_times_search"]; `fewstep.shipped.export` keeps both. Shapes: noise [n, ...]; times: steps + 1
decreasing floats.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .student import SAMPLER_KEY, TIMES_KEY, sample_student, stored_times

SEARCH_KEY = "student_times_search"
Score = Callable[[list[float]], float]


def neighbours_grid(upper: float, lower: float, points: int) -> list[float]:
    """`points` evenly spaced values strictly between lower < upper."""
    return [lower + (upper - lower) * j / (points + 1) for j in range(1, points + 1)]


def search_times(
    score: Score, times: Sequence[float], *, points: int = 9, sweeps: int = 2, allowed: Sequence[float] | None = None
) -> tuple[list[float], float]:
    """Coordinate search of the interior times of a decreasing grid `times` minimising `score(times)`; returns the
    best times and their score (never worse than the start's). `allowed`: the only values an interior time may take
    (a discrete-schedule student's training grid), else `points` evenly spaced ones between its neighbours."""
    best = [float(t) for t in times]
    best_score = score(best)
    for _ in range(sweeps):
        moved = False
        for i in range(1, len(best) - 1):
            upper, lower = best[i - 1], best[i + 1]
            values = neighbours_grid(upper, lower, points) if allowed is None else [t for t in allowed if lower < t < upper]
            for value in values:
                trial = best[:i] + [value] + best[i + 1 :]
                value_score = score(trial)
                if value_score < best_score:
                    best, best_score, moved = trial, value_score, True
        if not moved:
            break
    return best, best_score


def student_score(loaded: Any, noise: torch.Tensor, fd: Callable[[torch.Tensor], float], seed: int) -> Score:
    """times -> fd of the student's samples of `noise` with those times (its own sampler; sampler noise of `seed`)."""

    @torch.no_grad()
    def score(times: list[float]) -> float:
        schedule = torch.tensor(times, dtype=torch.float64)
        try:
            x = sample_student(loaded, noise, len(times) - 1, schedule=schedule, generator=torch.Generator().manual_seed(seed))
        except ValueError:  # a grid the solver refuses (times closer than round-off): not a candidate
            return float("inf")
        return fd(x) if bool(torch.isfinite(x).all()) else float("inf")

    return score


def tune_student_times(
    loaded: Any,
    steps: Sequence[int],
    noise: torch.Tensor,
    fd: Callable[[torch.Tensor], float],
    *,
    seed: int = 0,
    points: int = 9,
    sweeps: int = 2,
    log: Callable[[str], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """For each step count in `steps` (>= 2, stored by the student): {"times", "score", "start", "start_score"}."""
    say = log or (lambda text: None)
    stored = stored_times(loaded.meta)
    allowed = student_training_times(loaded)
    score = student_score(loaded, noise, fd, seed)
    out = {}
    for n in steps:
        if n not in stored:
            counts = ", ".join(str(k) for k in sorted(stored)) or "none"
            raise ValueError(f"steps={n}: the student stores times for steps {counts} only")
        if n < 2:
            raise ValueError(f"steps={n}: one step has no interior time to choose; give step counts >= 2")
        start_score = score(stored[n])
        times, best = search_times(score, stored[n], points=points, sweeps=sweeps, allowed=allowed)
        out[n] = {"times": times, "score": best, "start": stored[n], "start_score": start_score}
        say(f"{n} steps: {_fmt(stored[n])} score {start_score:.4g} -> {_fmt(times)} score {best:.4g}")
    return out


def student_training_times(loaded: Any) -> list[float] | None:
    """The times a consistency student was trained at (its checkpoint's distill table and process; None: every time,
    the continuous schedule); ValueError for a progressive-distillation student, whose times are its training grid."""
    from .consistency import training_times
    from .options import ConsistencyOptions, parse_table

    table = ((loaded.config or {}).get("train") or {}).get("distill") or {}
    if not table:
        raise ValueError("this checkpoint is not a distilled student (its config has no distill table)")
    options = parse_table(table)
    if not isinstance(options, ConsistencyOptions):
        raise ValueError("a progressive-distillation student samples at the times it was trained at; they are not tuned")
    return training_times(loaded.process, options)


def _fmt(times: Sequence[float]) -> str:
    return "[" + ", ".join(f"{t:.4g}" for t in times) + "]"


def write_times(checkpoint: str | Path, results: dict[int, dict[str, Any]], how: dict[str, Any]) -> Path:
    """Store the chosen times in a checkpoint's sidecar (extra["student_times"]) and the search under
    extra["student_times_search"] (start and chosen times, scores, and `how`: the score and the noise)."""
    from ..io import atomic_write_text
    from ..train.checkpoint import read_checkpoint, sidecar_path

    path = sidecar_path(checkpoint)
    meta, _ = read_checkpoint(path)  # checked, weights included, before anything is written
    extra = meta.setdefault("extra", {})
    if SAMPLER_KEY not in extra:
        raise ValueError(f"{path} is not a distilled student (no extra.{SAMPLER_KEY})")
    extra[TIMES_KEY] = {**extra.get(TIMES_KEY, {}), **{str(n): r["times"] for n, r in results.items()}}
    search = {str(n): {k: r[k] for k in ("start", "start_score", "times", "score")} for n, r in results.items()}
    extra[SEARCH_KEY] = {**extra.get(SEARCH_KEY, {}), **search, "how": how}
    atomic_write_text(path, json.dumps(meta, indent=1))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewstep.distill.times", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a student checkpoint (its sidecar .json, or its folder)")
    parser.add_argument("--steps", default="2,4", help="comma-separated step counts to tune (>= 2)")
    parser.add_argument("--n", type=int, default=5000, help="held-out noise samples")
    parser.add_argument("--seed", type=int, default=11, help="seed of the held-out noise (not the report's)")
    parser.add_argument("--points", type=int, default=9, help="values tried per interior time and sweep")
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="store the chosen times in the checkpoint")
    args = parser.parse_args(argv)
    from ..sample_model import sample_shape
    from ..shipped import load_model
    from ..tools.bench_learned import digits_fd
    from ..train.checkpoint import CheckpointError

    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
        loaded = load_model(args.checkpoint)
        noise = torch.randn(args.n, *sample_shape(loaded), generator=torch.Generator().manual_seed(args.seed))
        results = tune_student_times(loaded, steps, noise, digits_fd(), seed=args.seed + 1, points=args.points,
                                     sweeps=args.sweeps, log=print)  # fmt: skip
    except (ValueError, CheckpointError) as err:
        parser.error(str(err))
    if args.write:
        how = {"score": "digits FD", "n": args.n, "seed": args.seed, "points": args.points, "sweeps": args.sweeps}
        print(f"wrote {write_times(args.checkpoint, results, how)}")


if __name__ == "__main__":
    main()
