"""Held-out RMS error of solver="auto" with a model's shipped tuning and with another tuning file, at each budget of
the latter (N samples of seed 2, default 256, against the STEPS-step reference, default 200):
python scripts/compare_tunings.py MODEL TUNING.json [N [STEPS]]"""

import sys

import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tune import converged_reference
from fewstep.tuning import Tuning

name, path, *rest = sys.argv[1:]
n, steps = (int(v) for v in [*rest, *(256, 200)[len(rest) :]])
loaded = load_model(name)
other = Tuning.load(path)
noise = torch.randn(n, *sample_shape(loaded), generator=torch.Generator().manual_seed(2))
reference, _ = converged_reference(loaded.model, noise, loaded.process, loaded.prediction, "dpmpp_2m", steps, 1.0)
for nfe, entry in sorted(other.entries.items()):
    errors = [
        rms_error(
            fewstep.sample(
                loaded.model, noise, process=loaded.process, prediction=loaded.prediction, solver="auto", nfe=nfe, tuning=tuning
            ),
            reference,
        )  # fmt: skip
        for tuning in (loaded.model.tuning, other)
    ]
    corrected = " + corrections" if entry.corrections else ""
    print(f"{name} NFE {nfe}: shipped {errors[0]:.4g}, {path} {errors[1]:.4g} ({errors[1] / errors[0]:.2f}x; "
          f"{entry.solver} {entry.grid}{corrected})")  # fmt: skip
