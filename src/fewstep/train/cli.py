"""`fewstep train` and `fewstep bench train`: the command-line front ends of the Trainer and its benchmark, and the
argument checks every `fewstep` command shares (a user mistake ends in one line naming the option, exit code 2).

Single process:  fewstep train --config run.toml --steps 5000 --set net.width=128
Two processes:   torchrun --standalone --nproc_per_node 2 -m fewstep.cli train --config run.toml
Resume:          fewstep train --config run.toml --resume auto   (or --resume path/to/checkpoint.json)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ..parameterization import ModelError
from .checkpoint import CheckpointError
from .config import MAX_SEED, ConfigError, load_config

# OSError: a file the user named cannot be read or written; ImportError: an optional dependency is missing
LIBRARY_ERRORS = (ValueError, TypeError, CheckpointError, ModelError, OSError, ImportError)
SEED_HELP = f"Random seed (0 to {MAX_SEED})."


# Argument checks shared by the commands -----------------------------------------------------------------------------


@contextmanager
def usage_errors(option: str | None = None, *, options: dict[str, str] | None = None) -> Iterator[None]:
    """Turn the library's errors for bad input (LIBRARY_ERRORS) into a usage error (exit 2, no traceback), naming
    `option` if given, else the command-line options whose library parameters the message names (`options` maps a
    library parameter to its option, e.g. {"schedule": "--schedule", "t_start": "--process"})."""
    try:
        yield
    except LIBRARY_ERRORS as err:
        message = str(err)
        hint = option or _options_named(message, options or {})
        raise typer.BadParameter(message, param_hint=hint) from err


def _options_named(message: str, options: dict[str, str]) -> list[str] | None:
    """The options (in `options`' order, without repeats) whose library parameter names appear in `message`."""
    named = [opt for name, opt in options.items() if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message)]
    return list(dict.fromkeys(named)) or None


def choice(value: str, allowed: Sequence[str], option: str, name: str | None = None) -> str:
    """`value` if it is one of `allowed`, else a usage error naming `option` and the allowed values (the message
    says `name`=value like the library's, e.g. "solver='x' is not known"; default name: the option without dashes)."""
    if value not in allowed:
        name = name or option.lstrip("-")
        raise typer.BadParameter(f"{name}={value!r} is not known; allowed values: {', '.join(allowed)}", param_hint=option)
    return value


def _items(text: str, option: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise typer.BadParameter(f"expected a comma-separated list, got {text!r}", param_hint=option)
    return items


def parse_names(text: str, allowed: Sequence[str], option: str, name: str) -> list[str]:
    """The names of a comma-separated option, each one of `allowed` (else a usage error naming `option`; `name`: what
    one item is, e.g. "solver")."""
    return [choice(item, allowed, option, name) for item in _items(text, option)]


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    """The integers >= minimum of a comma-separated option (else a usage error naming `option`)."""
    values = []
    for item in _items(text, option):
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise typer.BadParameter(f"{item!r} is not an integer >= {minimum} (expected e.g. 5,10,20)", param_hint=option)
        values.append(value)
    return values


def writable_dir(path: Path, option: str) -> Path:
    """Create the folder `path` (with its parents) if needed; a usage error naming `option` if it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise typer.BadParameter(f"cannot create the folder {path}: {err.strerror or err}", param_hint=option) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"the folder {path} is not writable", param_hint=option)
    return path


def writable_file(path: Path, option: str) -> Path:
    """`path` if its folder can be created and written and it is not a folder itself (else a usage error)."""
    writable_dir(path.parent, option)
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    return path


# fewstep train ------------------------------------------------------------------------------------------------------

FLAG_OF_KEY = {"data": "--data", "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "prediction": "--prediction",
               "process": "--process", "out_dir": "--out", "seed": "--seed", "bf16": "--bf16", "threads": "--threads",
               "progress": "--progress"}  # fmt: skip


def start_trainer(cfg, out: Path | None, resume: str | None, config_hint: str):
    """The Trainer of `cfg` in this process's distributed context, resumed when asked, its out_dir checked writable;
    returns (trainer, context). Errors are one-line usage errors naming `config_hint`, --resume or --out."""
    from .distributed import init_distributed
    from .trainer import Trainer

    ctx = init_distributed()
    with usage_errors(config_hint):  # what the config check cannot see: the net and data_options tables, the teacher
        trainer = Trainer(cfg, dist=ctx)
    if resume is not None:
        with usage_errors("--resume"):
            start = trainer.resume(None if resume == "auto" else resume)
    if ctx.is_main:
        writable_dir(Path(cfg.out_dir), "--out" if out is not None else "out_dir")
        if resume is not None:
            typer.echo(f"resumed from step {start}")
    return trainer, ctx


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
    seed: Annotated[int | None, typer.Option(help=SEED_HELP)] = None,
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
    from .distributed import finish_distributed

    flags = {"data": data, "steps": steps, "batch_size": batch_size, "lr": lr, "prediction": prediction, "out_dir": out,
             "seed": seed, "bf16": bf16, "threads": threads, "progress": progress}  # fmt: skip
    given = {key for key, value in flags.items() if value is not None} | ({"process"} if process is not None else set())
    overrides = [f"{k}={_toml(v)}" for k, v in flags.items() if v is not None]
    if process is not None:
        overrides.append(f"process={{type = {_toml(process)}}}")
    try:
        cfg = load_config(config, overrides + list(set_ or []))
    except OSError as err:
        raise typer.BadParameter(f"cannot read {config}: {err.strerror or err}", param_hint="--config") from err
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint=FLAG_OF_KEY[err.key] if err.key in given else "--config/--set") from err
    except ValueError as err:  # the TOML file or an override is malformed
        raise typer.BadParameter(str(err), param_hint="--config/--set") from err
    trainer, ctx = start_trainer(cfg, out, resume, "--config/--set")
    trainer.train()
    if ctx.is_main:
        rate = trainer.iterations_per_second
        loss = trainer.loss_history[-1] if trainer.loss_history else float("nan")
        typer.echo(f"done: step {trainer.step}, loss {loss:.5g}, {rate:.1f} it/s, checkpoint {trainer.checkpoint_path}")
    finish_distributed(ctx)


def bench_train_command(
    data: Annotated[str, typer.Option(help="Data set of the benchmark (its default network is used).")] = "digits",
    steps: Annotated[int, typer.Option(min=1, help="Timed steps (after 10 warm-up steps).")] = 100,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 128,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast in both loops.")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch.set_num_threads.")] = None,
) -> None:
    """Trainer throughput (it/s) against a bare PyTorch loop on the same model and batch."""
    from rich.console import Console
    from rich.table import Table

    from ..data import DATASETS
    from .bench import benchmark_training

    choice(data, DATASETS, "--data")
    with usage_errors("--data"):
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
