"""Whole-loop compile (`fewstep.accel.compile_sampler`) against eager sampling and a compiled backbone, timed in
alternation on one thread: ms per batch for each batch size, and the largest difference to eager sampling.

    OMP_NUM_THREADS=1 python scripts/loop_speed.py [--model digits_vp] [--solver dpmpp_2m] [--steps 10] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import time

import torch

import fewstep
from fewstep.accel import compile_model, compile_sampler
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits_vp")
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    common = {"process": loaded.process, "prediction": loaded.prediction, "solver": args.solver, "steps": args.steps}
    backbone = compile_model(loaded.model)
    start = time.perf_counter()
    whole = compile_sampler(loaded.model, **common)
    plan_s = time.perf_counter() - start
    runs = {
        "eager": lambda z: fewstep.sample(loaded.model, z, **common),
        "compiled backbone": lambda z: fewstep.sample(backbone, z, **common),
        "compiled loop": whole,
    }
    print(f"{args.model}, {args.solver} {args.steps} steps ({whole.plan.nfe} NFE); plan read and checked in {plan_s:.2f} s")
    for batch in [int(b) for b in args.batches.split(",")]:
        z = torch.randn(batch, *sample_shape(loaded), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs = {}
            for name, fn in runs.items():  # warm-up: compiles
                begin = time.perf_counter()
                outs[name] = fn(z)
                print(f"  batch {batch}: first call of {name}: {time.perf_counter() - begin:.1f} s")
            times = {name: [] for name in runs}
            for _ in range(args.repeats):  # in alternation
                for name, fn in runs.items():
                    begin = time.perf_counter()
                    fn(z)
                    times[name].append(time.perf_counter() - begin)
        med = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        diff = {name: float((outs[name] - outs["eager"]).abs().max()) for name in runs}
        print(f"batch {batch}: " + "; ".join(f"{name} {ms:.2f} ms ({med['eager'] / ms:.2f}x eager, max diff {diff[name]:.1e})"
                                             for name, ms in med.items()))


if __name__ == "__main__":
    main()
