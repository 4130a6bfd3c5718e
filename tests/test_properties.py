"""Property-based suite over the public API (hypothesis).

Random valid inputs with 0-2 parameters made invalid must give either a correct result or a ValueError /
TypeError that names a parameter: never a silent NaN, a wrong shape or dtype, a hang, or an internal exception
(ZeroDivisionError, IndexError, AttributeError, KeyError, torch internals). Every call runs under a time limit
that turns a hang into a failure.

Profiles (registered in tests/conftest.py): "ci", the default, is derandomised with a fixed example budget
(about 2 minutes on the 2-core CI machine); "long" (`pytest tests/test_properties.py --hypothesis-profile=long`)
runs 20x the examples with fresh random seeds.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fewstep
from fewstep.solvers import get_solver
from fewstep.train.checkpoint import CheckpointError

NAN, INF = math.nan, math.inf
EXAMPLES = settings.default.max_examples  # of the active profile (tests/conftest.py)
MIXTURE = fewstep.ring2d()


class Hang(BaseException):
    """Raised by the time limit; a BaseException so that no `except Exception` in the library swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def names_one_of(message: str, names: Iterable[str]) -> list[str]:
    return [n for n in names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message)]


def outcome(
    fn: Callable[..., Any],
    *args: Any,
    invalid: Iterable[str] = (),
    names: Iterable[str] = (),
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError),
    seconds: float = 30.0,
    valid: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Call fn; return its result, or None when it raised one of `errors` naming a parameter.

    invalid: the parameters made invalid (then the call must fail, naming one of them); names: every parameter a
    valid-but-incompatible combination may name instead. valid: the same call without the invalid parameters; an
    error that names none of them must then be the error this call gives too (a combination of valid parameters
    at fault, checked before a parameter that is only read later, such as a solver option).
    """
    invalid = list(invalid)
    try:
        with time_limit(seconds):
            result = fn(*args, **kwargs)
    except errors as err:
        message = str(err)
        expected = invalid or list(names) + list(kwargs)
        if invalid and valid is not None and not names_one_of(message, invalid):
            with pytest.raises(errors) as same, time_limit(seconds):
                valid()
            assert str(same.value) == message, f"{message!r} names none of {invalid}, and the valid call says {same.value}"
            return None
        assert names_one_of(message, expected), f"{type(err).__name__} names none of {expected}: {message}"
        return None
    assert not invalid, f"accepted invalid {invalid}: {[(k, kwargs.get(k)) for k in invalid]}"
    return result


# Strategies ------------------------------------------------------------------------------------------------------

PROCESSES = {
    "discrete_vp": fewstep.DiscreteVP.linear(),
    "discrete_vp_cosine": fewstep.DiscreteVP.cosine(),
    "vp": fewstep.VP("linear"),
    "vp_cosine": fewstep.VP("cosine"),
    "ve": fewstep.VE(),
    "edm": fewstep.EDM(),
    "rectified_flow": fewstep.RectifiedFlow(),
}
PROCESSES["discrete_vp_zero_snr"] = fewstep.DiscreteVP.scaled_linear(zero_terminal_snr=True)  # alpha(1) = 0

SOLVERS = fewstep.solvers()
SCHEDULES = [None, *fewstep.SCHEDULES, fewstep.Schedule("karras", rho=3.0), fewstep.Schedule("polyexponential", rho=2.0)]
BAD_SCALARS = ["0.5", NAN, INF, -INF, complex(0.5, 0.0), True, torch.tensor([0.5, 0.6]), [0.5], 1e300, -1e300]
BAD_OPTION_VALUES = ["bogus", NAN, complex(1.0, 1.0)]

INVALID_SAMPLE = {
    "steps": [0, -2, 2.5, True, "4", 10**12, None],
    "solver": ["bogus", 3, None, ["ddim"]],
    "prediction": ["noise", None, 1],
    "schedule": ["bogus", 7, torch.tensor([1.0, 2.0]), torch.full((3,), NAN)],
    "t_start": BAD_SCALARS,
    "t_end": BAD_SCALARS,
    "noise": [torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), NAN), torch.tensor(1.0), "noise"],
    "generator": ["seed", 5],
    "callback": [5, "print"],
    "x0_fn": [5, lambda x0: x0[:, :1], lambda x0: x0.to(torch.float16)],
    "denoise_to_zero": ["yes", None, 2],
    "nfe": [4, "4"],  # only with solver="auto"
}


def time_in(process: fewstep.Process, u: float) -> float:
    """A time inside the process's range, u in [0, 1] (log-spaced for EDM/VE-like wide ranges)."""
    lo, hi = process.t_min, process.t_max
    if lo > 0 and hi / lo > 100:
        return lo * (hi / lo) ** u
    return lo + u * (hi - lo)


def statistics_for(process: fewstep.Process, dim: int) -> fewstep.ModelStatistics:
    lam = process.log_snr(torch.tensor([process.t_min, process.t_max], dtype=torch.float64))
    lo, hi = (float(v) if math.isfinite(v) else float(math.copysign(30.0, v)) for v in lam.flip(0).tolist())
    return fewstep.ModelStatistics.constant((dim,), min(lo, hi), max(lo, hi), l=1.0)


@st.composite
def sample_cases(draw) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    process = PROCESSES[draw(st.sampled_from(sorted(PROCESSES)))]
    solver = draw(st.sampled_from(SOLVERS))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    batch = draw(st.integers(1, 4))
    noise = torch.randn(batch, 2, generator=torch.Generator().manual_seed(draw(st.integers(0, 9))), dtype=dtype)
    kwargs: dict[str, Any] = dict(
        noise=noise,
        process=process,
        prediction=draw(st.sampled_from(fewstep.PREDICTIONS)),
        solver=solver,
        steps=draw(st.integers(1, 8)),
        schedule=draw(st.sampled_from(SCHEDULES)),
    )
    if draw(st.booleans()):
        kwargs["t_start"] = time_in(process, draw(st.floats(0.3, 1.0)))
    if draw(st.booleans()):
        kwargs["t_end"] = time_in(process, draw(st.floats(0.0, 0.3)))
    if draw(st.booleans()):
        kwargs["denoise_to_zero"] = draw(st.booleans())
    if get_solver(solver).stochastic:
        kwargs["generator"] = torch.Generator().manual_seed(draw(st.integers(0, 9)))
    if solver == "dpm_solver_v3":
        kwargs["statistics"] = statistics_for(process, 2)
    if draw(st.integers(0, 4)) == 0:
        kwargs["x0_fn"] = fewstep.StaticClipping(2.0)

    valid = dict(kwargs)
    invalid: list[str] = []
    for name in draw(st.lists(st.sampled_from(sorted(INVALID_SAMPLE) + ["option"]), max_size=2, unique=True)):
        if name == "option":
            options = get_solver(solver).options
            option = draw(st.sampled_from(options)) if options and draw(st.booleans()) else "bogus_option"
            kwargs[option] = draw(st.sampled_from(BAD_OPTION_VALUES))
            invalid.append(option)
        else:
            kwargs[name] = draw(st.sampled_from(INVALID_SAMPLE[name]))
            invalid.append(name)
    return kwargs, invalid, valid


def check_samples(x: Any, noise: torch.Tensor, ratio: float = 1.0) -> None:
    """A result of `sample`: a finite tensor shaped like the noise, of its dtype, with an NFE count, not garbage.

    ratio: sigma / alpha at the start. The ring lies within radius 1.4. A solver's error is about this ratio
    times the model's error (a one-step Euler or DPM-2 step from sigma/alpha = 157 lands tens away), and a
    pseudo-Runge-Kutta stage evaluated far from the data at small sigma amplifies it once more (one-step PNDM
    lands 1e4-1e6 away on DiscreteVP: what the algorithm computes, not a defect), hence the bound ~ ratio^2.
    Broken arithmetic (overflow, a division by round-off) lands orders of magnitude further.
    """
    assert isinstance(x, torch.Tensor)
    assert x.shape == noise.shape and x.dtype == noise.dtype, (x.shape, x.dtype)
    assert bool(torch.isfinite(x).all()), "silent NaN/Inf in the output"
    assert isinstance(x.nfe, int) and x.nfe >= 1
    bound = 1e3 * (1.0 + ratio) ** 2 if math.isfinite(ratio) else 1e5  # alpha = 0 at the start: a flow from pure noise
    assert float(x.abs().max()) < bound, f"output far from the data: max |x| = {float(x.abs().max()):.3g} > {bound:.3g}"


def noise_to_signal(process: fewstep.Process, t_start: Any) -> float:
    t = process.t_max if not isinstance(t_start, float) else t_start
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    return math.inf if alpha == 0 else sigma / alpha


# sample ------------------------------------------------------------------------------------------------------


@given(case=sample_cases())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_sample_gives_a_correct_result_or_a_clear_error(case):
    kwargs, invalid, valid = case
    kwargs = dict(kwargs)
    noise = kwargs.pop("noise")
    process = kwargs["process"]
    prediction = kwargs["prediction"] if kwargs["prediction"] in fewstep.PREDICTIONS else "eps"
    model = MIXTURE.model(process, prediction)
    names = ["noise", *kwargs]
    # ModelError: a user function (x0_fn) returned something unusable; it must name x0_fn like any other parameter
    errors = (ValueError, TypeError, fewstep.ModelError)
    x = outcome(fewstep.sample, model, noise, invalid=invalid, names=names, errors=errors, **kwargs,
                valid=lambda: fewstep.sample(model, **valid))  # fmt: skip
    if x is not None:
        check_samples(x, noise, noise_to_signal(process, kwargs.get("t_start")))


@given(
    process=st.sampled_from(sorted(PROCESSES)),
    solver=st.sampled_from(SOLVERS),
    steps=st.integers(1, 6),
    bad_at=st.integers(1, 4),
    value=st.sampled_from([NAN, INF, -INF]),
)
def test_a_model_returning_nan_is_named_with_step_evaluation_and_time(process, solver, steps, bad_at, value):
    process = PROCESSES[process]
    calls = []
    exact = MIXTURE.model(process, "x0")

    def model(x, t):
        calls.append(1)
        out = exact(x, t)
        return out * value if len(calls) == bad_at else out

    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    extra: dict[str, Any] = {"statistics": statistics_for(process, 2)} if solver == "dpm_solver_v3" else {}
    if get_solver(solver).stochastic:
        extra["generator"] = torch.Generator().manual_seed(1)
    try:
        with time_limit(30):
            x = fewstep.sample(model, noise, process=process, prediction="x0", solver=solver, steps=steps, **extra)
    except fewstep.ModelError as err:
        assert all(word in str(err) for word in ("step", "evaluation", "t=")), str(err)
        return
    except (ValueError, TypeError) as err:  # an incompatible (process, grid) pair, named
        assert names_one_of(str(err), ["schedule", "t_start", "t_end", "prediction", "steps"]), str(err)
        return
    assert len(calls) < bad_at, f"the model returned {value} at evaluation {bad_at} and sample returned without an error"
    check_samples(x, noise, noise_to_signal(process, None))


@given(
    process=st.sampled_from(sorted(PROCESSES)),
    prediction=st.sampled_from(["eps", "x0", "v", "velocity"]),
    nfe=st.one_of(st.integers(2, 30), st.sampled_from([0, 1, -3, 2.5, "5", None, True, 10**9])),
    u_start=st.one_of(st.none(), st.floats(0.3, 1.0)),
)
def test_auto_uses_exactly_the_budget_or_says_why_not(process, prediction, nfe, u_start):
    process = PROCESSES[process]
    t_start = None if u_start is None else time_in(process, u_start)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = MIXTURE.model(process, prediction)
    x = outcome(fewstep.sample, model, noise, process=process, prediction=prediction, solver="auto", nfe=nfe, t_start=t_start,
                names=["nfe", "prediction", "t_start"])  # fmt: skip
    if x is not None:
        assert x.nfe == nfe and x.choice["source"] == "fallback" and x.choice["nfe"] == nfe
        check_samples(x, noise, noise_to_signal(process, t_start))


# convert ------------------------------------------------------------------------------------------------------

INVALID_CONVERT = {
    "source": ["noise", None],
    "target": ["data", 3],
    "t": BAD_SCALARS[:6] + [torch.tensor([0.5, 0.6, 0.7])],
    "pred": [torch.zeros(5, 3, dtype=torch.float64), "pred"],
    "x": [torch.zeros(2, 2, dtype=torch.float64), None],
    "process": ["edm", None],
}


@given(
    process=st.sampled_from(sorted(PROCESSES)),
    source=st.sampled_from(fewstep.PREDICTIONS),
    target=st.sampled_from(fewstep.PREDICTIONS),
    u=st.one_of(st.just(0.0), st.floats(1e-9, 1.0)),  # not 1e-300: sigma^2 underflows and the true score overflows
    per_sample=st.booleans(),
    broken=st.lists(st.sampled_from(sorted(INVALID_CONVERT)), max_size=2, unique=True),
    data=st.data(),
)
def test_convert_is_exact_or_a_clear_error(process, source, target, u, per_sample, broken, data):
    process = PROCESSES[process]
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = time_in(process, u)
    t_arg: Any = torch.full((5,), t, dtype=torch.float64) if per_sample else t
    pred = MIXTURE.model(process, source)(x, torch.full((5,), t, dtype=torch.float64))
    kwargs = dict(pred=pred, x=x, t=t_arg, process=process, source=source, target=target)
    for name in broken:
        kwargs[name] = data.draw(st.sampled_from(INVALID_CONVERT[name]), label=name)
    out = outcome(fewstep.convert, invalid=broken, **kwargs)
    if out is None:
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = MIXTURE.model(process, target)(x, torch.full((5,), t, dtype=torch.float64))
    if bool(torch.isfinite(expected).all()):
        assert bool(torch.isfinite(out).all()), f"{source} -> {target} at t={t}: NaN where the exact answer is finite"
        # Conversions divide by alpha, sigma or the velocity's determinant: round-off in `pred` grows by the ratio
        # of the coefficients (1e38 at RectifiedFlow's t = 1e-38), so the tolerance does too.
        t64 = torch.tensor(t, dtype=torch.float64)
        c = [abs(float(f(t64))) for f in (process.alpha, process.sigma, process.dalpha_dt, process.dsigma_dt)]
        scale = max(c) / max(min(v for v in c if v > 0), 1e-300)
        atol = 1e-9 * scale * (1 + float(expected.abs().max()) + float(pred.abs().max()))
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=atol)


# time_grid and Schedule ----------------------------------------------------------------------------------------

INVALID_GRID = {
    "steps": [0, -1, 1.5, True, "3", 10**12],
    "t_start": BAD_SCALARS,
    "t_end": BAD_SCALARS,
    "schedule": ["bogus", 3, torch.tensor([2.0, 1.0])],
    "process": ["vp", None],
}


@given(
    process=st.sampled_from(sorted(PROCESSES)),
    steps=st.integers(1, 60),
    schedule=st.sampled_from(SCHEDULES),
    u_start=st.floats(0.0, 1.0),
    u_end=st.floats(0.0, 1.0),
    broken=st.lists(st.sampled_from(sorted(INVALID_GRID)), max_size=2, unique=True),
    data=st.data(),
)
def test_time_grid_is_valid_or_a_clear_error(process, steps, schedule, u_start, u_end, broken, data):
    proc = PROCESSES[process]
    kwargs = dict(process=proc, steps=steps, t_start=time_in(proc, u_start), t_end=time_in(proc, u_end), schedule=schedule)
    for name in broken:
        kwargs[name] = data.draw(st.sampled_from(INVALID_GRID[name]), label=name)
    ts = outcome(fewstep.time_grid, invalid=broken, **kwargs)
    if ts is None:
        return
    check_grid(ts, proc, steps, kwargs["t_start"], kwargs["t_end"])


def check_grid(ts: torch.Tensor, process: fewstep.Process, steps: int, t_start: float, t_end: float) -> None:
    assert ts.dtype == torch.float64 and ts.shape == (steps + 1,)
    assert bool(torch.isfinite(ts).all())
    assert float(ts[0]) == t_start and float(ts[-1]) == t_end
    assert bool((ts[1:] < ts[:-1]).all()), f"grid not strictly decreasing: {ts.tolist()}"
    assert process.t_min <= float(ts.min()) and float(ts.max()) <= process.t_max
    lam = process.log_snr(ts)
    assert not bool((lam[1:] <= lam[:-1]).any()), f"log-SNR not increasing along the grid: {lam.tolist()}"


@given(
    name=st.sampled_from(["karras", "polyexponential"]),
    rho=st.one_of(st.floats(1e-8, 1e8), st.sampled_from([1e-300, 1e300, 0.0, -1.0, NAN, INF, "7", True])),
    process=st.sampled_from(sorted(PROCESSES)),
    steps=st.integers(1, 200),
)
def test_schedule_parameters_give_a_valid_grid_or_a_clear_error(name, rho, process, steps):
    proc = PROCESSES[process]
    t_start, t_end = time_in(proc, 0.95), time_in(proc, 0.02)
    schedule = outcome(fewstep.Schedule, name, rho=rho, names=["rho"])
    if schedule is None:
        return
    ts = outcome(fewstep.time_grid, proc, steps, t_start, t_end, schedule, names=["rho", "schedule", "steps"])
    if ts is not None:
        check_grid(ts, proc, steps, t_start, t_end)


# schedule search ---------------------------------------------------------------------------------------------------

INVALID_SEARCH = {
    "nfe": [0, -1, 2.5, "4", True, 10**9],
    "solver": ["bogus", None],
    "iters": [-1, 1.5, "3", True, 10**9],
    "lr": [0.0, -0.1, NAN, INF, "0.2", True],
    "fd_step": [0.0, NAN, 2.0, "x"],
    "init": ["bogus", 5],
    "t_end": BAD_SCALARS[:6],
    "calibration_noise": [torch.zeros(4, 2, dtype=torch.long), "noise"],
    "reference": [torch.zeros(3, 2, dtype=torch.float64), "ref"],
}


@given(
    process=st.sampled_from(["discrete_vp", "edm", "rectified_flow"]),
    solver=st.sampled_from(["ddim", "dpmpp_2m", "heun", "ipndm", "unipc"]),
    nfe=st.integers(2, 6),
    iters=st.integers(0, 2),
    broken=st.lists(st.sampled_from(sorted(INVALID_SEARCH)), max_size=2, unique=True),
    data=st.data(),
)
@settings(max_examples=max(EXAMPLES // 6, 8))
def test_optimize_schedule_gives_a_valid_grid_or_a_clear_error(process, solver, nfe, iters, broken, data):
    proc = PROCESSES[process]
    prediction = "velocity" if process == "rectified_flow" else "eps"
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(model=MIXTURE.model(proc, prediction), process=proc, solver=solver, nfe=nfe, calibration_noise=noise,
                  prediction=prediction, iters=iters, reference_steps=32, lr=0.2, fd_step=1e-3)  # fmt: skip
    valid = dict(kwargs)
    for name in broken:
        kwargs[name] = data.draw(st.sampled_from(INVALID_SEARCH[name]), label=name)
    searched = outcome(fewstep.optimize_schedule, invalid=broken, names=["nfe", "solver", "schedule", "t_start", "t_end"],
                       valid=lambda: fewstep.optimize_schedule(**valid), **kwargs)  # fmt: skip
    if searched is None:
        return
    assert isinstance(searched, fewstep.SearchedSchedule) and searched.solver == solver
    check_grid(searched.times, proc, searched.steps, float(searched.times[0]), float(searched.times[-1]))
    assert math.isfinite(searched.error) and searched.error <= searched.error_init + 1e-12  # the best grid seen
    x = fewstep.sample(kwargs["model"], noise, process=proc, **searched.sample_kwargs())
    assert x.nfe == nfe


# processes ------------------------------------------------------------------------------------------------------

PROCESS_ARGS = {
    fewstep.VE: {"sigma_min": (1e-4, 1.0), "sigma_max": (2.0, 500.0)},
    fewstep.EDM: {"sigma_min": (0.0, 1.0), "sigma_max": (2.0, 500.0)},
    fewstep.VP: {"beta_min": (0.01, 1.0), "beta_max": (2.0, 30.0), "t_min": (1e-5, 1e-2)},
}
BAD_NUMBERS = [NAN, INF, -1.0, "0.1", None, True, complex(1, 1), torch.tensor([1.0, 2.0])]


@given(
    cls=st.sampled_from(list(PROCESS_ARGS)),
    data=st.data(),
    broken=st.lists(st.integers(0, 2), max_size=2, unique=True),
)
def test_process_constructors_validate_and_satisfy_the_identities(cls, data, broken):
    ranges = PROCESS_ARGS[cls]
    names = sorted(ranges)
    kwargs = {name: data.draw(st.floats(*ranges[name]), label=name) for name in names}
    invalid = []
    for i in broken:
        if i < len(names):
            kwargs[names[i]] = data.draw(st.sampled_from(BAD_NUMBERS), label=names[i])
            invalid.append(names[i])
    process = outcome(cls, invalid=invalid, **kwargs)
    if process is None:
        return
    check_process_identities(process)


def check_process_identities(process: fewstep.Process) -> None:
    t = torch.linspace(process.t_min, process.t_max, 33, dtype=torch.float64)[1:-1]
    alpha, sigma, lam = process.alpha(t), process.sigma(t), process.log_snr(t)
    assert bool(torch.isfinite(alpha).all() and torch.isfinite(sigma).all() and torch.isfinite(lam).all())
    assert bool((sigma > 0).all() and (alpha >= 0).all())
    torch.testing.assert_close(lam, torch.log(alpha / sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.t_from_log_snr(lam), t, rtol=1e-7, atol=1e-9)


@given(
    betas=st.lists(st.floats(1e-5, 0.5), min_size=2, max_size=50),
    bad=st.sampled_from(["<valid>", NAN, INF, -0.1, 0.0, 1.5, "0.1", None]),
    position=st.integers(0, 49),
    zero_terminal=st.booleans(),
)
def test_discrete_vp_betas_validated(betas, bad, position, zero_terminal):
    if zero_terminal:
        betas = betas + [1.0]  # a final beta of 1: zero terminal SNR (Lin et al., 2024)
    if bad != "<valid>":
        betas[position % len(betas)] = bad
        arg = torch.tensor(betas, dtype=torch.float64) if isinstance(bad, float) else betas
        outcome(fewstep.DiscreteVP, arg, invalid=["betas"])
        return
    process = outcome(fewstep.DiscreteVP, torch.tensor(betas, dtype=torch.float64), names=["betas"])
    if process is not None:
        check_process_identities(process)


# classifier-free guidance -----------------------------------------------------------------------------------------


def conditional(x, t, c):
    return MIXTURE.model(fewstep.EDM(), "eps")(x, t) + 0.1 * c


@given(
    scale=st.one_of(st.floats(-5, 10), st.sampled_from([NAN, INF, "2", True, None])),
    interval=st.one_of(st.none(), st.tuples(st.floats(0.002, 80.0), st.floats(0.002, 80.0)),
                       st.sampled_from([(1.0,), "all", (NAN, 1.0), (1.0, INF)])),  # fmt: skip
    cond_batch=st.sampled_from([1, 3, 2]),
)
def test_cfg_validates_and_guides(scale, interval, cond_batch):
    cond = torch.ones(cond_batch, 2, dtype=torch.float64)
    uncond = torch.zeros(1, 2, dtype=torch.float64)
    model = outcome(fewstep.cfg, conditional, cond, uncond, scale, interval=interval, names=["scale", "interval"])
    if model is None:
        return
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = outcome(fewstep.sample, model, noise, process=fewstep.EDM(), steps=4, names=["cond", "uncond"])
    if x is not None:
        check_samples(x, noise, 80.0)


# Brownian tree ------------------------------------------------------------------------------------------------------


@given(
    t_min=st.floats(-1e6, 1e6),
    width=st.floats(1e-12, 1e3),
    tol=st.one_of(st.none(), st.floats(1e-300, 1.0), st.sampled_from([0.0, -1.0, NAN, INF, "1e-3", True])),
    seed=st.one_of(st.integers(0, 2**40), st.sampled_from([True, "0", [0, 1], 2**70])),
)
def test_brownian_tree_answers_or_refuses_and_never_hangs(t_min, width, tol, seed):
    t_max = t_min + width
    assume(t_max > t_min)
    tree = outcome(fewstep.BrownianTreeNoise, (2, 3), t_min, t_max, seed, tol=tol, names=["tol", "seed", "t_min", "t_max"],
                   seconds=5)  # fmt: skip
    if tree is None:
        return
    x = torch.zeros(2, 3, dtype=torch.float64)
    z = outcome(tree, x, t_max, t_min + 0.5 * width, names=["t_from", "t_to"], seconds=5)
    if z is not None:
        assert z.shape == x.shape and bool(torch.isfinite(z).all())


# Loading files ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    from fewstep.nets import build_model
    from fewstep.train import save_checkpoint

    folder = tmp_path_factory.mktemp("ckpt")
    process = fewstep.DiscreteVP.linear(100)
    config = {"model": {"net": {"type": "mlp", "dim": 2, "width": 8, "depth": 1}, "prediction": "eps"}}
    model = build_model(config["model"], process)
    return save_checkpoint(folder / "checkpoint", model=model, config=config, step=3)


def _mutations() -> st.SearchStrategy:
    keys = ["format", "version", "weights", "size", "sha256", "step", "config", "has_ema", "prediction"]
    values = [None, [], {}, "x", -1, 1.5, "../victim.txt", "/etc/passwd", "checkpoint.json", True]
    return st.lists(st.tuples(st.sampled_from(keys), st.one_of(st.just("<delete>"), st.sampled_from(values))),
                    min_size=1, max_size=2)  # fmt: skip


@given(mutations=_mutations(), as_list=st.booleans())
@settings(max_examples=max(EXAMPLES // 2, 10))
def test_malformed_checkpoint_sidecars_fail_clearly(saved_checkpoint, tmp_path_factory, mutations, as_list):
    from fewstep.train import load_checkpoint

    folder = tmp_path_factory.mktemp("mutated")
    meta = json.loads(saved_checkpoint.read_text())
    (folder / meta["weights"]).write_bytes((saved_checkpoint.parent / meta["weights"]).read_bytes())
    victim = folder.parent / f"{folder.name}-victim.txt"
    victim.write_text("keep me")
    for key, value in mutations:
        if value == "<delete>":
            meta.pop(key, None)
        else:
            meta[key] = value
    sidecar = folder / "checkpoint.json"
    sidecar.write_text(json.dumps([meta] if as_list else meta))
    try:
        with time_limit(30):
            loaded = load_checkpoint(sidecar)
    except CheckpointError as err:
        assert str(sidecar.name) in str(err) or str(folder) in str(err), str(err)
    else:  # only a label nothing reads may be changed without an error; every other key is required and typed
        assert not as_list and {key for key, _ in mutations} <= {"prediction"}, (mutations, loaded.step)
    assert victim.read_text() == "keep me"


@given(
    key=st.sampled_from(["format", "times", "process", "solver", "nfe", "steps", "prediction", "solver_options", "history"]),
    value=st.one_of(st.just("<delete>"), st.sampled_from([None, [], {}, "x", -1, 1.5, [3.0, 2.0, 1.0], True])),
)
@settings(max_examples=max(EXAMPLES // 2, 10))
def test_malformed_searched_schedules_fail_clearly(tmp_path_factory, key, value):
    schedule = fewstep.SearchedSchedule(torch.tensor([1.0, 0.5, 0.001], dtype=torch.float64), "DiscreteVP()", "ddim", 3, 2)
    data = schedule.to_dict()
    if value == "<delete>":
        data.pop(key)
    else:
        data[key] = value
    path = tmp_path_factory.mktemp("schedule") / "schedule.json"
    path.write_text(json.dumps(data))
    loaded = outcome(fewstep.SearchedSchedule.load, path, names=[key, str(path), "schedule"])
    if loaded is not None:
        assert isinstance(loaded, fewstep.SearchedSchedule) and loaded.times.ndim == 1


# Command line -----------------------------------------------------------------------------------------------------

CLI_OPTIONS = {
    "--solver": ["ddim", "dpmpp_2m", "bogus", ""],
    "--steps": ["3", "0", "-1", "x", "2.5"],
    "--schedule": ["logsnr", "karras", "bogus"],
    "--process": ["edm", "rectified_flow", "bogus"],
    "--problem": ["ring2d", "bogus"],
    "--n": ["5", "0", "-3", "x"],
    "--seed": ["1", "x"],
}


@given(options=st.dictionaries(st.sampled_from(sorted(CLI_OPTIONS)), st.text(max_size=0), max_size=4), data=st.data())
@settings(max_examples=max(EXAMPLES // 3, 10))
def test_cli_sample_answers_or_exits_2_without_a_traceback(tmp_path_factory, options, data):
    from typer.testing import CliRunner

    from fewstep.cli import app

    args = ["sample", "--out", str(tmp_path_factory.mktemp("cli") / "x.npy")]
    for option in options:
        args += [option, data.draw(st.sampled_from(CLI_OPTIONS[option]), label=option)]
    with time_limit(60):
        result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 2), (args, result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert names_one_of(result.output, [*CLI_OPTIONS, "--out"]) or "No such option" in result.output, result.output
