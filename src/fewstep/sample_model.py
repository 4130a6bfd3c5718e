"""`fewstep sample --model`: any model — a shipped name, a fewstep checkpoint or a local diffusers folder — sampled
with per-sample seeds in batches, written as one .npy / .png or, for many samples, as shards that a rerun resumes.

Sample i of `--seed S` starts from its own noise (`fewstep.sharded`), so the same seed gives the same sample at any
`--batch-size` and in any shard. A diffusers folder (`fewstep.integrations.local`) is loaded from disk only and
wrapped by `fewstep.from_diffusers`; a class-conditional UNet (num_class_embeds) takes `--class-label` and, with the
label it was trained to treat as "no class", classifier-free guidance (`--guidance S --uncond-label L`; 2 NFE per
step, Ho & Salimans 2022). Bad input ends in a usage error naming the option.

Under `torchrun --nproc_per_node P -m fewstep.cli sample --model ... --num-samples N --out x.npy --shard-size K` the P
processes split the shards (shard k on rank k % P; `fewstep.sharded`): the files are those of the one-process run,
and a rerun with any P resumes. RANK / WORLD_SIZE / LOCAL_RANK that do not fit together end in a usage error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer

from .grids import SCHEDULES
from .sharded import Ranks
from .train.cli import choice, parse_ints, usage_errors, writable_file

IMAGE_GRID_MAX = 256  # samples shown in a .png grid


@dataclass(frozen=True)
class ModelRequest:
    """The command line's choices for `fewstep sample --model`."""

    model: str
    solver: str | None
    steps: int
    nfe: int | None
    schedule: str | None
    n: int
    seed: int
    out: Path
    batch_size: int = 256
    shard_size: int = 10_000
    class_label: str | None = None
    uncond_label: int | None = None
    guidance: float | None = None
    scheduler_config: Path | None = None


@dataclass
class Source:
    """A loaded model of any kind: what `fewstep.sample` needs, one sample's shape, its classes (None: unconditional),
    a checkpoint's sidecar `meta` (None for a diffusers folder) and the tuning key of its weights (lazy)."""

    model: Callable[..., torch.Tensor]
    process: Any
    prediction: str
    shape: tuple[int, ...]
    num_classes: int | None = None
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    meta: dict[str, Any] | None = None
    weights: Any = field(default=None, repr=False)  # what `fewstep.tuning.model_key` hashes

    def key(self) -> str:
        from .tuning import model_key

        return model_key(self.weights)


def sample_model(req: ModelRequest, console) -> None:
    """Run `fewstep sample --model` for `req`, printing to `console` (a rich Console)."""
    _check_request(req)
    ranks = _ranks(req)
    source = load_source(req.model, req.scheduler_config)
    labels = class_labels(source, req)
    plan = sampling_plan(source, req)
    nfe_used: list[int] = []
    draw = make_draw(source, plan, labels, req, nfe_used)
    shards = req.out.suffix == ".npy" and req.n > req.shard_size
    from .sharded import check_resume, rank_barrier, sample_range, save_npy, write_shards

    if shards:
        settings = _settings(source, req, plan, labels)
        with usage_errors("--out"):
            check_resume(req.out, n=req.n, shard_size=req.shard_size, settings=settings)
    total = _rank_rows(req, ranks) if shards else req.n
    with _progress(total, ranks.rank > 0) as bar, usage_errors(options=PLAN_OPTIONS), rank_barrier(ranks) as barrier:

        def make(start: int, stop: int) -> torch.Tensor:
            return sample_range(draw, source.shape, req.seed, start, stop, batch_size=req.batch_size, on_batch=bar.update)

        if shards:
            log = bar.write if ranks.world_size == 1 else lambda text: bar.write(f"rank {ranks.rank}: {text}")
            index = write_shards(req.out, make, n=req.n, shard_size=req.shard_size, settings=settings, log=log,
                                 ranks=ranks, barrier=barrier)  # fmt: skip
        else:
            x = make(0, req.n)
    if ranks.rank > 0:
        return
    what = f"{req.n} samples of {req.model}, {_describe(plan, nfe_used, ranks.world_size)}"
    if shards:
        over = f" over {ranks.world_size} processes" if ranks.world_size > 1 else ""
        console.print(f"{what}, wrote {-(-req.n // req.shard_size)} shards{over} and their index {index}")
        return
    if req.out.suffix == ".npy":
        save_npy(req.out, x)
    else:
        from .train.plots import save_samples

        with usage_errors("--out"):
            save_samples(x[:IMAGE_GRID_MAX], req.out, f"{req.model}: {_describe(plan, nfe_used)}")
    console.print(f"{what}, wrote {req.out}")


PLAN_OPTIONS = {"steps": "--steps", "schedule": "--schedule", "solver": "--solver", "nfe": "--nfe",
                "class_labels": "--class-label"}  # fmt: skip


def _check_request(req: ModelRequest) -> None:
    """The options that need no model: solver, --nfe with auto only, schedule, output, guidance options."""
    from .solvers import solver_specs

    if req.solver is not None:
        choice(req.solver, (*solver_specs(), "auto"), "--solver")
    if (req.solver == "auto") != (req.nfe is not None):
        raise typer.BadParameter("--nfe goes with --solver auto (which picks solver, steps and grid for it)", param_hint="--nfe")
    if req.schedule is not None:
        choice(req.schedule, SCHEDULES, "--schedule")
    if req.out.suffix not in (".npy", ".png"):
        raise typer.BadParameter(f"output must end in .npy or .png, got {req.out.name}", param_hint="--out")
    writable_file(req.out, "--out")
    if (req.guidance is None) != (req.uncond_label is None):
        raise typer.BadParameter(
            "--guidance and --uncond-label go together: guidance mixes the conditional output with the output for the "
            "label the model was trained to treat as 'no class'",
            param_hint="--guidance/--uncond-label",
        )


RANK_OPTIONS = {name: name for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT")}


def _ranks(req: ModelRequest) -> Ranks:
    """This process's Ranks (torchrun / accelerate launch); several processes need shards to split."""
    from .sharded import ranks_from_env

    with usage_errors(options=RANK_OPTIONS):
        ranks = ranks_from_env()
    if ranks.world_size > 1 and not (req.out.suffix == ".npy" and req.n > req.shard_size):
        raise typer.BadParameter(
            f"{ranks.world_size} processes (WORLD_SIZE) split the samples by shard: give --out x.npy and a --shard-size "
            f"below --n={req.n} (e.g. {max(1, -(-req.n // (2 * ranks.world_size)))})",
            param_hint="--shard-size",
        )
    return ranks


def _rank_rows(req: ModelRequest, ranks: Ranks) -> int:
    """How many samples this rank's shards hold (its progress bar's total)."""
    count = -(-req.n // req.shard_size)
    return sum(min((k + 1) * req.shard_size, req.n) - k * req.shard_size for k in ranks.shards(count))


def load_source(name: str, scheduler_config: Path | None) -> Source:
    """A shipped model, a fewstep checkpoint or a local diffusers folder (usage errors name --model /
    --scheduler-config)."""
    from .integrations.local import load_diffusers_folder, read_scheduler_config
    from .shipped import SHIPPED_NAMES as SHIPPED_MODELS

    path = Path(name)
    if name not in SHIPPED_MODELS and not path.exists():
        raise typer.BadParameter(
            f"{name!r} does not exist: give a shipped model ({', '.join(SHIPPED_MODELS)}), a fewstep checkpoint or a "
            "local diffusers folder",
            param_hint="--model",
        )
    diffusers_folder = path.is_dir() and name not in SHIPPED_MODELS and not (path / "checkpoint.json").exists()
    if scheduler_config is not None and not diffusers_folder:
        raise typer.BadParameter("--scheduler-config goes with a diffusers model folder", param_hint="--scheduler-config")
    if not diffusers_folder:
        return _checkpoint_source(name)
    config = None
    if scheduler_config is not None:
        from .integrations.conventions import convention

        with usage_errors("--scheduler-config"):
            config = read_scheduler_config(scheduler_config)
            convention(config)  # a config fewstep cannot represent: named here, not as a folder problem
    with usage_errors("--model"):
        loaded = load_diffusers_folder(path, config)
    return Source(loaded.model, loaded.process, loaded.prediction, loaded.shape, loaded.num_classes, loaded.x0_fn,
                  weights=loaded.model.net)  # fmt: skip


def sample_shape(loaded) -> tuple[int, ...]:
    """One sample's shape for a loaded checkpoint: an MLP's dim, else the shape of its training data set."""
    from .data import load_dataset

    net = loaded.config["model"]["net"]
    if net.get("type") == "mlp":
        return (int(net["dim"]),)
    train = loaded.config.get("train", {})
    return tuple(load_dataset(train.get("data", "digits"), **train.get("data_options", {})).shape[1:])


def _checkpoint_source(name: str) -> Source:
    """A shipped model or a fewstep checkpoint (its sidecar's meta drives a student's stored times)."""
    from .shipped import load_model

    with usage_errors("--model"):
        loaded = load_model(name)
        shape = sample_shape(loaded)
    return Source(loaded.model, loaded.process, loaded.prediction, shape, meta=loaded.meta, weights=loaded.model)


def class_labels(source: Source, req: ModelRequest) -> list[int] | None:
    """The labels cycled over the samples (sample i gets labels[i % len]); None for an unconditional model."""
    classes = source.num_classes
    if classes is None:
        for given, option in ((req.class_label, "--class-label"), (req.guidance, "--guidance")):
            if given is not None:
                raise typer.BadParameter(
                    "the model is not class-conditional (its config has no num_class_embeds)", param_hint=option
                )
        return None
    if req.class_label is None:
        raise typer.BadParameter(
            f"the model is class-conditional (num_class_embeds={classes}): pass --class-label L (0 to {classes - 1}) or a "
            "comma-separated list cycled over the samples",
            param_hint="--class-label",
        )
    labels = parse_ints(req.class_label, "--class-label", minimum=0)
    uncond = [] if req.uncond_label is None else [req.uncond_label]
    for option, values in (("--class-label", labels), ("--uncond-label", uncond)):
        bad = [v for v in values if not 0 <= v < classes]
        if bad:
            message = f"label {bad[0]} is out of range: the model has classes 0 to {classes - 1} (num_class_embeds={classes})"
            raise typer.BadParameter(message, param_hint=option)
    return labels


def sampling_plan(source: Source, req: ModelRequest) -> dict[str, Any]:
    """`fewstep.sample` keywords: solver auto with the NFE budget; a student's own sampler and stored times; else
    the named solver (default dpmpp_2m), steps and grid."""
    if req.solver == "auto":
        plan: dict[str, Any] = {"solver": "auto", "nfe": req.nfe}
    elif source.meta is not None:
        from .distill.student import student_plan

        with usage_errors(options=PLAN_OPTIONS):
            plan = student_plan(source.meta, req.steps, req.schedule, req.solver)
    else:
        plan = {"solver": req.solver or "dpmpp_2m", "steps": req.steps, "schedule": req.schedule}
    if source.x0_fn is not None:
        plan["x0_fn"] = source.x0_fn
    return plan


def make_draw(source: Source, plan: dict[str, Any], labels: list[int] | None, req: ModelRequest, nfe_used: list[int]):
    """draw(generators, noise, indices) -> samples of one batch (images clamped to [-1, 1]); records x.nfe (and
    the auto choice) in nfe_used."""
    from .integrations import cfg_kwargs
    from .sampling import sample

    def draw(generators: list[torch.Generator], noise: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        model, kwargs = source.model, {}
        if labels is not None:
            lab = torch.tensor(labels)[indices % len(labels)]
            if req.guidance is not None:
                model = cfg_kwargs(model, {"class_labels": lab}, {"class_labels": torch.tensor([req.uncond_label])}, req.guidance)
            else:
                kwargs["model_kwargs"] = {"class_labels": lab}
        with torch.no_grad():
            x = sample(model, noise, process=source.process, prediction=source.prediction, generator=generators, **plan, **kwargs)
        nfe_used[:] = [x.nfe, getattr(x, "choice", None)]
        return x.clamp(-1, 1) if x.ndim == 4 else x

    return draw


def _settings(source: Source, req: ModelRequest, plan: dict[str, Any], labels: list[int] | None) -> dict[str, Any]:
    """What the shards depend on (a resumed run must match): the model's weights, the plan, seed and conditioning."""
    schedule = plan.get("schedule")
    return {"weights_sha256": source.key(), "solver": plan["solver"], "steps": plan.get("steps"),
            "nfe": plan.get("nfe"), "schedule": schedule.tolist() if isinstance(schedule, torch.Tensor) else schedule,
            "options": {k: v for k, v in plan.items() if k not in ("solver", "steps", "nfe", "schedule", "x0_fn")},
            "seed": req.seed, "shape": list(source.shape), "class_labels": labels, "uncond_label": req.uncond_label,
            "guidance": req.guidance}  # fmt: skip


def _describe(plan: dict[str, Any], nfe_used: list[Any], world_size: int = 1) -> str:
    """What was run, e.g. "dpmpp_2m 3 steps, NFE 4" (the auto choice with its reason)."""
    if not nfe_used:
        return "nothing sampled: every shard was complete" if world_size == 1 else "rank 0 had no shard left to sample"
    nfe, choice_record = nfe_used
    if choice_record is not None:
        c = choice_record
        return f"solver auto: {c['source']} {c['solver']} on {c['schedule']}, {c['steps']} steps ({c['reason']}), NFE {nfe}"
    return f"{plan['solver']} {plan['steps']} steps, NFE {nfe}"


def _progress(total: int, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="sample", leave=False, disable=disable)
