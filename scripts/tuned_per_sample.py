"""Per-sample errors of a shipped tuning's entry with and without its learned corrections, on several noise seeds:
python scripts/tuned_per_sample.py MODEL NFE [SEEDS]  (e.g. digits_vp 20 1,2,3; 256 samples per seed, each sample's RMS
error to the 200-step reference; prints the batch RMS, median, 99th percentile and largest, uncorrected -> corrected)."""

import sys

import torch

import fewstep
from fewstep.corrections import Corrections
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tune import converged_reference

name, nfe = sys.argv[1], int(sys.argv[2])
seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "1,2,3").split(",")]
loaded = load_model(name)
entry = loaded.model.tuning.entries[nfe]
if not entry.corrections:
    sys.exit(f"{name} NFE {nfe} has no corrections")
run, corrections = entry.sample_kwargs(), Corrections.from_dict(entry.corrections)


def stats(x: torch.Tensor, reference: torch.Tensor) -> str:
    per = (x - reference).double().flatten(1).pow(2).mean(1).sqrt()
    values = (per.pow(2).mean().sqrt(), per.median(), per.quantile(0.99), per.max())
    return " / ".join(f"{float(v):.4f}" for v in values)


for seed in seeds:
    noise = torch.randn(256, *sample_shape(loaded), generator=torch.Generator().manual_seed(seed))
    reference, _ = converged_reference(loaded.model, noise, loaded.process, loaded.prediction, "dpmpp_2m", 200, 1.0)
    plain = fewstep.sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, **run)
    corrected = corrections.wrap(loaded.model, loaded.process, loaded.prediction)  # one wrapped model per run
    fixed = fewstep.sample(corrected, noise, process=loaded.process, prediction="x0", **run)
    print(f"seed {seed}: RMS / median / q99 / max  {stats(plain, reference)}  ->  {stats(fixed, reference)}")
