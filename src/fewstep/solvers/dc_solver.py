"""DC-Solver: a multistep predictor-corrector with dynamic compensation, and the calibration of its ratios.

Zhao, Wang, Zhou & Lu, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation",
ECCV 2024.

Base sampler (UniPC-style, Zhao et al. 2023, with exact exponential-integrator weights from `_lagrange`): at step
i an order-k exponential Adams-Bashforth predictor gives x^p_{i+1}; the network is evaluated there once and an
order-(k+1) Adams-Moulton corrector using that evaluation gives x_{i+1}. The stored data prediction of grid
point i + 1 is the one at x^p_{i+1}, not at the corrected x_{i+1}: the misalignment DC-Solver addresses.
Dynamic compensation: before step i the newest data prediction is replaced by the Lagrange interpolation (degree
`dc_order`, in time t) of the last dc_order + 1 ones at t_i^rho = rho_i t_i + (1 - rho_i) t_{i-1}; rho_i = 1 is no
compensation. `dc_calibrate` fits the ratios rho_i step by step on a few calibration samples so that each step
lands on a reference trajectory (a many-step solve), minimising the mean squared distance with a bounded
scalar search (the paper uses 40 AdamW steps on the same loss). The paper's cascade polynomial regression
(predicting ratios for unseen NFE / guidance scales) is not implemented. NFE: steps + 1, like a multistep solver.
Shapes: x [batch, ...]; ratios: one float per step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..grids import Schedule, time_grid
from ..parameterization import Model
from ..processes import Process
from ._cache import CacheError, check_model_name, digest, read_json, tensor_digest, write_json
from ._core import Run, register
from ._lagrange import combine, data_step, weights
from ._options import check_int

MAX_ORDER = 3
MAX_RATIO = 100.0  # a compensation ratio far from 1 extrapolates the data prediction by a huge polynomial


def lagrange_at(times: list[float], tau: float) -> list[float]:
    """Lagrange basis values at tau for the nodes `times`."""
    out = []
    for j, tj in enumerate(times):
        value = 1.0
        for m, tm in enumerate(times):
            if m != j:
                value *= (tau - tm) / (tj - tm)
        out.append(value)
    return out


def compensate(run: Run, i: int, history: list[torch.Tensor], ratio: float, dc_order: int) -> torch.Tensor:
    """The newest data prediction moved to t_i^rho = rho t_i + (1 - rho) t_{i-1} by Lagrange interpolation in t."""
    tau = ratio * run.t[i] + (1 - ratio) * run.t[i - 1]
    return combine(lagrange_at([run.t[i - j] for j in range(dc_order + 1)], tau), history[: dc_order + 1])


def pc_step(run: Run, i: int, x: torch.Tensor, history: list[torch.Tensor], order: int, ratio: float, dc_order: int):
    """One compensated predictor-corrector step i -> i + 1: (x_{i+1}, history with the new data prediction, its Prediction)."""
    if ratio != 1.0 and i >= dc_order and all(math.isfinite(run.log_snr[i - j]) for j in range(dc_order + 1)):
        history = [compensate(run, i, history, ratio, dc_order), *history[1:]]
    k = run.order_at(i, order)
    x_pred = data_step(run, i, x, combine(weights(run, i, [i - j for j in range(k)]), history[:k]))
    if i == run.steps - 1 or not math.isfinite(run.log_snr[i + 1]):
        return x_pred, history, None
    pred = run.denoise(x_pred, i + 1)
    kc = k + 1 if math.isfinite(run.log_snr[i]) else 1  # from alpha = 0 the e^lambda weight sits at lambda_{i+1}
    corrector = [pred.x0, *history[: kc - 1]]
    x_next = data_step(run, i, x, combine(weights(run, i, [i + 1 - j for j in range(kc)]), corrector))
    return x_next, [pred.x0, *history[: MAX_ORDER + 1]], pred


class RatioSearch:
    """Chooses each step's ratio so that the step lands closest to the reference state (used by `dc_calibrate`)."""

    def __init__(self, reference: list[torch.Tensor], bounds: tuple[float, float], dc_order: int):
        self.reference, self.bounds, self.dc_order = reference, bounds, dc_order
        self.ratios: list[float] = []

    def choose(self, i: int, trial) -> float:
        from scipy.optimize import minimize_scalar

        if i < self.dc_order:
            ratio = 1.0
        else:
            target = self.reference[i + 1]

            def loss(rho: float) -> float:
                return float((trial(rho) - target).pow(2).mean())

            res = minimize_scalar(loss, bounds=self.bounds, method="bounded", options={"xatol": 1e-4})
            ratio = float(res.x) if res.fun < loss(1.0) else 1.0
        self.ratios.append(ratio)
        return ratio


def _check_ratios(ratios: Any, steps: int) -> Sequence[float] | RatioSearch:
    if ratios is None:
        return [1.0] * steps
    if isinstance(ratios, RatioSearch):
        return ratios
    if isinstance(ratios, torch.Tensor):
        ratios = ratios.tolist()
    if not isinstance(ratios, Sequence) or len(ratios) != steps:
        raise ValueError(f"ratios must be a sequence of {steps} floats (one per step, from fewstep.dc_calibrate), got {ratios!r}")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and abs(r) <= MAX_RATIO for r in ratios):  # NaN fails
        raise ValueError(f"ratios must be finite numbers with |ratio| <= {MAX_RATIO} (about 1), got ratios={ratios!r}")
    return [float(r) for r in ratios]


@register("dc_solver", order=3)
def dc_solver(
    run: Run, x: torch.Tensor, *, ratios: Sequence[float] | None = None, order: int = 2, dc_order: int = 2
) -> torch.Tensor:
    """DC-Solver: multistep predictor-corrector (order k / k+1) with per-step dynamic compensation ratios."""
    order = check_int("order", order, 1, MAX_ORDER)
    dc_order = check_int("dc_order", dc_order, 1, 3)
    ratios = _check_ratios(ratios, run.steps)
    pred = run.denoise(x, 0)
    history = [pred.x0]
    for i in run.range():
        if isinstance(ratios, RatioSearch):
            ratio = ratios.choose(i, lambda rho, i=i, x=x, history=history: pc_step(run, i, x, history, order, rho, dc_order)[0])
        else:
            ratio = ratios[i]
        x, history, new = pc_step(run, i, x, history, order, ratio, dc_order)
        x, history = run.report(i, x, new if new is not None else pred, history)
    return x


# Calibration ------------------------------------------------------------------------------------------------

_MEMORY: dict[str, list[float]] = {}


def reference_states(
    model: Model, process: Process, noise: torch.Tensor, ts: torch.Tensor, *, prediction: str, solver: str, substeps: int
) -> list[torch.Tensor]:
    """States of a many-step solve at each time of the grid ts (each interval split into `substeps` log-SNR steps)."""
    from ..sampling import sample

    pieces = [ts[:1]]
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        finite = math.isfinite(float(process.log_snr(a))) and math.isfinite(float(process.log_snr(b)))
        pieces.append(time_grid(process, substeps, a, b, "logsnr" if finite else "time_uniform")[1:])
    fine = torch.cat(pieces)
    states = [float(process.sigma(float(ts[0]))) * noise]

    def capture(info: dict[str, Any]) -> None:
        if (info["step"] + 1) % substeps == 0:
            states.append(info["x"])

    sample(
        model,
        noise,
        process=process,
        prediction=prediction,
        solver=solver,
        steps=len(fine) - 1,
        schedule=fine,
        t_start=float(ts[0]),
        t_end=float(ts[-1]),
        denoise_to_zero=False,
        callback=capture,
    )
    return states


def dc_calibrate(
    model: Model,
    process: Process,
    steps: int,
    calibration_noise: torch.Tensor,
    *,
    prediction: str = "eps",
    schedule: Schedule = None,
    t_start: float | None = None,
    t_end: float | None = None,
    order: int = 2,
    dc_order: int = 2,
    reference_solver: str = "dpmpp_2m",
    reference_substeps: int = 20,
    ratio_range: tuple[float, float] = (0.5, 1.5),
    model_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[float]:
    """Fit DC-Solver's compensation ratios (one per step) on calibration noise [n, ...]; pass them as `ratios=`.

    With `model_name` the ratios are cached in memory and, when `cache_dir` is given, on disk as JSON (written
    atomically); without a name nothing is cached (models cannot be told apart). A corrupted cache file raises
    CacheError.
    """
    from ..sampling import sample

    steps = check_int("steps", steps, 1, 10_000)
    substeps = check_int("reference_substeps", reference_substeps, 2, 10_000)
    lo, hi = ratio_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < 1.0 < hi):
        raise ValueError(f"ratio_range must be (low, high) with low < 1 < high, got ratio_range={ratio_range!r}")
    if cache_dir is not None and model_name is None:
        raise ValueError("model_name is needed to cache ratios on disk (cache_dir is set): name the model")
    check_model_name(model_name, in_file_name=False)  # the file name is a digest of the key
    t_start = process.check_time(process.t_max if t_start is None else t_start, "t_start")
    t_end = process.check_time(process.t_min if t_end is None else t_end, "t_end")
    ts = time_grid(process, steps, t_start, t_end, schedule)
    key = {
        "method": "dc_solver",
        "process": repr(process),
        "model": model_name,
        "prediction": prediction,
        "grid": ts.tolist(),
        "order": order,
        "dc_order": dc_order,
        "reference": [reference_solver, substeps],
        "ratio_range": [lo, hi],
        "noise": tensor_digest(calibration_noise),
    }
    name = digest(key)
    path = None if cache_dir is None else Path(cache_dir) / f"dc_ratios-{name}.json"
    if model_name is not None and name in _MEMORY:
        return list(_MEMORY[name])
    if path is not None and path.exists():
        ratios = read_json(path, key).get("ratios")
        valid = isinstance(ratios, list) and len(ratios) == steps
        if not valid or not all(isinstance(r, float) and math.isfinite(r) for r in ratios):
            raise CacheError(f"cache file {path} holds no valid list of {steps} ratios; delete it to recompute")
        _MEMORY[name] = ratios
        return list(ratios)
    reference = reference_states(
        model, process, calibration_noise, ts, prediction=prediction, solver=reference_solver, substeps=substeps
    )
    search = RatioSearch(reference, (lo, hi), dc_order)
    sample(
        model,
        calibration_noise,
        process=process,
        prediction=prediction,
        solver="dc_solver",
        steps=steps,
        schedule=ts,
        t_start=t_start,
        t_end=t_end,
        denoise_to_zero=False,
        ratios=search,
        order=order,
        dc_order=dc_order,
    )
    if model_name is not None:
        _MEMORY[name] = search.ratios
    if path is not None:
        write_json(path, {"key": key, "ratios": search.ratios})
    return list(search.ratios)
