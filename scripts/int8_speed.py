"""Real int8 kernels (`fewstep.accel.int8_kernels`) against the float model and the simulated W8A8 they come from:
ms / sample (best chunk, timed in alternation with the float model) and FD, DPM-Solver++(2M), one thread:
python scripts/int8_speed.py [--model digits_vp | CHECKPOINT] [--steps 50] [--n 2048] [--batch 128]"""

import argparse

import torch

from fewstep import accel
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tools.bench_speed import _Runner, image_fd

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="digits_vp")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--n", type=int, default=2048)
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--w-bits", type=int, default=8)
args = parser.parse_args()
torch.set_num_threads(1)

loaded = load_model(args.model)
model, shape = loaded.model, sample_shape(loaded)
noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(0))  # bench speed's noise
runner = _Runner(loaded, "dpmpp_2m", args.steps, noise, args.batch, image_fd(loaded, shape), baseline=model)
calib = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1000))
states = accel.calibration_states(model, calib, process=loaded.process, prediction=loaded.prediction, solver="dpmpp_2m",
                                  steps=args.steps)  # fmt: skip
simulated = accel.quantize(model, states, w_bits=args.w_bits, a_bits=8)
rows = [runner.run("float (eager fp32)", "plain", model),
        runner.run(f"W{args.w_bits}A8 simulated", "quant", simulated, flops_model=(model, None), speed="simulated"),
        runner.run(f"W{args.w_bits}A8 int8 kernels", "quant", accel.int8_kernels(simulated), flops_model=(model, None)),
        runner.run(f"W{args.w_bits}A8 int8 kernels, output too", "quant",
                   accel.int8_kernels(simulated, keep_output_layer=False), flops_model=(model, None))]  # fmt: skip
plain = rows[0]
for row in rows:
    print(f"{row.label:36s} {1e3 * row.seconds:8.2f} ms/sample  speed-up {row.speedup:.2f}x  FD {row.fd:.3f} "
          f"({row.fd / plain.fd:.2f}x float)", flush=True)
