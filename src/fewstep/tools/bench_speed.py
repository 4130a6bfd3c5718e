"""`fewstep bench speed`: wall-clock per sample, network FLOPs and FD of each acceleration in `fewstep.accel` (issue 12).

On a shipped digits model, one solver and step count, the same noise for every configuration: the plain model, DeepCache
(Ma et al., 2024) at several intervals and depths, adaptive caching (TeaCache / First-Block Cache style, refresh when
the first block's accumulated relative L1 change reaches a threshold) at a few thresholds, both also forecasting the
reused feature (TaylorSeer, group "forecast"), Faster Diffusion's encoder
propagation (fewstep UNets), torch.compile / bf16 /
channels_last, post-training quantization (Q-Diffusion-style calibration across the sampler's timesteps vs one
timestep; simulated W8A8 / W4A8, and real int8 Linear layers), and combinations; each as a ratio to the plain model
measured in the same run. Optionally the end-to-end comparison of the issue's last target: the teacher at 50 NFE
against the distilled student `digits_flow_cd` at 1-4 steps, eager and compiled.

Seconds per sample: the best of the n / batch chunks after one warm-up chunk (compilation excluded, reported apart;
the best, not the median, because other jobs share the machine and only slow runs down). Speed-up: the plain model's
best time over the same chunks, each timed just before the configuration's, divided by the configuration's best.
FD: Fréchet distance in the digits classifier's features of all n samples (`fewstep.tools.bench_learned.digits_fd`;
for a checkpoint of another one-channel image size, e.g. the 28 x 28 MNIST model of configs/mnist_vp.toml, of the
samples and the training data area-pooled to 8 x 8, `pooled_digits_fd`);
a stochastic sampler draws the same seeded noise per chunk in every configuration. FLOPs: `torch.utils.flop_counter`
on an eager run (a compiled configuration spends what its eager twin spends). One thread.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from .. import accel
from ..accel.backbone import backbone_of
from ..io import atomic_write_text, save_figure
from ..sampling import sample
from ..solvers import get_solver


@dataclass
class SpeedRow:
    """One configuration: seconds per sample, FLOPs per sample, FD, NFE, first-call (compile) seconds, how it is real."""

    label: str
    group: str
    seconds: float
    speedup: float  # best baseline seconds / best seconds, the chunks of both timed in alternation
    flops: float
    fd: float
    nfe: int
    warmup_seconds: float
    speed: str  # "real" or "simulated (no speed)"


@dataclass
class SpeedResult:
    model: str
    solver: str
    steps: int
    samples: int
    batch: int
    rows: list[SpeedRow]
    total_seconds: float = 0.0

    def row(self, label: str) -> SpeedRow:
        return next(r for r in self.rows if r.label == label)


class _Runner:
    """Runs one configuration: `make()` -> (callable model, prepare(ts) or None), sampled on fixed noise chunks."""

    def __init__(self, loaded: Any, solver: str, steps: int, noise: torch.Tensor, batch: int, fd: Callable,
                 baseline: Callable | None = None, **options):  # fmt: skip
        self.loaded, self.solver, self.steps, self.fd, self.baseline = loaded, solver, steps, fd, baseline
        self.chunks = list(noise.split(batch))
        self.options = options
        self.ts = accel.sampling_grid(loaded.process, steps, options.get("schedule"))

    def _sample(self, model: Callable, noise: torch.Tensor, prepare: Callable | None) -> torch.Tensor:
        if isinstance(getattr(model, "plan", None), accel.LinearPlan):  # a whole compiled run: noise -> x0
            return model(noise)
        if prepare is not None:
            prepare(self.ts)
        seed = next(i for i, chunk in enumerate(self.chunks) if chunk is noise)  # a stochastic sampler's noise per chunk
        return sample(model, noise, process=self.loaded.process, prediction=self.loaded.prediction, solver=self.solver,
                      steps=self.steps, generator=torch.Generator().manual_seed(seed), **self.options)  # fmt: skip

    def run(self, label: str, group: str, model: Callable, prepare: Callable | None = None, *, flops_model: Any = None,
            speed: str = "real", flops: float | None = None) -> SpeedRow:  # fmt: skip
        """Warm up (compiles), time every chunk, FD of all samples; FLOPs from `flops_model` (eager twin) or given."""
        start = time.perf_counter()
        self._sample(model, self.chunks[0], prepare)
        warmup = time.perf_counter() - start
        outs, seconds, base = [], [], []
        paired = self.baseline is not None and model is not self.baseline and speed == "real"
        for chunk in self.chunks:  # baseline and configuration in alternation, over the same stretch of machine load
            if paired:
                base.append(self._time(self.baseline, chunk, None)[1])
            out, sec = self._time(model, chunk, prepare)
            outs.append(out)
            seconds.append(sec)
        x = torch.cat(outs)
        if flops is None:
            twin = (model, prepare) if flops_model is None else flops_model
            flops = accel.count_flops(self._sample, twin[0], self.chunks[0], twin[1])[1] / self.chunks[0].shape[0]
        fd = self.fd(x) if bool(torch.isfinite(x).all()) else math.inf
        speedup = 1.0 if model is self.baseline else min(base) / min(seconds) if paired else math.nan  # nan: simulated
        return SpeedRow(label, group, min(seconds), speedup, float(flops), fd, int(outs[0].nfe), warmup, speed)

    def _time(self, model: Callable, chunk: torch.Tensor, prepare: Callable | None) -> tuple[torch.Tensor, float]:
        """(samples, seconds per sample) of one chunk."""
        start = time.perf_counter()
        out = self._sample(model, chunk, prepare)
        return out, (time.perf_counter() - start) / chunk.shape[0]


def _cache(model, interval: int, depth: int, refresh: str = "uniform", compile_mode: str | None = None,
           forecast: int = 0, **opts):  # fmt: skip
    cache = accel.DeepCache(model, interval=interval, depth=depth, refresh=refresh, forecast=forecast)
    if compile_mode is not None:
        cache.compile(compile_mode, **opts)
    return cache, cache.plan


FD_RELIABLE_SAMPLES = 2048  # below, the report warns that FD's bias hides the ratios (measured on digits_vp)
GROUPS = ("cache", "forecast", "compile", "quant", "stitch")  # the row groups of `bench_speed` (besides the plain model)
ADAPTIVE = ((0.02, None), (0.1, 3), (0.2, 3))  # (threshold, max_reuse): relative L1 of the depth-1 indicator
FORECAST_DEEP = ((2, 1, 1), (2, 1, 2), (3, 1, 1), (3, 2, 1))  # (interval, depth, forecast order) of DeepCache rows
FORECAST_ADAPTIVE = ((0.1, 3), (0.2, 3))  # (threshold, max_reuse) of the AdaptiveCache rows with forecast 1


def _adaptive(model, threshold: float, max_reuse: int | None, depth: int = 1, forecast: int = 0):
    cache = accel.AdaptiveCache(model, threshold=threshold, depth=depth, max_reuse=max_reuse, forecast=forecast)
    return cache, cache.plan


def image_fd(loaded: Any, shape: tuple[int, ...]) -> Callable[[torch.Tensor], float]:
    """FD for the model's samples: the digits classifier's features at 8 x 8 (`digits_fd`); other one-channel image
    sizes area-pooled to 8 x 8 against the model's training data pooled the same way (`pooled_digits_fd`)."""
    from ..data import load_dataset
    from .bench_learned import digits_fd, pooled_digits_fd

    if shape == (1, 8, 8):
        return digits_fd()
    if len(shape) != 3 or shape[0] != 1:
        raise ValueError(f"bench speed measures FD on one-channel images [1, H, W], got samples of shape {shape}")
    train = loaded.config.get("train", {})
    return pooled_digits_fd(load_dataset(train.get("data", "digits"), **train.get("data_options", {})))


def bench_speed(model_name: str = "digits_vp", solver: str = "dpmpp_2m", steps: int = 50, *, n: int = 512, batch: int = 128,
                seed: int = 0, compile: bool = True, groups: Sequence[str] = GROUPS,
                log: Callable[[str], None] = print) -> SpeedResult:  # fmt: skip
    """Every acceleration of `groups` on one shipped model (see the module docstring); rows in the order they ran.
    The plain model always runs first (every ratio is to it)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"groups: {', '.join(unknown)} not known; allowed values: {', '.join(GROUPS)}")
    from ..sample_model import sample_shape
    from ..shipped import load_model

    loaded = load_model(model_name)
    model = loaded.model
    shape = sample_shape(loaded)
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    runner = _Runner(loaded, solver, steps, noise, batch, image_fd(loaded, shape), baseline=model)
    started = time.perf_counter()
    rows: list[SpeedRow] = []

    def add(row: SpeedRow) -> None:
        rows.append(row)
        log(
            f"{row.label:46s} {1e3 * row.seconds:8.3f} ms/sample  {row.speedup:5.2f}x  FD {row.fd:7.3f}  "
            f"(warm-up {row.warmup_seconds:.1f} s)"
        )

    add(runner.run("plain (eager fp32)", "plain", model))
    if "cache" in groups:
        for interval, depth in ((2, 1), (2, 2), (3, 1), (3, 2), (5, 1)):
            add(runner.run(f"DeepCache interval {interval}, depth {depth}", "cache", *_cache(model, interval, depth)))
        for threshold, max_reuse in ADAPTIVE:
            label = f"AdaptiveCache threshold {threshold:g}, max_reuse {max_reuse}, depth 1"
            add(runner.run(label, "cache", *_adaptive(model, threshold, max_reuse)))
        if hasattr(backbone_of(model), "forward_propagated"):  # fewstep's UNet
            for interval in (2, 3):
                propagation = accel.EncoderPropagation(model, interval=interval)
                add(runner.run(f"Encoder propagation interval {interval}", "cache", propagation, propagation.plan))
    if "forecast" in groups:  # TaylorSeer-style: the reused deep feature extrapolated in t
        for interval, depth, order in FORECAST_DEEP:
            label = f"DeepCache interval {interval}, depth {depth}, forecast {order}"
            add(runner.run(label, "forecast", *_cache(model, interval, depth, forecast=order)))
        for threshold, max_reuse in FORECAST_ADAPTIVE:
            label = f"AdaptiveCache threshold {threshold:g}, max_reuse {max_reuse}, depth 1, forecast 1"
            add(runner.run(label, "forecast", *_adaptive(model, threshold, max_reuse, forecast=1)))
    if "compile" in groups:
        add(runner.run("bf16 autocast (eager)", "compile", accel.compile_model(model, None, dtype="bf16"),
                       flops_model=(model, None)))  # fmt: skip
        add(runner.run("channels_last (eager)", "compile", accel.compile_model(model, None, channels_last=True),
                       flops_model=(model, None)))  # fmt: skip
    if compile and "compile" in groups:
        plain_flops = rows[0].flops
        add(runner.run("torch.compile", "compile", accel.compile_model(model), flops=plain_flops))
        add(runner.run("torch.compile + channels_last", "compile", accel.compile_model(model, channels_last=True),
                       flops=plain_flops))  # fmt: skip
        add(runner.run("torch.compile + bf16 + channels_last", "compile",
                       accel.compile_model(model, dtype="bf16", channels_last=True), flops=plain_flops))  # fmt: skip
        if not get_solver(solver).stochastic:  # the whole run as one graph (a deterministic solver's LinearPlan)
            loop = accel.compile_sampler(model, loaded.process, loaded.prediction, solver, steps, **runner.options)
            add(runner.run("torch.compile of the whole sampling loop", "compile", loop, flops=plain_flops))
        if "cache" in groups:
            cached = runner.run("DeepCache i2 d1 + torch.compile", "combo", *_cache(model, 2, 1, compile_mode="default"),
                                flops=next(r.flops for r in rows if r.label == "DeepCache interval 2, depth 1"))  # fmt: skip
            add(cached)
    if "quant" in groups:
        _quantization_rows(runner, model, loaded, solver, steps, seed, add)
    if "stitch" in groups and model_name in STITCH_SMALL:
        _stitch_rows(runner, model, STITCH_SMALL[model_name], add)
    return SpeedResult(model_name, solver, steps, n, batch, rows, time.perf_counter() - started)


STITCH_SMALL = {"digits_vp": "digits_vp_small"}  # shipped small models for T-Stitch (same process and prediction)
STITCH_FRACTIONS = (0.2, 0.4, 0.6)


def _stitch_rows(runner: _Runner, model, small_name: str, add) -> None:
    """The small model alone, and T-Stitch with the first 20 / 40 / 60 % of the steps on it (Pan et al., 2024)."""
    from ..shipped import load_model

    small = load_model(small_name).model
    add(runner.run(f"small model alone ({small_name})", "stitch", small))
    for fraction in STITCH_FRACTIONS:
        stitch = accel.Stitch(small, model, fraction=fraction)
        add(runner.run(f"T-Stitch: first {fraction:.0%} of the steps on {small_name}", "stitch", stitch, stitch.plan))


def _quantization_rows(runner: _Runner, model, loaded, solver: str, steps: int, seed: int, add) -> None:
    """Simulated W8A8 / W4A8 calibrated on the sampler's states at all its timesteps or at one, and real int8 Linear."""
    calib_noise = torch.randn(32, *runner.chunks[0].shape[1:], generator=torch.Generator().manual_seed(seed + 1000))
    states = accel.calibration_states(model, calib_noise, process=loaded.process, prediction=loaded.prediction,
                                      solver=solver, steps=steps)  # fmt: skip
    mid, last = states[len(states) // 2], states[-1]
    simulated = "simulated (no speed)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one-timestep calibrations warn about the mismatch, by design
        one_mid, one_last = f"one timestep (t={float(mid[1][0]):.3g})", f"one timestep (t={float(last[1][0]):.3g})"
        plans = ((8, 8, "all timesteps", states), (8, 8, one_mid, [mid]), (8, 8, one_last, [last]),
                 (4, 8, "all timesteps", states), (4, 8, one_mid, [mid]), (4, 8, one_last, [last]),
                 (4, None, "all timesteps, first/last conv also 4-bit", states))  # fmt: skip
        for w_bits, edge_bits, name, calib in plans:
            qmodel = accel.quantize(model, calib, w_bits=w_bits, a_bits=8, edge_bits=edge_bits)
            add(runner.run(f"W{w_bits}A8 calibrated on {name}", "quant", qmodel, flops_model=(model, None), speed=simulated))
            if (w_bits, name) == (8, "all timesteps"):  # the same model on real int8 kernels
                add(runner.run("W8A8 calibrated on all timesteps, int8 kernels (torch.ao, real)", "quant",
                               accel.int8_kernels(qmodel), flops_model=(model, None)))  # fmt: skip
        add(runner.run("int8 dynamic Linear (torch.ao, real)", "quant", accel.dynamic_int8(model), flops_model=(model, None)))


def end_to_end(teacher: str = "digits_flow", student: str = "digits_flow_cd", *, n: int = 512, batch: int = 128, seed: int = 0,
               compile: bool = True, steps: tuple[int, ...] = (1, 2, 4),
               log: Callable[[str], None] = print) -> list[SpeedRow]:  # fmt: skip
    """The teacher at 50 NFE (DPM-Solver++(2M)) against the distilled student at `steps` steps with its own times and
    sampler, eager and compiled: the issue's target is the teacher's FD x 1.2 at >= 20x less time."""
    from ..distill.student import student_plan
    from ..shipped import load_model
    from .bench_learned import digits_fd

    fd = digits_fd()
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    loaded_teacher, loaded_student = load_model(teacher), load_model(student)
    rows = []
    teacher_runner = _Runner(loaded_teacher, "dpmpp_2m", 50, noise, batch, fd)
    rows.append(teacher_runner.run(f"{teacher} teacher, dpmpp_2m 50 NFE", "end-to-end", loaded_teacher.model))
    log(f"{rows[-1].label}: {1e3 * rows[-1].seconds:.3f} ms/sample, FD {rows[-1].fd:.3f}")
    for count in steps:
        plan = student_plan(loaded_student.meta, count)
        solver, options = plan.pop("solver"), {k: v for k, v in plan.items() if k != "steps"}
        runner = _Runner(loaded_student, solver, count, noise, batch, fd, **options)
        variants = [("eager", loaded_student.model)]
        if compile:
            variants.append(("torch.compile + channels_last", accel.compile_model(loaded_student.model, channels_last=True)))
        for name, model in variants:
            row = runner.run(f"{student} student, {count} step(s), {name}", "end-to-end", model,
                             flops_model=(loaded_student.model, None))  # fmt: skip
            rows.append(row)
            log(f"{row.label}: {1e3 * row.seconds:.3f} ms/sample, FD {row.fd:.3f}")
    return rows


def report(result: SpeedResult, e2e: list[SpeedRow] | None = None) -> str:
    """Markdown: each configuration with ratios to the plain model of the same run."""
    base = result.rows[0]
    lines = [
        f"### `fewstep bench speed`: {result.model}, {result.solver}, {result.steps} steps, {result.samples} samples "
        f"(batches of {result.batch}), one thread",
        "",
        "| configuration | ms / sample | speed-up | GFLOPs / sample | FLOPs saved | FD | FD / plain | NFE | warm-up s | speed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.label} | {1e3 * r.seconds:.3f} | {_ratio(r.speedup)} | {r.flops / 1e9:.3f} | "
            f"{base.flops / r.flops:.2f}x | {r.fd:.3f} | {r.fd / base.fd:.2f} | {r.nfe} | {r.warmup_seconds:.1f} | {r.speed} |"
        )
    if e2e:
        teacher = e2e[0]
        lines += ["", "End to end (issue target: FD <= 1.2 x the teacher's at 50 NFE, >= 20x faster than it):", "",
                  "| configuration | ms / sample | speed-up vs teacher@50 | FD | FD / teacher@50 | NFE |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in e2e:
            lines.append(f"| {r.label} | {1e3 * r.seconds:.3f} | {teacher.seconds / r.seconds:.1f}x | {r.fd:.3f} | "
                         f"{r.fd / teacher.fd:.2f} | {r.nfe} |")  # fmt: skip
    if result.samples < FD_RELIABLE_SAMPLES:
        lines.append(f"\nFD of {result.samples} samples is dominated by its own bias (digits_vp: 1.66 at 512 samples, "
                     f"0.52 at 2,048), which hides FD ratios of up to ~1.5 at 512: decide with --n {FD_RELIABLE_SAMPLES} "
                     "or more.")  # fmt: skip
    lines.append(f"\n{result.total_seconds:.0f} s for the main table.")
    return "\n".join(lines) + "\n"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "n/a"


def _finite(value: Any) -> Any:
    """NaN and infinities as None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def speed_plot(result: SpeedResult, path: Path) -> None:
    """FD against ms per sample, one point per configuration, with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(1e3 * r.seconds, r.fd, r.label) for r in result.rows if math.isfinite(r.fd)]
    for ms, fd, label in pts:
        ax.scatter(ms, fd, s=18)
        ax.annotate(label, (ms, fd), fontsize=6)
    front, best = [], math.inf
    for ms, fd, _ in sorted(pts):
        if fd < best:
            front.append((ms, fd))
            best = fd
    ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
    ax.set(xlabel="ms per sample (one thread)", ylabel="FD (digits classifier features)", yscale="log",
           title=f"{result.model}, {result.solver}, {result.steps} steps")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write(result: SpeedResult, out: Path, e2e: list[SpeedRow] | None = None, command: str = "") -> str:
    """speed.md, speed.json and speed.png in `out`; returns the markdown."""
    text = report(result, e2e) + (f"\n`{command}`\n" if command else "")
    atomic_write_text(out / "speed.md", text)
    data = {**asdict(result), "end_to_end": [asdict(r) for r in e2e or []]}
    atomic_write_text(out / "speed.json", json.dumps(_finite(data), indent=1))
    speed_plot(result, out / "speed.png")
    return text


def bench_speed_command(
    model: Annotated[str, typer.Option(help="A shipped model (digits_vp, digits_flow, digits_cosine_v) or a checkpoint "
                                            "path of a one-channel image model.")] = "digits_vp",
    solver: Annotated[str, typer.Option(help="The solver (see `fewstep solvers`).")] = "dpmpp_2m",
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Solver steps (caching needs many).")] = 50,
    n: Annotated[int, typer.Option(min=1, max=100_000, help="Samples for FD, a multiple of --batch.")] = 512,
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Samples per timed batch.")] = 128,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the noise.")] = 0,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Skip the torch.compile rows (~30-80 s each).")] = False,
    end_to_end_rows: Annotated[
        bool, typer.Option("--end-to-end", help="Add the teacher at 50 NFE against the distilled student digits_flow_cd.")
    ] = False,
    groups: Annotated[str, typer.Option(help=f"Comma-separated row groups of {', '.join(GROUPS)}.")] = ",".join(GROUPS),
    out: Annotated[Path, typer.Option(help="Folder for speed.md, speed.json and speed.png.")] = Path("out/bench"),
) -> None:
    """Wall-clock per sample, network FLOPs and FD of caching, compile, bf16, quantization and combinations, as ratios
    to the plain model in the same run (one thread)."""
    from ..shipped import SHIPPED_MODELS
    from ..solvers import solver_specs

    if model not in SHIPPED_MODELS and not Path(model).is_file():
        raise typer.BadParameter(f"{model!r} is neither a shipped model ({', '.join(SHIPPED_MODELS)}) nor a checkpoint file",
                                 param_hint="--model")  # fmt: skip
    if solver not in solver_specs():
        raise typer.BadParameter(f"{solver!r} is not a solver; see `fewstep solvers`", param_hint="--solver")
    group_list = [g.strip() for g in groups.split(",") if g.strip()]
    if not set(group_list) <= set(GROUPS):
        bad = ", ".join(sorted(set(group_list) - set(GROUPS)))
        raise typer.BadParameter(f"{bad}: not a row group; allowed: {', '.join(GROUPS)}", param_hint="--groups")
    if n % batch:
        raise typer.BadParameter(f"--n {n} must be a multiple of --batch {batch}", param_hint="--n")
    torch.set_num_threads(1)
    result = bench_speed(model, solver, steps, n=n, batch=batch, seed=seed, compile=not no_compile, groups=group_list)
    e2e = end_to_end(n=n, batch=batch, seed=seed, compile=not no_compile) if end_to_end_rows else None
    out.mkdir(parents=True, exist_ok=True)
    flags = " --no-compile" * no_compile + " --end-to-end" * end_to_end_rows
    flags += f" --groups {','.join(group_list)}" * (tuple(group_list) != GROUPS)
    command = (
        f"fewstep bench speed --model {model} --solver {solver} --steps {steps} --n {n} --batch {batch} --seed {seed}{flags}"
    )
    print(write(result, out, e2e, command))


def main() -> None:
    typer.run(bench_speed_command)


if __name__ == "__main__":
    main()
