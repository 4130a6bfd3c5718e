"""`fewstep demo`: the exact Gaussian-mixture part (solvers at NFE 5/10/20 against the exact ODE solution)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..accuracy import rms_error
from ..budget import plan_for_nfe
from ..gmm import ring2d
from ..io import atomic_write_text, save_figure
from ..processes import DiscreteVP
from ..sampling import sample


def scatter_figure(panels: dict[str, torch.Tensor], path: Path, columns: int | None = None) -> None:
    """Scatter plots of 2-D samples, one panel per entry, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, x) in zip(axes.flat, panels.items(), strict=False):
        x = x.detach().cpu().double()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal", title=title)
        ax.title.set_fontsize(8)
    fig.tight_layout()
    save_figure(fig, path)


def gmm_demo(
    out: Path,
    *,
    solvers: Sequence[str],
    nfes: Sequence[int],
    samples: int = 512,
    seed: int = 0,
    schedule: str = "logsnr",
    console=None,
) -> tuple[str, Path]:
    """Sample the exact ring2d model (DiscreteVP linear betas, eps prediction) with each solver at each NFE.

    Prints and returns a markdown table of the RMS error against the exact ODE solution and writes a figure with
    the exact samples beside each solver's at every NFE.
    """
    from rich.table import Table

    mixture, process = ring2d(), DiscreteVP.linear()
    model = mixture.model(process, "eps")
    noise = torch.randn(samples, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reference = mixture.ode_solution(noise, process)
    exact = mixture.sample(samples, torch.Generator().manual_seed(seed + 1))
    title = f"ring2d, DiscreteVP(linear), {schedule} grid: RMS error vs exact ODE solution"
    table = Table("solver", *(f"NFE {n}" for n in nfes), title=title)
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    panels: dict[str, torch.Tensor] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(nfes) * len(solvers), desc="demo (exact mixture)", leave=False)
    for nfe in nfes:
        panels[f"exact data (NFE {nfe} row)"] = exact
        for solver in solvers:
            bar.update(1)
            try:
                steps, denoise = plan_for_nfe(solver, nfe, process)
            except ValueError:
                panels[f"{solver}: NFE {nfe} n/a"] = torch.full((1, 2), math.nan)
                continue
            x = sample(model, noise, process=process, solver=solver, steps=steps, denoise_to_zero=denoise, schedule=schedule)
            panels[f"{solver}, NFE {nfe}\nerr {rms_error(x, reference):.3f}"] = x
    bar.close()
    for solver in solvers:
        cells = []
        for nfe in nfes:
            key = next((k for k in panels if k.startswith(f"{solver}, NFE {nfe}\n")), None)
            cells.append(key.split("err ")[1] if key else "-")
        table.add_row(solver, *cells)
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    if console is not None:
        console.print(table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "demo_gmm.png"
    scatter_figure(panels, figure, columns=len(solvers) + 1)
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "demo_gmm.md", text)
    return text, figure
