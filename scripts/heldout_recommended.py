"""Held-out check of fewstep.recommended against every installed peer on two mixtures the choice was not made on.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/heldout_recommended.py (prints markdown rows; README, "Benchmarks").
"""

import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.tools import peers

PROBLEMS = {
    "mixture_nd(dim=8, components=4, seed=7)": fewstep.mixture_nd(dim=8, components=4, seed=7),
    "ring2d(modes=5, std=0.15)": fewstep.ring2d(modes=5, std=0.15),
}


def main() -> None:
    process = fewstep.DiscreteVP.linear()
    for label, mixture in PROBLEMS.items():
        noise = torch.randn(256, mixture.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        reference = mixture.flow_map(noise, process)
        for nfe in (5, 6, 8, 10, 15, 20):
            errors = []
            for name, run in peers.peers().items():
                x = peers.run_at_nfe(run, mixture, noise, nfe)
                if x is not None and torch.isfinite(x).all():
                    errors.append((rms_error(x, reference), name))
            best, best_name = min(errors)
            x = fewstep.sample(mixture.model(process), noise, process=process, **fewstep.recommended(nfe, process))
            ours = rms_error(x, reference)
            print(f"| {label} | {nfe} | {best_name} | {best:.2e} | {ours:.2e} | {ours / best:.2f} |", flush=True)


if __name__ == "__main__":
    main()
