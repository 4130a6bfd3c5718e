"""Measure the `fallback_error` of every entry of a model's tuning again, for the current `fewstep.recommended`, on the
bed `fewstep tune` uses (256 samples of seed 1 against the 200-step reference), and write the tuning to OUT:
python scripts/refresh_fallback.py MODEL OUT  (MODEL: a shipped name or a checkpoint with a tuning)."""

import sys

import torch

from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tune import CONFIRM_SAMPLES, _fallback_error, converged_reference

name, out = sys.argv[1:]
loaded = load_model(name)
tuning = loaded.model.tuning
noise = torch.randn(CONFIRM_SAMPLES, *sample_shape(loaded), generator=torch.Generator().manual_seed(1))
reference, _ = converged_reference(loaded.model, noise, loaded.process, loaded.prediction, "dpmpp_2m", 200, 0.01)
for nfe, entry in sorted(tuning.entries.items()):
    before = entry.fallback_error
    entry.fallback_error = _fallback_error(loaded.model, (noise, reference), loaded.process, loaded.prediction, nfe)
    print(f"NFE {nfe}: fallback error {before:.4g} -> {entry.fallback_error:.4g} (tuned {entry.error:.4g})")
tuning.save(out)
print("wrote", out)
