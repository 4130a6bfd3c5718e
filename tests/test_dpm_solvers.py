"""DPM-Solver family: convergence orders on the exact Gaussian-mixture ODE, the adaptive solver's tolerance,
parity with diffusers' DPMSolverMultistepScheduler / DPMSolverSinglestepScheduler, and SDE sample distributions."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import fewstep
from fewstep.accuracy import empirical_order, solver_error
from fewstep.solvers import get_solver

MIX = fewstep.ring2d()
NOISE = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
PROCESSES = {
    "vp": (fewstep.DiscreteVP.linear(), "eps"),
    "edm": (fewstep.EDM(), "x0"),
    "rf": (fewstep.RectifiedFlow(), "velocity"),
}
# RectifiedFlow's log-SNR is -inf at t = 1 and +inf at t = 0, where every solver falls back to a first-order step
# (which caps the order at 2); the convergence runs use a log-SNR grid on t in [0.01, 0.99] instead.
RANGES = {"vp": {}, "edm": {}, "rf": {"t_start": 0.99, "t_end": 0.01}}

# Step counts in the asymptotic range (measured on 10..320 steps). The noise-prediction multisteps are still
# pre-asymptotic below ~80 steps (pairwise orders 1.5 -> 1.9 and 1.7 -> 2.9 from 10 to 160 steps).
CONVERGENCE = {
    "dpm_solver_1": (20, 40, 80),
    "dpm_solver_2": (20, 40, 80),
    "dpm_solver_3": (40, 80, 160),
    "dpmpp_2s": (40, 80, 160),
    "dpmpp_2m": (20, 40, 80),
    "dpmpp_3m": (40, 80, 160),
    "dpm_multistep_2": (80, 160, 320),
    "dpm_multistep_3": (80, 160, 320),
}


@functools.cache
def reference(process_name: str, default_range: bool = False) -> torch.Tensor:
    process, _ = PROCESSES[process_name]
    kw = {} if default_range else RANGES[process_name]
    return MIX.ode_solution(NOISE, process, kw.get("t_start"), kw.get("t_end"))


def errors(solver: str, process_name: str, steps, *, default_range: bool = False, **options) -> list[float]:
    process, prediction = PROCESSES[process_name]
    kw = {} if default_range else {"schedule": "logsnr", **RANGES[process_name]}
    ref = reference(process_name, default_range)
    return [
        solver_error(MIX, process, NOISE, ref, prediction=prediction, solver=solver, steps=n, **kw, **options)[0] for n in steps
    ]


# Convergence ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_name", list(PROCESSES))
@pytest.mark.parametrize("solver", list(CONVERGENCE))
def test_convergence_order(solver, process_name):
    steps = CONVERGENCE[solver]
    errs = errors(solver, process_name, steps)
    order = empirical_order(steps, errs)
    assert abs(order - get_solver(solver).order) <= 0.3, (solver, process_name, errs, order)


@pytest.mark.parametrize(
    "solver, options, steps",
    [
        ("dpm_solver_2", {"solver_type": "taylor"}, (20, 40, 80)),
        ("dpm_solver_3", {"solver_type": "taylor"}, (40, 80, 160)),
        ("dpmpp_2s", {"solver_type": "taylor"}, (40, 80, 160)),
        # grid mode: one evaluation per grid point, `order` grid intervals per step
        ("dpm_solver_2", {"intermediate": "grid"}, (40, 80, 160)),
        ("dpm_solver_3", {"intermediate": "grid"}, (120, 240, 480)),
        ("dpmpp_2s", {"intermediate": "grid"}, (80, 160, 320)),
    ],
)
def test_convergence_order_of_options(solver, options, steps):
    errs = errors(solver, "vp", steps, **options)
    assert abs(empirical_order(steps, errs) - get_solver(solver).order) <= 0.3, errs


@pytest.mark.parametrize("solver", ["dpmpp_3m", "dpm_multistep_3"])
def test_reference_third_order_is_second_order(solver):
    """The authors'/diffusers' 3M update (half the Taylor D2 term) converges at order ~2, the default at ~3."""
    steps = (80, 160, 320)
    reference_order = empirical_order(steps, errors(solver, "edm", steps, third_order="reference"))
    taylor_order = empirical_order(steps, errors(solver, "edm", steps))
    assert 1.8 <= reference_order <= 2.5 < 2.7 <= taylor_order


@pytest.mark.parametrize("solver", list(CONVERGENCE))
def test_rectified_flow_default_range(solver):
    """t from 1 (alpha = 0) to 0 (sigma = 0): first-order end steps, no NaN, the error still converges."""
    steps = (20, 40, 80, 160)
    errs = errors(solver, "rf", steps, default_range=True)
    assert all(math.isfinite(e) for e in errs)
    assert errs[2] < errs[0] / 3, errs
    if solver.startswith("dpm_solver") or solver == "dpmpp_2s":  # singlestep: clean asymptotics, capped at order 2
        assert empirical_order(steps[1:], errs[1:]) >= min(get_solver(solver).order, 2) - 0.3, errs


def test_singlestep_nfe_with_infinite_log_snr_ends():
    process, prediction = PROCESSES["rf"]
    x = fewstep.sample(
        MIX.model(process, prediction), NOISE, process=process, prediction=prediction, solver="dpm_solver_3", steps=10
    )
    assert x.nfe == 1 + 8 * 3 + 1  # first and last steps are first order; no final denoise at sigma = 0
    assert bool(torch.isfinite(x).all())


# Adaptive ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_name", list(PROCESSES))
@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_meets_tolerance(order, process_name):
    process, prediction = PROCESSES[process_name]
    ref = reference(process_name, True)
    nfes = []
    for tol in (1e-3, 1e-4):
        err, nfe = solver_error(
            MIX, process, NOISE, ref, prediction=prediction, solver="dpm_adaptive", steps=1, order=order, rtol=tol, atol=tol
        )
        assert tol / 300 < err < tol, (tol, err)
        nfes.append(nfe)
    assert nfes[0] < nfes[1]


def test_adaptive_ignores_grid_length():
    process, prediction = PROCESSES["vp"]
    model = MIX.model(process, prediction)
    a = fewstep.sample(model, NOISE, process=process, solver="dpm_adaptive", steps=1, rtol=1e-3, atol=1e-3)
    b = fewstep.sample(model, NOISE, process=process, solver="dpm_adaptive", steps=7, rtol=1e-3, atol=1e-3)
    assert torch.equal(a, b) and a.nfe == b.nfe


# Bad options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, options, match",
    [
        ("dpm_adaptive", {"order": 4}, "order=4.*allowed values: 2, 3"),
        ("dpm_adaptive", {"rtol": -1.0}, "rtol"),
        ("dpm_adaptive", {"atol": 0.0}, "atol"),
        ("dpm_adaptive", {"h_init": 0.0}, "h_init"),
        ("dpm_solver_2", {"solver_type": "midpoint"}, "solver_type='midpoint'.*allowed values: dpmsolver, taylor"),
        ("dpmpp_2s", {"intermediate": "uniform"}, "intermediate='uniform'.*allowed values: logsnr, grid"),
        ("dpmpp_3m", {"third_order": "diffusers"}, "third_order='diffusers'.*allowed values: taylor, reference"),
        ("dpm_solver_1", {"solver_type": "taylor"}, "does not take option"),
    ],
)
def test_bad_options(solver, options, match):
    process, prediction = PROCESSES["vp"]
    with pytest.raises(ValueError, match=match):
        fewstep.sample(MIX.model(process, prediction), NOISE, process=process, solver=solver, steps=3, **options)


# Parity with diffusers --------------------------------------------------------------------------------------
#
# Mapping: diffusers calls the model at integer timesteps k_0 > ... > k_{n-1}; the fewstep DiscreteVP time of k is
# t = (k + 1) / N (alphas_cumprod[k] = alpha(t)^2). diffusers then takes one more step to its final sigma:
# - final_sigmas_type="zero" (data prediction): a first-order step to sigma = 0, i.e. the data prediction at k_{n-1}
#   = fewstep's grid [(k_i + 1) / N] with steps = n - 1 and denoise_to_zero=True;
# - final_sigmas_type="sigma_min" (required by diffusers for noise prediction): a step to timestep 0, i.e. the
#   grid [(k_i + 1) / N] + [1 / N] with steps = n and denoise_to_zero=False.
# Final-step policy: fewstep lowers the multistep order over the last steps when steps < 15 without a final
# denoise, as diffusers' lower_order_final for len(timesteps) < 15; with a final denoise fewstep does not lower the
# order of the step before it, so diffusers' order-3 run uses lower_order_final=False (its last step to zero is
# first order anyway). Singlestep "grid" mode groups `order` grid intervals per step from the start, as diffusers'
# order list with its default lower_order_final=False (which it switches on itself when n % order != 0).
# diffusers keeps its schedule in float32; it is replaced by the float64 one of the fewstep process. Its multistep
# step() also casts the sample to float32, which bounds that parity at ~1e-7 (~1e-16 without the cast).

N = 1000
PROCESS = fewstep.DiscreteVP.linear(N)
EPS_MODEL = MIX.model(PROCESS, "eps")
PARITY_NOISE = NOISE[:8]


def _diffusers_scheduler(cls, n: int, config: dict):
    diffusers = pytest.importorskip("diffusers")
    scheduler_cls = getattr(diffusers, cls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = scheduler_cls(
            num_train_timesteps=N, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon", **config
        )
        ac = PROCESS.alphas_cumprod.clone()
        scheduler.alphas_cumprod = ac
        scheduler.alpha_t, scheduler.sigma_t = ac.sqrt(), (1 - ac).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
        scheduler.set_timesteps(n)
    ks = scheduler.timesteps.tolist()
    zero = scheduler.config.final_sigmas_type == "zero"
    last = 0.0 if zero else math.sqrt((1 - ac[0]) / ac[0])
    scheduler.sigmas = torch.tensor([math.sqrt((1 - ac[k]) / ac[k]) for k in ks] + [last], dtype=torch.float64)
    grid = torch.tensor([(k + 1) / N for k in ks] + ([] if zero else [1 / N]), dtype=torch.float64)
    return scheduler, ks, grid, zero


def _run_diffusers(scheduler, ks, x, noises=None):
    for j, k in enumerate(ks):
        eps = EPS_MODEL(x, torch.full((x.shape[0],), (k + 1) / N, dtype=torch.float64))
        extra = {} if noises is None else {"variance_noise": noises[j]}
        x = scheduler.step(eps, k, x, **extra).prev_sample
    return x


MULTISTEP = "DPMSolverMultistepScheduler"
SINGLESTEP = "DPMSolverSinglestepScheduler"
PARITY = [
    (MULTISTEP, {"solver_order": 2, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"}, "dpmpp_2m", {}, 1e-5),
    (
        MULTISTEP,
        {"solver_order": 3, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", "lower_order_final": False},
        "dpmpp_3m",
        {"third_order": "reference"},
        1e-5,
    ),
    (
        MULTISTEP,
        {"solver_order": 2, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        "dpm_multistep_2",
        {},
        1e-5,
    ),
    (
        MULTISTEP,
        {"solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        "dpm_multistep_3",
        {"third_order": "reference"},
        1e-5,
    ),
    (
        SINGLESTEP,
        {"solver_order": 2, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "midpoint"},
        "dpm_solver_2",
        {"intermediate": "grid"},
        1e-10,
    ),
    (
        SINGLESTEP,
        {"solver_order": 2, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"},
        "dpm_solver_2",
        {"intermediate": "grid", "solver_type": "taylor"},
        1e-10,
    ),
    # diffusers' order-3 "midpoint" computes the second intermediate point with its midpoint second-order update
    # instead of the paper's (eq. of DPM-Solver-3); it matches neither solver type, so order 3 is compared as "heun".
    (
        SINGLESTEP,
        {"solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"},
        "dpm_solver_3",
        {"intermediate": "grid", "solver_type": "taylor"},
        1e-10,
    ),
    (
        SINGLESTEP,
        {"solver_order": 2, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", "solver_type": "midpoint"},
        "dpmpp_2s",
        {"intermediate": "grid"},
        1e-10,
    ),
    (
        SINGLESTEP,
        {"solver_order": 2, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", "solver_type": "heun"},
        "dpmpp_2s",
        {"intermediate": "grid", "solver_type": "taylor"},
        1e-10,
    ),
]


@pytest.mark.parametrize("n", [10, 20, 21])
@pytest.mark.parametrize(
    "cls, config, solver, options, tol", PARITY, ids=[f"{p[2]}-{p[1].get('solver_type', '')}" for p in PARITY]
)
def test_diffusers_parity(cls, config, solver, options, tol, n):
    scheduler, ks, grid, zero = _diffusers_scheduler(cls, n, config)
    x0 = float(PROCESS.sigma(float(grid[0]))) * PARITY_NOISE  # fewstep starts at sigma(t_start) * noise
    expected = _run_diffusers(scheduler, ks, x0)
    x = fewstep.sample(
        EPS_MODEL,
        PARITY_NOISE,
        process=PROCESS,
        solver=solver,
        schedule=grid,
        steps=len(grid) - 1,
        denoise_to_zero=zero,
        **options,
    )
    assert (x - expected).abs().max().item() < tol


@pytest.mark.parametrize("solver, order", [("sde_dpmpp_1", 1), ("sde_dpmpp_2m", 2)])
def test_diffusers_sde_parity(solver, order):
    """SDE-DPM-Solver++ against diffusers' algorithm_type="sde-dpmsolver++" with the same per-step noise.

    (Order 3 is not compared: diffusers 0.42's third-order SDE update has the sign of the 0.5 in its D2
    coefficient flipped; with it flipped back it matches sde_dpmpp_3m(third_order="reference") to 1e-7.)
    """
    config = {"solver_order": order, "algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "zero"}
    scheduler, ks, grid, _ = _diffusers_scheduler(MULTISTEP, 12, config)
    noises = torch.randn(len(ks), *PARITY_NOISE.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0 = float(PROCESS.sigma(float(grid[0]))) * PARITY_NOISE
    expected = _run_diffusers(scheduler, ks, x0, noises)
    calls = iter(noises)
    x = fewstep.sample(
        EPS_MODEL,
        PARITY_NOISE,
        process=PROCESS,
        solver=solver,
        schedule=grid,
        steps=len(grid) - 1,
        generator=lambda x, a, b: next(calls),
    )
    assert (x - expected).abs().max().item() < 1e-5


# SDE solvers ------------------------------------------------------------------------------------------------

SDE_SAMPLES = 2000
SDE_RUNS = {
    "vp": {"schedule": "logsnr"},
    "edm": {"schedule": "logsnr"},
    "rf": {},  # the default range: the first step starts at alpha = 0 with fresh noise, the last one denoises
}


@functools.cache
def exact_statistics() -> dict[str, torch.Tensor]:
    """Moments and mean log-density of the mixture, with the standard errors of their estimates from SDE_SAMPLES."""
    x = MIX.sample(40000, torch.Generator().manual_seed(11))
    logp = MIX.log_prob(x)
    centred = x - x.mean(0)
    return {
        "mean": x.mean(0),
        "mean_se": x.std(0) / math.sqrt(SDE_SAMPLES),
        "var": centred.pow(2).mean(0),
        "var_se": centred.pow(2).std(0) / math.sqrt(SDE_SAMPLES),
        "logp": logp.mean(),
        "logp_se": logp.std() / math.sqrt(SDE_SAMPLES),
    }


def distribution_mismatch(x: torch.Tensor) -> list[str]:
    """The statistics of x that differ from the exact ones by more than 4 standard errors."""
    s = exact_statistics()
    bad = []
    if ((x.mean(0) - s["mean"]).abs() > 4 * s["mean_se"]).any():
        bad.append(f"mean {x.mean(0).tolist()} vs {s['mean'].tolist()}")
    if ((x.var(0) - s["var"]).abs() > 4 * s["var_se"]).any():
        bad.append(f"var {x.var(0).tolist()} vs {s['var'].tolist()}")
    if abs(MIX.log_prob(x).mean() - s["logp"]) > 4 * s["logp_se"]:
        bad.append(f"mean log p {float(MIX.log_prob(x).mean()):.4f} vs {float(s['logp']):.4f}")
    return bad


def test_distribution_check_detects_a_wrong_sampler():
    exact = MIX.sample(SDE_SAMPLES, torch.Generator().manual_seed(12))
    assert distribution_mismatch(exact) == []
    assert distribution_mismatch(1.05 * exact) != []


@pytest.mark.parametrize("process_name", list(SDE_RUNS))
@pytest.mark.parametrize("solver", ["sde_dpmpp_1", "sde_dpmpp_2m", "sde_dpmpp_3m"])
def test_sde_samples_match_the_distribution(solver, process_name):
    process, prediction = PROCESSES[process_name]
    noise = torch.randn(SDE_SAMPLES, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = fewstep.sample(
        MIX.model(process, prediction),
        noise,
        process=process,
        prediction=prediction,
        solver=solver,
        steps=200,
        generator=torch.Generator().manual_seed(3),
        **SDE_RUNS[process_name],
    )
    assert x.nfe == (200 if process_name == "rf" else 201)  # + the final denoise where sigma(t_end) > 0
    assert distribution_mismatch(x) == []


@pytest.mark.parametrize("solver", ["sde_dpmpp_1", "sde_dpmpp_2m", "sde_dpmpp_3m"])
def test_sde_per_sample_generators(solver):
    process, prediction = PROCESSES["edm"]
    model = MIX.model(process, prediction)

    def run(rows, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return fewstep.sample(model, NOISE[rows], process=process, prediction=prediction, solver=solver, steps=12, generator=gens)

    batch = run([0, 1, 2, 3, 4], [100, 101, 102, 103, 104])
    alone = run([1, 3], [101, 103])
    torch.testing.assert_close(alone, batch[[1, 3]], rtol=0, atol=1e-12)
    other = run([1, 3], [201, 203])
    assert (other - alone).abs().max() > 1e-3  # the noise is used
