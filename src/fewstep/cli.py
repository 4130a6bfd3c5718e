"""The `fewstep` command line: demo, sample, solvers, bench (and the commands other modules add)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .io import atomic_write_text

app = typer.Typer(help="fewstep: few-step diffusion sampling, training and distillation.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: accuracy against exact answers, solver overhead.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()

DEMO_SOLVERS = ("ddim", "euler", "heun", "dpmpp_2m", "deis", "ipndm")
DIGITS_SOLVERS = ("ddim", "dpmpp_2m", "unipc", "deis", "ipndm")
DEMO_NFES = (5, 10, 20)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _process(name: str):
    from .train.process_config import build_process

    try:
        return build_process(name)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--process") from err


@app.command("solvers")
def solvers_command() -> None:
    """List the solvers with their order, kind and options."""
    from .solvers import solver_specs

    table = Table("solver", "order", "kind", "options", "what")
    for spec in solver_specs().values():
        kind = "SDE" if spec.stochastic else "ODE"
        table.add_row(spec.name, str(spec.order), kind, ", ".join(spec.options) or "-", spec.summary)
    console.print(table)


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("out/demo"), help="Folder for the figures and the tables."),
    samples: int = typer.Option(512, help="Samples per solver."),
    seed: int = typer.Option(0),
) -> None:
    """The main job: the shipped digits model, then the exact mixture, sampled by several solvers at NFE 5/10/20."""
    from .demo import gmm_demo
    from .digits_demo import digits_demo

    console.rule("1. shipped digits model (DiscreteVP, eps): Fréchet distance vs NFE, quadratic grid")
    digits = digits_demo(out, nfes=DEMO_NFES, solvers=DIGITS_SOLVERS, n=samples, seed=seed, schedule="quadratic")
    atomic_write_text(out / "demo_digits.md", digits)
    console.print(digits)
    console.print(f"sample grids: {out}/digits_vp_<solver>_nfe<N>.png")
    console.rule("2. exact Gaussian mixture (ring2d): error against the exact ODE solution")
    _, figure = gmm_demo(out, solvers=DEMO_SOLVERS, nfes=DEMO_NFES, samples=samples, seed=seed, console=console)
    console.print(f"\nwrote {out / 'demo_digits.md'}, {figure} and {out / 'demo_gmm.md'}")


@app.command("sample")
def sample_command(
    solver: str = typer.Option("dpmpp_2m", help="Solver name (see `fewstep solvers`)."),
    steps: int = typer.Option(10, help="Solver steps."),
    schedule: str = typer.Option(None, help="Grid name (default: the process's default)."),
    process: str = typer.Option("discrete_vp", help="discrete_vp, vp, ve, edm or rectified_flow."),
    problem: str = typer.Option("ring2d", help="Exact Gaussian-mixture model: ring2d or mixture16d."),
    n: int = typer.Option(1000, help="Number of samples."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("out/samples.npy"), help="Output .npy (array) or .png (scatter of 2-D samples)."),
) -> None:
    """Sample the exact model of a Gaussian-mixture problem and save the samples."""
    import numpy as np
    import torch

    from . import gmm
    from .sampling import sample

    if out.suffix not in (".npy", ".png"):
        raise typer.BadParameter(f"output must end in .npy or .png, got {out.name}", param_hint="--out")
    proc = _process(process)
    mixture = gmm.problem(problem)
    prediction = "velocity" if process == "rectified_flow" else "eps"
    noise = torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = sample(mixture.model(proc, prediction), noise, process=proc, prediction=prediction, solver=solver, steps=steps,
               schedule=schedule, progress=True)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        from .io import atomic_write

        def save(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, x.numpy())

        atomic_write(out, save)
    else:
        from .demo import scatter_figure

        scatter_figure(
            {f"{solver}, {steps} steps (NFE {x.nfe})": x, "exact": mixture.sample(n, torch.Generator().manual_seed(seed))}, out
        )
    console.print(f"{n} samples, NFE {x.nfe}, wrote {out}")


@bench_app.command("accuracy")
def bench_accuracy_command(
    solvers: str = typer.Option("ddim,euler,heun,dpmpp_2m", help="Comma-separated solver names, or 'all'."),
    schedules: str = typer.Option("time_uniform,logsnr,karras", help="Comma-separated grid names."),
    nfes: str = typer.Option("5,6,8,10,15,20", help="Comma-separated NFE budgets."),
    problems: str = typer.Option("ring2d,mixture16d", help="Comma-separated problems."),
    process: str = typer.Option("discrete_vp", help="discrete_vp, vp, ve, edm or rectified_flow."),
    samples: int = typer.Option(256),
    out: Path = typer.Option(Path("out/bench"), help="Folder for the markdown table and the plot."),
    peers: bool = typer.Option(False, "--peers", help="Compare with diffusers / k-diffusion and searched grids instead."),
    search_iters: int = typer.Option(30, help="Schedule-search iterations per NFE (with --peers)."),
) -> None:
    """Error against the exact ODE solution vs NFE for every solver and grid (markdown table + log-log plot).

    With --peers: fewstep's recommended default, a searched grid and several fewstep solvers beside every installed
    diffusers scheduler and k-diffusion sampler, all on DiscreteVP(linear) against the exact flow map.
    """
    from . import bench
    from .sampling import solvers as all_solvers

    if peers:
        budget = [int(n) for n in _csv(nfes)]
        _bench_peers(_csv(problems), budget, samples, search_iters, out)
        return

    names = [s for s in all_solvers() if not _is_stochastic(s)] if solvers == "all" else _csv(solvers)
    proc = _process(process)
    prediction = "velocity" if process == "rectified_flow" else "eps"
    budget = [int(n) for n in _csv(nfes)]
    rows = bench.accuracy(_csv(problems), proc, prediction, names, _csv(schedules), budget, samples=samples)
    table = bench.accuracy_markdown(rows, budget)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "accuracy.md", table)
    bench.accuracy_plot(rows, out / "accuracy.png")
    console.print(table)
    console.print(f"wrote {out / 'accuracy.md'} and {out / 'accuracy.png'}")


PEER_FEWSTEP_ENTRIES = (("dpmpp_2m", "logsnr"), ("unipc", "logsnr"), ("deis", "logsnr"), ("ipndm", "logsnr"),
                        ("ipndm", "quadratic"), ("heun", "logsnr"), ("ddim", "quadratic"))  # fmt: skip


def _bench_peers(problems: list[str], nfes: list[int], samples: int, search_iters: int, out: Path) -> None:
    from . import bench, peers
    from .processes import DiscreteVP
    from .recommend import recommended

    process = DiscreteVP.linear()

    def pick(nfe):
        kwargs = recommended(nfe, process)
        return (
            kwargs.pop("solver"),
            kwargs.pop("schedule"),
            {k: v for k, v in kwargs.items() if k not in ("steps", "denoise_to_zero")},
        )

    default = peers.Entry("fewstep recommended default", pick)
    entries = [default] + [peers.fixed(solver, grid) for solver, grid in PEER_FEWSTEP_ENTRIES]
    rows = peers.peer_accuracy(problems, nfes, entries, search_solvers=("ipndm", "heun"), samples=samples,
                               search_iters=search_iters)  # fmt: skip
    summary = peers.peer_summary(rows, nfes, default.label)
    table = peers.peer_markdown(rows, nfes)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "peers.md", summary + "\n" + table)
    bench.accuracy_plot(rows, out / "peers.png")
    console.print(summary)
    console.print(table)
    console.print(f"wrote {out / 'peers.md'} and {out / 'peers.png'}")


@bench_app.command("overhead")
def bench_overhead_command(
    solvers: str = typer.Option("ddim,dpmpp_2m", help="Comma-separated solver names."),
    steps: int = typer.Option(50),
    repeats: int = typer.Option(30),
    batch: str = typer.Option("64,1,8,8", help="Batch shape."),
    out: Path = typer.Option(Path("out/bench"), help="Folder for the markdown table."),
) -> None:
    """Per-step solver overhead with a zero-cost model, and the ratio to diffusers' DPMSolverMultistepScheduler."""
    from . import bench

    result = bench.overhead(_csv(solvers), batch_shape=tuple(int(b) for b in _csv(batch)), steps=steps, repeats=repeats)
    table = bench.overhead_markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "overhead.md", table)
    console.print(table)


def _is_stochastic(name: str) -> bool:
    from .solvers import get_solver

    return get_solver(name).stochastic


from .train.cli import bench_train_command, train_command  # noqa: E402

app.command("train")(train_command)
bench_app.command("train")(bench_train_command)

from .evaluate import eval_command  # noqa: E402

app.command("eval")(eval_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
