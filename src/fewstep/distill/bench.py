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
and kept by `fewstep.shipped.export`). The figure (`plot_fd_vs_nfe`, issue 11 item 4): FD vs NFE (log-log) of every
student at its step counts beside the teacher's training-free curve, the table's numbers at the step counts plus
`curve_nfes` more NFEs (same `training_free` rule, on the first `curve_parts` noise sets, by default all: fewer sets
are cheaper and noisier: FD at 1000 samples moves a lot between sets, see `mean_fd`) and its reference at `reference_nfe`.
Shapes: noise and samples [n, *sample_shape].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import save_figure
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
    curve: dict[int, Scored] = field(default_factory=dict)  # the teacher's training-free FD at NFEs beyond `steps`
    curve_parts: int = 1  # ... as the mean over this many noise sets


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
    curve_nfes: Sequence[int] = (),
    curve_parts: int | None = None,
    log: Callable[[str], None] | None = None,
) -> DistillBench:
    """Score (label, LoadedCheckpoint) students and the teacher (name, LoadedCheckpoint) on `noise` with `fd`; with
    `parts` > 1 every score is the mean FD over that many equal slices of `noise` (`mean_fd`). `curve_nfes`: further
    NFEs of the teacher's training-free curve (those in `steps` are the table's), each scored on the first
    `curve_parts` slices (default: all `parts`)."""
    say = log or (lambda text: None)
    if parts < 1 or len(noise) % parts:
        raise ValueError(f"parts={parts} must be >= 1 and divide the {len(noise)} noise samples")
    curve_parts = parts if curve_parts is None else curve_parts
    if not 1 <= curve_parts <= parts:
        raise ValueError(f"curve_parts={curve_parts} must be in 1..parts={parts}")
    if any(int(n) < 1 for n in curve_nfes):
        raise ValueError(f"curve_nfes={list(curve_nfes)} must be NFEs >= 1")
    raw, fd = fd, mean_fd(fd, parts)
    name, loaded = teacher
    steps = sorted({int(n) for n in steps})
    reference = teacher_reference(loaded, noise, fd, reference_nfe)
    say(f"teacher {name} at {reference_nfe} NFE: FD {reference.fd:.4g} ({reference.what})")
    free = {}
    for n in steps:
        free[n] = training_free(loaded, noise, fd, n)
        say(f"teacher {name} training-free at {n} NFE: FD {free[n].fd:.4g} ({free[n].what})")
    curve, part = {}, len(noise) // parts
    for n in sorted({int(n) for n in curve_nfes} - set(steps)):
        curve[n] = training_free(loaded, noise[: part * curve_parts], mean_fd(raw, curve_parts), n)
        say(f"teacher {name} training-free at {n} NFE (curve): FD {curve[n].fd:.4g} ({curve[n].what})")
    results = []
    for label, student in students:
        results.append(score_student(label, student, noise, fd, steps, seed))
        say(f"student {label}: " + ", ".join(f"{n} steps FD {s.fd:.4g}" for n, s in results[-1].fds.items()))
    return DistillBench(name, steps, part, seed, reference_nfe, reference, free, results, parts, curve, curve_parts)


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
    if bench.curve:
        free = {**bench.curve, **bench.training_free}
        lines.append(f"\nThe teacher's training-free curve (FD at NFE; beyond the step counts over {bench.curve_parts} noise "
                     "set(s)): " + ", ".join(f"{n}: {_num(free[n].fd)}" for n in sorted(free)))  # fmt: skip
    return "\n".join(lines) + "\n"


# Figure ---------------------------------------------------------------------------------------------------------------

TEACHER_SERIES = "teacher, best training-free"


def fd_nfe_series(bench: DistillBench) -> dict[str, tuple[list[int], list[float]]]:
    """The figure's data: {series label: (NFEs ascending, FDs)}: the teacher's training-free curve (`TEACHER_SERIES`:
    the table's step counts and the extra curve NFEs) and one series per student label (its scored step counts)."""
    free = {**bench.curve, **bench.training_free}
    out = {TEACHER_SERIES: (sorted(free), [free[n].fd for n in sorted(free)])}
    for s in bench.students:
        out[s.label] = (sorted(s.fds), [s.fds[n].fd for n in sorted(s.fds)])
    return out


def plot_fd_vs_nfe(bench: DistillBench, path: str | Path) -> Path:
    """FD vs NFE (log-log) of `fd_nfe_series`, the teacher's reference at `reference_nfe` as a dashed line; written
    atomically to `path` (non-finite FDs are left out of the lines)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = iter("osD^v<>ph*")
    series = fd_nfe_series(bench)
    for label, (nfes, fds) in series.items():
        pts = [(n, v) for n, v in zip(nfes, fds, strict=True) if math.isfinite(v) and v > 0]
        if not pts:
            continue
        teacher = label == TEACHER_SERIES
        ax.plot(*zip(*pts, strict=True), "k-" if teacher else "-", marker="." if teacher else next(markers, "o"),
                lw=2 if teacher else 1.5, ms=6 if teacher else 8, label=label, zorder=2 if teacher else 3)  # fmt: skip
    ref = bench.reference
    if math.isfinite(ref.fd) and ref.fd > 0:
        ax.axhline(ref.fd, color="0.4", ls="--", lw=1, label=f"teacher @ {bench.reference_nfe} NFE ({ref.what})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({n for nfes, _ in series.values() for n in nfes} | {bench.reference_nfe})
    ax.set_xticks(ticks, [str(n) for n in ticks], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    sets = f" x {bench.parts} noise sets (curve beyond the table: {bench.curve_parts})" if bench.parts > 1 else ""
    ax.set(xlabel="NFE", ylabel="FD (digits features, lower is better)",
           title=f"{bench.teacher}: FD of {bench.samples} samples{sets}")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
