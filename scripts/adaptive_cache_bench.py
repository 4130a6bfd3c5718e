"""Adaptive caching vs DeepCache on digits_vp (dpmpp_2m, 20 and 50 steps): FLOPs, FD, ms/sample, one thread.

Reuses fewstep.tools.bench_speed's runner (same noise, FD and FLOP counting as `fewstep bench speed`); unpaired timing
(no alternating baseline chunks) to stay short. Also the relative L2 error of the first chunk's samples (128) against
the plain model's, and the full / reuse calls of that chunk's run.
Run: OMP_NUM_THREADS=1 .venv/bin/python out/helpers/adaptive_bench.py [--sweep | --paired]
"""

import sys
import time
from pathlib import Path

import torch

from fewstep import accel
from fewstep.io import atomic_write_text
from fewstep.shipped import load_model
from fewstep.tools.bench_learned import digits_fd
from fewstep.tools.bench_speed import SpeedResult, _cache, _Runner, report

torch.set_num_threads(1)
loaded = load_model("digits_vp")
model = loaded.model
n, batch, seed = 512, 128, 0
noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
fd = digits_fd()
text = []
SWEEP, PAIRED = "--sweep" in sys.argv, "--paired" in sys.argv


def adaptive(threshold, depth=1, max_reuse=None):
    cache = accel.AdaptiveCache(model, threshold=threshold, depth=depth, max_reuse=max_reuse, forecast=0)  # plain reuse
    return cache, cache.plan


for steps in (20, 50):
    runner = _Runner(loaded, "dpmpp_2m", steps, noise, batch, fd, baseline=model if PAIRED else None)
    plain = runner._sample(model, runner.chunks[0], None)
    start = time.perf_counter()
    configs = [("plain (eager fp32)", model, None)]
    if SWEEP:  # run 1: out/helpers/adaptive_bench/sweep.md
        configs += [(f"DeepCache interval {i}, depth {d}", *_cache(model, i, d)) for i, d in ((2, 1), (3, 1), (2, 2), (3, 2))]
        configs += [(f"AdaptiveCache threshold {t:g}, depth 1", *adaptive(t)) for t in (0.02, 0.03, 0.05, 0.1)]
        configs += [(f"AdaptiveCache threshold {t:g}, depth 1, max_reuse 2", *adaptive(t, 1, 2)) for t in (0.05, 0.1)]
        configs += [(f"AdaptiveCache threshold {t:g}, depth 2", *adaptive(t, 2)) for t in (0.05, 0.1, 0.2)]
    elif PAIRED:  # run 3: wall-clock timed in alternation with the plain model, as `fewstep bench speed`
        configs += [(f"DeepCache interval {i}, depth 1", *_cache(model, i, 1)) for i in (2, 3)]
        configs += [(f"AdaptiveCache threshold {t:g}, depth 1, max_reuse {r}", *adaptive(t, 1, r))
                    for t, r in ((0.1, 3), (0.2, 3))]  # fmt: skip
    else:  # run 2 (default): out/helpers/adaptive_bench/speed.md
        configs += [(f"DeepCache interval {i}, depth 1", *_cache(model, i, 1)) for i in (2, 3, 4)]
        configs += [(f"AdaptiveCache threshold {t:g}, depth 1", *adaptive(t)) for t in (0.02, 0.05)]
        configs += [(f"AdaptiveCache threshold {t:g}, depth 1, max_reuse {r}", *adaptive(t, 1, r))
                    for t, r in ((0.1, 2), (0.2, 2), (0.1, 3), (0.2, 3))]  # fmt: skip
    rows = []
    for label, m, prepare in configs:
        row = runner.run(label, "cache" if prepare else "plain", m, prepare)
        err = float((runner._sample(m, runner.chunks[0], prepare) - plain).norm() / plain.norm())
        calls = f"{m.counts['refresh']} / {m.counts['reuse']}" if prepare else f"{steps + 1} / 0"
        row.label += f" [full / reuse {calls}; rel. error {err:.3f}]"
        rows.append(row)
        print(steps, row.label, f"{row.flops / 1e9:.3f} GFLOPs", f"FD {row.fd:.3f}", f"{1e3 * row.seconds:.2f} ms", flush=True)
    result = SpeedResult("digits_vp", "dpmpp_2m", steps, n, batch, rows, time.perf_counter() - start)
    text.append(report(result))
out = Path("out/helpers/adaptive_bench") / ("sweep.md" if SWEEP else "paired.md" if PAIRED else "speed.md")
command = "OMP_NUM_THREADS=1 .venv/bin/python out/helpers/adaptive_bench.py" + " --sweep" * SWEEP + " --paired" * PAIRED
atomic_write_text(out, "\n".join(text) + f"\n`{command}`\n")
print("\n".join(text))
