"""The plain and fp32 torch.compile rows of `fewstep bench speed` alone (digits_vp, dpmpp_2m 50 steps, 512 samples,
one thread), with the eager row timed again after the compiled one: python scripts/compile_speed.py"""

import torch

from fewstep import accel
from fewstep.shipped import load_model
from fewstep.tools.bench_learned import digits_fd
from fewstep.tools.bench_speed import _Runner

torch.set_num_threads(1)
loaded = load_model("digits_vp")
model = loaded.model
noise = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(0))
runner = _Runner(loaded, "dpmpp_2m", 50, noise, 128, digits_fd(), baseline=model)
rows = [runner.run("eager fp32", "plain", model)]
rows.append(runner.run("torch.compile", "compile", accel.compile_model(model), flops=rows[0].flops))
rows.append(runner.run("eager fp32, again", "plain", model))
for row in rows:
    print(f"{row.label:20s} {1e3 * row.seconds:8.3f} ms/sample  FD {row.fd:.3f}  warm-up {row.warmup_seconds:.1f} s")
eager = [row.seconds for row in rows if row.group == "plain"]
print(f"torch.compile over eager: {min(eager) / rows[1].seconds:.2f}x - {max(eager) / rows[1].seconds:.2f}x")
