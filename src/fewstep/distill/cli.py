"""`fewstep distill`: distil a teacher into a few-step student on the Trainer (progress bar, checkpoints, figures,
`--resume auto`, torchrun multi-process as `fewstep train`).

    fewstep distill --method cd --teacher digits_flow --steps 4000 --out runs/cd
    fewstep distill --method pd --teacher digits_cosine_v --set distill.start_steps=16 --set distill.steps_per_round=500
    torchrun --standalone --nproc_per_node 2 -m fewstep.cli distill --method ect --teacher digits_flow --config ect.toml
    fewstep distill --config configs/distill_dmd_flow.toml      # DMD from the CD student; FD probe in metrics.json

The config (TOML file, flags, `--set key=value`) is a training config with a `[distill]` table; process, network,
prediction and data default to the teacher's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..train.cli import SEED_HELP, start_trainer, usage_errors, writable_dir
from ..train.config import ConfigError, apply_overrides

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

FLAG_OF_KEY = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "out_dir": "--out", "seed": "--seed",
               "progress": "--progress", "distill.method": "--method", "distill.teacher": "--teacher"}  # fmt: skip


def _read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror or err}", param_hint="--config") from err
    except tomllib.TOMLDecodeError as err:
        raise typer.BadParameter(f"{path} is not a valid TOML file: {err}", param_hint="--config") from err


def build_config(config: Path | None, flags: dict[str, Any], overrides: list[str], method: str | None, teacher: str | None):
    """The TrainConfig of a distillation run from the file, the flags and the overrides (flags win over the file)."""
    from .config import distill_config

    try:
        values = apply_overrides(_read_toml(config), [f"{k}={_toml(v)}" for k, v in flags.items() if v is not None] + overrides)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--config/--set") from err
    table = dict(values.pop("distill", {}) or {})
    method, teacher = method or table.get("method"), teacher or table.get("teacher")
    table = {k: v for k, v in table.items() if k not in ("method", "teacher")}
    if method is None:
        raise typer.BadParameter("give the method: --method cd, ct, ect, pd, dmd, sid or reflow", param_hint="--method")
    if teacher is None:
        raise typer.BadParameter("give the teacher: a shipped model name or a checkpoint path", param_hint="--teacher")
    try:
        return distill_config(method, teacher, distill=table, **values)
    except ConfigError as err:
        hint = FLAG_OF_KEY.get(err.key, "--config/--set")
        raise typer.BadParameter(str(err), param_hint=hint) from err
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--teacher" if "teacher" in str(err) else "--config/--set") from err


def distill_command(
    method: Annotated[str | None, typer.Option(help="Distillation method: cd, ct, ect, pd, dmd, sid, reflow.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher: a shipped model name or a checkpoint path.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file: training keys and a [distill] table.")] = None,
    steps: Annotated[int | None, typer.Option(help="Total number of optimisation steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size (split over processes).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output directory (checkpoint.json, samples, loss.png).")] = None,
    seed: Annotated[int | None, typer.Option(help=SEED_HELP)] = None,
    resume: Annotated[str | None, typer.Option(help="Continue from a checkpoint: a path, or 'auto'.")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override any config key: key=value (distill.target_decay=0.9).")
    ] = None,
) -> None:
    """Distil a teacher into a few-step student (consistency distillation/training, ECT, progressive distillation,
    distribution matching DMD/SiD) or retrain it on its own coupling (reflow)."""
    from ..train.distributed import finish_distributed
    from ..train.trainer import NonFiniteLossError

    flags = {"steps": steps, "batch_size": batch_size, "lr": lr, "out_dir": out, "seed": seed, "progress": progress}
    cfg = build_config(config, flags, list(set_ or []), method, teacher)
    trainer, ctx = start_trainer(cfg, out, resume, "--teacher/--config/--set")
    try:
        trainer.train()
    except NonFiniteLossError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    if ctx.is_main:
        loss = trainer.loss_history[-1] if trainer.loss_history else float("nan")
        rate = trainer.iterations_per_second
        typer.echo(f"done: step {trainer.step}, loss {loss:.5g}, {rate:.1f} it/s, student {trainer.checkpoint_path}")
    finish_distributed(ctx)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def bench_distill_command(
    students: Annotated[
        str, typer.Option(help="Comma-separated students: shipped names or checkpoint paths, each optionally LABEL=PATH.")
    ],  # fmt: skip
    teacher: Annotated[str, typer.Option(help="The teacher: a shipped model name or a checkpoint path.")] = "digits_flow",
    steps: Annotated[str, typer.Option(help="Comma-separated student step counts (= NFE).")] = "1,2,4",
    n: Annotated[int, typer.Option(min=2, max=100_000, help="Samples per noise set (>= 1000 for reportable FD).")] = 1000,
    repeats: Annotated[int, typer.Option(min=1, max=100, help="Noise sets; FD is their mean (FD at 1000 is noisy).")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the report noise.")] = 2,
    reference_nfe: Annotated[int, typer.Option(min=2, max=10_000, help="NFE of the teacher's reference.")] = 50,
    curve: Annotated[
        str, typer.Option(help="Comma-separated NFEs of the teacher's training-free curve in the figure ('' for none).")
    ] = "1,2,3,4,6,8,12,16,24,32,50",  # fmt: skip
    curve_repeats: Annotated[
        int | None, typer.Option(min=1, max=100, help="Noise sets per curve point beyond --steps (default: --repeats).")
    ] = None,  # fmt: skip
    out: Annotated[Path, typer.Option(help="Folder for distill.md and distill_fd_nfe.png.")] = Path("out/bench"),
) -> None:
    """FD of students at 1/2/4 steps beside the teacher at 50 NFE and its best training-free sampler at equal NFE;
    the figure distill_fd_nfe.png: FD vs NFE of every student and the teacher's training-free curve."""
    import time

    import torch

    from ..cli import console
    from ..io import atomic_write_text
    from ..sample_model import sample_shape as _sample_shape
    from ..shipped import load_model
    from ..tools.bench_learned import digits_fd
    from ..train.cli import parse_ints
    from .bench import bench_distill, markdown, plot_fd_vs_nfe

    counts = parse_ints(steps, "--steps")
    curve_nfes = parse_ints(curve, "--curve") if curve.strip() else []
    curve_repeats = repeats if curve_repeats is None else curve_repeats
    if curve_repeats > repeats:
        raise typer.BadParameter(f"--curve-repeats {curve_repeats} must be <= --repeats {repeats}", param_hint="--curve-repeats")
    specs = [s.strip() for s in students.split(",") if s.strip()]
    if not specs:
        raise typer.BadParameter("give at least one student", param_hint="--students")
    writable_dir(out, "--out")
    start = time.perf_counter()
    with usage_errors("--teacher"):
        loaded_teacher = load_model(teacher)
        shape = _sample_shape(loaded_teacher)
    loaded = []
    for spec in specs:
        label, _, path = spec.rpartition("=")
        with usage_errors("--students"):
            loaded.append((label or path, load_model(path)))
    noise = torch.randn(n * repeats, *shape, generator=torch.Generator().manual_seed(seed))
    with usage_errors(options={"steps": "--steps", "nfe": "--steps"}):
        result = bench_distill(loaded, (teacher, loaded_teacher), noise, digits_fd(), steps=counts, seed=seed,
                               reference_nfe=reference_nfe, parts=repeats, curve_nfes=curve_nfes,
                               curve_parts=curve_repeats, log=console.print)  # fmt: skip
    command = (f"fewstep bench distill --students {students} --teacher {teacher} --steps {steps} --n {n} "
               f"--repeats {repeats} --seed {seed} --curve '{curve}' --curve-repeats {curve_repeats}")  # fmt: skip
    figure = plot_fd_vs_nfe(result, out / "distill_fd_nfe.png")
    text = markdown(result) + f"\nFigure: {figure.name} (FD vs NFE).\n\n`{command}`: {time.perf_counter() - start:.0f} s\n"
    atomic_write_text(out / "distill.md", text)
    console.print(text)
    console.print(f"wrote {out / 'distill.md'}, {figure}")
