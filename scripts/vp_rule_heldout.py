"""Held-out check of the VP fallback rule (`fewstep.recommended`) against the best peer configuration at equal NFE.

Beds the rule was not chosen on (`scripts/vp_fallback.py` chose it on noise seed 4 of digits_vp / digits_cosine_v and
mixture_nd seeds 7-9 / ring2d): the digits models on noise seed 2 (the seed `fewstep bench learned` reports on); two
MLPs trained for this check (`configs/heldout/*.toml`: moons on linear-beta DiscreteVP with eps, swiss roll on
cosine-beta DiscreteVP with v; `fewstep train --config ...`, 4,000 steps, ~1 min each); exact mixtures mixture16d,
mixture_nd(dim=4, components=8, seed=11) and ring2d(modes=5, std=0.15) on linear/eps, cosine/v and continuous VP/x0.
Learned beds: RMS error to the model's own 200-step DPM-Solver++(2M) log-SNR run; exact beds: to the exact flow map.
Printed: per bed and NFE, the best peer (name, error) and fewstep.recommended's error and ratio.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/vp_rule_heldout.py [--out out/vpfb/heldout.json]  (~10 min)
"""

import argparse
import json
from pathlib import Path

import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.sample_model import sample_shape
from fewstep.shipped import load_model
from fewstep.tools import peers as peer_lib

NFES = (3, 4, 5, 6, 8, 10, 15, 20)


def learned_beds():
    for name, count in (("digits_vp", 256), ("digits_cosine_v", 256), ("out/heldout/moons_vp/checkpoint.json", 1000),
                        ("out/heldout/swiss_cos/checkpoint.json", 1000)):  # fmt: skip
        if name.endswith(".json") and not Path(name).exists():
            print(f"skipped {name}: train it with `fewstep train --config configs/heldout/<name>.toml`")
            continue
        loaded = load_model(name)
        noise = torch.randn(count, *sample_shape(loaded), generator=torch.Generator().manual_seed(2))
        m, process, prediction = loaded.model, loaded.process, loaded.prediction
        with torch.no_grad():
            reference = fewstep.sample(m, noise, process=process, prediction=prediction, steps=200, schedule="logsnr")
        label = f"L:{Path(name).parent.name}" if name.endswith(".json") else f"L:{name}"
        yield label, m, process, prediction, noise, reference


def exact_beds():
    problems = {"mixture16d": fewstep.problem("mixture16d"), "mixture_nd4": fewstep.mixture_nd(dim=4, components=8, seed=11),
                "ring5": fewstep.ring2d(modes=5, std=0.15)}  # fmt: skip
    processes = (("lin", fewstep.DiscreteVP.linear(), "eps"), ("cos", fewstep.DiscreteVP.cosine(), "v"),
                 ("vp", fewstep.VP(), "x0"))  # fmt: skip
    for tag, process, prediction in processes:
        for label, mixture in problems.items():
            noise = torch.randn(256, mixture.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            exact = mixture.flow_map(noise, process)
            yield f"X:{tag}:{label}", mixture.model(process, prediction), process, prediction, noise, exact


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/vpfb/heldout.json")
    parser.add_argument("--peers-from", help="an earlier --out of the same beds: reuse its peer errors")
    args = parser.parse_args()
    known = {(r["bed"], r["nfe"]): r for r in json.loads(Path(args.peers_from).read_text())} if args.peers_from else {}
    records = []
    for bed, model, process, prediction, noise, reference in (*learned_beds(), *exact_beds()):
        target = peer_lib.Target(model, process, prediction)
        runs = {} if known else peer_lib.peers(target)
        for nfe in NFES:
            if known:
                best, best_label = known[bed, nfe]["peer"], known[bed, nfe]["peer_label"]
            else:
                best, best_label = peer_lib.best_at_nfe(runs, target, noise, reference, nfe)
            kwargs = fewstep.recommended(nfe, process)
            with torch.no_grad():
                ours = rms_error(fewstep.sample(model, noise, process=process, prediction=prediction, **kwargs), reference)
            records.append(dict(bed=bed, nfe=nfe, peer=best, peer_label=best_label, ours=ours))
            print(f"| {bed} | {nfe} | {best_label} | {best:.3g} | {ours:.3g} | {ours / best:.2f} |", flush=True)
    Path(args.out).write_text(json.dumps(records))


if __name__ == "__main__":
    main()
