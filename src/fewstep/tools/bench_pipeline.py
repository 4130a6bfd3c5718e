"""FD of a shipped digits model run as a diffusers pipeline, per scheduler and NFE (issue 9's pipeline table).

The shipped DiscreteVP model becomes a `DDPMPipeline` (`fewstep.integrations.export.to_pipeline`: the same weights as
a diffusers model); the pipeline is then run at `num_inference_steps` = NFE with its own DDPMScheduler, with
diffusers' DDIM and DPM-Solver++(2M) schedulers (from the pipeline's config, defaults otherwise), and with
`FewstepScheduler(solver="auto")` with the model's shipped tuning ("tuned") and without one (the fallback,
`fewstep.recommended`). Every network call is counted, so each cell states the NFE it used. FD: the digits
classifier's features of n samples against the training digits (`fewstep.tools.bench_learned.digits_fd`).

    python -m fewstep.tools.bench_pipeline --models digits_vp,digits_cosine_v --nfes 4,5,6,8,10 --n 1000 --seed 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

SCHEDULERS = ("pipeline default (DDPM)", "DDIM", "DPM-Solver++(2M)", "fewstep auto, tuned", "fewstep auto, fallback")
# (diffusers UniPC cannot run in DDPMPipeline: its step() takes no generator, which the pipeline passes)


def _scheduler(label: str, pipe, loaded):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ..integrations import FewstepScheduler

    config = pipe.scheduler.config
    if label == "pipeline default (DDPM)":
        return pipe.scheduler
    if label == "DDIM":
        return DDIMScheduler.from_config(config)
    if label == "DPM-Solver++(2M)":
        return DPMSolverMultistepScheduler.from_config(config)
    tuning = loaded.model.tuning if label.endswith("tuned") else None
    return FewstepScheduler.from_config(config, solver="auto", tuning=tuning, model=pipe.unet if tuning else None)


@torch.no_grad()
def run_pipeline(pipe, scheduler, nfe: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """(samples [n, C, H, W] in [-1, 1], network calls) of `pipe` with `scheduler` at num_inference_steps = nfe."""
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    default = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=nfe,
                      output_type="np", return_dict=False)[0]  # fmt: skip
    finally:
        hook.remove()
        pipe.scheduler = default
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1
    return x, len(calls)


def bench_pipeline(
    models: Sequence[str],
    nfes: Sequence[int],
    n: int,
    seed: int,
    log: Callable[[str], None] = print,
    schedulers: Sequence[str] = SCHEDULERS,
) -> dict[str, dict[str, dict[int, tuple[float, int]]]]:
    """{model: {scheduler: {nfe: (FD, network calls)}}} for `schedulers` (labels of SCHEDULERS)."""
    unknown = [label for label in schedulers if label not in SCHEDULERS]
    if unknown:
        raise ValueError(f"schedulers {unknown} are not known; allowed values: {', '.join(SCHEDULERS)}")
    from ..integrations.export import to_pipeline
    from ..shipped import load_model
    from .bench_learned import digits_fd

    fd = digits_fd()
    out: dict[str, dict[str, dict[int, tuple[float, int]]]] = {}
    for name in models:
        loaded = load_model(name)
        pipe = to_pipeline(loaded)
        pipe.set_progress_bar_config(disable=True)
        out[name] = {}
        for label in schedulers:
            out[name][label] = {}
            for nfe in nfes:
                x, calls = run_pipeline(pipe, _scheduler(label, pipe, loaded), nfe, n, seed)
                out[name][label][nfe] = (fd(x) if bool(torch.isfinite(x).all()) else float("inf"), calls)
                log(f"{name} {label} NFE {nfe}: FD {out[name][label][nfe][0]:.3g} ({calls} calls)")
    return out


def markdown(results: dict[str, dict[str, dict[int, tuple[float, int]]]], n: int, seed: int) -> str:
    """One table per model: a row per scheduler, a column per NFE; FD (network calls where they differ from NFE)."""
    lines = []
    for name, rows in results.items():
        nfes = sorted(next(iter(rows.values())))
        lines += [f"**{name}** as a diffusers `DDPMPipeline`; FD of {n} samples (generator seed {seed}); lower is better.", "",
                  "| scheduler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]  # fmt: skip
        best = {k: min(cells[k][0] for cells in rows.values()) for k in nfes}
        for label, cells in rows.items():
            lines.append(f"| {label} | " + " | ".join(_cell(*cells[k], k, best[k]) for k in nfes) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(value: float, calls: int, nfe: int, best: float) -> str:
    text = f"{value:.3g}" + (f" ({calls} calls)" if calls != nfe else "")
    return f"**{text}**" if value == best else text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewstep.tools.bench_pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits_vp,digits_cosine_v")
    parser.add_argument("--nfes", default="4,5,6,8,10")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--schedulers", default=";".join(SCHEDULERS), help="labels separated by ; (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = bench_pipeline(args.models.split(","), [int(k) for k in args.nfes.split(",")], args.n, args.seed,
                             schedulers=args.schedulers.split(";"))  # fmt: skip
    print(markdown(results, args.n, args.seed))
    print(f"`python -m fewstep.tools.bench_pipeline --models {args.models} --nfes {args.nfes} --n {args.n} "
          f"--seed {args.seed}`: {time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
