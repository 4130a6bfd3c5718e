"""`fewstep.tune`: choose solver and grid per NFE budget on the model itself, against its own many-step reference.

For each budget: every candidate (solver x named grid, `CANDIDATES`) is scored by the RMS error of its samples
against a many-step reference of the same model on calibration noise; the best few get their interior times
searched (`fewstep.optimize_schedule`, the idea of Align Your Steps, Sabour et al., 2024, and of the
trajectory-error schedule searches of Xue et al., 2024) on that calibration noise; then every configuration is
scored again on *selection* noise of another seed and the best there is kept (so a grid over-fitted to the
calibration samples loses); a configuration whose samples collapse toward the mean of the modes (`collapsed`) is
never chosen, however low its RMS error. The reference is checked for convergence (the same solver at half the
steps must agree to `reference_rtol`); a model whose reference does not converge is refused with the numbers. The
result is a `fewstep.Tuning` (JSON, keyed by the model's weights, process and prediction) that `fewstep.sample(...,
solver="auto", nfe=N)` uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .accuracy import rms_error
from .budget import plan_for_nfe
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
    per_sample = (half - full).double().flatten(1).pow(2).mean(1).sqrt() / 3.0
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


def _score(model, noise, reference, process, prediction, solver, steps, schedule, denoise, t_end=None, guard=True) -> float:
    """RMS error to the reference; inf where the run diverged or (with `guard`) collapsed (`collapsed`)."""
    x = sample(model, noise, process=process, prediction=prediction, solver=solver, steps=steps, schedule=schedule,
               denoise_to_zero=denoise, t_end=t_end)  # fmt: skip
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
    search_top: int = 2,
    search_iters: int = 12,
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
    configurations get their grid searched, with `search_iters` iterations each (0: no search).
    end_log_snrs: where else than at the process's t_min a grid may end before its final denoising step (log-SNR
        values; () for t_min only); each candidate is scored at each end.
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
    search_top = check_int(search_top, "search_top", minimum=0, maximum=1000)  # at most all candidates are searched
    search_iters = check_int(search_iters, "search_iters", minimum=0, maximum=10_000)
    reference_steps = check_int(reference_steps, "reference_steps", minimum=4, maximum=100_000)
    key = key_of(model) if model_key is None else model_key
    say = log or (lambda text: None)
    shape = tuple(int(n) for n in shape)

    def noise_of(s: int) -> torch.Tensor:
        return torch.randn(samples, *shape, generator=torch.Generator().manual_seed(s))

    cal, sel = noise_of(seed), noise_of(seed + 1)
    start = time.perf_counter()
    ref_cal, record = converged_reference(model, cal, process, prediction, reference_solver, reference_steps, reference_rtol)
    ref_sel, _ = converged_reference(model, sel, process, prediction, reference_solver, reference_steps, reference_rtol)
    say(f"reference: {reference_solver} {reference_steps} steps, estimated error {record['estimated_error_median']:.2e} "
        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    tuning = Tuning(key, repr(process), prediction, reference=record, name=name)
    for nfe in budgets:
        tuning.entries[nfe] = _tune_one(model, process, prediction, nfe, cal, ref_cal, sel, ref_sel, candidates,
                                        end_times(process, end_log_snrs), search_top, search_iters)  # fmt: skip
        entry = tuning.entries[nfe]
        say(f"NFE {nfe}: {entry.solver} on {entry.grid}, RMS {entry.error:.3g} (fallback {entry.fallback_error:.3g}), "
            f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return tuning


def _tune_one(
    model, process, prediction, nfe, cal, ref_cal, sel, ref_sel, candidates, ends, search_top, search_iters
) -> TunedEntry:
    """The best configuration at one budget, chosen on the selection noise (see the module doc)."""
    configs: list[dict[str, Any]] = []
    for (solver, grid), (t_end, suffix) in ((c, e) for c in candidates for e in ends):
        try:
            steps, denoise = plan_for_nfe(solver, nfe, process, t_end=t_end)
            error = _score(model, cal, ref_cal, process, prediction, solver, steps, grid, denoise, t_end)
        except ValueError:  # budget not reachable, or grid undefined on this process
            continue
        configs.append(dict(solver=solver, steps=steps, denoise=denoise, schedule=grid, t_end=t_end, label=grid + suffix,
                            cal=error))  # fmt: skip
    if not configs:
        raise ValueError(f"nfe={nfe} is below every candidate solver's minimum on {process!r}")
    ranked = sorted((c for c in configs if math.isfinite(c["cal"])), key=lambda c: c["cal"])
    for c in ranked[: search_top if search_iters > 0 else 0]:
        searched = optimize_schedule(model, process, c["solver"], nfe, cal, prediction=prediction, init=c["schedule"],
                                     reference=ref_cal, iters=search_iters, t_end=c["t_end"],
                                     denoise_to_zero=c["denoise"])  # fmt: skip
        configs.append(dict(c, schedule=searched.times, label=f"searched from {c['label']!r}", cal=searched.error))
    fallback = recommended(nfe, process)
    fallback_error = _score(model, sel, ref_sel, process, prediction, fallback["solver"], fallback["steps"],
                            fallback["schedule"], fallback["denoise_to_zero"], fallback.get("t_end"), guard=False)  # fmt: skip
    for c in configs:
        c["sel"] = _score(model, sel, ref_sel, process, prediction, c["solver"], c["steps"], c["schedule"], c["denoise"],
                          c["t_end"])  # fmt: skip
    best = min(configs, key=lambda c: c["sel"])
    if not math.isfinite(best["sel"]):
        raise TuningError(f"every configuration diverges at nfe={nfe} on this model (non-finite error)")
    t_end = process.t_min if best["t_end"] is None else best["t_end"]
    times = best["schedule"] if isinstance(best["schedule"], torch.Tensor) else Schedule(best["schedule"]).grid(
        process, best["steps"], process.t_max, t_end)  # fmt: skip
    return TunedEntry(
        nfe=nfe,
        solver=best["solver"],
        steps=best["steps"],
        times=[float(t) for t in times],
        denoise_to_zero=best["denoise"],
        grid=best["label"],
        error=best["sel"],
        fallback_error=fallback_error,
        candidates={f"{c['solver']} {c['label']}": c["sel"] for c in configs},
    )
