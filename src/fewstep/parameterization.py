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

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .processes import Process, Time, _as_tensor, broadcast_to

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_prediction(prediction: str, name: str = "prediction") -> str:
    """`prediction` if it is one of PREDICTIONS; else a ValueError naming the parameter `name`."""
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise ValueError(f"{name}={prediction!r} is not known; allowed values: {', '.join(PREDICTIONS)}")
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


# What each conversion divides by: to_x0_eps (from the prediction) and from_x0_eps (to it); 1 where nothing.
_DIVISORS: dict[str, Callable[[Coefficients], object]] = {
    "eps": lambda c: c.alpha,
    "score": lambda c: c.alpha,
    "x0": lambda c: c.sigma,
    "v": lambda c: c.alpha**2 + c.sigma**2,
    "velocity": lambda c: c.alpha * c.dsigma - c.sigma * c.dalpha,
}
_DIVISOR_NAMES = {
    "eps": "alpha",
    "score": "alpha",
    "x0": "sigma",
    "v": "alpha^2 + sigma^2",
    "velocity": "alpha sigma' - sigma alpha'",
}


def _divides_safely(kind: str, c: Coefficients) -> bool:
    value = float(_DIVISORS[kind](c))
    return math.isfinite(value) and value != 0.0


def check_convertible(
    prediction: str, process: Process, t: float, name: str, c: Coefficients | None = None, *, label: str = "prediction"
) -> None:
    """ValueError naming `prediction` and the time `name` when a `prediction` model cannot give (x0, eps) at time t.

    eps and score divide by alpha (0 where the state is pure noise, RectifiedFlow at t = 1), x0 by sigma (0 at
    the data end), velocity by alpha sigma' - sigma alpha'; v never fails on these processes.
    """
    c = Coefficients.at(process, t) if c is None else c
    if _divides_safely(prediction, c):
        return
    works = [k for k in PREDICTIONS if _divides_safely(k, c)]
    raise ValueError(
        f"{label}={prediction!r} cannot give the data prediction at {name}={t} on {process!r}: the conversion divides "
        f"by {_DIVISOR_NAMES[prediction]} = {float(_DIVISORS[prediction](c))} there (alpha={c.alpha}, sigma={c.sigma}); "
        f"predictions that work at this time: {', '.join(works) or 'none'}; or choose another {name}"
    )


def _check_convert_time(t: Time, x: torch.Tensor, process: Process) -> Time:
    """t as a float (a scalar or one-element tensor) or a float64 [batch] tensor, finite and inside the time range."""
    if not isinstance(t, torch.Tensor) or t.numel() == 1:
        return process.check_time(t, "t")
    if t.ndim != 1 or t.shape[0] != x.shape[0] or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"t must be a scalar or a real tensor of shape [batch] = [{x.shape[0]}], got shape {tuple(t.shape)}")
    t64 = t.detach().to(torch.float64)
    if not bool(torch.isfinite(t64).all()):
        raise ValueError("t must be finite, got NaN or Inf in t")
    process.check_time(t64.min().item(), "t")
    process.check_time(t64.max().item(), "t")
    return t64.clamp(process.t_min, process.t_max)


def _check_conversion(source: str, target: str, t: Time, process: Process) -> None:
    """ValueError naming the first time where converting `source` to `target` would divide by zero."""
    t64 = torch.as_tensor(t, dtype=torch.float64).detach().reshape(-1).cpu()
    c = Coefficients(*(f(t64) for f in (process.alpha, process.sigma, process.dalpha_dt, process.dsigma_dt)))
    divisor = torch.as_tensor(_DIVISORS[source](c))
    bad = ~torch.isfinite(divisor) | (divisor == 0)
    if target == "score":
        bad |= c.sigma == 0
    if bool(bad.any()):
        tk = float(t64[bad.nonzero()[0, 0]])
        check_convertible(source, process, tk, "t", label="source")
        raise ValueError(f"target='score' is undefined at t={tk} on {process!r} (sigma = 0: the score is infinite)")


def convert(pred: torch.Tensor, x: torch.Tensor, t: Time, process: Process, *, source: str, target: str) -> torch.Tensor:
    """Convert a prediction at (x, t) from parameterization `source` to `target` exactly.

    pred, x: [batch, ...] floating-point tensors of one shape; t: scalar or [batch] in the process's time.
    ValueError where the conversion is undefined (e.g. from eps where alpha = 0, to eps from x0 where sigma = 0).
    """
    check_prediction(source, "source")
    check_prediction(target, "target")
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
    for name, value in (("pred", pred), ("x", x)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim < 1:
            got = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{name} must be a floating-point tensor of shape [batch, ...], got {got}")
    if pred.shape != x.shape:
        raise ValueError(f"pred and x must have the same shape, got {tuple(pred.shape)} and {tuple(x.shape)}")
    t = _check_convert_time(t, x, process)
    if source == target:
        return pred
    _check_conversion(source, target, t, process)
    c = Coefficients.of(process, t, x)
    return from_x0_eps(*to_x0_eps(pred, source, x, c), target, c)


class Prediction(NamedTuple):
    """What a solver gets from one network evaluation: the data and noise predictions, [batch, ...]."""

    x0: torch.Tensor
    eps: torch.Tensor


class ModelError(RuntimeError):
    """The model returned something a solver cannot use (wrong shape or dtype, NaN or Inf)."""


class SolverError(FloatingPointError):
    """fewstep's own arithmetic produced NaN or Inf from finite model outputs (a solver, its options or the grid)."""


class _Flag(NamedTuple):
    """A device scalar that is NaN/Inf iff `kind` ("input", "model", "x0_fn" or "state") had a non-finite entry."""

    kind: str
    nfe: int
    step: int | None
    t: float
    value: torch.Tensor


def _finite_flag(v: torch.Tensor) -> torch.Tensor:
    # The sum is NaN/Inf iff some entry is (or the values are absurdly large, > 1e34 on average): one cheap
    # reduction and no sync. Accumulated in at least float32 so that half-precision outputs do not overflow.
    return v.detach().sum(dtype=torch.float64 if v.dtype == torch.float64 else torch.float32)


class Denoiser:
    """Wraps a model of any parameterization; gives solvers (x0, eps) and counts network evaluations (NFE).

    `model(x, t)` takes x [batch, ...] and t [batch] (the process's time) and returns a tensor shaped like x.
    Shapes and dtypes are checked on every call (host-side metadata, no device sync). Finiteness is checked
    without synchronising: every call records device flags for its input state and its output (and the output
    of `x0_fn`), `sample` records one for the final state (`flag_state`), and `raise_if_not_finite` looks at
    them once, naming the first non-finite one: the model (ModelError), `x0_fn` (ModelError) or the
    solver's own arithmetic (SolverError). A model that costs several network evaluations per call
    (classifier-free guidance batching conditional and unconditional inputs) says so with an attribute
    `nfe_per_call`, read after every call (so a model whose cost varies, as with a guidance interval, sets it to
    the cost of the call it just made). `x0_fn`, when given, post-processes the data prediction (thresholding,
    clipping) and the noise prediction is made consistent with it. `solver`: the solver's name, for messages.
    """

    def __init__(
        self,
        model: Model,
        process: Process,
        prediction: str = "eps",
        x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        solver: str | None = None,
    ):
        self.model = model
        self.process = process
        self.prediction = check_prediction(prediction)
        self.x0_fn = x0_fn
        self.solver = solver
        self.nfe = 0
        self.step: int | None = None  # the solver step in progress, set by the solver loop (for error messages)
        self._finite_flags: list[_Flag] = []
        self._coefficients: dict[float, Coefficients] = {}

    def _evaluate(self, x: torch.Tensor, t_batch: torch.Tensor, t: float) -> torch.Tensor:
        """One checked network evaluation with times t_batch [batch]; t labels it in messages."""
        out = self.model(x, t_batch)
        self.nfe += getattr(self.model, "nfe_per_call", 1)
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"the model must return a torch.Tensor, got {type(out).__name__} at time t={t}")
        if out.shape != x.shape:
            raise ModelError(f"the model returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)} at time t={t}")
        if out.dtype != x.dtype:
            raise ModelError(f"the model returned dtype {out.dtype} for x of dtype {x.dtype} at time t={t}")
        self._flag("input", x, t)
        self._flag("model", out, t)
        return out

    def _flag(self, kind: str, v: torch.Tensor, t: float, step: int | None = None) -> None:
        self._finite_flags.append(_Flag(kind, self.nfe, self.step if step is None else step, t, _finite_flag(v)))

    def flag_state(self, x: torch.Tensor, step: int, t: float) -> None:
        """Record (no sync) whether the solver's state x after `step` (now at time t) is finite."""
        self._flag("state", x, t, step)

    def raw(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """One network evaluation at scalar time t, checked; returns the model's own prediction."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=_time_dtype(x))
        return self._evaluate(x, t_batch, t)

    def __call__(self, x: torch.Tensor, t: float, c: Coefficients | None = None) -> Prediction:
        """One network evaluation at scalar time t, converted to (x0, eps); `c`: precomputed coefficients at t."""
        out = self.raw(x, t)
        if c is None:
            c = self._coefficients.get(t)
            if c is None:
                c = self._coefficients[t] = Coefficients.at(self.process, t)
        return self._prediction(out, x, c, t)

    def at_times(self, x: torch.Tensor, t: torch.Tensor, label: float) -> Prediction:
        """One network evaluation with a time per sample, t [batch] (float64, on x's device), as (x0, eps).

        `label`: the nominal time of the evaluation, for messages. No host sync.
        """
        out = self._evaluate(x, t.to(_time_dtype(x)), label)
        return self._prediction(out, x, Coefficients.of(self.process, t, x), label)

    def _prediction(self, out: torch.Tensor, x: torch.Tensor, c: Coefficients, t: float) -> Prediction:
        x0, eps = to_x0_eps(out, self.prediction, x, c)
        if self.x0_fn is None:
            return Prediction(x0, eps)
        x0 = self.x0_fn(x0)
        if not isinstance(x0, torch.Tensor) or x0.shape != x.shape or x0.dtype != x.dtype:
            got = f"shape {tuple(x0.shape)}, dtype {x0.dtype}" if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ModelError(f"x0_fn must return a tensor of shape {tuple(x.shape)} and dtype {x.dtype}, got {got} at time t={t}")
        self._flag("x0_fn", x0, t)
        if isinstance(c.sigma, torch.Tensor):
            eps = torch.where(c.sigma > 0, (x - c.alpha * x0) / c.sigma, eps)
        elif c.sigma > 0:
            eps = (x - c.alpha * x0) / c.sigma
        return Prediction(x0, eps)

    def raise_if_not_finite(self) -> None:
        """One device sync: raise naming the first flag (in order of computation) that is NaN or Inf."""
        if not self._finite_flags:
            return
        values = [f.value for f in self._finite_flags]
        if any(v.dtype != values[0].dtype for v in values):  # finiteness survives the cast to float64
            values = [v.to(torch.float64) for v in values]
        flags = torch.isfinite(torch.stack(values))
        if bool(flags.all()):
            return
        flag = self._finite_flags[int((~flags).nonzero()[0, 0])]
        step = "" if flag.step is None else f"step {flag.step}, "
        where = f"{step}evaluation {flag.nfe} (time t={flag.t:.6g}, log-SNR {float(self.process.log_snr(flag.t)):.4g})"
        solver = "the solver" if self.solver is None else f"solver {self.solver!r}"
        if flag.kind == "model":
            raise ModelError(
                f"the model returned NaN or Inf at {where}; check the model, its prediction type and the time range"
            )
        if flag.kind == "x0_fn":
            raise ModelError(f"x0_fn returned NaN or Inf at {where} from a finite data prediction; check x0_fn")
        if flag.kind == "input":
            raise SolverError(
                f"{solver} produced NaN or Inf in its own arithmetic: the state passed to the model at {where} is not "
                "finite although every earlier model output was; check the solver options and the time grid"
            )
        raise SolverError(
            f"{solver} produced NaN or Inf in its own arithmetic at step {flag.step} (after evaluation {flag.nfe}, "
            f"time t={flag.t:.6g}) although every model output was finite; check the solver options and the time grid"
        )


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
