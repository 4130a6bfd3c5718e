"""Fit `fewstep.corrections.Corrections` of one solver run on the model itself, against its many-step reference.

Adam through the differentiable solver run on calibration noise (the objective of LD3, Tong et al., "Learning to
Discretize Denoising Diffusion ODEs", ICLR 2025, which fits the times; here the per-evaluation corrections of
`fewstep.corrections`), early stopping on selection noise of another seed, kept only where the selection error falls.
Shapes: noise and reference [batch, ...].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .accuracy import rms_error
from .checks import check_int, check_real
from .corrections import CorrectedModel, Corrections, zero_corrections
from .parameterization import Model, check_prediction
from .processes import Process
from .sampling import sample


class _Recorder:
    """model(x, t) that records the time of every call (the run's evaluation times)."""

    def __init__(self, model: Model) -> None:
        self.model, self.times = model, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(float(torch.as_tensor(t).flatten()[0]))
        return self.model(x, t)


def evaluation_times(model: Model, noise: torch.Tensor, process: Process, prediction: str, **sample_kwargs: Any) -> list[float]:
    """The times at which one run of `fewstep.sample(model, noise, ...)` evaluates the model, in call order."""
    recorder = _Recorder(model)
    sample(recorder, noise[:1], process=process, prediction=prediction, **sample_kwargs)
    return recorder.times


def fit_corrections(
    model: Model,
    process: Process,
    prediction: str,
    sample_kwargs: dict[str, Any],
    calibration: tuple[torch.Tensor, torch.Tensor],
    selection: tuple[torch.Tensor, torch.Tensor],
    *,
    iters: int = 60,
    lr: float = 0.01,
    memory: int = 2,
    check_every: int = 10,
    patience: int | None = None,
    decay: bool = False,
    log: Callable[[str], None] | None = None,
) -> Corrections | None:
    """Fit `Corrections` for the run `fewstep.sample(model, noise, process=..., prediction=..., **sample_kwargs)`.

    calibration, selection: (noise [batch, ...], the model's reference from that noise [batch, ...]); Adam minimises
    the mean squared error on the calibration pair; every `check_every` iterations the selection RMS error is measured
    and the best state kept. Returns None where no state beats the uncorrected run on the selection pair.
    patience: stop after this many selection checks in a row without a new best (None: run all `iters`).
    decay: decay the learning rate to 0 over `iters` by a cosine (Loshchilov & Hutter, ICLR 2017).
    """
    check_prediction(prediction)
    iters = check_int(iters, "iters", minimum=1, maximum=100_000)
    memory = check_int(memory, "memory", minimum=0, maximum=16)
    check_every = check_int(check_every, "check_every", minimum=1, maximum=100_000)
    lr = check_real(lr, "lr", positive=True)
    (cal, ref_cal), (sel, ref_sel) = calibration, selection
    patience = iters if patience is None else check_int(patience, "patience", minimum=1, maximum=100_000)
    times = evaluation_times(model, cal, process, prediction, **sample_kwargs)
    start = zero_corrections(times, memory)
    params = {k: v.clone().requires_grad_(True) for k, v in start.wrap(model, process, prediction).params.items()}

    def run(noise: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        corrected = CorrectedModel(model, process, prediction, start, params)
        return sample(corrected, noise, process=process, prediction="x0", differentiable=differentiable, **sample_kwargs)

    def selection_error() -> float:
        with torch.no_grad():
            return rms_error(run(sel), ref_sel)

    before = best_error = selection_error()
    best: tuple[int, dict[str, torch.Tensor]] | None = None
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iters) if decay else None
    stale = 0
    for it in range(1, iters + 1):
        optimizer.zero_grad()
        loss = (run(cal, differentiable=True) - ref_cal).double().pow(2).mean()
        if not bool(torch.isfinite(loss)):
            break  # a step too far: keep the best state so far
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if it % check_every == 0 or it == iters:
            error = selection_error()
            if log:
                rms = float(loss.detach().sqrt())
                log(f"  corrections, iteration {it}: calibration RMS {rms:.4g}, selection RMS {error:.4g}")
            if error < best_error:
                best_error, best, stale = error, (it, {k: v.detach().clone() for k, v in params.items()}), 0
            else:
                stale += 1
                if stale >= patience:
                    break
    if best is None:
        return None
    it, values = best
    return Corrections(times=times, shift=values["shift"].tolist(), scale=values["scale"].tolist(),
                       mix=values["mix"].tolist(), error=best_error, error_before=before, iters=it)  # fmt: skip
