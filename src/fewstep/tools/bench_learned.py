"""`fewstep bench learned`: the defaults against the sweep and the peer libraries on learned models (issue 10, item 4).

Per model: the many-step reference (`fewstep.tune.converged_reference`: DPM-Solver++(2M), 200 steps, log-SNR grid
where finite) on report noise of another seed than the tuning's (tuning: seeds 0 and 1; report: 2 by default), and
at every NFE the RMS error to it and the Fréchet distance in digits-classifier features (FD; the reference's own FD is
the floor) of:

- the tuned default: `fewstep.sample(..., solver="auto", nfe=N)` (the model's tuning; where it has no entry at N,
  `solver="auto"` falls back, and the cell says so);
- the fallback default: `fewstep.sample(..., **fewstep.recommended(N, process))`;
- every fixed fewstep configuration of `fewstep.tune.CANDIDATES` (solver x grid, at exactly N evaluations);
- every diffusers scheduler and k-diffusion sampler the peer adapter (`fewstep.tools.peers`) supports for the model,
  at exactly N evaluations.

A configuration *diverges* at an NFE when its samples are not finite or its RMS error exceeds that of DDIM on the
process's default grid at the same NFE (`DDIM baseline`); such cells are marked. Each ratio of the summary (tuned and
fallback against the best peer and the best fixed configuration) comes with its paired bootstrap interval over the
noise samples (`intervals`). `fallback_analysis` turns the
full tables of several models into the worst-case ratio of each fixed configuration to the best fixed one, the
measurement behind a fallback default that holds on learned models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..accuracy import rms_error, rms_ratio_interval, squared_errors
from ..budget import plan_for_nfe
from ..io import save_figure
from ..parameterization import ModelError, SolverError
from ..processes import Process
from ..recommend import recommended
from ..sampling import sample
from ..tune import CANDIDATES, converged_reference

REFERENCE, TUNED, FALLBACK, FIXED, DIFFUSERS, KDIFFUSION = "reference", "tuned", "fallback", "fixed", "diffusers", "k-diffusion"
CONVERGED_RTOL = 0.01  # fewstep tune's reference_rtol: a reference that changes more is flagged in the report
TUNED_LABEL = 'tuned default (solver="auto")'
FALLBACK_LABEL = "fallback default (recommended)"
PEER_KINDS = (DIFFUSERS, KDIFFUSION)


@dataclass
class Cell:
    """One configuration at one NFE budget: RMS error to the reference, FD, evaluations used, and what ran."""

    rmse: float = math.nan  # NaN: not run (budget unreachable, grid undefined, peer error); inf: non-finite samples
    fd: float = math.nan
    nfe: int | None = None
    what: str = ""  # e.g. the configuration solver="auto" chose, or why the cell is empty
    fallback: bool = False  # tuned row only: solver="auto" had no tuned entry and used the fallback
    diverged: bool = False
    errors: torch.Tensor | None = field(default=None, repr=False, compare=False)  # per sample (not saved)

    @property
    def ran(self) -> bool:
        return self.nfe is not None


@dataclass
class LearnedRow:
    kind: str  # REFERENCE, TUNED, FALLBACK, FIXED, DIFFUSERS or KDIFFUSION
    label: str
    cells: dict[int, Cell] = field(default_factory=dict)
    solver: str = ""  # fixed rows: the (solver, grid) of tune.CANDIDATES
    grid: str = ""


@dataclass
class LearnedResult:
    """Everything measured on one model."""

    model: str
    process: str
    prediction: str
    nfes: list[int]
    samples: int
    seed: int
    rows: list[LearnedRow]
    reference: dict[str, Any]
    baseline: str  # the DDIM configuration divergence is judged against
    seconds: float
    # NFE -> "tuned/peer", "tuned/fixed", "fallback/peer" -> RATIO_LEVEL bootstrap interval of that ratio (`intervals`)
    intervals: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def row(self, kind: str, label: str | None = None) -> LearnedRow:
        return next(r for r in self.rows if r.kind == kind and (label is None or r.label == label))

    def kind(self, *kinds: str) -> list[LearnedRow]:
        return [r for r in self.rows if r.kind in kinds]

    def best(self, kinds: Sequence[str], nfe: int) -> tuple[LearnedRow | None, float]:
        """The row of these kinds with the lowest finite RMS error at `nfe` (None, NaN when none ran)."""
        finite = [r for r in self.kind(*kinds) if math.isfinite(r.cells[nfe].rmse)]
        if not finite:
            return None, math.nan
        best = min(finite, key=lambda r: r.cells[nfe].rmse)
        return best, best.cells[nfe].rmse

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnedResult:
        """The inverse of `to_dict` (e.g. to merge the learned.json of separate runs into one report)."""
        rows = [LearnedRow(r["kind"], r["label"], {int(n): Cell(**c) for n, c in r["cells"].items()}, r["solver"], r["grid"])
                for r in data["rows"]]  # fmt: skip
        intervals = {int(n): v for n, v in data.get("intervals", {}).items()}
        return cls(**{**data, "rows": rows, "intervals": intervals})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row in out["rows"]:
            row["cells"] = {str(n): {k: v for k, v in c.items() if k != "errors"} for n, c in row["cells"].items()}
        out["intervals"] = {str(n): v for n, v in self.intervals.items()}
        return out


def digits_fd() -> Callable[[torch.Tensor], float]:
    """FD of digit samples [n, 1, 8, 8] (clamped to [-1, 1]) to the training digits in the classifier's features."""
    from ..metrics import frechet_distance
    from .classifier import features_and_logits
    from .evaluate import reference_features

    def fd(samples: torch.Tensor) -> float:
        feats, _ = features_and_logits(samples.float().clamp(-1, 1))
        return float(frechet_distance(reference_features(), feats))

    return fd


def pooled_digits_fd(data: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """FD of one-channel images [n, 1, H, W] in [-1, 1] to `data` [m, 1, H, W], both area-pooled to 8 x 8 and embedded
    by the digits classifier (a proxy for larger digit images, e.g. the 28 x 28 MNIST: it sees the coarse shape only)."""
    from ..metrics import frechet_distance
    from .classifier import features_and_logits

    def features(x: torch.Tensor) -> torch.Tensor:
        return features_and_logits(torch.nn.functional.adaptive_avg_pool2d(x.float().clamp(-1, 1), 8))[0]

    reference = features(data)
    return lambda samples: float(frechet_distance(reference, features(samples)))


def _measure(cell: Cell, x: torch.Tensor, reference: torch.Tensor, fd: Callable[[torch.Tensor], float] | None) -> Cell:
    finite = bool(torch.isfinite(x).all())
    cell.rmse = rms_error(x, reference) if finite else math.inf
    cell.errors = squared_errors(x, reference) if finite else None
    cell.fd = fd(x) if fd is not None and finite else math.nan
    return cell


def _fewstep_cell(model, noise, reference, process, prediction, fd, budget: int, **kwargs) -> Cell:
    """Run fewstep.sample with `kwargs`; non-finite samples (SolverError / ModelError) are a divergence."""
    try:
        x = sample(model, noise, process=process, prediction=prediction, **kwargs)
    except (SolverError, ModelError) as err:
        return Cell(rmse=math.inf, nfe=budget, what=f"non-finite: {str(err)[:80]}")
    cell = _measure(Cell(nfe=x.nfe), x, reference, fd)
    choice = getattr(x, "choice", None)
    if choice is not None:
        cell.what = f"{choice['solver']} / {choice['schedule']}" + (" + corrections" if choice.get("corrected") else "")
        cell.fallback = choice["source"] != "tuned"
    return cell


@torch.no_grad()
def bench_model(
    name: str,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: Process,
    prediction: str,
    nfes: Sequence[int],
    noise: torch.Tensor,
    *,
    fd: Callable[[torch.Tensor], float] | None = None,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
    peers: bool = True,
    reference_steps: int = 200,
    reference_rtol: float = math.inf,
    seed: int = -1,
    reuse: LearnedResult | None = None,
    log: Callable[[str], None] | None = None,
) -> LearnedResult:
    """Every configuration of the report on one model, from `noise` (see the module doc).

    reuse: an earlier result of the same model, noise and reference: its fixed and peer rows are taken as they are
    (they do not depend on the model's tuning or the fallback rule) and only the tuned and fallback rows are run.

    model: `model(x, t)` predicting `prediction` on `process`; its tuning (`model.tuning`, or a `tuning_key` model's)
    is what solver="auto" uses. fd: samples -> FD (None: no FD). peers: also run the peer adapter's configurations.
    reference_rtol: refuse a reference that changes more than this (relative to the samples' RMS) from half the
    steps (default: never; the report states the change and flags one above `CONVERGED_RTOL`).
    """
    from . import peers as peer_lib

    say = log or (lambda text: None)
    start = time.perf_counter()
    nfes = [int(n) for n in nfes]
    reference, record = converged_reference(model, noise, process, prediction, "dpmpp_2m", reference_steps, reference_rtol)
    say(f"{name}: reference ({_reference_text(record)[0]}), {time.perf_counter() - start:.0f} s")
    ref_fd = fd(reference) if fd is not None else math.nan
    rows = [LearnedRow(REFERENCE, f"reference: dpmpp_2m, {reference_steps} steps",
                       {n: Cell(0.0, ref_fd, reference.nfe, "the many-step reference") for n in nfes})]  # fmt: skip
    tuned, fallback = LearnedRow(TUNED, TUNED_LABEL), LearnedRow(FALLBACK, FALLBACK_LABEL)
    fixed = [LearnedRow(FIXED, f"fewstep {s} / {g}", solver=s, grid=g) for s, g in candidates]
    target = peer_lib.Target(model, process, prediction)
    peer_runs = peer_lib.peers(target) if peers and reuse is None else {}
    peer_rows = [LearnedRow(KDIFFUSION if label.startswith("k-diffusion") else DIFFUSERS, label) for label in peer_runs]
    if reuse is not None:
        fixed, peer_rows = _reused_rows(reuse, name, noise, record, nfes)
    rows += [tuned, fallback, *fixed, *peer_rows]
    common = (model, noise, reference, process, prediction, fd)
    if reuse is not None:
        fixed, peer_rows = [], []  # taken as they are: nothing to run
    for nfe in nfes:
        tuned.cells[nfe] = _fewstep_cell(*common, nfe, solver="auto", nfe=nfe)
        kwargs = recommended(nfe, process)
        fallback.cells[nfe] = _fewstep_cell(*common, nfe, **kwargs)
        fallback.cells[nfe].what = f"{kwargs['solver']} / {kwargs['schedule']}" + "".join(
            f", {word} at log-SNR {float(process.log_snr(kwargs[key])):.3g}"
            for key, word in (("t_start", "starts"), ("t_end", "ends")) if key in kwargs
        )  # fmt: skip
        for row in fixed:
            try:
                steps, denoise = plan_for_nfe(row.solver, nfe, process)
                cell = _fewstep_cell(*common, nfe, solver=row.solver, steps=steps, schedule=row.grid, denoise_to_zero=denoise)
            except ValueError as err:  # budget below the solver's minimum, or the grid undefined on this process
                cell = Cell(what=f"n/a: {str(err)[:80]}")
            row.cells[nfe] = cell
        for row in peer_rows:
            try:
                x = peer_lib.run_at_nfe(peer_runs[row.label], target, noise, nfe)
            except Exception as err:  # a peer's own failure (e.g. an IndexError in its timestep bookkeeping)
                row.cells[nfe] = Cell(what=f"error: {type(err).__name__}: {str(err)[:60]}")
                continue
            if x is None:
                row.cells[nfe] = Cell(what=f"n/a: no step count uses exactly {nfe} evaluations")
            else:
                row.cells[nfe] = _measure(Cell(nfe=nfe), x, reference, fd)
        say(f"{name}: NFE {nfe} done, {time.perf_counter() - start:.0f} s")
    baseline = f"fewstep ddim / {process.default_schedule}"
    base = next((r for r in rows if r.kind == FIXED and r.label == baseline), None)
    for row in rows[1:]:
        for nfe, cell in row.cells.items():
            limit = base.cells[nfe].rmse if base is not None else math.inf
            cell.diverged = cell.ran and (not math.isfinite(cell.rmse) or (math.isfinite(limit) and cell.rmse > limit))
    result = LearnedResult(name, repr(process), prediction, nfes, int(noise.shape[0]), seed, rows, record,
                           baseline if base is not None else "", time.perf_counter() - start)  # fmt: skip
    result.intervals = intervals(result)
    return result


RATIO_LEVEL = 0.95


def intervals(result: LearnedResult) -> dict[int, dict[str, list[float]]]:
    """Per NFE, the RATIO_LEVEL paired-bootstrap interval (`accuracy.rms_ratio_interval`, over the noise samples) of
    the summary's ratios, tuned/peer, tuned/fixed and fallback/peer, where both cells kept their per-sample errors
    (rows reused from an earlier report did not). An RMS error at 15-20 NFE can hinge on 1 % of the samples
    (digits_cosine_v NFE 15: 28-72 % of the squared error), so a ratio's point value alone overstates what it shows."""
    out: dict[int, dict[str, list[float]]] = {}
    for n in result.nfes:
        (peer, _), (fixed, _) = result.best(PEER_KINDS, n), result.best((FIXED,), n)
        pairs = {"tuned/peer": (result.row(TUNED), peer), "tuned/fixed": (result.row(TUNED), fixed),
                 "fallback/peer": (result.row(FALLBACK), peer)}  # fmt: skip
        for label, (row, base) in pairs.items():
            a, b = row.cells[n].errors, base.cells[n].errors if base is not None else None
            if a is not None and b is not None and bool(b.sum() > 0):
                out.setdefault(n, {})[label] = list(rms_ratio_interval(a, b, level=RATIO_LEVEL))
    return out


def _reused_rows(reuse: LearnedResult, name: str, noise: torch.Tensor, record: dict[str, Any], nfes: list[int]):
    """The fixed and peer rows of `reuse` at `nfes`; ValueError unless it is a result of the same model, noise and
    reference (same samples and seed, same reference convergence record) that covers every NFE asked for."""
    same = (reuse.model, reuse.samples, reuse.reference.get("estimated_error_median")) == (
        name, int(noise.shape[0]), record.get("estimated_error_median"))  # fmt: skip
    if not same or any(n not in reuse.nfes for n in nfes):
        raise ValueError(f"reuse: the earlier report is of {reuse.model!r}, {reuse.samples} samples of seed {reuse.seed}, "
                         f"NFE {reuse.nfes}; it must be of {name!r} on the same noise and reference, at every NFE of "
                         f"{nfes}")  # fmt: skip
    keep = lambda row: LearnedRow(row.kind, row.label, {n: row.cells[n] for n in nfes}, row.solver, row.grid)  # noqa: E731
    return [keep(r) for r in reuse.kind(FIXED)], [keep(r) for r in reuse.kind(*PEER_KINDS)]


def bench_learned(
    models: Sequence[str],
    nfes: Sequence[int],
    *,
    n: int = 256,
    seed: int = 2,
    peers: bool = True,
    reuse: Sequence[LearnedResult] = (),
    reference_steps: int = 200,
    log: Callable[[str], None] | None = None,
) -> list[LearnedResult]:
    """`bench_model` on shipped models (or checkpoints) by name, from standard normal noise of `seed`, with FD;
    `reuse`: earlier results whose fixed and peer rows are taken for the model of the same name."""
    from ..sample_model import sample_shape
    from ..shipped import load_model

    fd = digits_fd()
    results = []
    for name in models:
        loaded = load_model(name)
        shape = sample_shape(loaded)
        noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
        earlier = next((r for r in reuse if r.model == name), None)
        results.append(bench_model(name, loaded.model, loaded.process, loaded.prediction, nfes, noise, fd=fd, peers=peers,
                                   seed=seed, reuse=earlier, reference_steps=reference_steps, log=log))  # fmt: skip
    return results


# Reports ------------------------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    return "-" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.3g}"


def _rmse_fd(cell: Cell) -> str:
    if not cell.ran:
        return "-"
    text = f"{_num(cell.rmse)} ({_num(cell.fd)})" if not math.isnan(cell.fd) else _num(cell.rmse)
    return text + (" †" if cell.diverged else "")


def _ratio(a: float, b: float, interval: Sequence[float] | None = None) -> str:
    if not (math.isfinite(a) and math.isfinite(b) and b > 0):
        return "-"
    return f"{a / b:.2f}" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")


def _short(label: str) -> str:
    return label.removeprefix("fewstep ").removeprefix("diffusers ")


def _reference_text(record: dict[str, Any]) -> tuple[str, float]:
    """How the reference was made and how well it converged (either form of `converged_reference`'s record), and
    its convergence measure relative to the samples' RMS."""
    scale = record.get("sample_rms", math.nan)
    head = f"{record.get('solver', 'dpmpp_2m')} {record.get('steps')} steps"
    if "estimated_error_median" in record:
        median = record["estimated_error_median"]
        text = f"{head}, estimated error {median:.2e} (median sample; largest {record.get('estimated_error_max', math.nan):.2e})"
        return text, median / scale
    change = record.get("change_from_half_steps", math.nan)
    return f"{head}, changes {change:.2e} from half the steps", change / scale


def summary_markdown(result: LearnedResult) -> str:
    """The per-NFE summary of one model: tuned and fallback defaults against the best fixed and the best peer."""
    ref = result.row(REFERENCE)
    floor = next(iter(ref.cells.values())).fd
    tuned, fallback = result.row(TUNED), result.row(FALLBACK)
    text, relative = _reference_text(result.reference)
    flag = f": NOT converged to {CONVERGED_RTOL:.0%} of the samples' RMS" if relative > CONVERGED_RTOL else ""
    lines = [
        f"**{result.model}** ({result.prediction} on {result.process}); {result.samples} samples of noise seed {result.seed}; "
        f"reference: {text}{flag}; "
        f"its FD (the floor) {_num(floor)}; {result.seconds:.0f} s"
        + (f"; ratios with their {RATIO_LEVEL:.0%} bootstrap interval over the samples" if result.intervals else "") + "\n",
        "| NFE | tuned RMSE (FD) | fallback RMSE (FD) | best fixed: name RMSE | best peer: name RMSE | tuned/peer | tuned/fixed "
        "| fallback/peer |",
        "|" + "---|" * 8,
    ]
    for n in result.nfes:
        t, f = tuned.cells[n], fallback.cells[n]
        best_fixed, fixed_err = result.best((FIXED,), n)
        best_peer, peer_err = result.best(PEER_KINDS, n)
        tuned_text = _rmse_fd(t) + (" (fallback)" if t.fallback else f" [{t.what}]")
        fixed_text = f"{_short(best_fixed.label)} {_num(fixed_err)}" if best_fixed else "-"
        peer_text = f"{_short(best_peer.label)} {_num(peer_err)}" if best_peer else "-"
        within = result.intervals.get(n, {}).get
        lines.append(f"| {n} | {tuned_text} | {_rmse_fd(f)} [{f.what}] | {fixed_text} | {peer_text} | "
                     f"{_ratio(t.rmse, peer_err, within('tuned/peer'))} | {_ratio(t.rmse, fixed_err, within('tuned/fixed'))} | "
                     f"{_ratio(f.rmse, peer_err, within('fallback/peer'))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def full_markdown(result: LearnedResult) -> str:
    """Every configuration at every NFE: RMSE (FD); best RMSE per column in bold; † diverged; - not run."""
    lines = [
        f"**{result.model}**: every configuration, RMSE to the reference (FD). † = diverged (non-finite, or RMSE above "
        f"{result.baseline or 'DDIM'} at that NFE); - = not run (budget unreachable, grid undefined, peer error).\n",
        "| configuration | " + " | ".join(f"NFE {n}" for n in result.nfes) + " |",
        "|---|" + "---|" * len(result.nfes),
    ]
    best = {n: result.best((TUNED, FALLBACK, FIXED, *PEER_KINDS), n)[1] for n in result.nfes}
    for row in result.rows:
        cells = []
        for n in result.nfes:
            c = row.cells[n]
            text = _rmse_fd(c)
            if row.kind != REFERENCE and c.ran and c.rmse == best[n]:
                text = f"**{text}**"
            if row.kind == TUNED and c.ran:
                text += " (fallback)" if c.fallback else ""
            if not c.ran and c.what.startswith("error"):
                text = "error"
            cells.append(text)
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    errors = sorted({f"{row.label}: {c.what}" for row in result.rows for c in row.cells.values() if c.what.startswith("error")})
    if errors:
        lines += ["", "Peer errors: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def _config_error(result: LearnedResult, solver: str, grid: str, nfe: int) -> float:
    """A fixed configuration's error; a grid undefined on the process (log-SNR where alpha(t_max) = 0) falls back to
    time-uniform as `fewstep.recommended` does."""
    row = next((r for r in result.kind(FIXED) if r.solver == solver and r.grid == grid), None)
    cell = row.cells[nfe] if row is not None else Cell()
    if not cell.ran and grid == "logsnr":
        return _config_error(result, solver, "time_uniform", nfe)
    return cell.rmse


def fallback_analysis(results: Sequence[LearnedResult]) -> dict[str, Any]:
    """Per NFE (common to all models) and fixed (solver, grid): the worst ratio over the models of its RMS error to
    the best fixed configuration's; the best single configuration per NFE and the fallback default's worst ratio."""
    nfes = [n for n in results[0].nfes if all(n in r.nfes for r in results)]
    configs = list(dict.fromkeys((r.solver, r.grid) for res in results for r in res.kind(FIXED)))
    worst: dict[tuple[str, str], dict[int, float]] = {c: {} for c in configs}
    fallback_worst: dict[int, float] = {}
    for n in nfes:
        bests = [res.best((FIXED,), n)[1] for res in results]
        for c in configs:
            ratios = [_config_error(res, *c, n) / b for res, b in zip(results, bests, strict=True)]
            worst[c][n] = max(ratios) if all(math.isfinite(r) for r in ratios) else math.inf
        fallback_worst[n] = max(res.row(FALLBACK).cells[n].rmse / b for res, b in zip(results, bests, strict=True))
    return {"nfes": nfes, "worst": worst, "fallback_worst": fallback_worst, "models": [r.model for r in results]}


def band_choice(analysis: dict[str, Any], band: Sequence[int]) -> tuple[tuple[str, str], float]:
    """The fixed configuration with the lowest worst-case ratio over the NFEs of `band` (and that ratio)."""
    band = [n for n in band if n in analysis["nfes"]]
    scored = {c: max(w[n] for n in band) for c, w in analysis["worst"].items()}
    best = min(scored, key=scored.get)
    return best, scored[best]


def fallback_markdown(analysis: dict[str, Any], bands: Sequence[Sequence[int]] = ()) -> str:
    """The fallback analysis as markdown: per NFE the best single fixed configuration (worst-case ratio over the
    models to the best fixed one) beside the current fallback's; then, per band, the best single configuration."""
    nfes, worst = analysis["nfes"], analysis["worst"]
    lines = [
        f"Worst-case ratio over {', '.join(analysis['models'])} of each configuration's RMSE to the best fixed "
        "configuration's (1.00 = best on every model); log-SNR falls back to time-uniform where undefined (flow).\n",
        "| NFE | best single config | its worst ratio | runner-up | its worst ratio | current fallback's worst ratio |",
        "|---|---|---|---|---|---|",
    ]
    for n in nfes:
        ranked = sorted(worst, key=lambda c: worst[c][n])
        first, second = ranked[0], ranked[1] if len(ranked) > 1 else ranked[0]
        lines.append(f"| {n} | {' / '.join(first)} | {worst[first][n]:.2f} | {' / '.join(second)} | {worst[second][n]:.2f} | "
                     f"{analysis['fallback_worst'][n]:.2f} |")  # fmt: skip
    if bands:
        lines += ["", "| NFE band | best single config over the band | worst ratio | current fallback's worst ratio |",
                  "|---|---|---|---|"]  # fmt: skip
        for band in bands:
            band = [n for n in band if n in nfes]
            if not band:
                continue
            (solver, grid), ratio = band_choice(analysis, band)
            current = max(analysis["fallback_worst"][n] for n in band)
            lines.append(f"| {band[0]}-{band[-1]} | {solver} / {grid} | {ratio:.2f} | {current:.2f} |")
    lines += ["", "Every configuration's worst ratio per NFE:\n",
              "| config | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]  # fmt: skip
    for c in sorted(worst, key=lambda c: max(worst[c].values())):
        lines.append(f"| {' / '.join(c)} | " + " | ".join(_num(worst[c][n]) for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def learned_plot(results: Sequence[LearnedResult], path: Path) -> None:
    """Log-log RMSE vs NFE, one panel per model: the tuned and fallback defaults, the best fixed configuration and
    the best peer per NFE; every other configuration thin and grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for row in res.kind(FIXED, *PEER_KINDS):
            pts = [(n, c.rmse) for n, c in row.cells.items() if math.isfinite(c.rmse) and c.rmse > 0]
            if pts:
                ax.loglog(*zip(*pts, strict=True), color="0.75", lw=0.6, zorder=1)
        for label, kinds, style in (("best fixed fewstep", (FIXED,), "k--"), ("best peer", PEER_KINDS, "r:")):
            pts = [(n, res.best(kinds, n)[1]) for n in res.nfes]
            pts = [(n, e) for n, e in pts if math.isfinite(e) and e > 0]
            if pts:
                ax.loglog(*zip(*pts, strict=True), style, lw=1.8, label=label, zorder=2)
        for row, style in ((res.row(TUNED), "o-"), (res.row(FALLBACK), "s-")):
            pts = [(n, c.rmse) for n, c in row.cells.items() if math.isfinite(c.rmse) and c.rmse > 0]
            if pts:
                ax.loglog(*zip(*pts, strict=True), style, lw=2, label=row.label, zorder=3)
        ax.set(title=f"{res.model}: {res.prediction} on {res.process[:40]}", xlabel="NFE", ylabel="RMSE vs many-step reference")
        ax.set_xticks(res.nfes, [str(n) for n in res.nfes])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def report(results: Sequence[LearnedResult], bands: Sequence[Sequence[int]] = ()) -> str:
    """The whole markdown report: summaries, then the fallback analysis (several models), then the full tables."""
    parts = ["# fewstep bench learned\n", "## Summary\n"]
    parts += [summary_markdown(r) for r in results]
    if len(results) > 1:
        parts += [
            "## Fallback analysis (fixed configurations across models)\n",
            fallback_markdown(fallback_analysis(results), bands),
        ]
    parts += ["## Every configuration\n"] + [full_markdown(r) for r in results]
    return "\n".join(parts)
