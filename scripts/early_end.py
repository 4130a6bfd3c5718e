"""The measurements behind `fewstep.recommended`'s early grid end: the fallback solver and grid at NFE 3-6, ending at
t_min against ending at log-SNR 4 / 3 / 2 / 1.5 before the final denoising step.

Learned beds (the shipped models; RMS error to a 200-step DPM-Solver++(2M) reference of the same 128 noises, and FD
on the project's digits features with --fd) and held-out exact mixtures (mixture_nd seeds 7-9, RMS error to the exact
flow map). Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/early_end.py [--fd]   (about 5 min)
"""

import math
import sys

import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.budget import plan_for_nfe
from fewstep.recommend import EARLY_END_NFES
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tools.bench_learned import digits_fd

NFES = (3, 4, 5, 6)
ENDS = (None, 4.0, 3.0, 2.0, 1.5)


def run(model, noise, process, prediction, nfe, log_snr):
    """The fallback's solver and grid at `nfe`, ending at t_min (log_snr None) or at that log-SNR."""
    kwargs = fewstep.recommended(nfe, process, t_end=process.t_min)
    lo, hi = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
    if log_snr is not None and not lo < log_snr < hi:
        return None
    t_end = process.t_min if log_snr is None else float(process.t_from_log_snr(torch.tensor(log_snr, dtype=torch.float64)))
    steps, denoise = plan_for_nfe(kwargs["solver"], nfe, process, t_end=t_end)
    kwargs.update(steps=steps, denoise_to_zero=denoise, t_end=t_end)
    return fewstep.sample(model, noise, process=process, prediction=prediction, **kwargs)


def table(rows):
    print("| bed | NFE | " + " | ".join("t_min" if e is None else f"log-SNR {e:g}" for e in ENDS) + " |")
    print("|---|---|" + "---|" * len(ENDS))
    for bed, nfe, cells in rows:
        print(f"| {bed} | {nfe} | " + " | ".join(cells) + " |")


def main() -> None:
    with_fd = "--fd" in sys.argv
    fd = digits_fd() if with_fd else None
    rows = []
    for name in ("digits_vp", "digits_cosine_v", "digits_flow"):
        loaded = load_model(name)
        m, process, prediction = loaded.model, loaded.process, loaded.prediction
        noise = torch.randn(128, *sample_shape(loaded), generator=torch.Generator().manual_seed(2))
        grid = "logsnr" if math.isfinite(float(process.log_snr(process.t_max))) else None
        with torch.no_grad():
            reference = fewstep.sample(m, noise, process=process, prediction=prediction, steps=200, schedule=grid)
            for nfe in NFES:
                cells = []
                for end in ENDS:
                    x = run(m, noise, process, prediction, nfe, end)
                    cells.append("-" if x is None else f"{rms_error(x, reference):.3f}" + (f" ({fd(x):.1f})" if fd else ""))
                rows.append((name, nfe, cells))
    for process, prediction in ((fewstep.DiscreteVP.linear(), "eps"), (fewstep.DiscreteVP.cosine(), "v")):
        noise = torch.randn(128, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        for seed in (7, 8, 9):
            mixture = fewstep.mixture_nd(dim=8, components=4, seed=seed)
            reference, model = mixture.flow_map(noise, process), mixture.model(process, prediction)
            for nfe in NFES:
                cells = []
                for end in ENDS:
                    x = run(model, noise, process, prediction, nfe, end)
                    cells.append("-" if x is None else f"{rms_error(x, reference):.3f}")
                rows.append((f"mixture_nd seed {seed} on {process!r}", nfe, cells))
    table(rows)
    print(f"\nfewstep.recommended ends at log-SNR 2 at NFE {list(EARLY_END_NFES)} on VP processes.")


if __name__ == "__main__":
    main()
