"""`fewstep bench distill`: FD of few-step students beside their teacher at 50 NFE and its best training-free sampler.

Issue 8, item 6. All samples come from the same report noise [n, ...] (standard normal of `seed`); the score is
`fewstep.tools.bench_learned.digits_fd()` (Fréchet distance in the digits classifier's features) or any `fd(samples) ->
float`. Per step count N (1, 2, 4 by default):

- each student at N steps with its stored times and sampler (`fewstep.distill.sample_student`, N NFE; "-" where the
  student stores no times for N), its FD, the ratio to the teacher's FD at `reference_nfe` and whether it meets the
  issue's target (`TARGET_RATIOS`: 2x at 1 step, 1.5x at 2, 1.2x at 4) and beats the training-free result at N NFE;
- the teacher's best training-free result at N NFE: the lower FD of `fewstep.sample(..., solver="auto", nfe=N)`
  (its shipped tuning, else the fallback) and plain DDIM with N steps (at N = 1 DDIM only: auto needs 2 NFE);
- the teacher at `reference_nfe` (50): the lowest FD over `REFERENCE_SOLVERS` with that many steps, default grid.

Each student's training time is its checkpoint's extra["train_seconds"] (written by the distillation objectives
and kept by `fewstep.shipped.export`). Shapes: noise and samples [n, *sample_shape].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling import sample
from .clock import SECONDS_KEY
from .student import sample_student, stored_times

TARGET_RATIOS = {1: 2.0, 2: 1.5, 4: 1.2}  # student FD / teacher FD at 50 NFE, issue 8 targets
REFERENCE_SOLVERS = ("dpmpp_2m", "ipndm", "unipc")
FD = Callable[[torch.Tensor], float]


@dataclass
class Scored:
    """One FD measurement and what produced it."""

    fd: float
    what: str


@dataclass
class StudentResult:
    """A student's FD per step count (missing: no stored times there) and its training time (NaN: not recorded)."""

    label: str
    fds: dict[int, Scored] = field(default_factory=dict)
    train_seconds: float = math.nan


@dataclass
class DistillBench:
    """The teacher's reference and training-free FDs and every student's, on one report noise."""

    teacher: str
    steps: list[int]
    samples: int
    seed: int
    reference_nfe: int
    reference: Scored
    training_free: dict[int, Scored]
    students: list[StudentResult]
    parts: int = 1  # FD is the mean over this many noise sets of `samples` each


def mean_fd(fd: FD, parts: int) -> FD:
    """The mean of `fd` over `parts` equal consecutive slices of the samples: FD of n samples averaged over several
    noise sets (FD at n = 1000 moves by a factor of 3 between noise seeds on the digits, mostly through the class mix)."""
    if parts == 1:
        return fd

    def score(x: torch.Tensor) -> float:
        return sum(fd(chunk) for chunk in x.chunk(parts)) / parts

    return score


def _score(fd: FD, x: torch.Tensor) -> float:
    return fd(x) if bool(torch.isfinite(x).all()) else math.inf


@torch.no_grad()
def teacher_reference(loaded: Any, noise: torch.Tensor, fd: FD, nfe: int = 50, solvers: Sequence[str] = REFERENCE_SOLVERS):
    """The teacher's lowest FD over `solvers` with `nfe` steps on its default grid (final denoising off, so each
    uses exactly `nfe` evaluations for these single-evaluation-per-step solvers): Scored."""
    best = Scored(math.inf, "")
    for solver in solvers:
        x = sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, solver=solver, steps=nfe,
                   denoise_to_zero=False)  # fmt: skip
        score = _score(fd, x)
        if score < best.fd:
            best = Scored(score, f"{solver}, {x.nfe} NFE")
    return best


@torch.no_grad()
def training_free(loaded: Any, noise: torch.Tensor, fd: FD, nfe: int) -> Scored:
    """The teacher's best training-free FD at `nfe` evaluations: solver="auto" (nfe >= 2) or DDIM with nfe steps."""
    kwargs = dict(process=loaded.process, prediction=loaded.prediction)
    ddim = sample(loaded.model, noise, solver="ddim", steps=nfe, denoise_to_zero=False, **kwargs)
    best = Scored(_score(fd, ddim), f"ddim {nfe} steps")
    if nfe >= 2:
        auto = sample(loaded.model, noise, solver="auto", nfe=nfe, **kwargs)
        c = auto.choice
        score = _score(fd, auto)
        if score < best.fd:
            best = Scored(score, f"auto: {c['solver']} / {c['schedule']} ({c['source']})")
    return best


@torch.no_grad()
def score_student(label: str, loaded: Any, noise: torch.Tensor, fd: FD, steps: Sequence[int], seed: int) -> StudentResult:
    """A student's FD at each of `steps` it stores times for (its own sampler; fresh noise of `seed` + 1 where it is
    stochastic), and its recorded training time."""
    extra = loaded.meta.get("extra") or {}
    seconds = extra.get(SECONDS_KEY)
    result = StudentResult(label, train_seconds=float(seconds) if isinstance(seconds, (int, float)) else math.nan)
    times = stored_times(loaded.meta)
    for n in steps:
        if n in times:
            x = sample_student(loaded, noise, n, generator=torch.Generator(noise.device).manual_seed(seed + 1))
            result.fds[n] = Scored(_score(fd, x), f"{x.nfe} NFE")
    return result


def bench_distill(
    students: Sequence[tuple[str, Any]],
    teacher: tuple[str, Any],
    noise: torch.Tensor,
    fd: FD,
    *,
    steps: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    reference_nfe: int = 50,
    parts: int = 1,
    log: Callable[[str], None] | None = None,
) -> DistillBench:
    """Score (label, LoadedCheckpoint) students and the teacher (name, LoadedCheckpoint) on `noise` with `fd`; with
    `parts` > 1 every score is the mean FD over that many equal slices of `noise` (`mean_fd`)."""
    say = log or (lambda text: None)
    if parts < 1 or len(noise) % parts:
        raise ValueError(f"parts={parts} must be >= 1 and divide the {len(noise)} noise samples")
    fd = mean_fd(fd, parts)
    name, loaded = teacher
    steps = sorted({int(n) for n in steps})
    reference = teacher_reference(loaded, noise, fd, reference_nfe)
    say(f"teacher {name} at {reference_nfe} NFE: FD {reference.fd:.4g} ({reference.what})")
    free = {}
    for n in steps:
        free[n] = training_free(loaded, noise, fd, n)
        say(f"teacher {name} training-free at {n} NFE: FD {free[n].fd:.4g} ({free[n].what})")
    results = []
    for label, student in students:
        results.append(score_student(label, student, noise, fd, steps, seed))
        say(f"student {label}: " + ", ".join(f"{n} steps FD {s.fd:.4g}" for n, s in results[-1].fds.items()))
    return DistillBench(name, steps, len(noise) // parts, seed, reference_nfe, reference, free, results, parts)


# Report ---------------------------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    return "-" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.3g}"


def _minutes(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds / 60:.1f} min"


def student_cell(bench: DistillBench, n: int, scored: Scored | None) -> str:
    """'FD (ratio to the teacher at 50 NFE, target met or missed; beats training-free or not)', or '-'."""
    if scored is None:
        return "-"
    ratio = scored.fd / bench.reference.fd if bench.reference.fd > 0 else math.inf
    marks = []
    if n in TARGET_RATIOS:
        marks.append(f"≤{TARGET_RATIOS[n]:g}x {'met' if ratio <= TARGET_RATIOS[n] else 'MISSED'}")
    marks.append("beats training-free" if scored.fd < bench.training_free[n].fd else "NOT below training-free")
    return f"{_num(scored.fd)} ({ratio:.2f}x; {', '.join(marks)})"


def markdown(bench: DistillBench) -> str:
    """The table: one row per student and two for the teacher, one column per step count, plus training time."""
    head = [f"{n} step{'s' if n > 1 else ''} ({n} NFE)" for n in bench.steps]
    ref = bench.reference
    sets = f", mean over {bench.parts} noise sets" if bench.parts > 1 else ""
    lines = [
        f"FD (digits classifier features; lower is better) of {bench.samples} samples{sets} from noise seed {bench.seed}. "
        f"Teacher `{bench.teacher}` at {bench.reference_nfe} NFE: **{_num(ref.fd)}** ({ref.what}). A student cell: FD "
        f"(ratio to the teacher at {bench.reference_nfe} NFE; target at that step count; whether it beats the "
        "teacher's best training-free sampler at the same NFE).\n",
        "| model | train time | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(bench.steps),
        f"| teacher `{bench.teacher}`, {bench.reference_nfe} NFE | - | " + " | ".join(_num(ref.fd) for _ in bench.steps) + " |",
        f"| teacher `{bench.teacher}`, best training-free at equal NFE | - | "
        + " | ".join(f"{_num(bench.training_free[n].fd)} ({bench.training_free[n].what})" for n in bench.steps)
        + " |",
    ]
    for s in bench.students:
        cells = [student_cell(bench, n, s.fds.get(n)) for n in bench.steps]
        lines.append(f"| {s.label} | {_minutes(s.train_seconds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
