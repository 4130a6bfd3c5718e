"""Convergence order and exactness of the first solvers against the exact Gaussian-mixture ODE solution."""

import pytest
import torch

import fewstep
from fewstep.accuracy import empirical_order, solver_error

# A smooth mixture (stds >= 0.2) so that the asymptotic regime starts at modest step counts.
MIXTURE = fewstep.GaussianMixture([1, 2, 1], [[-0.8, 0.2], [0.3, 0.5], [0.6, -0.7]], [[0.3, 0.4], [0.25, 0.3], [0.4, 0.2]])
NOISE = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STEPS = (16, 32, 64)
ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2}

# (process, prediction, schedule, t_end). Methods stepping in the process's own time (euler, heun) use a
# time-uniform grid on DiscreteVP: its log alpha is piecewise linear, so the drift in t has jumps every 1/N and
# steps shorter than that (the log-SNR grid near t_end) see them. Log-SNR integrators are immune to this.
CASES = {
    "DiscreteVP": (fewstep.DiscreteVP.linear(), "eps", "logsnr", None),
    "DiscreteVP-uniform": (fewstep.DiscreteVP.linear(), "eps", "time_uniform", None),
    "EDM": (fewstep.EDM(), "x0", "karras", None),
    "RectifiedFlow": (fewstep.RectifiedFlow(), "velocity", "time_uniform", 1e-3),
}
PLAN = [
    (solver, case)
    for solver in ORDERS
    for case in CASES
    if not (case == "DiscreteVP" and solver in ("euler", "heun")) and not (case == "DiscreteVP-uniform" and solver == "dpmpp_2m")
]
_references: dict = {}


def reference(case):
    if case not in _references:
        process, _, _, t_end = CASES[case]
        _references[case] = MIXTURE.ode_solution(NOISE, process, t_end=t_end)
    return _references[case]


@pytest.mark.parametrize("solver,case", PLAN)
def test_convergence_order(solver, case):
    process, prediction, schedule, t_end = CASES[case]
    errors = [
        solver_error(
            MIXTURE,
            process,
            NOISE,
            reference(case),
            prediction=prediction,
            solver=solver,
            steps=n,
            schedule=schedule,
            t_end=t_end,
        )[0]
        for n in STEPS
    ]
    order = empirical_order(STEPS, errors)
    assert abs(order - ORDERS[solver]) <= 0.3, f"{solver} on {case}: errors {errors}, order {order:.2f}"


@pytest.mark.parametrize("solver", list(ORDERS))
def test_rectified_flow_default_range_converges(solver):
    """From t = 1 (alpha = 0) to t = 0 (sigma = 0): every solver finite and within 2e-3 at 64 steps."""
    process = fewstep.RectifiedFlow()
    ref = reference_default_rf()
    err, nfe = solver_error(MIXTURE, process, NOISE, ref, prediction="velocity", solver=solver, steps=64)
    assert err < (2e-2 if ORDERS[solver] == 1 else 2e-3)
    assert nfe == (127 if solver == "heun" else 64)  # last step ends at sigma = 0: no extra evaluation


_rf = {}


def reference_default_rf():
    if not _rf:
        _rf["ref"] = MIXTURE.ode_solution(NOISE, fewstep.RectifiedFlow())
    return _rf["ref"]


@pytest.mark.parametrize("process", [fewstep.DiscreteVP.linear(), fewstep.EDM(), fewstep.RectifiedFlow()], ids=repr)
def test_exponential_integrators_are_exact_for_constant_data_prediction(process):
    """Point-mass data (x0 prediction constant in time): DDIM and DPM-Solver++ reproduce the exact flow."""
    g = fewstep.GaussianMixture([1.0], [[0.4, -0.3]], [[1e-9, 1e-9]])
    t_end = 0.05 * process.t_max
    exact = g.single_gaussian_flow(NOISE, process, process.t_max, t_end)
    for solver in ("ddim", "dpmpp_2m"):
        x = fewstep.sample(
            g.model(process, "x0"),
            NOISE,
            process=process,
            prediction="x0",
            solver=solver,
            steps=3,
            schedule="time_uniform",
            t_end=t_end,
            denoise_to_zero=False,
        )
        assert torch.allclose(x, exact, atol=1e-10), solver
    x = fewstep.sample(
        g.model(process, "x0"),
        NOISE,
        process=process,
        prediction="x0",
        solver="euler",
        steps=3,
        schedule="time_uniform",
        t_end=t_end,
        denoise_to_zero=False,
    )
    assert not torch.allclose(x, exact, atol=1e-3) or isinstance(process, (fewstep.EDM, fewstep.RectifiedFlow))


def test_nfe_accounting():
    process = fewstep.EDM()
    model = MIXTURE.model(process, "x0")
    assert fewstep.sample(model, NOISE, process=process, prediction="x0", solver="dpmpp_2m", steps=10).nfe == 11
    assert fewstep.sample(model, NOISE, process=process, prediction="x0", solver="heun", steps=10).nfe == 21
    x = fewstep.sample(model, NOISE, process=process, prediction="x0", solver="ddim", steps=10, denoise_to_zero=False)
    assert x.nfe == 10


def test_denoise_to_zero_returns_data_prediction_at_t_end():
    process = fewstep.EDM()
    model = MIXTURE.model(process, "eps")
    states = []
    b = fewstep.sample(model, NOISE, process=process, solver="dpmpp_2m", steps=8, callback=states.append)
    assert states[-1]["t"] == process.t_min
    assert torch.allclose(b, MIXTURE.posterior_mean(states[-1]["x"], 1.0, process.t_min)[0], atol=1e-12)


def test_lower_order_final_makes_last_multistep_step_first_order():
    """Without denoise_to_zero and steps < 15, the last DPM-Solver++(2M) step is DDIM from the same state."""
    process = fewstep.EDM()
    model = MIXTURE.model(process, "eps")
    states = []
    x = fewstep.sample(
        model,
        NOISE,
        process=process,
        solver="dpmpp_2m",
        steps=6,
        denoise_to_zero=False,
        callback=lambda info: states.append(info),
    )
    grid = fewstep.time_grid(process, 6, process.t_max, process.t_min)
    before = states[-2]["x"]
    pred = fewstep.Denoiser(model, process, "eps")(before, float(grid[-2]))
    assert torch.allclose(x, pred.x0 + float(grid[-1]) * pred.eps, atol=1e-12)


def test_callback_sees_every_step():
    process = fewstep.DiscreteVP.linear()
    seen = []
    fewstep.sample(MIXTURE.model(process), NOISE, process=process, steps=5, callback=lambda d: seen.append((d["step"], d["t"])))
    grid = fewstep.time_grid(process, 5, 1.0, 1e-3)
    assert [s for s, _ in seen] == list(range(5))
    assert [t for _, t in seen] == pytest.approx(grid[1:].tolist())


def test_float32_runs_close_to_float64():
    process = fewstep.DiscreteVP.linear()
    model = MIXTURE.model(process)
    x64 = fewstep.sample(model, NOISE, process=process, steps=10)
    x32 = fewstep.sample(model, NOISE.float(), process=process, steps=10)
    assert x32.dtype == torch.float32
    assert (x32.double() - x64).abs().max() < 1e-4
