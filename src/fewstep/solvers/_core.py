"""The shared core every solver is written on: the solver registry and `Run`, one sampling run's state.

A solver is a function `solver(run, x, **options) -> x` registered with `@register(name, order=...)`. It walks the
time grid `run.t[0] > ... > run.t[-1]`, calls the network through `run.denoise(x, i)` / `run.denoise_at(x, t)`,
and reports each finished step with `x = run.report(i, x, prediction, *history)` (which may reindex the
particles: see `Run.report`). All per-time coefficients (alpha, sigma,
log-SNR, derivatives) are precomputed once in float64 as Python floats, so the loop creates no device tensors
and never synchronises with the device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..parameterization import Coefficients, Denoiser, Prediction
from ..processes import Process

SolverFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its function, convergence order, whether it is stochastic, and its options.

    `returns_x0`: the solver's last step returns the data prediction itself (a consistency sampler), so `sample`
    adds no final denoising evaluation.
    """

    name: str
    fn: SolverFn
    order: int
    stochastic: bool = False
    options: tuple[str, ...] = field(default=())
    summary: str = ""
    returns_x0: bool = False

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) if self.options else "none"
            raise ValueError(f"solver {self.name!r} does not take option(s) {', '.join(unknown)}; allowed: {allowed}")


_REGISTRY: dict[str, SolverSpec] = {}


def register(name: str, *, order: int, stochastic: bool = False, returns_x0: bool = False) -> Callable[[SolverFn], SolverFn]:
    """Decorator: register `fn(run, x, **options)` under `name`; keyword-only parameters become its options."""

    def decorate(fn: SolverFn) -> SolverFn:
        if name in _REGISTRY:
            raise ValueError(f"solver {name!r} is registered twice")
        params = inspect.signature(fn).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = SolverSpec(name, fn, order, stochastic, options, summary, returns_x0)
        return fn

    return decorate


def get_solver(name: str) -> SolverSpec:
    """The registered solver `name`; a ValueError naming `solver` and the allowed values otherwise (also for non-strings)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"solver={name!r} is not known; allowed values: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def solver_specs() -> dict[str, SolverSpec]:
    return dict(sorted(_REGISTRY.items()))


class GridValues(NamedTuple):
    """The times and coefficients of a grid of `process` (float64 Python floats per grid point i = 0..steps), and
    the `Coefficients` of every point: what `Run` needs of its grid, computable once for many runs on one grid."""

    process: Process
    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    log_snr: tuple[float, ...]
    dalpha: tuple[float, ...]
    dsigma: tuple[float, ...]
    coefficients: tuple[Coefficients, ...]


def grid_values(process: Process, ts: torch.Tensor) -> GridValues:
    """`GridValues` of the float64 times ts [steps + 1] under `process`."""
    functions = (process.alpha, process.sigma, process.log_snr, process.dalpha_dt, process.dsigma_dt)
    alpha, sigma, log_snr, dalpha, dsigma = (tuple(f(ts).tolist()) for f in functions)
    coefficients = tuple(Coefficients(*c) for c in zip(alpha, sigma, dalpha, dsigma, strict=True))
    return GridValues(process, tuple(ts.tolist()), alpha, sigma, log_snr, dalpha, dsigma, coefficients)


class Run:
    """One sampling run: the time grid with its coefficients, the wrapped model, and the final-step policy.

    Lists of Python floats indexed by grid point i = 0..steps: t, alpha, sigma, log_snr, dalpha, dsigma.
    `values`: the grid's `GridValues` when already computed (else computed here from ts).
    `lower_order_final`: multistep solvers lower their order over the last steps (see `order_at`).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        ts: torch.Tensor,
        *,
        values: GridValues | None = None,
        lower_order_final: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
    ):
        process: Process = denoiser.process
        values = grid_values(process, ts) if values is None else values
        if values.process is not process or len(values.t) != ts.shape[0]:
            raise ValueError("values must be the GridValues of ts under the denoiser's process")
        self.denoiser = denoiser
        self.process = process
        self.steps = len(values.t) - 1
        self.t: list[float] = list(values.t)
        self.alpha: list[float] = list(values.alpha)
        self.sigma: list[float] = list(values.sigma)
        self.log_snr: list[float] = list(values.log_snr)
        self.dalpha: list[float] = list(values.dalpha)
        self.dsigma: list[float] = list(values.dsigma)
        self._coefficients = list(values.coefficients)
        self.lower_order_final = lower_order_final
        self.generator = generator
        self.callback = callback
        self.progress = progress
        # The Gaussian transition of the step in progress, where the solver's step is one (`_ancestral`): x_next =
        # mean + noise with d mean / d x0 = x0_coef (x held) and noise = std * z; reported to the callback.
        self.transition: dict[str, Any] | None = None
        denoiser.step = 0  # evaluations before a solver's loop (a multistep start) belong to step 0

    def denoise(self, x: torch.Tensor, i: int) -> Prediction:
        """Network evaluation at grid point i."""
        return self.denoiser(x, self.t[i], self._coefficients[i])

    def denoise_at(self, x: torch.Tensor, t: float) -> Prediction:
        """Network evaluation at an off-grid time t (singlestep / Runge-Kutta stages)."""
        return self.denoiser(x, t)

    def range(self) -> Iterator[int]:
        """The step indices 0..steps-1, with a progress bar when asked for."""
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps, desc="sampling", unit="step")
        for i in range(self.steps):
            self.begin_step(i)
            yield i
            if bar is not None:
                bar.update(1)
        self.denoiser.step = self.steps  # anything after the loop (final denoising) counts as step `steps`
        if bar is not None:
            bar.close()

    def begin_step(self, i: int) -> None:
        """Mark step i as in progress (for error messages); `range` does this, solvers with their own loop call it."""
        self.denoiser.step = i
        self.transition = None

    def report(self, i: int, x: torch.Tensor, prediction: Prediction | None, *state: Any) -> Any:
        """Call the user's callback after step i (x is now at time t[i + 1]); returns x, or (x, *state).

        The callback may return a LongTensor of indices [batch] (particle resampling, `fewstep.steer`): the run then
        continues from x[index], and every per-sample tensor of the solver's carried `state` (its multistep history:
        tensors [batch, ...], or lists / tuples / dicts of them) is reindexed alike, so that a particle keeps its own
        history. Solvers write `x = run.report(i, x, pred)` or `x, history = run.report(i, x, pred, history)`.
        Any other return value of the callback is ignored. The callback's dict holds step, t (= t[i + 1]), x, x0 (the
        step's data prediction), nfe and transition (None, or for an ancestral step x_next = mean + noise: x0_coef =
        d mean / d x0 at fixed x, std and the drawn noise, so that steering can reweigh a changed data prediction).

        The state's finiteness needs no flag here: x is the input of the next evaluation, whose flag the Denoiser
        records, and `sample` flags the final output (one reduction per evaluation saved).
        """
        if self.callback is None:
            return (x, *state) if state else x
        index = self.callback(
            {
                "step": i,
                "t": self.t[i + 1],
                "x": x,
                "x0": None if prediction is None else prediction.x0,
                "nfe": self.denoiser.nfe,
                "transition": self.transition,
            }
        )
        if isinstance(index, torch.Tensor):
            batch = x.shape[0]
            if index.dtype not in (torch.int64, torch.int32) or index.shape != (batch,):
                raise ValueError(
                    f"a callback may return particle indices as an integer tensor of shape [{batch}], got a "
                    f"{index.dtype} tensor of shape {tuple(index.shape)}"
                )
            index = index.to(device=x.device, dtype=torch.int64)
            x, state = x.index_select(0, index), tuple(reindex(s, index, batch) for s in state)
        return (x, *state) if state else x

    def order_at(self, i: int, order: int) -> int:
        """Effective order of multistep step i -> i+1 for a method of the given order.

        Lowered (a) during warm-up, when fewer than `order` past evaluations exist; (b) when a history point or
        the start lies at log-SNR -inf (alpha = 0: the log-SNR step there is infinite and the higher-order terms
        vanish in the limit); (c) when the step ends at sigma = 0 (a pure denoising step); (d) over the last
        steps when `lower_order_final` is set (Lu et al., 2022b, "DPM-Solver++", section 5).
        """
        order = min(order, i + 1)
        for j in range(order):
            if self.log_snr[i - j] == -math.inf:
                order = max(j, 1)
                break
        if self.log_snr[i + 1] == math.inf:
            order = 1
        if self.lower_order_final:
            order = min(order, self.steps - i)
        return order

    def noise_like(self, x: torch.Tensor, i: int, part: int = 0, parts: int = 1) -> torch.Tensor:
        """Standard normal noise shaped like x for the step i -> i + 1 of a stochastic solver.

        `run.generator` may be None (global RNG), a torch.Generator, a list of per-sample generators (a sample's
        noise then does not depend on the batch it is in), or a noise source: a callable
        `source(x, t_from, t_to) -> Tensor` returning standard normal noise for that interval (a Brownian tree).
        A solver that needs several independent draws in one step (a predictor-corrector) asks for `part` k of
        `parts`: a noise source then gives the noise of the k-th of `parts` equal sub-intervals of the step;
        generators just draw again.
        """
        if not 0 <= part < parts:
            raise ValueError(f"need 0 <= part < parts, got part={part}, parts={parts}")
        g = self.generator
        if g is None:
            return torch.randn_like(x)
        if isinstance(g, torch.Generator):
            return torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
        if isinstance(g, (list, tuple)):
            if len(g) != x.shape[0]:
                raise ValueError(f"generator is a list of {len(g)} generators but the batch has {x.shape[0]} samples")
            return torch.stack([torch.randn(x.shape[1:], generator=gi, device=gi.device, dtype=x.dtype) for gi in g]).to(x.device)
        if callable(g):
            t_from, t_to = self.t[i], self.t[i + 1]
            if parts == 1:
                return g(x, t_from, t_to)
            width = (t_to - t_from) / parts
            return g(x, t_from + part * width, t_to if part == parts - 1 else t_from + (part + 1) * width)
        raise TypeError(
            "generator must be None, a torch.Generator, a list of per-sample generators or a noise source "
            f"callable(x, t_from, t_to); got {type(g).__name__}"
        )

    # Shared step formulas -------------------------------------------------------------------------------------

    def ddim_step(self, i: int, pred: Prediction, j: int | None = None) -> torch.Tensor:
        """First-order exponential-integrator step to grid point j (default i + 1): alpha_j x0 + sigma_j eps.

        This is DDIM (Song et al., 2021a) = DPM-Solver-1 = DPM-Solver++(1); written in (x0, eps) it is finite
        at alpha = 0 and sigma = 0.
        """
        j = i + 1 if j is None else j
        return self.alpha[j] * pred.x0 + self.sigma[j] * pred.eps

    def velocity(self, pred: Prediction, i: int) -> torch.Tensor:
        """Probability-flow ODE drift dx/dt = alpha'(t) x0 + sigma'(t) eps at grid point i."""
        return self.dalpha[i] * pred.x0 + self.dsigma[i] * pred.eps


def reindex(state: Any, index: torch.Tensor, batch: int) -> Any:
    """`state` with every tensor [batch, ...] in it replaced by its rows `index` (lists, tuples, named tuples and dicts
    are walked; other values, and tensors without the batch axis, are kept as they are)."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index.to(state.device)) if state.ndim >= 1 and state.shape[0] == batch else state
    if isinstance(state, list):
        return [reindex(s, index, batch) for s in state]
    if isinstance(state, tuple):
        items = [reindex(s, index, batch) for s in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    if isinstance(state, dict):
        return {k: reindex(v, index, batch) for k, v in state.items()}
    return state
