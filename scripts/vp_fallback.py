"""The measurements behind `fewstep.recommended`'s VP rule: candidate fallbacks (solver x grid x grid end) against the
best diffusers configuration at equal NFE, on learned models and exact mixtures alike.

Learned beds: digits_vp (eps, linear betas) and digits_cosine_v (v, cosine betas), RMS error to a 200-step
DPM-Solver++(2M) reference of the same noises (seed given by --seed; `fewstep bench learned` reports on seed 2).
Exact beds: mixture_nd seeds 7-9 (8-d, 4 components) and ring2d on the same two processes, RMS error to the exact
flow map. Printed per candidate and bed: ratio of its error to the best peer's at NFE 3-20, and the worst over beds.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/vp_fallback.py [--seed 4] [--out out/vpfb/sweep.json]  (~15 min)
[--models digits_vp,digits_cosine_v,out/heldout/moons_vp/checkpoint.json] [--no-exact] (checkpoints: 1,000 noises)
[--nfes 15,20] [--digits-samples 128]
"""

import argparse
import json
import math
from pathlib import Path

import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.budget import plan_for_nfe
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tools import peers as peer_lib

NFES = (3, 4, 5, 6, 8, 10, 15, 20)
SOLVERS = ("dpmpp_2m", "unipc", "deis", "ipndm", "dpmpp_3m")
GRIDS = ("time_uniform", "quadratic", "logsnr")
ENDS = ("t_min", "last_interval", 1.0, 2.0, 3.0)  # t_min, diffusers' linspace end t_max/nfe, or a log-SNR


def t_end_for(process, nfe: int, end) -> float:
    if end == "t_min":
        return float(process.t_min)
    if end == "last_interval":  # diffusers' linspace grid: nfe points from t_max down, the last one denoises
        return float(process.t_min + (process.t_max - process.t_min) / nfe)
    return float(process.t_from_log_snr(torch.tensor(end, dtype=torch.float64)))


def candidate(model, noise, process, prediction, nfe, solver, grid, end):
    t_end = t_end_for(process, nfe, end)
    steps, denoise = plan_for_nfe(solver, nfe, process, t_end=t_end)
    return fewstep.sample(model, noise, process=process, prediction=prediction, solver=solver, steps=steps,
                          schedule=grid, t_end=t_end, denoise_to_zero=denoise)  # fmt: skip


def beds(seed: int, models: list[str], exact: bool, digits_samples: int = 128):
    for name in models:
        loaded = load_model(name)
        count = digits_samples if name.startswith("digits") else 1000
        noise = torch.randn(count, *sample_shape(loaded), generator=torch.Generator().manual_seed(seed))
        m, process, prediction = loaded.model, loaded.process, loaded.prediction
        with torch.no_grad():
            reference = fewstep.sample(m, noise, process=process, prediction=prediction, steps=200, schedule="logsnr")
        yield f"L:{Path(name).parent.name if name.endswith('.json') else name}", m, process, prediction, noise, reference
    if not exact:
        return
    for process, prediction, tag in ((fewstep.DiscreteVP.linear(), "eps", "lin"), (fewstep.DiscreteVP.cosine(), "v", "cos")):
        for prob in ("mixture_nd7", "mixture_nd8", "mixture_nd9", "ring2d"):
            mixture = fewstep.ring2d() if prob == "ring2d" else fewstep.mixture_nd(dim=8, components=4, seed=int(prob[-1]))
            dim = 2 if prob == "ring2d" else 8
            noise = torch.randn(256, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            exact = mixture.flow_map(noise, process)
            yield f"X:{tag}:{prob}", mixture.model(process, prediction), process, prediction, noise, exact


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--out", default="out/vpfb/sweep.json")
    parser.add_argument("--models", default="digits_vp,digits_cosine_v", help="shipped names or checkpoint paths")
    parser.add_argument("--no-exact", action="store_true", help="learned beds only")
    parser.add_argument("--nfes", default=",".join(map(str, NFES)))
    parser.add_argument("--digits-samples", type=int, default=128, help="noises of a digits model (RMS at NFE >= 15 "
                        "hinges on the few near a boundary between modes: use 1024 there)")
    args = parser.parse_args()
    records = []
    nfes = [int(n) for n in args.nfes.split(",")]
    for bed, model, process, prediction, noise, reference in beds(args.seed, args.models.split(","), not args.no_exact,
                                                                   args.digits_samples):
        target = peer_lib.Target(model, process, prediction)
        runs = peer_lib.peers(target)
        for nfe in nfes:
            best_peer, best_label = peer_lib.best_at_nfe(runs, target, noise, reference, nfe)
            cells = {}
            for solver in SOLVERS:
                for grid in GRIDS:
                    for end in ENDS:
                        try:
                            with torch.no_grad():
                                x = candidate(model, noise, process, prediction, nfe, solver, grid, end)
                            e = rms_error(x, reference)
                        except ValueError:
                            e = math.nan
                        cells[f"{solver}|{grid}|{end}"] = e if math.isfinite(e) else None
            with torch.no_grad():
                x = fewstep.sample(model, noise, process=process, prediction=prediction, **fewstep.recommended(nfe, process))
            cells["recommended"] = rms_error(x, reference)
            records.append(dict(bed=bed, nfe=nfe, peer=best_peer, peer_label=best_label, cells=cells))
            print(bed, nfe, f"peer {best_label} {best_peer:.4g} recommended {cells['recommended']:.4g}", flush=True)
        json.dump(records, open(args.out, "w"))


if __name__ == "__main__":
    main()
