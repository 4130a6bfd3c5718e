"""The `fewstep` command line: demo, sample, solvers, bench (and the commands other modules add)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="fewstep: few-step diffusion sampling, training and distillation.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: accuracy against exact answers, solver overhead.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()


@app.command("solvers")
def solvers_command() -> None:
    """List the solvers with their order, kind and options."""
    from .solvers import solver_specs

    table = Table("solver", "order", "kind", "options", "what")
    for spec in solver_specs().values():
        kind = "SDE" if spec.stochastic else "ODE"
        table.add_row(spec.name, str(spec.order), kind, ", ".join(spec.options) or "-", spec.summary)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
