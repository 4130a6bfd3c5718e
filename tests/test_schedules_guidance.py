"""Step schedules (named grids with parameters), NFE budgets, schedule search, classifier-free guidance, thresholding."""

import json
import math

import pytest
import torch
from conftest import all_processes

import fewstep
from fewstep.accuracy import rms_error
from fewstep.grids import time_grid

F64 = torch.float64


def _noise(n, seed, dim=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


# Grids -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", all_processes(), ids=repr)
@pytest.mark.parametrize("schedule", fewstep.SCHEDULES)
def test_grids_monotone_with_exact_endpoints(process, schedule):
    infinite = not bool(torch.isfinite(process.log_snr(torch.tensor([process.t_min, process.t_max], dtype=F64))).all())
    needs_log_snr = schedule in ("logsnr", "exponential", "karras", "polyexponential")
    ranges = [(process.t_max, process.t_min), (0.9 * process.t_max + 0.1 * process.t_min, 0.5 * (process.t_min + process.t_max))]
    for i, (t_start, t_end) in enumerate(ranges):
        for steps in (1, 2, 7, 25):
            if i == 0 and infinite and needs_log_snr and not (schedule == "karras" and process.log_snr(t_start) > -math.inf):
                with pytest.raises(ValueError, match="finite log-SNR"):
                    time_grid(process, steps, t_start, t_end, schedule)
                continue
            ts = time_grid(process, steps, t_start, t_end, schedule)
            assert ts.dtype == F64 and ts.shape == (steps + 1,)
            assert float(ts[0]) == t_start and float(ts[-1]) == t_end
            assert bool((ts[1:] < ts[:-1]).all()), ts


def test_exponential_is_the_logsnr_grid_and_polyexponential_rho1_equals_it():
    for process in (fewstep.EDM(), fewstep.VP("cosine"), fewstep.DiscreteVP.linear(), fewstep.VE()):
        args = (process, 9, process.t_max, process.t_min)
        exp = time_grid(*args, "exponential")
        assert torch.equal(exp, time_grid(*args, "logsnr"))
        assert torch.allclose(time_grid(*args, "polyexponential"), exp, rtol=1e-12, atol=0)
        assert torch.allclose(time_grid(*args, fewstep.Schedule("polyexponential", rho=1.0)), exp, rtol=1e-12, atol=0)


def test_polyexponential_closed_form():
    """EDM: log sigma_i = log sigma_min + r_i^rho (log sigma_max - log sigma_min), r_i = 1 - i / n (k-diffusion)."""
    process, n = fewstep.EDM(), 8
    for rho in (0.5, 2.0, 3.0):
        ts = time_grid(process, n, process.t_max, process.t_min, fewstep.Schedule("polyexponential", rho=rho))
        r = 1 - torch.arange(n + 1, dtype=F64) / n
        expected = torch.exp(math.log(process.t_min) + r**rho * (math.log(process.t_max) - math.log(process.t_min)))
        assert torch.allclose(ts, expected, rtol=1e-12)
    assert time_grid(process, n, 80.0, 0.002, fewstep.Schedule("polyexponential", rho=2.0))[1] > 0
    # rho > 1 puts more steps at low noise than the exponential grid
    assert (
        time_grid(process, n, 80.0, 0.002, "polyexponential", rho=2.0)[n // 2]
        < time_grid(process, n, 80.0, 0.002, "exponential")[n // 2]
    )


@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_closed_form(rho):
    """sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al., 2022, eq. 5)."""
    n = 10
    i = torch.arange(n + 1, dtype=F64)
    edm = fewstep.EDM()
    smax, smin = edm.t_max, edm.t_min
    expected = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    schedule = "karras" if rho == 7.0 else fewstep.Schedule("karras", rho=rho)
    assert torch.allclose(time_grid(edm, n, smax, smin, schedule), expected, rtol=1e-12)
    # on a VP process the same formula holds for sigma / alpha
    vp = fewstep.VP("linear")
    ts = time_grid(vp, n, vp.t_max, vp.t_min, fewstep.Schedule("karras", rho=rho))
    ratio = vp.sigma(ts) / vp.alpha(ts)
    rmax, rmin = float(ratio[0]), float(ratio[-1])
    assert torch.allclose(ratio, (rmax ** (1 / rho) + i / n * (rmin ** (1 / rho) - rmax ** (1 / rho))) ** rho, rtol=1e-9)


def test_schedule_object_passes_through_sample():
    mixture, process = fewstep.ring2d(), fewstep.EDM()
    model, noise = mixture.model(process, "x0"), _noise(16, 3)
    schedule = fewstep.Schedule("polyexponential", rho=2.0)
    grid = time_grid(process, 6, process.t_max, process.t_min, schedule)
    a = fewstep.sample(model, noise, process=process, prediction="x0", steps=6, schedule=schedule)
    b = fewstep.sample(model, noise, process=process, prediction="x0", steps=6, schedule=grid)
    c = fewstep.sample(model, noise, process=process, prediction="x0", steps=6, schedule="karras")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert schedule == fewstep.Schedule("polyexponential", rho=2) and repr(schedule) == "Schedule('polyexponential', rho=2.0)"


def test_schedule_bad_input():
    process = fewstep.EDM()
    with pytest.raises(ValueError, match="allowed values: time_uniform, logsnr, exponential"):
        fewstep.Schedule("cosine")
    with pytest.raises(ValueError, match="does not take parameter"):
        fewstep.Schedule("logsnr", rho=2.0)
    with pytest.raises(ValueError, match="allowed: rho"):
        fewstep.Schedule("karras", sigma_min=1.0)
    for bad in (-1.0, 0.0, math.inf, "7"):
        with pytest.raises(ValueError, match="rho must be a positive finite number"):
            fewstep.Schedule("polyexponential", rho=bad)
    with pytest.raises(ValueError, match="rho is only used with a schedule name"):
        time_grid(process, 4, 80.0, 0.002, fewstep.Schedule("karras"), rho=3.0)
    with pytest.raises(ValueError, match="schedule=3 is not known"):
        time_grid(process, 4, 80.0, 0.002, 3)
    with pytest.raises(ValueError, match="finite log-SNR"):
        time_grid(fewstep.RectifiedFlow(), 4, 1.0, 0.0, "polyexponential")


# NFE budgets ---------------------------------------------------------------------------------------------------


def test_steps_for_nfe_matches_sample_nfe():
    mixture = fewstep.ring2d()
    cases = [
        ("heun", 7, fewstep.EDM(), True, 3),  # 2 per step + the final denoising
        ("heun", 6, fewstep.EDM(), False, 3),
        ("heun", 5, fewstep.RectifiedFlow(), True, 3),  # the last step ends at sigma = 0: 2 + 2 + 1, no denoising
        ("dpmpp_2m", 6, fewstep.DiscreteVP.linear(), True, 5),
        ("euler", 4, fewstep.RectifiedFlow(), True, 4),
    ]
    for solver, nfe, process, dtz, steps in cases:
        assert fewstep.steps_for_nfe(solver, nfe, process, denoise_to_zero=dtz) == steps
        x = fewstep.sample(
            mixture.model(process, "v"),
            _noise(2, 0),
            process=process,
            prediction="v",
            solver=solver,
            steps=steps,
            denoise_to_zero=dtz,
        )
        assert x.nfe == nfe == fewstep.nfe_for_steps(solver, steps, process, denoise_to_zero=dtz)


def test_steps_for_nfe_bad_input():
    with pytest.raises(ValueError, match="nfe=6 is not reachable.*reachable values up to it: 3, 5"):
        fewstep.steps_for_nfe("heun", 6, fewstep.EDM())
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        fewstep.steps_for_nfe("ddim", 0, fewstep.EDM())
    with pytest.raises(ValueError, match="solver='nope' is not known"):
        fewstep.steps_for_nfe("nope", 5, fewstep.EDM())
    with pytest.raises(ValueError, match="does not take option"):
        fewstep.steps_for_nfe("ddim", 5, fewstep.EDM(), churn=1.0)


# Schedule search -----------------------------------------------------------------------------------------------


def _fixed_grid_errors(mixture, process, prediction, solver, steps, noise, reference):
    errors = {}
    for schedule in [*fewstep.SCHEDULES, fewstep.Schedule("polyexponential", rho=2.0), fewstep.Schedule("karras", rho=3.0)]:
        try:
            x = fewstep.sample(mixture.model(process, prediction), noise, process=process, prediction=prediction,
                               solver=solver, steps=steps, schedule=schedule)  # fmt: skip
        except ValueError:  # log-SNR grids on a process with infinite log-SNR at an endpoint: not a candidate
            continue
        errors[repr(schedule)] = rms_error(x, reference)
    return errors


@pytest.mark.parametrize(
    "process, solver, nfe, prediction, init",
    [(fewstep.DiscreteVP.linear(), "dpmpp_2m", 6, "eps", "logsnr"), (fewstep.EDM(), "heun", 7, "x0", None)],
    ids=["discretevp-dpmpp_2m-nfe6", "edm-heun-nfe7"],
)
def test_search_beats_best_fixed_grid_on_held_out_noise(process, solver, nfe, prediction, init):
    """Search on ring2d noise seed 0, evaluate against the exact ODE solution on noise seed 1 (not used in the search)."""
    mixture = fewstep.ring2d()
    calib, held_out = _noise(96, 0), _noise(256, 1)
    model = mixture.model(process, prediction)
    searched = fewstep.optimize_schedule(
        model,
        process,
        solver,
        nfe,
        calib,
        prediction=prediction,
        reference=mixture.ode_solution(calib, process),
        init=init,
        iters=60,
        lr=0.2,
    )
    ts = searched.times
    assert float(ts[0]) == process.t_max and float(ts[-1]) == process.t_min and bool((ts[1:] < ts[:-1]).all())
    assert searched.error < 0.5 * searched.error_init
    reference = mixture.ode_solution(held_out, process)
    x = fewstep.sample(model, held_out, process=process, **searched.sample_kwargs())
    assert x.nfe == nfe
    fixed = _fixed_grid_errors(mixture, process, prediction, solver, searched.steps, held_out, reference)
    assert rms_error(x, reference) < 0.5 * min(fixed.values()), (rms_error(x, reference), fixed)


def test_search_default_reference_is_accurate_and_zero_iterations_keep_the_init():
    mixture, process = fewstep.ring2d(), fewstep.EDM()
    calib = _noise(64, 0)
    model = mixture.model(process, "x0")
    auto = fewstep.optimize_schedule(model, process, "dpmpp_2m", 5, calib, prediction="x0", init="karras", iters=0)
    exact = fewstep.optimize_schedule(
        model,
        process,
        "dpmpp_2m",
        5,
        calib,
        prediction="x0",
        init="karras",
        iters=0,
        reference=mixture.ode_solution(calib, process),
    )
    assert torch.equal(auto.times, time_grid(process, 4, process.t_max, process.t_min, "karras"))
    assert auto.history == [auto.error_init] and auto.error == auto.error_init
    assert abs(auto.error_init - exact.error_init) < 2e-3 * exact.error_init


def test_search_starts_from_the_best_of_several_initial_grids():
    mixture, process = fewstep.ring2d(), fewstep.DiscreteVP.linear()
    calib = _noise(64, 0)
    model, reference = mixture.model(process), mixture.ode_solution(calib, process)
    candidates = ["time_uniform", "logsnr", fewstep.Schedule("polyexponential", rho=2.0)]
    errors = [
        rms_error(fewstep.sample(model, calib, process=process, steps=5, schedule=c), reference)  # dpmpp_2m, 5 steps = 6 NFE
        for c in candidates
    ]
    searched = fewstep.optimize_schedule(model, process, "dpmpp_2m", 6, calib, reference=reference, init=candidates, iters=0)
    best = min(range(3), key=errors.__getitem__)
    assert best == 2 and searched.init == repr(candidates[best]) and searched.error_init == errors[best]
    assert torch.equal(searched.times, time_grid(process, 5, process.t_max, process.t_min, candidates[best]))
    with pytest.raises(ValueError, match="non-empty list"):
        fewstep.optimize_schedule(model, process, "dpmpp_2m", 6, calib, reference=reference, init=[])


def test_searched_schedule_json_round_trip(tmp_path):
    mixture, process = fewstep.ring2d(), fewstep.EDM()
    calib = _noise(32, 0)
    model = mixture.model(process, "x0")
    searched = fewstep.optimize_schedule(
        model, process, "heun", 5, calib, prediction="x0", reference=mixture.ode_solution(calib, process), iters=3
    )
    path = searched.save(tmp_path / "schedule.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedule.json"]  # no temporary file left behind
    data = json.loads(path.read_text())
    assert data["process"] == repr(process) and data["solver"] == "heun" and data["nfe"] == 5 and data["steps"] == 2
    loaded = fewstep.SearchedSchedule.load(path)
    assert torch.equal(loaded.times, searched.times) and loaded.to_dict() == searched.to_dict()
    a = fewstep.sample(model, calib, process=process, **searched.sample_kwargs())
    b = fewstep.sample(model, calib, process=process, prediction="x0", solver="heun", steps=2, schedule=loaded)
    assert torch.equal(a, b) and b.nfe == 5
    with pytest.raises(ValueError, match="searched for process EDM"):
        fewstep.sample(model, calib, process=fewstep.VE(), prediction="x0", solver="heun", steps=2, schedule=loaded)
    with pytest.raises(ValueError, match="pass steps=2"):
        fewstep.sample(model, calib, process=process, prediction="x0", solver="heun", steps=3, schedule=loaded)
    path.write_text(json.dumps({**data, "format": "other"}))
    with pytest.raises(ValueError, match="not a searched schedule"):
        fewstep.SearchedSchedule.load(path)


def test_search_bad_input():
    mixture, process = fewstep.ring2d(), fewstep.EDM()
    model, calib = mixture.model(process, "x0"), _noise(8, 0)
    with pytest.raises(ValueError, match="nfe=6 is not reachable"):
        fewstep.optimize_schedule(model, process, "heun", 6, calib, prediction="x0")
    with pytest.raises(ValueError, match="reference must be a tensor shaped like calibration_noise"):
        fewstep.optimize_schedule(model, process, "ddim", 4, calib, prediction="x0", reference=calib[:4])
    with pytest.raises(ValueError, match="iters must be an integer >= 0"):
        fewstep.optimize_schedule(model, process, "ddim", 4, calib, prediction="x0", iters=-1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fewstep.optimize_schedule(model, process, "ddim", 4, calib, prediction="x0", lr=0.0)
    with pytest.raises(ValueError, match="does not take option"):
        fewstep.optimize_schedule(model, process, "ddim", 4, calib, prediction="x0", order=3)
    with pytest.raises(TypeError, match="process must be a fewstep Process"):
        fewstep.optimize_schedule(model, "EDM", "ddim", 4, calib, prediction="x0")
    with pytest.raises(ValueError, match="strictly decreasing"):
        fewstep.SearchedSchedule(times=torch.tensor([1.0, 2.0]), process="EDM()", solver="ddim", nfe=2, steps=1)


# Guidance ------------------------------------------------------------------------------------------------------


class LabelledPair:
    """A conditional network over two exact mixtures: label 1 -> mixture A, label 0 -> mixture B; counts calls."""

    def __init__(self, process, prediction="eps"):
        self.a = fewstep.ring2d().model(process, prediction)
        self.b = fewstep.GaussianMixture([1.0, 2.0], [[0.5, 0.5], [-1.0, 0.2]], [0.3, 0.2]).model(process, prediction)
        self.batches = []

    def __call__(self, x, t, label):
        self.batches.append(x.shape[0])
        mask = (label == 1).reshape(-1, 1)
        return torch.where(mask, self.a(x, t), self.b(x, t))


def test_cfg_matches_the_formula_on_a_gmm_pair():
    process = fewstep.VP("linear")
    net = LabelledPair(process)
    x = _noise(10, 5)
    t = torch.linspace(0.05, 0.95, 10, dtype=F64)
    cond, uncond = torch.ones(10, dtype=torch.long), torch.zeros(1, dtype=torch.long)  # uncond broadcast from [1]
    a, b = net.a(x, t), net.b(x, t)
    assert not torch.allclose(a, b)
    for scale in (1.0, 0.0, 3.0, -0.5):
        guided = fewstep.cfg(net, cond, uncond, scale)
        net.batches.clear()
        out = guided(x, t)
        assert torch.allclose(out, b + scale * (a - b), rtol=1e-12, atol=1e-12)
        expected_cost = 1 if scale in (0.0, 1.0) else 2
        assert guided.nfe_per_call == expected_cost
        assert net.batches == ([10] if expected_cost == 1 else [20])  # one call, conditional and unconditional batched
    assert torch.equal(fewstep.cfg(net, cond, uncond, 1.0)(x, t), a)
    assert torch.equal(fewstep.cfg(net, cond, uncond, 0.0)(x, t), b)


def test_cfg_nfe_counts_two_per_guided_call_and_one_outside_the_interval():
    process, steps = fewstep.VP("linear"), 6
    net = LabelledPair(process)
    noise = _noise(12, 2)
    cond, uncond = torch.ones(12, dtype=torch.long), torch.zeros(12, dtype=torch.long)
    x = fewstep.sample(fewstep.cfg(net, cond, uncond, 2.0), noise, process=process, solver="dpmpp_2m", steps=steps)
    assert x.nfe == 2 * (steps + 1) and len(net.batches) == steps + 1
    ts = time_grid(process, steps, process.t_max, process.t_min, process.default_schedule).tolist() + [process.t_min]
    lo, hi = ts[4] - 1e-9, ts[1] + 1e-9  # grid points 1..4 inside; the final denoising at t_min outside
    inside = sum(lo <= t <= hi for t in ts)
    assert inside == 4
    y = fewstep.sample(
        fewstep.cfg(net, cond, uncond, 2.0, interval=(lo, hi)), noise, process=process, solver="dpmpp_2m", steps=steps
    )
    assert y.nfe == 2 * inside + (steps + 1 - inside)
    assert not torch.allclose(x, y)
    # per-sample times straddling the interval: guided inside, conditional outside
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    guided = fewstep.cfg(net, cond[:3], uncond[:3], 2.0, interval=(0.3, 0.6))
    xs = noise[:3]
    a, b = net.a(xs, t), net.b(xs, t)
    out = guided(xs, t)
    assert torch.allclose(out[1], b[1] + 2.0 * (a[1] - b[1]), rtol=1e-12) and torch.equal(out[[0, 2]], a[[0, 2]])
    assert guided.nfe_per_call == 2
    guided(xs, torch.full((3,), 0.95, dtype=F64))
    assert guided.nfe_per_call == 1


def test_dynamic_thresholding_and_static_clipping_by_hand():
    x0 = torch.tensor([[0.5, -2.0, 3.0, 1.0], [0.1, -0.2, 0.3, 0.4]], dtype=F64).reshape(2, 2, 2)
    # |x0| of sample 0 sorted: 0.5, 1, 2, 3; the 0.5-quantile (linear interpolation) is 1.5. Sample 1: s = max(q, 1) = 1.
    out = fewstep.DynamicThresholding(percentile=0.5)(x0)
    assert torch.allclose(out[0].flatten(), torch.tensor([0.5, -1.5, 1.5, 1.0], dtype=F64) / 1.5)
    assert torch.equal(out[1], x0[1])
    capped = fewstep.DynamicThresholding(percentile=1.0, max_value=2.0)(x0)  # s = min(3, 2) = 2
    assert torch.allclose(capped[0].flatten(), torch.tensor([0.5, -2.0, 2.0, 1.0], dtype=F64) / 2.0)
    clipped = fewstep.StaticClipping(1.0)(x0)
    assert torch.equal(clipped[0].flatten(), torch.tensor([0.5, -1.0, 1.0, 1.0], dtype=F64)) and torch.equal(clipped[1], x0[1])


def test_x0_fn_is_applied_to_every_evaluation_in_sample():
    mixture, process = fewstep.ring2d(), fewstep.EDM()
    model, noise = mixture.model(process, "x0"), _noise(64, 4)
    calls = []

    def counting_clip(x0):
        calls.append(1)
        return fewstep.StaticClipping(0.5)(x0)

    plain = fewstep.sample(model, noise, process=process, prediction="x0", solver="heun", steps=4)
    clipped = fewstep.sample(model, noise, process=process, prediction="x0", solver="heun", steps=4, x0_fn=counting_clip)
    assert plain.abs().max() > 0.8 and clipped.abs().max() <= 0.5  # the final denoising is clipped too
    assert len(calls) == clipped.nfe == 9


def test_guidance_bad_input():
    net = LabelledPair(fewstep.EDM())
    cond = torch.ones(4, dtype=torch.long)
    with pytest.raises(TypeError, match="cond must be a tensor"):
        fewstep.cfg(net, [1, 1], cond, 2.0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fewstep.cfg(net, cond, cond, math.nan)
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        fewstep.cfg(net, cond, cond, 2.0, interval=(0.5, 0.1))
    with pytest.raises(ValueError, match="interval must be None or a pair"):
        fewstep.cfg(net, cond, cond, 2.0, interval=0.5)
    with pytest.raises(ValueError, match="uncond has batch size 3 but x has 4"):
        fewstep.cfg(net, cond, torch.zeros(3, dtype=torch.long), 2.0)(_noise(4, 0), torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="percentile must be a fraction in"):
        fewstep.DynamicThresholding(percentile=0.0)
    with pytest.raises(ValueError, match="max_value must be >= 1"):
        fewstep.DynamicThresholding(max_value=0.5)
    with pytest.raises(ValueError, match="limit must be positive"):
        fewstep.StaticClipping(0.0)
    with pytest.raises(TypeError, match="x0_fn must be None or a callable"):
        fewstep.sample(net.a, _noise(4, 0), process=fewstep.EDM(), x0_fn=3)
