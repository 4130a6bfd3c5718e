"""`fewstep train` and `fewstep bench train`: the command-line front ends of the Trainer and its benchmark.

Single process:  fewstep train --config run.toml --steps 5000 --set net.width=128
Two processes:   torchrun --standalone --nproc_per_node 2 -m fewstep.cli train --config run.toml
Resume:          fewstep train --config run.toml --resume auto   (or --resume path/to/checkpoint.json)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .config import load_config


def train_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with the training configuration.")] = None,
    data: Annotated[str | None, typer.Option(help="Data set: ring, moons, circles, swiss_roll, digits, mnist, folder.")] = None,
    steps: Annotated[int | None, typer.Option(help="Total number of optimisation steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size (split over processes).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    prediction: Annotated[str | None, typer.Option(help="What the network predicts: eps, x0, v, velocity.")] = None,
    process: Annotated[
        str | None, typer.Option(help="Process type: discrete_vp, vp, ve, edm, rectified_flow (default options).")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output directory (checkpoint.json, samples, loss.png).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast for the forward pass.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch.set_num_threads for this process.")] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue from a checkpoint: a path, or 'auto' for <out>/checkpoint.json.")
    ] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override any config key: key=value (TOML value; net.width=128).")
    ] = None,
) -> None:
    """Train a diffusion / flow model (configuration from --config, flags override it)."""
    from .checkpoint import CheckpointError
    from .distributed import finish_distributed, init_distributed
    from .trainer import Trainer

    flags = {
        "data": data,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "prediction": prediction,
        "out_dir": out,
        "seed": seed,
        "bf16": bf16,
        "threads": threads,
        "progress": progress,
    }
    overrides = [f"{k}={_toml(v)}" for k, v in flags.items() if v is not None]
    if process is not None:
        overrides.append(f"process={{type = {_toml(process)}}}")
    try:
        cfg = load_config(config, overrides + list(set_ or []))
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err)) from err
    ctx = init_distributed()
    try:
        trainer = Trainer(cfg, dist=ctx)
        if resume is not None:
            start = trainer.resume(None if resume == "auto" else resume)
            if ctx.is_main:
                typer.echo(f"resumed from step {start}")
    except (ValueError, ImportError, CheckpointError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    trainer.train()
    if ctx.is_main:
        rate = trainer.iterations_per_second
        loss = trainer.loss_history[-1]
        typer.echo(f"done: step {trainer.step}, loss {loss:.5g}, {rate:.1f} it/s, checkpoint {trainer.checkpoint_path}")
    finish_distributed(ctx)


def bench_train_command(
    data: Annotated[str, typer.Option(help="Data set of the benchmark (its default network is used).")] = "digits",
    steps: Annotated[int, typer.Option(help="Timed steps (after 10 warm-up steps).")] = 100,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast in both loops.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch.set_num_threads.")] = None,
) -> None:
    """Trainer throughput (it/s) against a bare PyTorch loop on the same model and batch."""
    from rich.console import Console
    from rich.table import Table

    from .bench import benchmark_training

    result = benchmark_training(data=data, steps=steps, batch_size=batch_size, bf16=bf16, threads=threads)
    table = Table("loop", "it/s", "ms/step")
    for name in ("bare", "trainer"):
        table.add_row(name, f"{result[name]:.1f}", f"{1000 / result[name]:.2f}")
    Console().print(table)
    Console().print(f"trainer / bare = {result['trainer'] / result['bare']:.3f} ({result['parameters']:,} parameters)")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
