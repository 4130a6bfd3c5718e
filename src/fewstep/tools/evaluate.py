"""Sample quality of a digits model over a solver x NFE grid, and the `fewstep eval` command.

Fréchet distance in the features of the digits classifier (the FID recipe of Heusel et al., NeurIPS 2017, with
`fewstep.tools.classifier` in place of Inception), classifier confidence and class-histogram entropy (and accuracy for
class-labelled samples), and k-NN precision/recall (Kynkaanniemi et al., NeurIPS 2019). Every (solver, NFE) cell
starts from the same noise, so the cells differ only by the solver. Samples: [n, 1, 8, 8] in [-1, 1].
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..budget import steps_within_nfe
from ..data import digits
from ..grids import SCHEDULES
from ..io import atomic_write_text, save_figure
from ..metrics import frechet_distance, precision_recall
from ..parameterization import Model
from ..processes import Process
from ..recommend import recommended
from ..sampling import sample
from ..shipped import SHIPPED_MODELS, load_model
from ..solvers import get_solver, solver_specs
from ..train.cli import choice, parse_ints, parse_names, usage_errors, writable_dir
from ..train.config import MAX_SEED
from .classifier import class_statistics, features_and_logits

DIGIT_SHAPE = (1, 8, 8)
CHECKPOINT_HELP = f"a `fewstep train` checkpoint (.json) or a shipped model: {', '.join(SHIPPED_MODELS)}"


@dataclass(frozen=True)
class EvalRow:
    """One cell of the grid: the solver, its NFE budget, the steps and NFE actually used, and the metrics."""

    solver: str
    nfe_budget: int
    steps: int
    nfe: int
    fd: float
    confidence: float
    class_entropy: float
    precision: float
    recall: float
    seconds: float


@lru_cache(maxsize=1)
def reference_features() -> torch.Tensor:
    """Classifier features [1797, 64] of all scikit-learn digits, the digits models' training set (FD reference)."""
    return features_and_logits(digits())[0]


def sample_metrics(samples: torch.Tensor, reference: torch.Tensor | None = None, k: int = 3) -> dict[str, float]:
    """FD, confidence, class entropy, precision and recall of digit samples [n, 1, 8, 8] (clamped to [-1, 1])."""
    reference = reference_features() if reference is None else reference
    feats, logits = features_and_logits(samples.clamp(-1, 1))
    precision, recall = precision_recall(reference, feats, k=k)
    return {"fd": frechet_distance(reference, feats), **class_statistics(logits), "precision": precision, "recall": recall}


# rows that choose their own solver and grid per budget: fewstep.sample(solver="auto") (the model's tuning, else the
# fallback) and the fallback fewstep.recommended itself; their steps are whatever the choice runs
CHOOSERS = ("auto", "recommended")


def plan_grid(solvers: Sequence[str], nfes: Sequence[int], process: Process) -> list[tuple[str, int, int]]:
    """(solver, NFE budget, steps) for every cell of the grid (steps 0 for a CHOOSERS row: chosen when sampling);
    raises ValueError for unknown solvers or budgets."""
    for solver in solvers:
        if solver not in CHOOSERS:
            get_solver(solver)
    cells = [(solver, budget, 0 if solver in CHOOSERS else steps_within_nfe(solver, budget, process))
             for solver in solvers for budget in nfes]  # fmt: skip
    if any(solver in CHOOSERS for solver in solvers):
        for budget in nfes:
            recommended(budget, process)  # the choosers' budget check
    return cells


def _cell_kwargs(solver: str, budget: int, steps: int, process: Process, schedule) -> dict:
    if solver == "auto":
        return dict(solver="auto", nfe=budget)
    if solver == "recommended":
        return recommended(budget, process)
    return dict(solver=solver, steps=steps, schedule=schedule)


def evaluate_digits(
    model: Model,
    *,
    process: Process,
    prediction: str,
    solvers: Sequence[str],
    nfes: Sequence[int],
    n: int = 1000,
    seed: int = 0,
    batch: int = 1000,
    schedule=None,
    on_cell: Callable[[EvalRow, torch.Tensor], None] | None = None,
) -> list[EvalRow]:
    """Sample n digits per (solver, NFE budget) from the same noise and measure them; one EvalRow per cell.

    on_cell(row, samples) is called after each cell with its samples [n, 1, 8, 8]. A solver named "auto" runs
    `sample(solver="auto", nfe=budget)` (the model's tuning, else the fallback), "recommended" the fallback
    `fewstep.recommended(budget, process)`; both with their own grids (not `schedule`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 10:
        raise ValueError(f"n must be an integer >= 10, got n={n!r}")
    cells = plan_grid(solvers, nfes, process)  # checks every solver and budget before any sampling
    noise = torch.randn(n, *DIGIT_SHAPE, generator=torch.Generator().manual_seed(seed))
    rows = []
    for solver, budget, steps in cells:
        start = time.perf_counter()
        parts, used = [], 0
        for i, chunk in enumerate(noise.split(batch)):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # stochastic solvers: reproducible noise
            kwargs = _cell_kwargs(solver, budget, steps, process, schedule)
            x = sample(model, chunk, process=process, prediction=prediction, generator=gen, **kwargs)
            parts.append(x)
            used = x.nfe
            steps = x.choice["steps"] if solver == "auto" else kwargs["steps"]
        seconds = time.perf_counter() - start
        samples = torch.cat(parts)
        row = EvalRow(solver, budget, steps, used, seconds=seconds, **sample_metrics(samples))
        rows.append(row)
        if on_cell is not None:
            on_cell(row, samples)
    return rows


COLUMNS = ("solver", "NFE", "steps", "FD", "confidence", "class entropy", "precision", "recall", "seconds")


def _cells(row: EvalRow) -> list[str]:
    nfe = str(row.nfe) if row.nfe == row.nfe_budget else f"{row.nfe} (of {row.nfe_budget})"
    return [row.solver, nfe, str(row.steps), f"{row.fd:.2f}", f"{row.confidence:.3f}", f"{row.class_entropy:.3f}",
            f"{row.precision:.3f}", f"{row.recall:.3f}", f"{row.seconds:.1f}"]  # fmt: skip


def markdown_table(rows: Sequence[EvalRow]) -> str:
    """The rows as a markdown table (FD: Fréchet distance in digits-classifier features; lower is better)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fd_table(rows: Sequence[EvalRow]) -> str:
    """FD as a markdown table with one row per solver and one column per NFE budget."""
    nfes = sorted({r.nfe_budget for r in rows})
    solvers = list(dict.fromkeys(r.solver for r in rows))
    fd = {(r.solver, r.nfe_budget): r for r in rows}
    lines = ["| solver | " + " | ".join(f"NFE {b}" for b in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for s in solvers:
        cells = [
            (f"{fd[s, b].fd:.2f}" + ("" if fd[s, b].nfe == b else f" ({fd[s, b].nfe})")) if (s, b) in fd else "-" for b in nfes
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_fd(rows: Sequence[EvalRow], path: Path, title: str = "") -> None:
    """FD against the NFE actually used, one line per solver, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for solver in dict.fromkeys(r.solver for r in rows):
        pts = sorted((r.nfe, r.fd) for r in rows if r.solver == solver)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=solver)
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FD (digits classifier features)", title=title)
    ticks = sorted({r.nfe_budget for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def eval_command(
    checkpoint: Annotated[str, typer.Argument(help=CHECKPOINT_HELP)],
    solvers: Annotated[str, typer.Option(help="comma-separated solver names (see `fewstep solvers`)")] = "ddim,dpmpp_2m,heun",
    nfe: Annotated[str, typer.Option(help="comma-separated NFE budgets")] = "5,10,20,50",
    n: Annotated[int, typer.Option(min=10, help="samples per cell")] = 1000,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="seed of the shared starting noise")] = 0,
    schedule: Annotated[str | None, typer.Option(help=f"time grid: {', '.join(SCHEDULES)} (default: the process's own)")] = None,
    out: Annotated[Path, typer.Option(help="folder for eval.md, eval.json and fd_vs_nfe.png")] = Path("eval-out"),
) -> None:
    """Sample digits with each solver at each NFE budget and report FD, confidence, precision and recall."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    solver_list = parse_names(solvers, tuple(solver_specs()), "--solvers", "solver")
    nfe_list = parse_ints(nfe, "--nfe")
    if schedule is not None:
        choice(schedule, SCHEDULES, "--schedule")
    with usage_errors("CHECKPOINT"):
        loaded = load_model(checkpoint)
    with usage_errors("--nfe"):
        plan_grid(solver_list, nfe_list, loaded.process)
    writable_dir(out, "--out")
    console = Console()
    table = Table(*COLUMNS, title=f"{checkpoint} ({loaded.prediction} on {loaded.process!r}), n={n}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("eval", total=len(solver_list) * len(nfe_list))

        def advance(row: EvalRow, samples: torch.Tensor) -> None:
            table.add_row(*_cells(row))
            progress.update(task, advance=1, description=f"{row.solver} NFE {row.nfe}: FD {row.fd:.2f}")

        with usage_errors():  # e.g. a grid not defined on this model's process
            rows = evaluate_digits(loaded.model, process=loaded.process, prediction=loaded.prediction, solvers=solver_list,
                                   nfes=nfe_list, n=n, seed=seed, schedule=schedule, on_cell=advance)  # fmt: skip
    console.print(table)
    header = f"# fewstep eval: {checkpoint}\n\n{loaded.prediction} model on {loaded.process!r}; n={n}, seed={seed}.\n\n"
    atomic_write_text(out / "eval.md", header + markdown_table(rows) + "\nFD by NFE budget:\n\n" + fd_table(rows))
    atomic_write_text(out / "eval.json", json.dumps([asdict(r) for r in rows], indent=1))
    plot_fd(rows, out / "fd_vs_nfe.png", title=str(Path(checkpoint).stem))
    console.print(f"wrote {out / 'eval.md'}, {out / 'eval.json'}, {out / 'fd_vs_nfe.png'}")
