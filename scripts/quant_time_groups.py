"""FD of simulated W8A8 / W4A8 digits_vp by activation-range rule (mse / minmax), calibration (all the sampler's
timesteps / its middle one) and time groups (`fewstep.accel.quantize(..., time_groups=G)`), against the float model
on the same noise; noise and calibration as `fewstep bench speed`:
python scripts/quant_time_groups.py --n 2048 [--groups 1,4] [--bits 8,4] [--ranges mse,minmax] [--calibration all,mid]
[--weights minmax,gptq]"""

import argparse
import time
import warnings

import torch

import fewstep
from fewstep import accel
from fewstep.shipped import load_model
from fewstep.tools.bench_learned import digits_fd

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--groups", default="1")
parser.add_argument("--bits", default="8,4", help="weight bits (activations 8)")
parser.add_argument("--ranges", default="mse,minmax")
parser.add_argument("--calibration", default="all,mid")
parser.add_argument("--weights", default="minmax", help="weight rounding rules: minmax, gptq")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--n", type=int, default=2048)
parser.add_argument("--seed", type=int, default=0, help="noise seed (0: the bench's)")
args = parser.parse_args()
torch.set_num_threads(1)

loaded = load_model("digits_vp")
kw = dict(process=loaded.process, prediction=loaded.prediction, solver="dpmpp_2m", steps=args.steps)
noise = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))  # seed 0: bench speed's
states = accel.calibration_states(loaded.model, torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1000)), **kw)
calibrations = {"all": states, "mid": [states[len(states) // 2]]}
fd = digits_fd()
with torch.no_grad():
    plain = fd(fewstep.sample(loaded.model, noise, **kw))
print(f"plain: FD {plain:.3f} ({args.n} samples)")
for w_bits in (int(b) for b in args.bits.split(",")):
    for ranges in args.ranges.split(","):
        for calibration in args.calibration.split(","):
            for groups, weights in ((int(g), r) for g in args.groups.split(",") for r in args.weights.split(",")):
                if groups > 1 and calibration != "all":
                    continue
                start = time.perf_counter()
                model = accel.quantize(loaded.model, calibrations[calibration], w_bits=w_bits, a_bits=8, ranges=ranges,
                                       time_groups=groups, weights=weights)  # fmt: skip
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # a one-timestep calibration warns, by design
                    value = fd(fewstep.sample(model, noise, **kw))
                print(f"W{w_bits}A8, ranges {ranges}, calibrated on {calibration} timestep(s), {groups} time group(s), "
                      f"{weights} weights: "
                      f"FD {value:.3f} ({value / plain:.2f}x plain), {time.perf_counter() - start:.0f} s", flush=True)
