"""Exact conversions between model parameterizations, and the wrapper solvers call.

A model predicts one of:
- "eps":      the noise, eps
- "x0":       the data, x0 (a denoiser)
- "v":        v = alpha * eps - sigma * x0 (Salimans & Ho, 2022, "Progressive Distillation")
- "velocity": the flow velocity dx/dt = alpha'(t) x0 + sigma'(t) eps (Lipman et al., 2023; Liu et al., 2023)
- "score":    grad_x log p_t(x) = -eps / sigma (Song et al., 2021)

Every conversion goes through the pair (x0, eps), which with x = alpha x0 + sigma eps is determined by any one
prediction; each formula is chosen so that it is finite wherever the prediction carries the information
(e.g. "v" and "velocity" convert at alpha = 0 and at sigma = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .processes import Process, Time, _as_tensor, broadcast_to

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is not known; allowed values: {', '.join(PREDICTIONS)}")
    return prediction


class Coefficients(NamedTuple):
    """alpha, sigma and their time derivatives, broadcast against x."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    dalpha: torch.Tensor
    dsigma: torch.Tensor

    @classmethod
    def of(cls, process: Process, t: Time, x: torch.Tensor) -> Coefficients:
        """Coefficients at t (scalar or [batch]) as tensors broadcast against x."""
        t = _as_tensor(t).to(torch.float64)
        return cls(*(broadcast_to(f(t), x) for f in (process.alpha, process.sigma, process.dalpha_dt, process.dsigma_dt)))

    @classmethod
    def at(cls, process: Process, t: float) -> Coefficients:
        """Coefficients at a scalar time as Python floats (float64; multiplying by them needs no device tensor)."""
        t64 = torch.tensor(float(t), dtype=torch.float64)
        return cls(*(float(f(t64)) for f in (process.alpha, process.sigma, process.dalpha_dt, process.dsigma_dt)))


def _minus_scaled(x: torch.Tensor, y: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """x - s * y; one fused kernel when s is a number (the sampling loop's case)."""
    return torch.add(x, y, alpha=-s) if isinstance(s, float) else x - s * y


def to_x0_eps(pred: torch.Tensor, kind: str, x: torch.Tensor, c: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a prediction of type `kind` at state x with coefficients c."""
    if kind == "eps":
        return _minus_scaled(x, pred, c.sigma) / c.alpha, pred
    if kind == "x0":
        return pred, _minus_scaled(x, pred, c.alpha) / c.sigma
    if kind == "v":
        norm = c.alpha**2 + c.sigma**2
        return (c.alpha * x - c.sigma * pred) / norm, (c.alpha * pred + c.sigma * x) / norm
    if kind == "velocity":
        det = c.alpha * c.dsigma - c.sigma * c.dalpha
        return (c.dsigma * x - c.sigma * pred) / det, (c.alpha * pred - c.dalpha * x) / det
    if kind == "score":
        eps = -c.sigma * pred
        return (x - c.sigma * eps) / c.alpha, eps
    check_prediction(kind)
    raise AssertionError(kind)


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, kind: str, c: Coefficients) -> torch.Tensor:
    """The prediction of type `kind` from the pair (x0, eps)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return c.alpha * eps - c.sigma * x0
    if kind == "velocity":
        return c.dalpha * x0 + c.dsigma * eps
    if kind == "score":
        return -eps / c.sigma
    check_prediction(kind)
    raise AssertionError(kind)


def convert(pred: torch.Tensor, x: torch.Tensor, t: Time, process: Process, *, source: str, target: str) -> torch.Tensor:
    """Convert a prediction at (x, t) from parameterization `source` to `target` exactly.

    pred, x: [batch, ...]; t: scalar or [batch] in the process's time.
    """
    check_prediction(source)
    check_prediction(target)
    if source == target:
        return pred
    c = Coefficients.of(process, t, x)
    return from_x0_eps(*to_x0_eps(pred, source, x, c), target, c)


class Prediction(NamedTuple):
    """What a solver gets from one network evaluation: the data and noise predictions, [batch, ...]."""

    x0: torch.Tensor
    eps: torch.Tensor


class ModelError(RuntimeError):
    """The model returned something a solver cannot use (wrong shape or dtype, NaN or Inf)."""


class Denoiser:
    """Wraps a model of any parameterization; gives solvers (x0, eps) and counts network evaluations (NFE).

    `model(x, t)` takes x [batch, ...] and t [batch] (the process's time) and returns a tensor shaped like x.
    Shapes and dtypes are checked on every call (host-side metadata, no device sync). Finiteness is checked
    without synchronising: each call records a device flag, and `raise_if_not_finite` looks at them once.
    A model that costs several network evaluations per call (classifier-free guidance batching conditional and
    unconditional inputs) says so with an attribute `nfe_per_call`, read after every call (so a model whose cost
    varies, as with a guidance interval, sets it to the cost of the call it just made). `x0_fn`, when given,
    post-processes the data prediction (thresholding, clipping) and the noise prediction is made consistent with it.
    """

    def __init__(
        self,
        model: Model,
        process: Process,
        prediction: str = "eps",
        x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self.process = process
        self.prediction = check_prediction(prediction)
        self.x0_fn = x0_fn
        self.nfe = 0
        self.step: int | None = None  # the solver step in progress, set by the solver loop (for error messages)
        self._finite_flags: list[tuple[int, int | None, float, torch.Tensor]] = []
        self._coefficients: dict[float, Coefficients] = {}

    def raw(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """One network evaluation at scalar time t, checked; returns the model's own prediction."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=_time_dtype(x))
        out = self.model(x, t_batch)
        self.nfe += getattr(self.model, "nfe_per_call", 1)
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"the model must return a torch.Tensor, got {type(out).__name__} at time t={t}")
        if out.shape != x.shape:
            raise ModelError(f"the model returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)} at time t={t}")
        if out.dtype != x.dtype:
            raise ModelError(f"the model returned dtype {out.dtype} for x of dtype {x.dtype} at time t={t}")
        # The sum is NaN/Inf iff some entry is (or the values are absurdly large, > 1e34 on average): one cheap
        # reduction and no sync. Accumulated in at least float32 so that half-precision outputs do not overflow.
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        self._finite_flags.append((self.nfe, self.step, t, out.sum(dtype=acc)))
        return out

    def __call__(self, x: torch.Tensor, t: float, c: Coefficients | None = None) -> Prediction:
        """One network evaluation at scalar time t, converted to (x0, eps); `c`: precomputed coefficients at t."""
        out = self.raw(x, t)
        if c is None:
            c = self._coefficients.get(t)
            if c is None:
                c = self._coefficients[t] = Coefficients.at(self.process, t)
        x0, eps = to_x0_eps(out, self.prediction, x, c)
        if self.x0_fn is not None:
            x0 = self.x0_fn(x0)
            eps = (x - c.alpha * x0) / c.sigma if c.sigma > 0 else eps
        return Prediction(x0, eps)

    def raise_if_not_finite(self) -> None:
        """One device sync: raise ModelError naming the first evaluation whose output had NaN or Inf."""
        if not self._finite_flags:
            return
        flags = torch.isfinite(torch.stack([f[-1] for f in self._finite_flags]))
        if bool(flags.all()):
            return
        first = int((~flags).nonzero()[0, 0])
        nfe, step, t, _ = self._finite_flags[first]
        where = "" if step is None else f"step {step}, "
        raise ModelError(
            f"the model returned NaN or Inf at {where}evaluation {nfe} (time t={t:.6g}, log-SNR "
            f"{float(self.process.log_snr(t)):.4g}); check the model, its prediction type and the time range"
        )


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
