"""fewstep's own sampling loop driven one network evaluation at a time ("ask/tell"), for stateful step() APIs.

A fewstep solver is a loop that calls `model(x, t)`; a diffusers pipeline owns the loop and calls the model itself.
`solver_run(solve)` runs `fewstep.sample` as a coroutine whose model pauses at every call: the caller receives the
state and time to evaluate (`Ask`), evaluates the network, and hands the output back (`tell`), so no solver formula
is re-implemented and the result is `fewstep.sample`'s, bit for bit. Exactly one side runs at any time (a
synchronous hand-off). Two interchangeable implementations: `SolverGreenlet` (a greenlet on the caller's thread,
about a microsecond per hand-off; used when the `greenlet` package is installed) and `SolverThread` (a worker thread
and two queues: no extra dependency, but each hand-off is an OS thread switch, tens to hundreds of microseconds on a
loaded machine). `evaluation_plan` lists, before sampling, the times at which a solver will evaluate.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

try:  # the fast hand-off (optional: SolverThread does the same job without it)
    import greenlet
except ImportError:  # pragma: no cover - depends on the environment
    greenlet = None

from ..processes import Process
from ..sampling import sample

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Ask(NamedTuple):
    """The solver asks for the network's output at state x [batch, ...] and times t [batch] (a named tuple: one is
    made per network evaluation, and a frozen dataclass costs several times more to build)."""

    x: torch.Tensor
    t: torch.Tensor


@dataclass(frozen=True)
class Done:
    """The solver finished: `x` is `fewstep.sample`'s result."""

    x: torch.Tensor


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class _Cancelled(BaseException):
    """Unwinds an abandoned solver run (BaseException: no solver's `except Exception` swallows it)."""


_CANCEL = object()


def _work(solve: Callable[[Model], torch.Tensor], to_main: queue.SimpleQueue, to_worker: queue.SimpleQueue, modes) -> None:
    """The worker: run `solve(model)` where model(x, t) hands (x, t) to the caller and waits for its answer.

    A module function, not a method, so that the thread holds no reference to its `SolverThread` (whose finalizer
    cancels an abandoned run).
    """
    grad, inference = modes

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        to_main.put(Ask(x, t))
        answer = to_worker.get()
        if answer is _CANCEL:
            raise _Cancelled
        output, stream = answer
        if stream is not None:
            torch.cuda.set_stream(stream)
        return output

    try:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            result = solve(model)
    except _Cancelled:
        return
    except BaseException as err:  # handed to the caller, raised there
        to_main.put(_Failed(err))
        return
    to_main.put(Done(result))


class SolverThread:
    """`solve(model)` (e.g. a `fewstep.sample` call) run one model evaluation at a time.

    `start()` returns the first `Ask` (or `Done`); `tell(output)` hands the network's output for the pending ask back
    and returns the next `Ask` or the final `Done`; an exception of the solver is raised by `start`/`tell`. `close()`
    (also called when the object is garbage-collected) unwinds a run that will not be finished. The worker runs with
    the caller's grad and inference modes, and on the caller's current CUDA stream.
    """

    def __init__(self, solve: Callable[[Model], torch.Tensor]):
        self._solve = solve
        self._to_main: queue.SimpleQueue = queue.SimpleQueue()
        self._to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.pending: Ask | None = None
        self.finished = False
        self._finalizer = weakref.finalize(self, self._to_worker.put, _CANCEL)

    def start(self) -> Ask | Done:
        if self._thread is not None:
            raise RuntimeError("SolverThread.start() was already called")
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        self._thread = threading.Thread(
            target=_work, args=(self._solve, self._to_main, self._to_worker, modes), daemon=True, name="fewstep-solver"
        )
        self._thread.start()
        return self._receive()

    def tell(self, output: torch.Tensor) -> Ask | Done:
        if self.pending is None:
            raise RuntimeError("no evaluation is pending: the run is finished or was not started")
        stream = torch.cuda.current_stream(output.device) if output.is_cuda else None
        self.pending = None
        self._to_worker.put((output, stream))
        return self._receive()

    def _receive(self) -> Ask | Done:
        message = self._to_main.get()
        if isinstance(message, _Failed):
            self.finished = True
            self._finalizer.detach()
            raise message.error
        if isinstance(message, Done):
            self.finished = True
            self._finalizer.detach()
        else:
            self.pending = message
        return message

    def close(self) -> None:
        """Unwind a run waiting for an output (no-op when finished or not started)."""
        if self.pending is not None:
            self.pending = None
            self._finalizer()
            self._thread.join()
        self._finalizer.detach()


class SolverGreenlet:
    """`solve(model)` run one model evaluation at a time as a greenlet on the caller's thread (`SolverThread`'s API).

    `start()` returns the first `Ask` (or `Done`); `tell(output)` returns the next `Ask` or the final `Done`; an
    exception of the solver is raised by `start`/`tell`; `close()` (or garbage collection) unwinds an unfinished run.
    Both sides share the thread, so its inference mode and CUDA stream; the autograd mode (thread state, which
    `fewstep.sample` sets for its loop) is swapped at every hand-off, so that neither side sees the other's.
    """

    def __init__(self, solve: Callable[[Model], torch.Tensor]):
        if greenlet is None:
            raise RuntimeError("SolverGreenlet needs the greenlet package (pip install greenlet); use SolverThread")
        self._solve = solve
        self._glet: Any = None
        self._thread_id: int | None = None
        self.pending: Ask | None = None
        self.finished = False

    def start(self) -> Ask | Done:
        if self._glet is not None:
            raise RuntimeError("SolverGreenlet.start() was already called")
        self._glet = greenlet.greenlet(_run_greenlet)
        self._thread_id = threading.get_ident()
        return self._switch(self._solve)

    def tell(self, output: torch.Tensor) -> Ask | Done:
        if self.pending is None:
            raise RuntimeError("no evaluation is pending: the run is finished or was not started")
        if threading.get_ident() != self._thread_id:
            raise RuntimeError("step() must be called from the thread that started this run (call set_timesteps there)")
        self.pending = None
        self._glet.parent = greenlet.getcurrent()  # answer to whichever greenlet of this thread called tell
        return self._switch(output)

    def _switch(self, value: Any) -> Ask | Done:
        outer = torch.is_grad_enabled()
        try:
            message = self._glet.switch(value)
        except BaseException:
            self.finished = True
            raise
        finally:
            _restore_grad_mode(outer)
        if isinstance(message, Done):
            self.finished = True
        else:
            self.pending = message
        return message

    def close(self) -> None:
        """Unwind a run waiting for an output (no-op when finished or not started)."""
        if self.pending is not None and threading.get_ident() == self._thread_id:
            self.pending = None
            outer = torch.is_grad_enabled()
            try:
                self._glet.throw()  # GreenletExit: the solver's `except Exception` does not catch it
            finally:
                _restore_grad_mode(outer)
        self._glet = None  # (from another thread: greenlet unwinds it in its own thread when collected)


def _run_greenlet(solve: Callable[[Model], torch.Tensor]) -> Done | None:
    """The greenlet's body: `solve(model)` where model(x, t) hands (x, t) to the parent and resumes with its output."""
    killer_mode: list[bool] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inner = torch.is_grad_enabled()
        try:
            output = greenlet.getcurrent().parent.switch(Ask(x, t))
        except greenlet.GreenletExit:
            killer_mode.append(torch.is_grad_enabled())  # the mode of whoever unwinds us, restored after unwinding
            raise
        _restore_grad_mode(inner)
        return output

    try:
        return Done(solve(model))
    except greenlet.GreenletExit:
        if killer_mode:
            _restore_grad_mode(killer_mode[0])
        return None


def _restore_grad_mode(mode: bool) -> None:
    """Set autograd's mode to `mode` (only where it differs: `torch.set_grad_enabled` builds a context object)."""
    if torch.is_grad_enabled() != mode:
        torch.set_grad_enabled(mode)


def solver_run(solve: Callable[[Model], torch.Tensor]) -> SolverGreenlet | SolverThread:
    """`solve(model)` run one evaluation at a time: a `SolverGreenlet` where greenlet is installed, else a `SolverThread`."""
    return SolverGreenlet(solve) if greenlet is not None else SolverThread(solve)


@dataclass(frozen=True)
class EvaluationPlan:
    """Where a solver evaluates the network on a grid: `times` (fewstep time of every evaluation, in order), the
    index in `times` of each step's first evaluation (`step_starts`), and whether the first evaluation is at the
    start state itself (`starts_at_state`: False for a solver that perturbs x before its first evaluation)."""

    times: tuple[float, ...]
    step_starts: tuple[int, ...]
    starts_at_state: bool

    def per_step(self) -> int | None:
        """Evaluations per step when step j starts at evaluation j * that number for every j (None otherwise)."""
        if len(self.step_starts) < 2:
            return 1
        cost = self.step_starts[1]
        return cost if all(s == j * cost for j, s in enumerate(self.step_starts)) else None


def evaluation_plan(
    process: Process,
    prediction: str,
    solver: str,
    grid: torch.Tensor,
    *,
    denoise_to_zero: bool,
    options: dict[str, Any],
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvaluationPlan:
    """The evaluation times of `fewstep.sample(solver, schedule=grid)` by a dry run on a zero model of one sample.

    Exact for every solver whose times depend on the grid only (all but adaptive step-size and per-sample-time ones);
    raises the ValueError `fewstep.sample` raises for this configuration (options, grid, prediction at the ends).
    """
    times: list[float] = []
    first_input: list[float] = []
    ends: list[int] = []

    def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not times:
            first_input.append(float(x.reshape(-1)[0]))
        times.append(float(t.reshape(-1)[0]))
        return torch.zeros_like(x)

    noise = torch.ones(1, 1, dtype=torch.float64)
    sample(zero, noise, process=process, prediction=prediction, solver=solver, steps=len(grid) - 1, schedule=grid,
           denoise_to_zero=denoise_to_zero, generator=torch.Generator().manual_seed(0), x0_fn=x0_fn,
           callback=lambda info: ends.append(info["nfe"]), **options)  # fmt: skip
    starts = tuple([0] + ends[:-1]) if len(ends) == len(grid) - 1 else (0,)
    start_state = float(process.sigma(float(grid[0])))
    return EvaluationPlan(tuple(times), starts, bool(first_input) and first_input[0] == start_state)
