"""The measurement behind the later start on rectified flow (`fewstep.tune.START_LOG_SNRS`, the fallback rule of
`fewstep.recommended` for RectifiedFlow): each solver on the time-uniform grid from t_max (log-SNR -inf) and from
log-SNR -6.9 (diffusers' flow grid, sigma = 1 - 1/1000) and -5, against the best diffusers flow configuration.

Exact beds: three mixtures with velocity prediction on RectifiedFlow, RMS error to the exact flow map (noise seed 5).
Learned bed (`--learned [SEED]`): digits_flow, RMS error to its 200-step reference on 256 samples of noise SEED
(default 0, the tunings' calibration seed, on which the fallback rule was chosen; `fewstep bench learned` reports
on seed 2).

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/flow_start.py [--learned [SEED]]  (markdown rows; about 1 + 5 min)
"""

import sys

import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.tools import peers

PROBLEMS = {
    "mixture_nd(dim=8, components=4, seed=7)": fewstep.mixture_nd(dim=8, components=4, seed=7),
    "ring2d(modes=5, std=0.15)": fewstep.ring2d(modes=5, std=0.15),
    "mixture16d": fewstep.problem("mixture16d"),
}
SOLVERS = ("ipndm", "deis", "unipc", "dpmpp_2m")
STARTS = (None, -6.9, -5.0)
NFES = (3, 4, 5, 6, 8, 10, 15, 20)  # `--nfes 15,20` for fewer


def t_of(process, log_snr):
    return None if log_snr is None else float(process.t_from_log_snr(torch.tensor(log_snr, dtype=torch.float64)))


def rows(label, target, noise, reference):
    """Markdown rows: per NFE, best peer, current fallback, and each solver x start, as ratios to the best peer."""
    process = target.process
    nfes = [int(v) for v in sys.argv[sys.argv.index("--nfes") + 1].split(",")] if "--nfes" in sys.argv else NFES
    for nfe in nfes:
        found = [peers.run_at_nfe(run, target, noise, nfe) for run in peers.peers(target).values()]
        best = min(rms_error(x, reference) for x in found if x is not None and torch.isfinite(x).all())
        fallback = rms_error(fewstep.sample(target.model, noise, process=process, prediction=target.prediction,
                                            **fewstep.recommended(nfe, process)), reference)  # fmt: skip
        cells = [f"{fallback / best:.2f}"]
        for solver in SOLVERS:
            for start in STARTS:
                x = fewstep.sample(target.model, noise, process=process, prediction=target.prediction, solver=solver,
                                   steps=nfe, schedule="time_uniform", t_start=t_of(process, start))  # fmt: skip
                cells.append(f"{rms_error(x.detach(), reference) / best:.2f}")
        print(f"| {label} | {nfe} | {best:.3g} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    heads = [f"{s} from {'t_max' if v is None else v}" for s in SOLVERS for v in STARTS]
    print("| bed | NFE | best peer RMSE | fallback / peer | " + " | ".join(heads) + " |")
    print("|---|---|---|---|" + "---|" * len(heads))
    process = fewstep.RectifiedFlow()
    if "--learned" in sys.argv:
        from fewstep.sample_model import sample_shape
        from fewstep.shipped import load_model
        from fewstep.tune import converged_reference

        loaded = load_model("digits_flow")
        at = sys.argv.index("--learned") + 1
        seed = int(sys.argv[at]) if at < len(sys.argv) and sys.argv[at].isdigit() else 0
        noise = torch.randn(256, *sample_shape(loaded), generator=torch.Generator().manual_seed(seed))
        reference, _ = converged_reference(loaded.model, noise, process, loaded.prediction, "dpmpp_2m", 200, 0.01)
        rows(f"digits_flow (seed {seed})", peers.Target(loaded.model, process, loaded.prediction), noise, reference)
        return
    for label, mixture in PROBLEMS.items():
        noise = torch.randn(256, mixture.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        rows(label, peers.mixture_target(mixture, process, "velocity"), noise, mixture.flow_map(noise, process))


if __name__ == "__main__":
    main()
