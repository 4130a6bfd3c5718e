"""`fewstep.tune`: choose solver and grid per NFE budget on the model itself, against its own many-step reference.

For each budget: every candidate (solver x named grid, `CANDIDATES`) is scored by the RMS error of its samples
against a many-step reference of the same model on calibration noise; the best few get their interior times
searched (`fewstep.optimize_schedule`, the idea of Align Your Steps, Sabour et al., 2024, and of the
trajectory-error schedule searches of Xue et al., 2024) on that calibration noise, at budgets up to `SEARCH_MAX_NFE`;
then the `SELECT_TOP` best and every searched configuration are scored again on *selection* noise of another seed,
the best few there once more on a wider batch of that seed (`CONFIRM_SAMPLES`), and the best of those is kept (so a
grid over-fitted to the calibration samples loses, and a choice does not hinge on one sample near a boundary between
modes), or, with learned corrections (`calibrate_iters`), the lowest corrected error of the best configuration of
each of the `CALIBRATE_TOP` best solvers; on a process that starts at log-SNR -inf
(rectified flow) the best configurations are also scored from a finite start (`START_LOG_SNRS`); a configuration
whose samples collapse toward the mean of the modes (`collapsed`) is never chosen, however low its RMS error. The
reference is checked for convergence (the same solver at half the steps must agree to `reference_rtol`); a model
whose reference does not converge is refused with the numbers. The result is a `fewstep.Tuning` (JSON, keyed by
the model's weights, process and prediction) that `fewstep.sample(..., solver="auto", nfe=N)` uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .accuracy import rms_error, squared_errors
from .budget import plan_for_nfe
from .calibrate import fit_corrections
from .checks import check_int, check_real
from .grids import SCHEDULES, Schedule
from .parameterization import check_prediction
from .processes import Process
from .recommend import recommended
from .sampling import sample
from .schedule_search import optimize_schedule
from .tuning import TunedEntry, Tuning, TuningError
from .tuning import model_key as key_of

# Fixed configurations scored at every budget: the solvers that win somewhere on the exact mixtures or the learned
# digits models (README, "Benchmarks"), each on the grids that matter for them. Grids undefined on a process (a
# log-SNR grid where alpha = 0 at t_start) are skipped.
CANDIDATES: tuple[tuple[str, str], ...] = tuple(
    (solver, grid)
    for solver in ("ddim", "dpmpp_2m", "unipc", "deis", "ipndm", "dpmpp_3m")
    for grid in ("logsnr", "quadratic", "time_uniform", "karras")
)
# Where a grid may end before its final denoising evaluation, as log-SNR values, besides the process's own t_min.
# At 4-6 evaluations a grid that stops at log-SNR 2-3 and denoises from there spends its steps where the sample is
# still being decided; on digits_vp at NFE 5 (dpmpp_2m, quadratic grid) RMS error 0.175 -> 0.110 and FD 2.9 -> 2.5
# against t_min (README, "On the learned models"). Ends above log-SNR 1.5 are not tried: from there the final data
# prediction is visibly blurred (lower RMS error, higher FD: 0.111 / 3.1 at log-SNR 1).
END_LOG_SNRS: tuple[float, ...] = (3.0, 2.0, 1.5)
# Where a grid may start besides t_max, as log-SNR values, on a process whose log-SNR is -inf at t_max (rectified
# flow, zero terminal SNR): there the first evaluation cannot enter a multistep formula (its log-SNR step is
# infinite), so every multistep solver's second step is first order, and the UniC corrector skips the first step. A
# grid that starts at a finite log-SNR from x = sigma(t_start) * noise keeps them (the alpha(t_start) * x0 part of
# the state it drops is measured with the rest). -6.9 is diffusers' flow grid, which starts at sigma = 1 - 1/1000;
# digits_flow, 256 samples of seed 2, time-uniform grid, RMS error from t_max -> from log-SNR -6.9: UniPC NFE 15
# 0.042 -> 0.020 (diffusers' UniPC bh2 flow: 0.021), iPNDM NFE 10 0.043 -> 0.027, NFE 5 0.086 -> 0.074.
START_LOG_SNRS: tuple[float, ...] = (-6.9, -5.0, -4.0, -3.0)
START_TOP = 4  # how many of the best configurations from t_max (on the calibration noise) are tried at each start
# The chosen configuration's per-evaluation corrections (`fewstep.corrections`: time shift, noise scaling, mixing of
# earlier data predictions) are fitted by CALIBRATE_ITERS Adam iterations, lr CALIBRATE_LR decayed to 0 by a cosine, on
# CONFIRM_SAMPLES samples of the calibration seed (on 64 they over-fit: digits_vp NFE 8, selection error 0.0575 ->
# 0.0485 but report error 0.061 -> 0.073), checked on the confirmation batch every CALIBRATE_CHECK_EVERY iterations
# (the best state kept). The shipped tunings were fitted with 60 iterations at a constant lr 0.01; 30 decayed from
# 0.02 take half the time, held-out RMS (256 samples of seed 2) 60 / 30 iterations: digits_vp NFE 5 0.092 / 0.093,
# NFE 8 0.045 / 0.051; digits_cosine_v NFE 6 0.040 / 0.045, NFE 10 0.019 / 0.019; digits_flow NFE 10 0.019 / 0.018.
# A constant lr 0.02 stopped after 3 checks without a new best lost more (digits_cosine_v NFE 10: 0.031).
CALIBRATE_ITERS = 30
CALIBRATE_LR = 0.02
CALIBRATE_CHECK_EVERY = 5
# The corrections change the order of the best configurations: with calibrate_top = k the best configuration of each
# of the k best solvers on the confirmation batch gets corrections fitted, and the lowest corrected error there wins
# (one per solver: the same solver on a nearby grid corrects to about the same error). digits_cosine_v NFE 8, held out
# (256 samples of seed 2): UniPC on a searched grid 0.036 on the confirmation batch, iPNDM time-uniform to log-SNR 3
# 0.045; corrected 0.045 -> 0.026 for iPNDM, kept; held-out 0.028 against 0.038 for the former tuning (iPNDM on a
# searched grid + corrections, chosen and corrected alone; README, "On the learned models"). k = 2 costs 1.4x the
# time of a budget (digits_vp NFE 8: 355 s against 249 s on one loaded core), past the 2-minute target on two idle
# cores, so the default fits one; the shipped tunings used 2.
CALIBRATE_TOP = 1
# Grids are searched (`optimize_schedule`: finite differences, 2 (steps - 1) + 1 runs per iteration, so its cost grows
# as NFE squared) at budgets up to SEARCH_MAX_NFE: in the shipped tunings of the three digits models a searched grid
# was chosen at 14 of the 21 budgets 3-9 and at none of the 3 at NFE 10.
SEARCH_MAX_NFE = 9
# The search's cost is held to that of `search_top` searches at SEARCH_FULL_NFE: above it fewer configurations are
# searched (at least one), search_top * SEARCH_FULL_NFE**2 // nfe**2 of them, so 1 of the default 2 at NFE 7-9. In the
# shipped tunings the second-ranked searched grid won at NFE 7-9 on digits_vp NFE 8 (0.4 % below the best fixed
# configuration) and digits_cosine_v NFE 8 (2.5 %), the first-ranked one at digits_vp NFE 7 (15 %) and 9 (2 %).
SEARCH_FULL_NFE = 6
# Only the SELECT_TOP best configurations on the calibration noise (and every searched one) are scored on the
# selection noise; the chosen configuration ranked 0-9 of 64-96 there (three digits models, NFE 5-10).
SELECT_TOP = 24


def searched_count(search_top: int, nfe: int) -> int:
    """How many of the best configurations get their grid searched at `nfe` (see SEARCH_FULL_NFE)."""
    return min(search_top, max(1, search_top * SEARCH_FULL_NFE**2 // nfe**2))


def end_times(process: Process, end_log_snrs: Sequence[float]) -> list[tuple[float | None, str]]:
    """(t_end, label suffix) for each grid end to try: None (the process's t_min) and each log-SNR strictly inside the
    process's log-SNR range."""
    low, high = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
    ends: list[tuple[float | None, str]] = [(None, "")]
    for log_snr in end_log_snrs:
        if low < log_snr < high:
            t_end = float(process.t_from_log_snr(torch.tensor(float(log_snr), dtype=torch.float64)))
            ends.append((t_end, f", ends at log-SNR {log_snr:g}"))
    return ends


# The selection error of 64 samples is dominated by the few that lie near a boundary between modes (digits_flow: a
# sample's error there is 10-100x the median's), so the order of close configurations on 64 samples does not carry
# over to other noise. The CONFIRM_TOP best on the selection batch are scored again on CONFIRM_SAMPLES samples of the
# selection seed and the best there is kept. digits_flow, RMS error on 64 / 256 samples of seed 1 -> 256 of seed 2:
# NFE 15, iPNDM quadratic ending at log-SNR 3 0.0185 / 0.0261 -> 0.0413, DEIS time-uniform ending there 0.0192 /
# 0.0176 -> 0.0369; NFE 5, UniPC on a searched grid 0.1013 / 0.1045 -> 0.0914, UniPC time-uniform 0.1031 / 0.0990
# -> 0.0825 (README, "On the learned models"). At NFE 15-20 even 1,024 samples of one seed can mislead: 1 % of the
# samples carry 28-72 % of the squared error (digits_cosine_v NFE 15; 500-step reference), and iPNDM time-uniform to
# log-SNR 3 gives 0.0137 on 1,024 samples of seed 1 but 0.0208 on seed 3, UniPC quadratic to 3 0.0179 / 0.0122;
# confirm on 2,048+ samples there (`confirm_samples`; the reference's cost grows with it).
CONFIRM_SAMPLES = 256
CONFIRM_TOP = 4


def start_times(process: Process, start_log_snrs: Sequence[float]) -> list[tuple[float, str]]:
    """(t_start, label suffix) for each later start to try: none where the process's log-SNR at t_max is finite, else
    each log-SNR below the one at t_min (`START_LOG_SNRS`)."""
    if math.isfinite(float(process.log_snr(process.t_max))):
        return []
    high = float(process.log_snr(process.t_min))
    return [(float(process.t_from_log_snr(torch.tensor(float(v), dtype=torch.float64))), f", starts at log-SNR {v:g}")
            for v in start_log_snrs if v < high]  # fmt: skip


def _reference(model, noise, process, prediction, solver: str, steps: int) -> torch.Tensor:
    schedule = "logsnr" if all(math.isfinite(float(process.log_snr(t))) for t in (process.t_min, process.t_max)) else None
    return sample(model, noise, process=process, prediction=prediction, solver=solver, steps=steps, schedule=schedule)


def converged_reference(
    model, noise: torch.Tensor, process: Process, prediction: str, solver: str, steps: int, rtol: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The `steps`-step reference of `model` from `noise` and a record of its convergence (vs steps // 2).

    Each sample's own error is estimated as Richardson does for a second-order solver, |x_N - x_{N/2}| / 3 (the
    error falls 4x when the steps double). TuningError when the median sample's estimate exceeds `rtol` times the
    samples' RMS: the reference is then not a reference, and tuning against it would tune to its error. The median,
    because a learned flow is chaotic near the boundary between two modes: a sample there moves far under any
    perturbation (digits_flow: one in 64 samples changes 10x more than the rest), whatever the step count.
    """
    full = _reference(model, noise, process, prediction, solver, steps)
    half = _reference(model, noise, process, prediction, solver, steps // 2)
    per_sample = squared_errors(half, full).sqrt() / 3.0
    median, scale = float(per_sample.median()), float(full.double().pow(2).mean().sqrt())
    record = dict(solver=solver, steps=steps, estimated_error_median=median, estimated_error_max=float(per_sample.max()),
                  estimated_error_rms=float(per_sample.pow(2).mean().sqrt()), sample_rms=scale)  # fmt: skip
    if not bool(torch.isfinite(per_sample).all()) or median > rtol * max(scale, 1e-12):
        raise TuningError(
            f"the reference does not converge: {solver} with {steps // 2} and {steps} steps gives a median sample an "
            f"estimated error of {median:.3g} RMS ({median / max(scale, 1e-12):.2%} of the samples' RMS {scale:.3g}; allowed "
            f"{rtol:.2%}; largest {record['estimated_error_max']:.3g}); raise reference_steps or check the model"
        )
    return full, record


# A configuration whose samples vary across the batch less than this fraction of the reference's (variance per
# feature, averaged) has collapsed toward the mean of several modes: its RMS error can be low while its samples are
# wrong (digits_vp, DEIS at NFE 3 ending at log-SNR 2: RMS 0.392 vs 0.422 at t_min, but variance 0.30 of the
# reference's and FD 154 vs 38). Measured ratios of sound configurations: 0.72-1.3.
COLLAPSE_RATIO = 0.6


def collapsed(x: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether samples x [batch, ...] vary across the batch less than COLLAPSE_RATIO times the reference's."""
    spread = x.double().flatten(1).var(0).mean()
    return bool(spread < COLLAPSE_RATIO * reference.double().flatten(1).var(0).mean())


def _score(
    model, noise, reference, process, prediction, solver, steps, schedule, denoise, t_end=None, guard=True, t_start=None
) -> float:
    """RMS error to the reference; inf where the run diverged or (with `guard`) collapsed (`collapsed`)."""
    x = sample(model, noise, process=process, prediction=prediction, solver=solver, steps=steps, schedule=schedule,
               denoise_to_zero=denoise, t_end=t_end, t_start=t_start)  # fmt: skip
    error = rms_error(x, reference)
    return error if math.isfinite(error) and not (guard and collapsed(x, reference)) else math.inf


def tune(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: Process,
    prediction: str,
    nfes: Sequence[int],
    *,
    shape: Sequence[int],
    samples: int = 64,
    seed: int = 0,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
    end_log_snrs: Sequence[float] = END_LOG_SNRS,
    start_log_snrs: Sequence[float] = START_LOG_SNRS,
    start_top: int = START_TOP,
    search_top: int = 2,
    search_iters: int = 12,
    search_max_nfe: int = SEARCH_MAX_NFE,
    select_top: int = SELECT_TOP,
    confirm_samples: int = CONFIRM_SAMPLES,
    confirm_top: int = CONFIRM_TOP,
    calibrate_iters: int = CALIBRATE_ITERS,
    calibrate_top: int = CALIBRATE_TOP,
    calibrate_samples: int | None = None,
    reference_solver: str = "dpmpp_2m",
    reference_steps: int = 200,
    reference_rtol: float = 0.01,
    model_key: str | None = None,
    name: str = "",
    log: Callable[[str], None] | None = None,
) -> Tuning:
    """Tune `model` (predicting `prediction` on `process`) at each budget in `nfes`; returns a `fewstep.Tuning`.

    shape: one sample's shape (e.g. (1, 8, 8)); samples: calibration and selection batch sizes; seed: calibration
    noise seed (selection uses seed + 1; report on another seed). search_top: how many of the best fixed
    configurations get their grid searched at NFE <= SEARCH_FULL_NFE (fewer above it, `searched_count`), with
        `search_iters` iterations each (0: no search).
    end_log_snrs: where else than at the process's t_min a grid may end before its final denoising step (log-SNR
        values; () for t_min only); each candidate is scored at each end.
    start_log_snrs, start_top: where a process whose log-SNR is -inf at t_max may also start (log-SNR values; () for
        t_max only); the `start_top` best configurations from t_max (on the calibration noise) are scored at each.
    confirm_samples, confirm_top: the `confirm_top` best configurations on the selection noise are scored again on
        `confirm_samples` samples of the selection seed (a superset of the selection batch) and the best there is
        kept (`CONFIRM_SAMPLES`; no confirmation where confirm_top is 0 or confirm_samples <= samples).
    calibrate_iters: Adam iterations of the learned corrections (`fewstep.corrections`) of the best configuration of
        each of the `calibrate_top` best solvers on the confirmation batch, fitted on max(samples, calibrate_samples)
        samples of the calibration seed (calibrate_samples: default confirm_samples) and stopped early on the
        confirmation batch; kept only where they lower the error there, and the lowest error wins (0: none;
        `CALIBRATE_ITERS`, `CALIBRATE_TOP`).
    model_key: the key of a model that is not a torch module (default: its weights' SHA-256, `tuning.model_key`).
    """
    check_prediction(prediction)
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    budgets = [check_int(n, "nfes", minimum=2, maximum=1000) for n in (nfes if isinstance(nfes, (list, tuple)) else [nfes])]
    if not budgets:
        raise ValueError("nfes must hold at least one NFE budget, e.g. [4, 5, 6, 8, 10]")
    samples = check_int(samples, "samples", minimum=2, maximum=100_000)
    for _, grid in candidates:
        if grid not in SCHEDULES:
            raise ValueError(f"candidate grid {grid!r} is not known; allowed values: {', '.join(SCHEDULES)}")
    end_log_snrs = [check_real(v, "end_log_snrs") for v in end_log_snrs]
    start_log_snrs = [check_real(v, "start_log_snrs") for v in start_log_snrs]
    start_top = check_int(start_top, "start_top", minimum=0, maximum=1000)
    search_top = check_int(search_top, "search_top", minimum=0, maximum=1000)  # at most all candidates are searched
    search_iters = check_int(search_iters, "search_iters", minimum=0, maximum=10_000)
    search_max_nfe = check_int(search_max_nfe, "search_max_nfe", minimum=0, maximum=1000)
    select_top = check_int(select_top, "select_top", minimum=1, maximum=100_000)
    confirm_samples = check_int(confirm_samples, "confirm_samples", minimum=2, maximum=100_000)
    confirm_top = check_int(confirm_top, "confirm_top", minimum=0, maximum=1000)
    calibrate_iters = check_int(calibrate_iters, "calibrate_iters", minimum=0, maximum=100_000)
    calibrate_top = check_int(calibrate_top, "calibrate_top", minimum=1, maximum=1000)
    calibrate_samples = confirm_samples if calibrate_samples is None else check_int(
        calibrate_samples, "calibrate_samples", minimum=2, maximum=100_000)  # fmt: skip
    reference_steps = check_int(reference_steps, "reference_steps", minimum=4, maximum=100_000)
    key = key_of(model) if model_key is None else model_key
    say = log or (lambda text: None)
    shape = tuple(int(n) for n in shape)

    def noise_of(s: int, n: int) -> torch.Tensor:  # the first m rows of n are those of m: the batches nest
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(s))

    confirm = confirm_top > 0 and confirm_samples > samples
    wide_samples = confirm_samples if confirm else samples
    cal_all = noise_of(seed, max(samples, calibrate_samples) if calibrate_iters else samples)
    wide = noise_of(seed + 1, wide_samples)
    start = time.perf_counter()
    ref_all, record = converged_reference(model, cal_all, process, prediction, reference_solver, reference_steps, reference_rtol)
    ref_wide, _ = converged_reference(model, wide, process, prediction, reference_solver, reference_steps, reference_rtol)
    beds = dict(cal=(cal_all[:samples], ref_all[:samples]), sel=(wide[:samples], ref_wide[:samples]),
                confirm=(wide, ref_wide) if confirm else None)  # fmt: skip
    beds["calibrate"] = (cal_all, ref_all) if calibrate_iters else None
    say(f"reference: {reference_solver} {reference_steps} steps, estimated error {record['estimated_error_median']:.2e} "
        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    tuning = Tuning(key, repr(process), prediction, reference=record, name=name)
    for nfe in budgets:
        grids = dict(candidates=candidates, ends=end_times(process, end_log_snrs), starts=start_times(process, start_log_snrs))
        searched = searched_count(search_top, nfe) if nfe <= search_max_nfe else 0
        tops = dict(start_top=start_top, search_top=searched, search_iters=search_iters, select_top=select_top,
                    confirm_top=confirm_top, solvers=calibrate_top if calibrate_iters else 1)  # fmt: skip
        ranked = _tune_one(model, process, prediction, nfe, beds, **grids, **tops)
        best = [e for i, e in enumerate(ranked) if e.solver not in {r.solver for r in ranked[:i]}][: tops["solvers"]]
        for entry in best if calibrate_iters else []:
            _calibrate(model, process, prediction, entry, beds, calibrate_iters)
        entry = tuning.entries[nfe] = min(best, key=lambda e: e.error)
        corrected = f", corrected from {entry.corrections['error_before']:.3g}" if entry.corrections else ""
        say(f"NFE {nfe}: {entry.solver} on {entry.grid}, RMS {entry.error:.3g}{corrected} (fallback {entry.fallback_error:.3g}), "
            f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return tuning


def _fallback_error(model, bed: tuple[torch.Tensor, torch.Tensor], process, prediction, nfe: int) -> float:
    """RMS error on bed = (noise, reference) of `fewstep.recommended(nfe, process)`, what solver="auto" runs untuned."""
    fallback = recommended(nfe, process)
    return _score(model, *bed, process, prediction, fallback["solver"], fallback["steps"], fallback["schedule"],
                  fallback["denoise_to_zero"], fallback.get("t_end"), False, fallback.get("t_start"))  # fmt: skip


def _tune_one(
    model,
    process,
    prediction,
    nfe,
    beds,
    *,
    candidates,
    ends,
    starts,
    start_top,
    search_top,
    search_iters,
    select_top,
    confirm_top,
    solvers=1,
) -> list[TunedEntry]:
    """The best configurations at one budget, best first: the `confirm_top` best on the selection noise and the best
    of each next solver until `solvers` solvers are among them, ordered by their error on the confirmation batch
    (where there is one; see the module doc).

    beds: "cal", "sel" and "confirm" (or None) -> (noise, reference)."""
    (cal, ref_cal), (sel, ref_sel) = beds["cal"], beds["sel"]
    configs: list[dict[str, Any]] = []

    def add(solver: str, grid: str, t_end: float | None, t_start: float | None, label: str) -> None:
        try:
            steps, denoise = plan_for_nfe(solver, nfe, process, t_end=t_end)
            error = _score(model, cal, ref_cal, process, prediction, solver, steps, grid, denoise, t_end, t_start=t_start)
        except ValueError:  # budget not reachable, or grid undefined on this process
            return
        configs.append(dict(solver=solver, steps=steps, denoise=denoise, schedule=grid, t_end=t_end, t_start=t_start,
                            label=label, cal=error))  # fmt: skip

    for (solver, grid), (t_end, suffix) in ((c, e) for c in candidates for e in ends):
        add(solver, grid, t_end, None, grid + suffix)
    if not configs:
        raise ValueError(f"nfe={nfe} is below every candidate solver's minimum on {process!r}")
    from_t_max = sorted((c for c in configs if math.isfinite(c["cal"])), key=lambda c: c["cal"])[:start_top]
    for c, (t_start, suffix) in ((c, s) for c in from_t_max for s in starts):
        add(c["solver"], c["schedule"], c["t_end"], t_start, c["label"] + suffix)
    ranked = sorted((c for c in configs if math.isfinite(c["cal"])), key=lambda c: c["cal"])
    for c in ranked[: search_top if search_iters > 0 else 0]:
        searched = optimize_schedule(model, process, c["solver"], nfe, cal, prediction=prediction, init=c["schedule"],
                                     reference=ref_cal, iters=search_iters, t_end=c["t_end"], t_start=c["t_start"],
                                     denoise_to_zero=c["denoise"])  # fmt: skip
        configs.append(dict(c, schedule=searched.times, label=f"searched from {c['label']!r}", cal=searched.error,
                            searched=True))  # fmt: skip
    scored = ranked[:select_top] + [c for c in configs if c.get("searched")]
    for c in scored:
        c["sel"] = _score(model, sel, ref_sel, process, prediction, c["solver"], c["steps"], c["schedule"], c["denoise"],
                          c["t_end"], t_start=c["t_start"])  # fmt: skip
    ranked = sorted((c for c in scored if math.isfinite(c["sel"])), key=lambda c: c["sel"])
    if not ranked:
        raise TuningError(f"every configuration diverges at nfe={nfe} on this model (non-finite error)")
    final = beds["confirm"] or beds["sel"]
    top = ranked[: max(confirm_top, 1)]
    for c in ranked[len(top) :]:  # the best configuration of each next solver, until `solvers` solvers are in
        included = {t["solver"] for t in top}
        if len(included) >= solvers:
            break
        if c["solver"] not in included:
            top.append(c)
    for c in top:
        c["final"] = c["sel"] if beds["confirm"] is None else _score(
            model, *final, process, prediction, c["solver"], c["steps"], c["schedule"], c["denoise"], c["t_end"],
            t_start=c["t_start"])  # fmt: skip
    top = sorted((c for c in top if math.isfinite(c["final"])), key=lambda c: c["final"]) or ranked[:1]
    fallback_error = _fallback_error(model, final, process, prediction, nfe)
    candidates = {
        f"{c['solver']} {c['label']}": c.get("sel", math.inf) for c in configs if "sel" in c or not math.isfinite(c["cal"])
    }
    confirmed = {f"{c['solver']} {c['label']}": c["final"] for c in configs if "final" in c} if beds["confirm"] else {}
    return [_entry(process, nfe, c, fallback_error, candidates, confirmed) for c in top]


def _entry(process, nfe: int, best: dict[str, Any], fallback_error: float, candidates, confirmed) -> TunedEntry:
    """The TunedEntry of one scored configuration (its error: on the confirmation batch where there is one)."""
    t_end = process.t_min if best["t_end"] is None else best["t_end"]
    t_start = process.t_max if best["t_start"] is None else best["t_start"]
    times = best["schedule"] if isinstance(best["schedule"], torch.Tensor) else Schedule(best["schedule"]).grid(
        process, best["steps"], t_start, t_end)  # fmt: skip
    error = best["final"] if math.isfinite(best.get("final", math.inf)) else best["sel"]
    return TunedEntry(nfe=nfe, solver=best["solver"], steps=best["steps"], times=[float(t) for t in times],
                      denoise_to_zero=best["denoise"], grid=best["label"], error=error, fallback_error=fallback_error,
                      candidates=dict(candidates), confirmed=dict(confirmed))  # fmt: skip


def correct(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tuning: Tuning,
    process: Process,
    prediction: str,
    *,
    shape: Sequence[int],
    nfes: Sequence[int] | None = None,
    samples: int = CONFIRM_SAMPLES,
    seed: int = 0,
    iters: int = CALIBRATE_ITERS,
    reference_solver: str = "dpmpp_2m",
    reference_steps: int = 200,
    reference_rtol: float = 0.01,
    log: Callable[[str], None] | None = None,
) -> Tuning:
    """Fit the learned corrections of the entries of an existing `tuning` of `model` (at `nfes`, default all), keeping
    their solvers and grids: what `tune(..., calibrate_iters=iters)` adds to a fresh tuning, on `samples` samples of
    `seed` (fitting) and of seed + 1 (early stopping and the stored error; the entries' `fallback_error` is measured
    there again, for the current `fewstep.recommended`). Updates `tuning` in place and returns it."""
    tuning.check(key_of(model), process, prediction)
    chosen = sorted(tuning.entries) if nfes is None else [check_int(n, "nfes", minimum=2, maximum=1000) for n in nfes]
    missing = [n for n in chosen if n not in tuning.entries]
    if missing:
        raise ValueError(f"nfes {missing} have no entry in this tuning (tuned: {', '.join(map(str, sorted(tuning.entries)))})")
    samples, iters = (
        check_int(samples, "samples", minimum=2, maximum=100_000),
        check_int(iters, "iters", minimum=1, maximum=100_000),
    )
    say, shape = log or (lambda text: None), tuple(int(n) for n in shape)
    beds: dict[str, Any] = {"sel": None}
    for name, s in (("calibrate", seed), ("confirm", seed + 1)):
        noise = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(s))
        beds[name] = (
            noise,
            converged_reference(model, noise, process, prediction, reference_solver, reference_steps, reference_rtol)[0],
        )
    start = time.perf_counter()
    for nfe in chosen:
        entry = tuning.entries[nfe]
        before = entry.error
        entry.fallback_error = _fallback_error(model, beds["confirm"], process, prediction, nfe)  # the current rule's
        _calibrate(model, process, prediction, entry, beds, iters)
        done = (
            f"RMS {entry.corrections['error_before']:.3g} -> {entry.error:.3g}"
            if entry.corrections
            else f"no gain (RMS {before:.3g})"
        )
        say(f"NFE {nfe}: {entry.solver} on {entry.grid}, corrections: {done}, {time.perf_counter() - start:.0f} s")
    return tuning


def _calibrate(model, process, prediction, entry: TunedEntry, beds, iters: int) -> None:
    """Fit the learned corrections of `entry`'s configuration (`fewstep.calibrate`); store them where they pay."""
    fitted = fit_corrections(
        model, process, prediction, entry.sample_kwargs(), beds["calibrate"], beds["confirm"] or beds["sel"], iters=iters,
        lr=CALIBRATE_LR, check_every=CALIBRATE_CHECK_EVERY, decay=True,
    )  # fmt: skip
    entry.corrections = {}
    if fitted is not None:  # fit_corrections keeps them only where they lower the selection error
        entry.corrections, entry.error = fitted.to_dict(), fitted.error
