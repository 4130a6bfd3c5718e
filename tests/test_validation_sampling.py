"""Issue 7: no silent NaN from `sample`, every input and solver option validated at the boundary, batch-invariant
adaptive and predictor-corrector sampling."""

import math

import pytest
import torch

import fewstep
from fewstep.parameterization import SolverError
from fewstep.sampling import solvers
from fewstep.solvers import _core, register, solver_specs
from fewstep.solvers.dpmv3 import ModelStatistics

VP = fewstep.VP("linear")
RING = fewstep.ring2d()
EPS_MODEL = RING.model(VP, "eps")
NOISE = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def base_options(solver, process=VP):
    """Options a solver needs to run at all (EMS for DPM-Solver-v3: the constant DPM-Solver++ ones)."""
    if solver == "dpm_solver_v3":
        lo, hi = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
        return {"statistics": ModelStatistics.constant((2,), lo, hi, l=1.0)}
    return {}


def run(solver="dpmpp_2m", model=EPS_MODEL, noise=NOISE, **kwargs):
    args = dict(process=VP, steps=4, generator=torch.Generator().manual_seed(1), **base_options(solver))
    args.update(kwargs)
    return fewstep.sample(model, noise, solver=solver, **args)


# 4. Silent NaN ---------------------------------------------------------------------------------------------------

NAN_CASES = [(s, {}) for s in solvers()] + [("time_shift", {"window": 0.3})]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("solver, options", NAN_CASES, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_model_nan_names_step_evaluation_and_time(solver, options, k):
    calls = []

    def model(x, t):
        calls.append(1)
        out = EPS_MODEL(x, t)
        return out * math.nan if len(calls) == k else out

    with pytest.raises(fewstep.ModelError, match=rf"NaN or Inf at step \d+, evaluation {k} \(time t=") as info:
        run(solver, model=model, **options)
    assert "step" in str(info.value) and "evaluation" in str(info.value) and "t=" in str(info.value)


def test_nan_noise_is_named_before_the_model_runs():
    calls = []
    noise = NOISE.clone()
    noise[1, 0] = math.inf
    with pytest.raises(ValueError, match="noise contains NaN or Inf"):
        run(model=lambda x, t: calls.append(1) or EPS_MODEL(x, t), noise=noise)
    assert not calls


@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_prediction_that_divides_by_alpha_zero_fails_before_sampling(prediction):
    rf = fewstep.RectifiedFlow()
    model = RING.model(rf, "velocity")
    with pytest.raises(ValueError, match=rf"prediction='{prediction}' .* at t_start=1.0 .*velocity") as info:
        fewstep.sample(model, NOISE, process=rf, prediction=prediction, steps=4)
    assert "v, velocity" in str(info.value) and "x0" in str(info.value)
    for ok in ("velocity", "v", "x0"):  # the predictions that work at alpha = 0 sample finitely
        x = fewstep.sample(RING.model(rf, ok), NOISE, process=rf, prediction=ok, steps=4)
        assert bool(torch.isfinite(x).all())
    x = fewstep.sample(RING.model(rf, "eps"), NOISE, process=rf, prediction="eps", steps=4, t_start=0.99)
    assert bool(torch.isfinite(x).all())


def test_solver_arithmetic_nan_is_blamed_on_the_solver():
    @register("_test_overflowing_ddim", order=1)
    def overflowing(run_, x):
        for i in run_.range():
            pred = run_.denoise(x, i)
            x = run_.ddim_step(i, pred) * (1e308 if i == 1 else 1.0) * 1e10
            run_.report(i, x, pred)
        return x

    try:
        # step 1 overflows; the state is first looked at as the input of step 2's evaluation (one reduction per evaluation)
        with pytest.raises(SolverError, match=r"solver '_test_overflowing_ddim' produced NaN or Inf .*step 2, evaluation 3"):
            run("_test_overflowing_ddim")
    finally:
        del _core._REGISTRY["_test_overflowing_ddim"]


def test_final_output_is_checked():
    @register("_test_nan_at_end", order=1)
    def nan_at_end(run_, x):
        for i in run_.range():
            x = run_.ddim_step(i, run_.denoise(x, i))
        return x * math.nan  # no report: only the final check sees it

    try:
        with pytest.raises(SolverError, match=r"solver '_test_nan_at_end' produced NaN or Inf .*step 4"):
            run("_test_nan_at_end", denoise_to_zero=False)
    finally:
        del _core._REGISTRY["_test_nan_at_end"]


def test_x0_fn_checked():
    with pytest.raises(fewstep.ModelError, match=r"x0_fn must return a tensor of shape \(3, 2\)"):
        run(x0_fn=lambda x0: x0[:, :1])
    with pytest.raises(fewstep.ModelError, match=r"x0_fn must return .* dtype torch.float64"):
        run(x0_fn=lambda x0: x0.float())
    with pytest.raises(fewstep.ModelError, match=r"x0_fn returned NaN or Inf at step 0, evaluation 1"):
        run(x0_fn=lambda x0: x0 * math.nan)


def test_time_shift_window_uses_x0_fn_and_checks():
    seen = []
    x = run("time_shift", window=0.3, x0_fn=lambda x0: seen.append(1) or x0.clamp(-1, 1))
    assert len(seen) == x.nfe


# 5. Validation at the boundary -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1.0", 1 + 0j, True, torch.tensor([1.0, 0.5]), math.nan, math.inf])
def test_t_start_must_be_a_real_finite_number(bad):
    with pytest.raises((ValueError, TypeError), match="t_start"):
        run(t_start=bad)


def test_sample_arguments_checked():
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1 and <= 100000"):
        run(steps=10**9)
    with pytest.raises(TypeError, match="callback must be None or a callable"):
        run(callback="print")
    with pytest.raises(TypeError, match="generator must be None, a torch.Generator"):
        run(generator=42)
    with pytest.raises(ValueError, match=r"one torch.Generator per sample \(3\)"):
        run(generator=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="at least one sample"):
        run(noise=torch.zeros(0, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="denoise_to_zero must be True or False"):
        run(denoise_to_zero="yes")


BAD_VALUES = [math.nan, math.inf, -1.0, 0, 1e308, "x", True, None, [1]]


def option_cases():
    for name, spec in solver_specs().items():
        for option in spec.options:
            for value in BAD_VALUES:
                yield name, option, value


@pytest.mark.parametrize("solver, option, value", list(option_cases()), ids=str)
def test_extreme_option_values_fail_clearly_or_run_finitely(solver, option, value):
    options = {**base_options(solver), option: value}
    try:
        x = run(solver, steps=3, **options)
    except (ValueError, TypeError) as err:
        assert option in str(err), str(err)
        return
    assert bool(torch.isfinite(x).all())


def test_dpm_adaptive_options_typed():
    bad = [("order", 2.0), ("order", True), ("rtol", "0.1"), ("atol", 1e-300), ("h_init", math.inf), ("per_sample", 1)]
    for option, value in bad:
        with pytest.raises(ValueError, match=option):
            run("dpm_adaptive", **{option: value})


def test_convert_validates_inputs():
    x = torch.randn(3, 2, dtype=torch.float64)
    convert = fewstep.convert
    with pytest.raises(ValueError, match=r"pred and x must have the same shape"):
        convert(x[:, :1], x, 0.5, VP, source="eps", target="x0")
    with pytest.raises(TypeError, match="pred must be a floating-point tensor"):
        convert(x.long(), x, 0.5, VP, source="eps", target="x0")
    with pytest.raises(TypeError, match="process must be a fewstep Process"):
        convert(x, x, 0.5, "vp", source="eps", target="x0")
    with pytest.raises(ValueError, match="t"):
        convert(x, x, math.nan, VP, source="eps", target="x0")
    with pytest.raises(ValueError, match="outside the time range"):
        convert(x, x, torch.tensor([0.5, 0.5, 2.0]), VP, source="eps", target="x0")
    with pytest.raises(ValueError, match=r"shape \[batch\] = \[3\]"):
        convert(x, x, torch.tensor([0.5, 0.5]), VP, source="eps", target="x0")
    rf = fewstep.RectifiedFlow()
    with pytest.raises(ValueError, match=r"source='eps' cannot give the data prediction at t=1.0"):
        convert(x, x, torch.tensor([0.5, 1.0, 0.2]), rf, source="eps", target="v")
    with pytest.raises(ValueError, match="target='score' is undefined at t=0.0"):
        convert(x, x, 0.0, rf, source="velocity", target="score")
    out = convert(x, x, torch.tensor([0.5, 0.3, 0.2]), rf, source="eps", target="v")
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_cfg_scale_checked():
    model = RING.model(VP, "eps")

    def cond_model(x, t, c):
        return model(x, t)

    c = torch.zeros(1, 1)
    for bad in (math.nan, 1e308, "2", True):
        with pytest.raises(ValueError, match="scale"):
            fewstep.cfg(cond_model, c, c, bad)
    with pytest.raises(TypeError, match="model must be a callable"):
        fewstep.cfg(None, c, c, 2.0)


def test_optimize_schedule_arguments_checked():
    args = dict(model=EPS_MODEL, process=VP, solver="ddim", nfe=4, calibration_noise=NOISE)
    bad = [("lr", True), ("lr", 1e308), ("fd_step", 0.0), ("iters", 10**9), ("seed", 1.5), ("reference_solver", "rk4")]
    for option, value in bad:
        with pytest.raises(ValueError, match=option if option != "reference_solver" else "rk4"):
            fewstep.optimize_schedule(**args, **{option: value})
    with pytest.raises(ValueError, match="reference must be a finite"):
        fewstep.optimize_schedule(**args, reference=NOISE * math.nan)
    with pytest.raises(ValueError, match=r"nfe must be an integer >= 1 and <= 100000"):
        fewstep.optimize_schedule(**{**args, "nfe": 10**9})


# 8. Determinism across batches -----------------------------------------------------------------------------------


def test_dpm_adaptive_per_sample_is_batch_invariant():
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = run("dpm_adaptive", noise=noise, per_sample=True)
    for b in (0, 5):
        alone = run("dpm_adaptive", noise=noise[b : b + 1], per_sample=True)
        assert (full[b] - alone[0]).abs().max() < 1e-12
    batch = run("dpm_adaptive", noise=noise, per_sample=False)  # one controller for the batch: depends on it
    assert (batch[0] - run("dpm_adaptive", noise=noise[:1], per_sample=False)[0]).abs().max() > 1e-8


def test_pc_default_is_batch_invariant():
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def pc(idx, **options):
        generator = [torch.Generator().manual_seed(10 + j) for j in idx]
        return run("pc", noise=noise[idx], steps=12, generator=generator, **options)

    assert (pc([0, 1, 2, 3])[[2, 0]] - pc([2, 0])).abs().max() < 1e-12
    assert (pc([0, 1, 2, 3], norms="batch")[[2, 0]] - pc([2, 0], norms="batch")).abs().max() > 1e-6
