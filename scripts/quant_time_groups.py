"""FD of simulated W8A8 / W4A8 digits_vp with one activation range per layer against one per group of timesteps
(`fewstep.accel.quantize(..., time_groups=G)`), same noise and calibration as `fewstep bench speed`:
python scripts/quant_time_groups.py [--groups 1,2,4,8] [--steps 50]"""

import argparse
import time

import torch

import fewstep
from fewstep import accel
from fewstep.shipped import load_model
from fewstep.tools.bench_learned import digits_fd

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--groups", default="1,2,4,8")
parser.add_argument("--bits", default="8,4", help="weight bits (activations 8)")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--n", type=int, default=512)
args = parser.parse_args()
torch.set_num_threads(1)

loaded = load_model("digits_vp")
kw = dict(process=loaded.process, prediction=loaded.prediction, solver="dpmpp_2m", steps=args.steps)
noise = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # bench speed's noise (seed 0)
states = accel.calibration_states(loaded.model, torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1000)), **kw)
fd = digits_fd()
with torch.no_grad():
    plain = fd(fewstep.sample(loaded.model, noise, **kw))
print(f"plain: FD {plain:.3f}")
for w_bits in (int(b) for b in args.bits.split(",")):
    for groups in (int(g) for g in args.groups.split(",")):
        start = time.perf_counter()
        model = accel.quantize(loaded.model, states, w_bits=w_bits, a_bits=8, time_groups=groups)
        with torch.no_grad():
            value = fd(fewstep.sample(model, noise, **kw))
        print(f"W{w_bits}A8, {groups} time group(s): FD {value:.3f} ({value / plain:.2f}x plain), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
