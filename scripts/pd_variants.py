"""PD students of the exact ring2d teacher under other settings than the exact bed's (README, "Exact-bed report"):
python scripts/pd_variants.py --start-steps 8 --lr-decay cosine --width 256 --batch 512 --train-steps 8000"""

import argparse
import json

import fewstep.distill.exact_bed as bed

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--start-steps", type=int, default=64, help="PD's first student step count (a power of two)")
parser.add_argument("--lr-decay", default="none", help="none or cosine")
parser.add_argument("--width", type=int, default=128, help="MLP student width")
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--train-steps", type=int, default=8000)
parser.add_argument("--samples", type=int, default=5000)
args = parser.parse_args()

bed.METHOD_SETTINGS["pd"] = {"ema_decay": 0.99, "lr_decay": args.lr_decay, "distill": {"start_steps": args.start_steps}}
bed.STUDENT_NET = {**bed.STUDENT_NET, "width": args.width}
train_student = bed.train_student
bed.train_student = lambda *a, **k: train_student(*a, **{**k, "batch_size": args.batch})
result = bed.exact_bed("ring2d", methods=("pd",), train_steps=args.train_steps, samples=args.samples, log=print)
print(json.dumps({"args": vars(args), "seconds": result.seconds["pd"],
                  "energy_and_map_error": {n: (c.energy, c.map_error) for n, c in result.students["pd"].items()}}))
