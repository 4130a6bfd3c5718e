"""The `fewstep` command line: demo, sample, solvers, bench (and the commands other modules add)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .grids import SCHEDULES
from .io import atomic_write_text
from .train.cli import choice, parse_ints, parse_names, usage_errors, writable_dir, writable_file
from .train.config import MAX_SEED
from .train.process_config import PROCESS_TYPES, build_process

# rich_markup_mode=None: a usage error is printed by click as one line "Error: Invalid value for '--steps': ..."
# (greppable in logs), not wrapped in a box of 80 columns.
app = typer.Typer(help="fewstep: few-step diffusion sampling, training and distillation.", no_args_is_help=True,
                  rich_markup_mode=None)  # fmt: skip
bench_app = typer.Typer(help="Benchmarks: accuracy against exact answers, solver overhead.", no_args_is_help=True,
                        rich_markup_mode=None)  # fmt: skip
app.add_typer(bench_app, name="bench")
console = Console()

DEMO_SOLVERS = ("ddim", "euler", "heun", "dpmpp_2m", "deis", "ipndm")
DIGITS_SOLVERS = ("ddim", "dpmpp_2m", "unipc", "deis", "ipndm", "recommended", "auto")
DEMO_NFES = (5, 10, 20)
DIGITS_NFES = (5, 10)  # the few-step budgets where the solvers differ; --full adds 20 (about 1 minute more)


SEED = typer.Option(0, min=0, max=MAX_SEED, help=f"Random seed (0 to {MAX_SEED}).")
PROCESS_HELP = f"Process: {', '.join(PROCESS_TYPES)}."


def _process(name: str):
    """The process of a --process option (default options)."""
    return build_process(choice(name, PROCESS_TYPES, "--process"))


def _solver_names() -> tuple[str, ...]:
    from .solvers import solver_specs

    return tuple(solver_specs())


def _problem_names() -> tuple[str, ...]:
    from .gmm import PROBLEMS

    return tuple(PROBLEMS)


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
    samples: int = typer.Option(512, min=10, help="Samples per solver."),
    seed: int = SEED,
    full: bool = typer.Option(False, "--full", help="Also sample the digits model at NFE 20 (about a minute more)."),
) -> None:
    """The main job: the shipped digits model at NFE 5/10 (--full: also 20), then the exact mixture at NFE 5/10/20,
    sampled by several solvers."""
    from .tools.demo import gmm_demo
    from .tools.digits_demo import digits_demo

    writable_dir(out, "--out")
    digits_nfes = DEMO_NFES if full else DIGITS_NFES
    console.rule("1. shipped digits model (DiscreteVP, eps): Fréchet distance vs NFE (fixed solvers: quadratic grid)")
    digits = digits_demo(out, nfes=digits_nfes, solvers=DIGITS_SOLVERS, n=samples, seed=seed, schedule="quadratic")
    atomic_write_text(out / "demo_digits.md", digits)
    console.print(digits)
    console.print(f"sample grids: {out}/digits_vp_<solver>_nfe<N>.png")
    console.rule("2. exact Gaussian mixture (ring2d): error against the exact ODE solution")
    _, figure = gmm_demo(out, solvers=DEMO_SOLVERS, nfes=DEMO_NFES, samples=samples, seed=seed, console=console)
    console.print(f"\nwrote {out / 'demo_digits.md'}, {figure} and {out / 'demo_gmm.md'}")


SOLVER_HELP = "Solver name (see `fewstep solvers`), or auto (with --nfe); default dpmpp_2m, or a student's own sampler."
MODEL_HELP = ("Sample this model instead: a shipped name, a checkpoint path (a student uses its stored times for --steps) "
              "or a local diffusers folder (a pipeline with a unet, or a UNet2DModel folder).")  # fmt: skip

N_HELP = "Number of samples (under torchrun write --num-samples: torchrun reads --n as one of its own options)."
SHARD_HELP = ("With --model and .npy: above this --n, write resumable shards x-00000.npy, ... and x-index.json; "
              "under torchrun the processes split the shards (shard k on rank k % WORLD_SIZE).")  # fmt: skip


@app.command("sample")
def sample_command(
    solver: str = typer.Option(None, help=SOLVER_HELP),
    steps: int = typer.Option(10, min=1, help="Solver steps."),
    nfe: int = typer.Option(None, min=2, max=100_000, help="NFE budget for --solver auto (it picks solver, steps, grid)."),
    schedule: str = typer.Option(None, help=f"Grid: {', '.join(SCHEDULES)} (default: the process's default)."),
    process: str = typer.Option("discrete_vp", help=PROCESS_HELP),
    problem: str = typer.Option("ring2d", help="Exact Gaussian-mixture model: ring2d or mixture16d."),
    model: str = typer.Option(None, help=MODEL_HELP),
    n: int = typer.Option(1000, "--n", "--num-samples", min=1, help=N_HELP),
    seed: int = SEED,
    out: Path = typer.Option(Path("out/samples.npy"), help="Output .npy (array) or .png (2-D scatter or image grid)."),
    batch_size: int = typer.Option(256, min=1, help="With --model: samples per batch (sample i is the same at any size)."),
    shard_size: int = typer.Option(10_000, min=1, help=SHARD_HELP),
    class_label: str = typer.Option(None, help="With a class-conditional --model: a label, or labels cycled over samples."),
    guidance: float = typer.Option(None, help="With a class-conditional --model: classifier-free guidance scale."),
    uncond_label: int = typer.Option(None, help="With --guidance: the label the model was trained on as 'no class'."),
    scheduler_config: Path = typer.Option(None, help="With a diffusers model folder: its scheduler_config.json (or folder)."),
) -> None:
    """Sample the exact model of a Gaussian-mixture problem (or a trained / distilled / diffusers model) and save the
    samples."""
    import numpy as np
    import torch

    from . import gmm
    from .sampling import sample

    if model is not None:
        from .sample_model import ModelRequest, sample_model

        sample_model(ModelRequest(model, solver, steps, nfe, schedule, n, seed, out, batch_size, shard_size, class_label,
                                  uncond_label, guidance, scheduler_config), console)  # fmt: skip
        return
    given = {"--class-label": class_label, "--guidance": guidance, "--uncond-label": uncond_label,
             "--scheduler-config": scheduler_config}  # fmt: skip
    for option, value in given.items():
        if value is not None:
            raise typer.BadParameter(f"{option} goes with --model (a diffusers model folder)", param_hint=option)
    solver = solver or "dpmpp_2m"
    choice(solver, (*_solver_names(), "auto"), "--solver")
    if (solver == "auto") != (nfe is not None):
        raise typer.BadParameter("--nfe goes with --solver auto (which picks solver, steps and grid for it)", param_hint="--nfe")
    if schedule is not None:
        choice(schedule, SCHEDULES, "--schedule")
    proc = _process(process)
    mixture = gmm.problem(choice(problem, _problem_names(), "--problem"))
    if out.suffix not in (".npy", ".png"):
        raise typer.BadParameter(f"output must end in .npy or .png, got {out.name}", param_hint="--out")
    writable_file(out, "--out")
    prediction = "velocity" if process == "rectified_flow" else "eps"
    noise = torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # e.g. more steps than allowed, or a grid not defined on this process (whose t_start / t_end the process sets)
    blame = {"schedule": "--schedule", "steps": "--steps", "solver": "--solver", "t_start": "--process", "t_end": "--process"}
    plan = dict(solver="auto", nfe=nfe) if solver == "auto" else dict(solver=solver, steps=steps, schedule=schedule)
    with usage_errors(options={**blame, "nfe": "--nfe"}):
        x = sample(mixture.model(proc, prediction), noise, process=proc, prediction=prediction, progress=True, **plan)
    if solver == "auto":
        c = x.choice
        console.print(f"solver auto: {c['source']} {c['solver']} on {c['schedule']}, {c['steps']} steps ({c['reason']})")
        solver, steps = c["solver"], c["steps"]
    if out.suffix == ".npy":
        from .io import atomic_write

        def save(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, x.numpy())

        atomic_write(out, save)
    else:
        from .tools.demo import scatter_figure

        scatter_figure(
            {f"{solver}, {steps} steps (NFE {x.nfe})": x, "exact": mixture.sample(n, torch.Generator().manual_seed(seed))}, out
        )
    console.print(f"{n} samples, NFE {x.nfe}, wrote {out}")


@bench_app.command("accuracy")
def bench_accuracy_command(
    solvers: str = typer.Option("ddim,euler,heun,dpmpp_2m", help="Comma-separated solver names, or 'all'."),
    schedules: str = typer.Option("time_uniform,logsnr,karras", help=f"Comma-separated grid names: {', '.join(SCHEDULES)}."),
    nfes: str = typer.Option("5,6,8,10,15,20", help="Comma-separated NFE budgets."),
    problems: str = typer.Option("ring2d,mixture16d", help="Comma-separated problems: ring2d, mixture16d."),
    process: str = typer.Option("discrete_vp", help=PROCESS_HELP),
    samples: int = typer.Option(256, min=1),
    out: Path = typer.Option(Path("out/bench"), help="Folder for the markdown table and the plot."),
    peers: bool = typer.Option(False, "--peers", help="Compare with diffusers / k-diffusion and searched grids instead."),
    search_iters: int = typer.Option(30, min=1, help="Schedule-search iterations per NFE (with --peers)."),
) -> None:
    """Error against the exact ODE solution vs NFE for every solver and grid (markdown table + log-log plot).

    With --peers: fewstep's recommended default, a searched grid and several fewstep solvers beside every installed
    diffusers scheduler and k-diffusion sampler, all on DiscreteVP(linear) against the exact flow map.
    """
    import math

    from .tools import bench

    problem_list = parse_names(problems, _problem_names(), "--problems", "problem")
    budget = parse_ints(nfes, "--nfes")
    if peers:
        with usage_errors():
            _bench_peers(problem_list, budget, samples, search_iters, writable_dir(out, "--out"))
        return

    if solvers == "all":
        names = [s for s in _solver_names() if not _is_stochastic(s)]
    else:
        names = parse_names(solvers, _solver_names(), "--solvers", "solver")
    grids = parse_names(schedules, SCHEDULES, "--schedules", "schedule")
    proc = _process(process)
    writable_dir(out, "--out")
    prediction = "velocity" if process == "rectified_flow" else "eps"
    rows = bench.accuracy(problem_list, proc, prediction, names, grids, budget, samples=samples)
    if all(math.isnan(e) for row in rows for e in row.errors.values()):
        message = "no cell of the table can be computed: each solver needs more evaluations than the budgets allow"
        raise typer.BadParameter(message + " or no grid is defined on --process", param_hint="--solvers/--schedules/--nfes")
    table = bench.accuracy_markdown(rows, budget)
    atomic_write_text(out / "accuracy.md", table)
    bench.accuracy_plot(rows, out / "accuracy.png")
    console.print(table)
    console.print(f"wrote {out / 'accuracy.md'} and {out / 'accuracy.png'}")


PEER_FEWSTEP_ENTRIES = (("dpmpp_2m", "logsnr"), ("unipc", "logsnr"), ("deis", "logsnr"), ("ipndm", "logsnr"),
                        ("ipndm", "quadratic"), ("heun", "logsnr"), ("ddim", "quadratic"))  # fmt: skip


def _bench_peers(problems: list[str], nfes: list[int], samples: int, search_iters: int, out: Path) -> None:
    from .processes import DiscreteVP
    from .recommend import recommended
    from .tools import bench, peers

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
    atomic_write_text(out / "peers.md", summary + "\n" + table)
    bench.accuracy_plot(rows, out / "peers.png")
    console.print(summary)
    console.print(table)
    console.print(f"wrote {out / 'peers.md'} and {out / 'peers.png'}")


@bench_app.command("overhead")
def bench_overhead_command(
    solvers: str = typer.Option("ddim,dpmpp_2m", help="Comma-separated solver names."),
    steps: int = typer.Option(50, min=1, max=1000, help="Solver steps (diffusers' scheduler has 1000 timesteps)."),
    repeats: int = typer.Option(30, min=1),
    batch: str = typer.Option("64,1,8,8", help="Batch shape: comma-separated sizes >= 1."),
    out: Path = typer.Option(Path("out/bench"), help="Folder for the markdown table."),
) -> None:
    """Per-step solver overhead with a zero-cost model, and the ratio to diffusers' DPMSolverMultistepScheduler."""
    from .tools import bench

    names = parse_names(solvers, _solver_names(), "--solvers", "solver")
    shape = tuple(parse_ints(batch, "--batch"))
    writable_dir(out, "--out")
    with usage_errors():
        result = bench.overhead(names, batch_shape=shape, steps=steps, repeats=repeats)
    table = bench.overhead_markdown(result)
    atomic_write_text(out / "overhead.md", table)
    console.print(table)


@bench_app.command("learned")
def bench_learned_command(
    models: str = typer.Option(None, help="Comma-separated shipped models (default: every shipped model)."),
    nfes: str = typer.Option("3,4,5,6,8,10,15,20", help="Comma-separated NFE budgets (>= 2)."),
    n: int = typer.Option(256, min=2, max=100_000, help="Samples (report noise)."),
    seed: int = typer.Option(2, min=0, max=MAX_SEED, help="Seed of the report noise (the tuning used 0 and 1)."),
    no_peers: bool = typer.Option(False, "--no-peers", help="Skip diffusers and k-diffusion."),
    reference_steps: int = typer.Option(200, min=10, max=100_000, help="Steps of the DPM-Solver++(2M) reference."),
    reuse: list[Path] = typer.Option(
        None,
        help="learned.json of an earlier run on the same noise: its fixed and peer "
        "rows are taken as they are, only the tuned and fallback rows run (repeatable).",
    ),  # fmt: skip
    out: Path = typer.Option(Path("out/bench"), help="Folder for learned.md, learned.json and learned.png."),
) -> None:
    """Tuned and fallback defaults vs every fixed configuration and the peers on the shipped learned models (RMSE to a
    many-step reference on held-out noise, and FD)."""
    import json
    import time

    from .shipped import SHIPPED_MODELS
    from .tools import bench_learned as bl

    names = parse_names(models, SHIPPED_MODELS, "--models", "model") if models is not None else list(SHIPPED_MODELS)
    budget = parse_ints(nfes, "--nfes", minimum=2)
    writable_dir(out, "--out")
    earlier = []
    for path in reuse or []:
        try:
            earlier += [bl.LearnedResult.from_dict(d) for d in json.loads(Path(path).read_text())]
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise typer.BadParameter(
                f"{path} is not a learned.json of fewstep bench learned: {err}", param_hint="--reuse"
            ) from err
    start = time.perf_counter()
    with usage_errors(options={"nfes": "--nfes", "nfe": "--nfes", "reference": "--models", "reuse": "--reuse"}):
        results = bl.bench_learned(names, budget, n=n, seed=seed, peers=not no_peers, reuse=earlier,
                                   reference_steps=reference_steps, log=console.print)  # fmt: skip
    text = bl.report(results, bands=LEARNED_BANDS)
    command = f"fewstep bench learned --models {','.join(names)} --nfes {nfes} --n {n} --seed {seed}"
    command += f" --reference-steps {reference_steps}" * (reference_steps != 200)
    text += f"\n`{command}`: {time.perf_counter() - start:.0f} s in all\n"
    atomic_write_text(out / "learned.md", text)
    atomic_write_text(out / "learned.json", json.dumps([r.to_dict() for r in results], indent=1, default=str))
    bl.learned_plot(results, out / "learned.png")
    for result in results:
        console.print(bl.summary_markdown(result))
    console.print(f"wrote {out / 'learned.md'}, {out / 'learned.json'} and {out / 'learned.png'}")


LEARNED_BANDS = ((3, 4), (5, 6), (8,), (10,), (15, 20), (3, 4, 5, 6, 8), (10, 15, 20))  # fallback analysis bands


@app.command("tune")
def tune_command(
    model: str = typer.Argument(..., help="A shipped model name (digits_vp, digits_flow, ...) or a checkpoint path."),
    nfe: str = typer.Option("4,5,6,8,10", help="Comma-separated NFE budgets to tune."),
    samples: int = typer.Option(64, min=2, max=100_000, help="Calibration (and selection) samples."),
    search_iters: int = typer.Option(12, min=0, max=10_000, help="Grid-search iterations per searched configuration."),
    reference_steps: int = typer.Option(200, min=4, max=100_000, help="Steps of the many-step reference."),
    seed: int = SEED,
    calibrate_iters: int = typer.Option(
        30,
        min=0,
        max=100_000,
        help="Adam iterations of the chosen configuration's learned corrections (time shift, noise scaling, mixing; 0: none).",
    ),  # fmt: skip
    calibrate_top: int = typer.Option(
        1,
        min=1,
        max=1000,
        help="Corrections are fitted to the best configuration of each of this many best solvers; the lowest error wins.",
    ),  # fmt: skip
    confirm_samples: int = typer.Option(
        256, min=2, max=100_000, help="Samples of the confirmation batch (seed + 1) that ranks the best few and stops the fit."
    ),  # fmt: skip
    calibrate_samples: int = typer.Option(
        None, min=2, max=100_000, help="Samples (of --seed) the corrections are fitted on (default: --confirm-samples)."
    ),  # fmt: skip
    correct_only: bool = typer.Option(
        False,
        "--correct-only",
        help="Keep the model's current tuning (its solvers and "
        "grids) and fit only their learned corrections, at the --nfe budgets it holds.",
    ),  # fmt: skip
    out: Path = typer.Option(
        None,
        help="Output JSON (default: <checkpoint>.tuning.json beside a checkpoint's sidecar, "
        "out/tune/<name>.tuning.json for a shipped model).",
    ),  # fmt: skip
) -> None:
    """Choose solver and grid per NFE budget on the model itself (fewstep.sample(..., solver="auto") uses the result)."""
    from .sample_model import sample_shape
    from .shipped import SHIPPED_MODELS, load_model, resolve_model
    from .train.cli import parse_ints, usage_errors, writable_file
    from .tune import correct, tune
    from .tuning import tuning_path

    budgets = parse_ints(nfe, "--nfe", minimum=2)
    with usage_errors("MODEL"):
        loaded = load_model(model)
    if out is None:
        out = Path("out/tune") / f"{model}.tuning.json" if model in SHIPPED_MODELS else tuning_path(resolve_model(model))
    writable_file(out, "--out")
    with usage_errors("MODEL"):
        shape = sample_shape(loaded)
    with usage_errors(options={"nfes": "--nfe", "nfe": "--nfe", "reference": "--reference-steps", "iters": "--calibrate-iters"}):
        if correct_only:
            if getattr(loaded.model, "tuning", None) is None:
                raise typer.BadParameter(
                    "the model has no tuning to correct; run fewstep tune without --correct-only", param_hint="MODEL"
                )
            tuning = correct(loaded.model, loaded.model.tuning, loaded.process, loaded.prediction, shape=shape,
                             nfes=budgets, seed=seed, iters=max(calibrate_iters, 1), reference_steps=reference_steps,
                             samples=confirm_samples,
                             log=console.print)  # fmt: skip
        else:
            tuning = tune(loaded.model, loaded.process, loaded.prediction, budgets, shape=shape, samples=samples, seed=seed,
                          search_iters=search_iters, reference_steps=reference_steps, calibrate_iters=calibrate_iters,
                          calibrate_top=calibrate_top, confirm_samples=confirm_samples,
                          calibrate_samples=calibrate_samples, name=str(model), log=console.print)  # fmt: skip
    tuning.save(out)
    table = Table("NFE", "solver", "grid", "RMS error", "fallback RMS", "ratio")
    for entry in tuning.entries.values():
        ratio = entry.error / entry.fallback_error if entry.fallback_error > 0 else float("nan")
        errors = (f"{entry.error:.3g}", f"{entry.fallback_error:.3g}", f"{ratio:.2f}")
        table.add_row(str(entry.nfe), entry.solver, entry.grid, *errors)
    console.print(table)
    console.print(f"wrote {out}")


def _is_stochastic(name: str) -> bool:
    from .solvers import get_solver

    return get_solver(name).stochastic


from .train.cli import bench_train_command, train_command  # noqa: E402

app.command("train")(train_command)
bench_app.command("train")(bench_train_command)

from .tools.evaluate import eval_command  # noqa: E402

app.command("eval")(eval_command)

from .distill.cli import bench_distill_command, distill_command  # noqa: E402

app.command("distill")(distill_command)
bench_app.command("distill")(bench_distill_command)

from .tools.bench_speed import bench_speed_command  # noqa: E402

bench_app.command("speed")(bench_speed_command)

from .tools.bench_steer import bench_steer_command  # noqa: E402

bench_app.command("steer")(bench_steer_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
