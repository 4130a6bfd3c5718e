"""Learned per-evaluation corrections of one solver run, fitted on the model itself against its many-step reference.

Each network evaluation k of a fixed solver run (solver, grid, NFE) is corrected in three ways; zero is no change:

- shift_k: the network is told the log-SNR lambda(t_k) + shift_k (the time-shift sampler of Li et al., "Alleviating
  Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps", ICLR 2024, chose the shift by a
  variance rule; here it is fitted);
- scale_k: its noise prediction is scaled by 1 + scale_k (epsilon scaling, Ning et al., "Elucidating the Exposure
  Bias in Diffusion Models", ICLR 2024), x0 <- x0 - scale_k (sigma / alpha) eps, where sigma <= alpha; at higher
  noise x0 <- x0 - scale_k eps (a step of the fit then moves x0 by at most its size in units of the noise, not by
  sigma / alpha times it: 160x at the start of a cosine schedule);
- mix_k: its data prediction moves toward the previous `memory` ones, x0 <- x0 + sum_j mix_kj (x0_{k-j} - x0): a
  learned form of DC-Solver's compensation (Zhao et al., ECCV 2024); through the solver's own linear combination of
  the data predictions it reaches learned multistep weights, as Bespoke Solvers (Shaul et al., ICLR 2024) and S4S
  (Frankel et al., ICML 2025) learn them.

`fewstep.calibrate.fit_corrections` fits them with Adam through the differentiable solver run on calibration noise, against the
model's reference from that noise (the objective of LD3, Tong et al., "Learning to Discretize Denoising Diffusion
ODEs", ICLR 2025, there for the times only), stops early on selection noise of another seed and keeps them only where
they lower the selection error. (3 + memory) numbers per evaluation; they belong to one model, solver and grid, and
the corrected model refuses an evaluation beyond the fitted ones or at another time than its fitted time.
Shapes: x [batch, ...], t a scalar or [batch]; the corrected model returns a data prediction (prediction="x0").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .parameterization import Coefficients, Model, check_prediction, to_x0_eps
from .processes import Process

TIME_RTOL = 1e-6  # an evaluation's time must match its fitted time to this relative tolerance


@dataclass
class Corrections:
    """Fitted corrections of one solver run: per evaluation (in call order) its time, shift, scale and mix weights."""

    times: list[float]
    shift: list[float]
    scale: list[float]
    mix: list[list[float]]
    error: float = math.nan  # RMS error to the reference on the selection noise, corrected
    error_before: float = math.nan  # the same uncorrected
    iters: int = 0  # the Adam iteration kept (early stopping on the selection noise)

    def __post_init__(self) -> None:
        n = len(self.times)
        if n < 1 or any(len(v) != n for v in (self.shift, self.scale, self.mix)):
            raise ValueError(f"corrections: times, shift, scale and mix must have one entry per evaluation ({n})")
        memory = {len(row) for row in self.mix}
        values = [*self.times, *self.shift, *self.scale, *(v for row in self.mix for v in row)]
        if len(memory) != 1 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ValueError("corrections: every value must be a finite number and every mix row of one length (memory)")

    @property
    def nfe(self) -> int:
        return len(self.times)

    def to_dict(self) -> dict[str, Any]:
        return dict(times=self.times, shift=self.shift, scale=self.scale, mix=self.mix, error=self.error,
                    error_before=self.error_before, iters=self.iters)  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> Corrections:
        """The Corrections of `to_dict`'s output; ValueError naming the key when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("corrections must be an object with keys times, shift, scale, mix")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        missing = [k for k in ("times", "shift", "scale", "mix") if k not in data]
        if unknown or missing:
            raise ValueError(f"corrections: unknown key(s) {unknown}, missing key(s) {missing}")
        if not all(isinstance(data[k], list) for k in ("times", "shift", "scale", "mix")) or not all(
            isinstance(row, list) for row in data["mix"]
        ):
            raise ValueError("corrections: times, shift, scale must be lists of numbers and mix a list of lists")
        return cls(**data)

    def network_times(self, process: Process) -> list[float]:
        """The time each evaluation tells the network: its own, shifted by shift_k in log-SNR where that is finite."""
        out = []
        for t, shift in zip(self.times, self.shift, strict=True):
            log_snr = float(process.log_snr(torch.tensor(t, dtype=torch.float64)))
            out.append(float(shifted_time(process, log_snr, shift)) if shift != 0.0 and math.isfinite(log_snr) else t)
        return out

    def wrap(self, model: Model, process: Process, prediction: str) -> CorrectedModel:
        """A fresh corrected model for one solver run (prediction="x0"); build one per `fewstep.sample` call."""
        return CorrectedModel(model, process, prediction, self)


def shifted_time(process: Process, log_snr: float, shift: torch.Tensor | float) -> torch.Tensor:
    """The time whose log-SNR is log_snr + shift (float64; differentiable in a tensor `shift`)."""
    device = shift.device if isinstance(shift, torch.Tensor) else None
    return process.t_from_log_snr(torch.tensor(log_snr, dtype=torch.float64, device=device) + shift)


class CorrectedModel:
    """model(x, t) with the corrections of its k-th call applied; returns the corrected data prediction.

    Stateful: it counts its calls and keeps the data predictions of the previous ones, so it serves one solver run.
    """

    def __init__(self, model: Model, process: Process, prediction: str, corrections: Corrections,
                 params: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        self.model, self.process, self.prediction = model, process, check_prediction(prediction)
        self.times = corrections.times
        self.params = params or {
            "shift": torch.tensor(corrections.shift, dtype=torch.float64),
            "scale": torch.tensor(corrections.scale, dtype=torch.float64),
            "mix": torch.tensor(corrections.mix, dtype=torch.float64).reshape(len(self.times), len(corrections.mix[0])),
        }
        self.calls = 0
        self.history: list[torch.Tensor] = []
        at = [torch.tensor(t, dtype=torch.float64) for t in self.times]  # per-call facts as Python values: no device syncs
        self._log_snr = [float(process.log_snr(t)) for t in at]
        self._low_noise = [float(process.sigma(t)) <= float(process.alpha(t)) for t in at]
        trainable = self.params["shift"].requires_grad
        self._shifted = [
            math.isfinite(v) and (trainable or s != 0.0) for v, s in zip(self._log_snr, corrections.shift, strict=True)
        ]

    def _check_call(self, t: torch.Tensor | float) -> int:
        k = self.calls
        if k >= len(self.times):
            raise ValueError(f"the corrections were fitted for {len(self.times)} evaluations; this run makes more "
                             "(another solver or grid than the fitted one, or a corrected model used for two runs)")  # fmt: skip
        if not (isinstance(t, torch.Tensor) and t.is_cuda):  # on the CPU the check costs no device sync
            now = float(torch.as_tensor(t).flatten()[0])
            if not math.isclose(now, self.times[k], rel_tol=TIME_RTOL, abs_tol=1e-12):
                raise ValueError(f"evaluation {k} is at t={now:.9g}, but the corrections were fitted at t={self.times[k]:.9g} "
                                 "(another grid than the fitted one)")  # fmt: skip
        self.calls += 1
        return k

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        k = self._check_call(t)
        shift, scale, mix = self.params["shift"][k], self.params["scale"][k], self.params["mix"][k]
        c = Coefficients.of(self.process, t, x)
        t_net = t
        if self._shifted[k]:  # from the fitted time itself, so that a pipeline told `network_times` sees the same value
            t_in = torch.as_tensor(t)
            t_net = shifted_time(self.process, self._log_snr[k], shift).to(t_in.dtype).to(t_in.device).expand(t_in.shape)
        x0, _ = to_x0_eps(self.model(x, t_net, **model_kwargs), self.prediction, x, c)
        self.history.append(x0)
        out = x0
        if self._low_noise[k]:  # sigma <= alpha: epsilon scaling, -(sigma / alpha) eps = x0 - x / alpha
            out = out + scale.to(x.dtype) * (x0 - x / c.alpha.to(x.dtype))
        else:  # higher noise (alpha = 0 included): the noise prediction itself, eps = (x - alpha x0) / sigma
            out = out - scale.to(x.dtype) * (x - c.alpha.to(x.dtype) * x0) / c.sigma.to(x.dtype)
        for j in range(1, min(mix.numel(), k) + 1):
            out = out + mix[j - 1].to(x.dtype) * (self.history[-1 - j] - x0)
        return out


def zero_corrections(times: list[float], memory: int) -> Corrections:
    """No correction at the given evaluation times (the start of the fit)."""
    n = len(times)
    return Corrections(times=list(times), shift=[0.0] * n, scale=[0.0] * n, mix=[[0.0] * memory for _ in range(n)])
