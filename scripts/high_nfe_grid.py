"""The measurement behind `fewstep.recommended`'s quadratic grid for VP processes from NFE 20: iPNDM on the log-SNR
grid against the quadratic grid, RMS error to the exact flow map (256 noises), on exact mixtures (ring2d,
mixture16d, held-out mixture_nd seeds 7-9) for DiscreteVP linear, continuous VP and EDM.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/high_nfe_grid.py   (about 2 min). The learned side is
`fewstep bench learned --models digits_vp` (rows "fewstep ipndm / logsnr" and "fewstep ipndm / quadratic").
"""

import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.gmm import problem

NFES = (9, 10, 15, 16, 20, 30, 50)


def main() -> None:
    print("| process | problem | " + " | ".join(f"NFE {n} (log-SNR / quadratic)" for n in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    for process in (fewstep.DiscreteVP.linear(), fewstep.VP(), fewstep.EDM()):
        for name in ("ring2d", "mixture16d", "nd7", "nd8", "nd9"):
            mix = fewstep.mixture_nd(dim=8, components=4, seed=int(name[2:])) if name.startswith("nd") else problem(name)
            noise = torch.randn(256, mix.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            reference, model = mix.flow_map(noise, process), mix.model(process, "eps")
            cells = []
            for nfe in NFES:
                errors = [rms_error(fewstep.sample(model, noise, process=process, solver="ipndm", steps=nfe - 1, schedule=g),
                                    reference) for g in ("logsnr", "quadratic")]  # fmt: skip
                cells.append(f"{errors[0]:.2e} / {errors[1]:.2e}")
            print(f"| {process!r} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
