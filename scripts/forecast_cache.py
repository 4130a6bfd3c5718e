"""FD of image samples under DeepCache / AdaptiveCache with the reused deep feature forecast (order 0 = plain reuse,
1, 2), against the plain model on the same noise (`fewstep.sample` with each cache, chunks of --batch):
python scripts/forecast_cache.py [--model digits_vp] [--steps 50] [--n 2048] [--orders 0,1,2]"""

import argparse
import warnings

import torch

import fewstep
from fewstep import accel
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tools.bench_speed import image_fd

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="digits_vp", help="a shipped model or a checkpoint of one-channel images")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--n", type=int, default=2048)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--orders", default="0,1,2")
parser.add_argument("--configs", default="deep:2:1,deep:3:1,deep:3:2,adaptive:0.1:1",
                    help="kind:interval-or-threshold:depth[:refresh rule of deep], comma-separated")  # fmt: skip
args = parser.parse_args()
torch.set_num_threads(1)

loaded = load_model(args.model)
kw = dict(process=loaded.process, prediction=loaded.prediction, solver="dpmpp_2m", steps=args.steps)
shape = sample_shape(loaded)
noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
ts = accel.sampling_grid(loaded.process, args.steps)
fd = image_fd(loaded, shape)


def run(model) -> torch.Tensor:
    out = []
    for chunk in noise.split(args.batch):
        if hasattr(model, "plan"):
            model.plan(ts)
        out.append(fewstep.sample(model, chunk, **kw))
    return torch.cat(out)


with torch.no_grad():
    plain = fd(run(loaded.model))
    print(f"{args.model}, {args.steps} steps, {args.n} samples: plain FD {plain:.3f}", flush=True)
    for config in args.configs.split(","):
        kind, strength, depth, *refresh = config.split(":")
        for order in (int(o) for o in args.orders.split(",")):
            if kind == "deep":
                cache = accel.DeepCache(loaded.model, interval=int(strength), depth=int(depth), forecast=order,
                                        refresh=refresh[0] if refresh else "uniform")  # fmt: skip
            else:
                cache = accel.AdaptiveCache(loaded.model, threshold=float(strength), depth=int(depth), forecast=order)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few steps: the cache warns that it saves little, by design
                value = fd(run(cache))
            print(f"{config} forecast {order}: FD {value:.3f} ({value / plain:.2f}x plain), counts {cache.counts}", flush=True)
