"""The measurements behind `fewstep.recommended`'s grid rule: every fixed solver x grid, worst ratio to the best.

Exact beds: ring2d and mixture16d on DiscreteVP linear (eps), DiscreteVP cosine (v) and rectified flow (velocity),
RMS error against the exact ODE solution. Learned beds: the `fewstep bench learned` JSON of digits_vp and
digits_cosine_v. Printed: per configuration and NFE, the worst ratio of its error to the best configuration's.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/fallback_sweep.py out/bench/learned.json [more learned.json ...]
(first `fewstep bench learned --models digits_vp,digits_cosine_v`; about 3 min for the exact part).
"""

import json
import math
import sys

import fewstep
from fewstep.tools.bench import accuracy

SOLVERS = ("ddim", "dpmpp_2m", "unipc", "deis", "ipndm", "dpmpp_3m")
GRIDS = ("logsnr", "quadratic", "time_uniform", "karras")
NFES = (3, 4, 5, 6, 8, 10, 15, 20)
EXACT = (("X:linear", fewstep.DiscreteVP.linear(), "eps"), ("X:cosine", fewstep.DiscreteVP.cosine(), "v"),
         ("X:flow", fewstep.RectifiedFlow(), "velocity"))  # fmt: skip


def worst_ratios(errors: dict[tuple, float]) -> dict[tuple, float]:
    """{(bed, problem, config, nfe): error} -> {(bed, config, nfe): worst ratio to the best config of its cell}."""
    best: dict[tuple, float] = {}
    for (bed, prob, _, n), e in errors.items():
        if math.isfinite(e):
            best[bed, prob, n] = min(best.get((bed, prob, n), math.inf), e)
    out: dict[tuple, float] = {}
    for (bed, prob, cfg, n), e in errors.items():
        ratio = e / best[bed, prob, n] if math.isfinite(e) else math.inf
        out[bed, cfg, n] = max(out.get((bed, cfg, n), 0.0), ratio)
    return out


def main() -> None:
    errors: dict[tuple, float] = {}
    for bed, process, prediction in EXACT:
        for row in accuracy(["ring2d", "mixture16d"], process, prediction, SOLVERS, GRIDS, NFES, progress=False):
            for n, e in row.errors.items():
                errors[bed, row.problem, (row.solver, row.schedule), n] = e
    for path in sys.argv[1:]:
        for model in json.load(open(path)):
            for r in model["rows"]:
                if r["kind"] == "fixed":
                    for n, cell in r["cells"].items():
                        rmse = cell.get("rmse")
                        errors[f"L:{model['model']}", "-", (r["solver"], r["grid"]), int(n)] = math.inf if rmse is None else rmse
    ratios = worst_ratios(errors)
    beds = sorted({b for b, _, _ in ratios})
    print("| configuration | bed | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    for cfg in ((s, g) for s in SOLVERS for g in GRIDS):
        for bed in beds:
            cells = [ratios.get((bed, cfg, n), math.nan) for n in NFES]
            print(f"| {cfg[0]} / {cfg[1]} | {bed} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")


if __name__ == "__main__":
    main()
