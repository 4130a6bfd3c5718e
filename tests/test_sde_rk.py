"""Runge-Kutta / sigma-space samplers (dpm_2, lms, euler/heun space="edm"), the stochastic samplers and the Brownian tree.

Deterministic solvers: convergence order against the exact GMM probability-flow ODE, parity with diffusers.
Stochastic solvers: at high NFE the samples of the exact ring2d model match `GaussianMixture.sample` (mean,
covariance, energy distance), and the same sampler with its noise switched off fails the same test.
"""

import math

import pytest
import torch

import fewstep
from fewstep.accuracy import empirical_order, solver_error
from fewstep.metrics import energy_distance
from fewstep.noise import BrownianTreeNoise
from fewstep.solvers import Run

VP = fewstep.DiscreteVP.linear()
RING = fewstep.ring2d()
PREDICTION = {"DiscreteVP": "eps", "EDM": "eps", "VP": "eps", "VE": "eps", "RectifiedFlow": "velocity"}
SCHEDULE = {"DiscreteVP": "logsnr", "EDM": "karras", "RectifiedFlow": "time_uniform"}


def prediction_for(process):
    return PREDICTION[type(process).__name__]


# Convergence order ------------------------------------------------------------------------------------------------

NOISE64 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_REFERENCES = {}


def reference(process):
    key = repr(process)
    if key not in _REFERENCES:
        _REFERENCES[key] = RING.ode_solution(NOISE64, process)
    return _REFERENCES[key]


def observed_order(process, solver, steps, **options):
    name = type(process).__name__
    errors = [
        solver_error(
            RING,
            process,
            NOISE64,
            reference(process),
            prediction=prediction_for(process),
            solver=solver,
            steps=n,
            schedule=SCHEDULE[name],
            **options,
        )[0]
        for n in steps
    ]
    return empirical_order(steps, errors), errors


PROCESSES = [VP, fewstep.EDM(), fewstep.RectifiedFlow()]


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize(
    "solver, options, expected",
    [("dpm_2", {}, 2), ("euler", {"space": "edm"}, 1), ("heun", {"space": "edm"}, 2), ("lms", {"order": 2}, 2)],
)
def test_convergence_order(process, solver, options, expected):
    order, errors = observed_order(process, solver, [20, 40, 80], **options)
    assert abs(order - expected) <= 0.3, (order, errors)


@pytest.mark.parametrize("process", [VP, fewstep.EDM()], ids=repr)
@pytest.mark.parametrize("order", [3, 4])
def test_lms_high_order(process, order):
    # The Euler/low-order warm-up limits LMS-3/4 at coarse grids; from 80 steps on the nominal order shows.
    observed, errors = observed_order(process, "lms", [80, 160, 320], order=order)
    assert abs(observed - order) <= 0.3, (observed, errors)


def test_space_edm_is_not_space_time():
    """space="edm" is a different integrator from the default (process time) on VP; the default is unchanged."""
    x_time = fewstep.sample(RING.model(VP), NOISE64, process=VP, solver="heun", steps=10)
    x_default = fewstep.sample(RING.model(VP), NOISE64, process=VP, solver="heun", steps=10, space="time")
    x_edm = fewstep.sample(RING.model(VP), NOISE64, process=VP, solver="heun", steps=10, space="edm")
    assert torch.equal(x_time, x_default)
    assert (x_time - x_edm).abs().max() > 1e-4
    euler_edm = fewstep.sample(RING.model(VP), NOISE64, process=VP, solver="euler", steps=10, space="edm")
    ddim = fewstep.sample(RING.model(VP), NOISE64, process=VP, solver="ddim", steps=10)
    assert (euler_edm - ddim).abs().max() < 1e-12  # Euler in sigma/alpha space is DDIM


def test_nfe_counts():
    model = RING.model(VP)
    assert fewstep.sample(model, NOISE64, process=VP, solver="dpm_2", steps=6).nfe == 6 * 2 + 1
    assert fewstep.sample(model, NOISE64, process=VP, solver="lms", steps=6).nfe == 6 + 1
    assert fewstep.sample(model, NOISE64, process=VP, solver="pc", steps=6, corrector_steps=2).nfe == 6 * 3 + 1
    edm = fewstep.EDM(sigma_min=0.0)  # last step to sigma = 0 is one evaluation, and no final denoising
    assert fewstep.sample(RING.model(edm), NOISE64, process=edm, solver="edm_sde", steps=6).nfe == 5 * 2 + 1


# Parity with diffusers ------------------------------------------------------------------------------------------------

MIXTURE6 = fewstep.mixture_nd(dim=6, components=4)
NOISE6 = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def diffusers_trajectory(scheduler, steps):
    """diffusers' loop on the exact eps model; returns the states (in its x/alpha units) and the integer timesteps."""
    assert torch.allclose(scheduler.alphas_cumprod.double(), VP.alphas_cumprod, rtol=1e-5)
    scheduler.alphas_cumprod = VP.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    x = NOISE6 * scheduler.init_noise_sigma
    states = []
    for k in scheduler.timesteps:
        t = VP.time_from_timestep(torch.as_tensor(float(k), dtype=torch.float64)).expand(x.shape[0])
        eps = MIXTURE6.model(VP, "eps")(scheduler.scale_model_input(x, k), t)
        x = scheduler.step(eps, k, x).prev_sample
        states.append(x)
    return states, sorted({int(k) for k in scheduler.timesteps}, reverse=True), float(scheduler.init_noise_sigma)


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize(
    "name, solver", [("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun"), ("LMSDiscreteScheduler", "lms")]
)
def test_parity_with_diffusers(name, solver, steps):
    diffusers = pytest.importorskip("diffusers", reason="parity tests need the dev extra (pip install -e .[dev])")
    scheduler = getattr(diffusers, name)(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="trailing"
    )
    states, timesteps, init_sigma = diffusers_trajectory(scheduler, steps)
    grid = VP.time_from_timestep(torch.tensor(timesteps, dtype=torch.float64))
    noise = NOISE6 * init_sigma * VP.alpha(grid[0]) / VP.sigma(grid[0])  # diffusers starts at x/alpha = init_sigma * noise
    ours = []
    options = {} if solver == "lms" else {"space": "edm"}
    x = fewstep.sample(
        MIXTURE6.model(VP, "eps"),
        noise,
        process=VP,
        solver=solver,
        schedule=grid,
        steps=len(grid) - 1,
        callback=lambda info: ours.append(info["x"]),
        **options,
    )
    if solver != "heun":  # diffusers' Heun reports two states per step; its final state is compared below
        expected = [s * VP.alpha(grid[j + 1]) for j, s in enumerate(states[: len(ours)])]
        assert max(float((a - b).abs().max()) for a, b in zip(ours, expected, strict=True)) < 1e-5
    if solver == "lms":
        # diffusers' last LMS step integrates to sigma = 0 with the 4-step formula; fewstep's grid ends at
        # sigma(t_min) > 0 and finishes with the data prediction there, so only the states before it are compared.
        assert (x - states[-1]).abs().max() > 1e-3
    else:
        assert (x - states[-1]).abs().max() < 1e-5
        assert x.nfe == (steps if solver == "euler" else 2 * steps - 1)


@pytest.mark.parametrize(
    "name, config, step_kwargs, solver, options",
    [
        ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": False}, {}, "ddpm", {"variance": "posterior"}),
        ("DDPMScheduler", {"variance_type": "fixed_large", "clip_sample": False}, {}, "ddpm", {"variance": "beta"}),
        ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, {"eta": 0.6}, "ddim_eta", {"eta": 0.6}),
        ("EulerAncestralDiscreteScheduler", {}, {}, "euler_ancestral", {}),
    ],
)
def test_stochastic_parity_with_diffusers(name, config, step_kwargs, solver, options):
    """Same model, same timesteps and the same normal draws (one torch.Generator, one draw per step, in order)."""
    diffusers = pytest.importorskip("diffusers", reason="parity tests need the dev extra (pip install -e .[dev])")
    scheduler = getattr(diffusers, name)(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="leading", **config
    )
    scheduler.alphas_cumprod = VP.alphas_cumprod.clone()
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(4)
    x = NOISE6 * scheduler.init_noise_sigma
    for k in scheduler.timesteps:
        t = VP.time_from_timestep(torch.as_tensor(float(k), dtype=torch.float64)).expand(x.shape[0])
        eps = MIXTURE6.model(VP, "eps")(scheduler.scale_model_input(x, k), t)
        x = scheduler.step(eps, k, x, generator=generator, **step_kwargs).prev_sample
    grid = VP.time_from_timestep(scheduler.timesteps.to(torch.float64))
    # Euler ancestral works on x / alpha (its init_noise_sigma is sigma/alpha at the start); DDPM and DDIM on x.
    scale = VP.alpha(grid[0]) if name.startswith("Euler") else 1.0
    noise = NOISE6 * float(scheduler.init_noise_sigma) * scale / VP.sigma(grid[0])

    def ours(seed):
        return fewstep.sample(MIXTURE6.model(VP, "eps"), noise, process=VP, solver=solver, schedule=grid,
                              steps=len(grid) - 1, generator=torch.Generator().manual_seed(seed), **options)  # fmt: skip

    assert (ours(4) - x).abs().max() < 1e-5
    assert (ours(5) - x).abs().max() > 1e-2  # the comparison sees the noise


# Stochastic samplers: distribution at high NFE ---------------------------------------------------------------------

N = 1000
TRUTH = RING.sample(N, torch.Generator().manual_seed(123))
NOISE_N = torch.randn(N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
EXACT_MEAN = (RING.weights[:, None] * RING.means).sum(0)
EXACT_COV = (
    RING.weights[:, None, None] * (torch.diag_embed(RING.stds**2) + RING.means[:, :, None] * RING.means[:, None, :])
).sum(0) - torch.outer(EXACT_MEAN, EXACT_MEAN)
# Tolerances for 1000 samples (ring2d: covariance 0.51 I). Measured on 300 sets of exact samples: max |mean| error
# 0.066, max |cov| error 0.037 and energy distance to TRUTH 0.0075 (99% quantile 0.0063).
MEAN_TOL, COV_TOL, ENERGY_TOL = 0.08, 0.05, 0.008


def distribution_errors(x):
    return (
        float((x.mean(0) - EXACT_MEAN).abs().max()),
        float((torch.cov(x.T) - EXACT_COV).abs().max()),
        energy_distance(x, TRUTH),
    )


def matches_truth(x):
    mean_err, cov_err, energy = distribution_errors(x)
    return mean_err < MEAN_TOL and cov_err < COV_TOL and energy < ENERGY_TOL


def zero_noise(x, t_from, t_to):
    return torch.zeros_like(x)


STOCHASTIC = [
    ("ddpm", VP, dict(steps=200)),
    ("ddpm", VP, dict(steps=500, variance="beta")),
    ("ddpm", fewstep.RectifiedFlow(), dict(steps=200)),
    ("ddim_eta", fewstep.VP("linear"), dict(steps=400, eta=0.5)),
    ("euler_ancestral", fewstep.EDM(), dict(steps=200)),
    ("edm_sde", fewstep.EDM(), dict(steps=100)),
    ("edm_sde", VP, dict(steps=100)),
    ("euler_maruyama", fewstep.VP("linear"), dict(steps=500)),
    ("pc", fewstep.VE(), dict(steps=300)),
    ("pc", fewstep.RectifiedFlow(), dict(steps=300, predictor="ddpm")),
    ("interpolant_sde", fewstep.RectifiedFlow(), dict(steps=300, diffusion=5.0)),
]


@pytest.mark.parametrize("solver, process, options", STOCHASTIC, ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_stochastic_sampler_matches_distribution(solver, process, options):
    def run(generator):
        return fewstep.sample(
            RING.model(process, prediction_for(process)),
            NOISE_N,
            process=process,
            prediction=prediction_for(process),
            solver=solver,
            generator=generator,
            **options,
        )

    x = run(torch.Generator().manual_seed(7))
    assert matches_truth(x), distribution_errors(x)
    wrong = run(zero_noise)  # the same sampler without its noise must fail the same test
    assert not matches_truth(wrong), distribution_errors(wrong)


def test_ancestral_family_identities():
    """eta = 1 DDIM, Euler ancestral and DDPM's posterior step are one formula; eta = 0 is DDIM; no-churn EDM is Heun."""
    model, runs = RING.model(VP), {}
    for solver, options in [
        ("ddpm", {}),
        ("ddim_eta", {"eta": 1.0}),
        ("euler_ancestral", {}),
        ("ddim_eta", {"eta": 0.0}),
        ("euler_ancestral", {"eta": 0.0}),
        ("ddim", {}),
    ]:
        runs[solver, str(options)] = fewstep.sample(
            model, NOISE64, process=VP, solver=solver, steps=8, generator=torch.Generator().manual_seed(3), **options
        )
    first = runs["ddpm", "{}"]
    assert (runs["ddim_eta", "{'eta': 1.0}"] - first).abs().max() < 1e-12
    assert (runs["euler_ancestral", "{}"] - first).abs().max() < 1e-12
    assert (runs["ddim_eta", "{'eta': 0.0}"] - runs["ddim", "{}"]).abs().max() < 1e-12
    assert (runs["euler_ancestral", "{'eta': 0.0}"] - runs["ddim", "{}"]).abs().max() < 1e-12
    edm = fewstep.EDM()
    no_churn = fewstep.sample(RING.model(edm), NOISE64, process=edm, solver="edm_sde", steps=8, s_churn=0.0)
    heun = fewstep.sample(RING.model(edm), NOISE64, process=edm, solver="heun", steps=8, space="edm")
    assert (no_churn - heun).abs().max() < 1e-12
    rf = fewstep.RectifiedFlow()
    ode = fewstep.sample(RING.model(rf, "velocity"), NOISE64, process=rf, prediction="velocity", solver="euler", steps=8)
    sde0 = fewstep.sample(
        RING.model(rf, "velocity"), NOISE64, process=rf, prediction="velocity", solver="interpolant_sde", steps=8, diffusion=0.0
    )
    assert (ode - sde0).abs().max() < 1e-12


# Batch invariance and the Brownian tree -----------------------------------------------------------------------------

BATCH_CASES = [
    ("ddpm", VP, {}),
    ("ddim_eta", VP, {"eta": 0.7}),
    ("euler_ancestral", fewstep.EDM(), {}),
    ("edm_sde", fewstep.EDM(), {}),
    ("euler_maruyama", fewstep.VP("linear"), {}),
    ("pc", fewstep.VP("linear"), {"norms": "sample"}),
    ("interpolant_sde", fewstep.RectifiedFlow(), {}),
]


@pytest.mark.parametrize("solver, process, options", BATCH_CASES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_batch_invariance(solver, process, options):
    pred = prediction_for(process)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seeds = [11, 12, 13, 14]

    def run(idx, kind):
        if kind == "generators":
            generator = [torch.Generator().manual_seed(seeds[j]) for j in idx]
        else:
            generator = BrownianTreeNoise(noise[idx], process.t_min, process.t_max, seed=[seeds[j] for j in idx])
        return fewstep.sample(
            RING.model(process, pred),
            noise[idx],
            process=process,
            prediction=pred,
            solver=solver,
            steps=12,
            generator=generator,
            **options,
        )

    for kind in ("generators", "tree"):
        full = run([0, 1, 2, 3], kind)
        part = run([2, 0], kind)
        assert (full[[2, 0]] - part).abs().max() < 1e-10, kind
        other = run([1, 3], kind)
        assert (full[[1, 3]] - other).abs().max() < 1e-10, kind
    assert (run([0, 1, 2, 3], "generators") - run([0, 1, 2, 3], "tree")).abs().max() > 1e-3  # the noise is used


def test_pc_batch_norms_depend_on_batch():
    """norms="batch" (Song et al.'s code) couples the samples of a batch: it is documented as not batch invariant."""
    process = fewstep.VP("linear")
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(idx):
        return fewstep.sample(
            RING.model(process),
            noise[idx],
            process=process,
            solver="pc",
            steps=12,
            generator=[torch.Generator().manual_seed(10 + j) for j in idx],
            norms="batch",
        )

    assert (run([0, 1, 2, 3])[[2, 0]] - run([2, 0])).abs().max() > 1e-6


def test_brownian_tree_increments():
    tree = BrownianTreeNoise((4000, 3), 0.0, 2.0, seed=list(range(4000)))
    x = torch.zeros(4000, 3, dtype=torch.float64)
    coarse = torch.linspace(2.0, 0.0, 5, dtype=torch.float64).tolist()
    fine = torch.linspace(2.0, 0.0, 17, dtype=torch.float64).tolist()
    increments = [tree(x, a, b) for a, b in zip(coarse[:-1], coarse[1:], strict=True)]
    for z in increments + [tree(x, 1.3, 1.3 + 1e-5)]:
        assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1.0) < 0.05  # 12000 draws: se 0.009 and 0.013
    assert abs(float((increments[0] * increments[1]).mean())) < 0.05  # disjoint intervals are independent
    # The same path whatever the grid: the coarse increment is the sum of the fine ones.
    for j in range(4):
        a, b = coarse[j], coarse[j + 1]
        fine_sum = sum(
            tree(x, fine[4 * j + k], fine[4 * j + k + 1]) * math.sqrt(abs(fine[4 * j + k + 1] - fine[4 * j + k]))
            for k in range(4)
        )
        assert (fine_sum - increments[j] * math.sqrt(abs(b - a))).abs().max() < 1e-12
    # Per-sample seeds: a sample's path does not depend on the batch or the query order.
    alone = BrownianTreeNoise((1, 3), 0.0, 2.0, seed=[17])(x[:1], 0.5, 0.25)
    assert (alone - tree(x, 0.5, 0.25)[17:18]).abs().max() < 1e-12
    # The draws are a pure function of the seed: a new tree gives the same noise.
    again = BrownianTreeNoise((4000, 3), 0.0, 2.0, seed=list(range(4000)))(x, 2.0, 1.5)
    assert torch.equal(again, increments[0])


def test_brownian_tree_is_step_count_consistent_in_a_sampler():
    """With the same Brownian path, an SDE solved on 50 or 200 steps gives nearly the same samples (strong
    convergence); with independent noise the samples differ by O(1)."""
    process = fewstep.VP("linear")
    noise = torch.randn(100, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(steps, generator):
        return fewstep.sample(
            RING.model(process),
            noise,
            process=process,
            solver="euler_maruyama",
            steps=steps,
            generator=generator,
            schedule="time_uniform",
        )

    tree = BrownianTreeNoise.for_process(noise, process, seed=list(range(100)))
    same_path = (run(50, tree) - run(200, tree)).pow(2).mean().sqrt()  # measured 0.11
    other_noise = (run(50, torch.Generator().manual_seed(1)) - run(200, torch.Generator().manual_seed(2))).pow(2).mean().sqrt()
    assert same_path < 0.2 * other_noise, (float(same_path), float(other_noise))  # measured 1.02


def test_noise_like_parts_split_the_step_of_a_noise_source():
    """Run.noise_like(x, i, part, parts): sub-interval increments of the Brownian path (independent draws for a
    predictor-corrector), which add up to the whole step's increment; generators just draw again."""
    ts = torch.tensor([1.0, 0.6, 0.2], dtype=torch.float64)
    x = torch.zeros(3000, 2, dtype=torch.float64)
    tree = BrownianTreeNoise(x, 0.0, 1.0, seed=list(range(3000)))
    run = Run(fewstep.Denoiser(RING.model(VP), VP), ts, generator=tree)
    whole = run.noise_like(x, 1)
    parts = [run.noise_like(x, 1, k, 3) for k in range(3)]
    assert (sum(parts) / math.sqrt(3) - whole).abs().max() < 1e-12
    assert abs(float((parts[0] * parts[2]).mean())) < 0.06 and abs(float(parts[1].var()) - 1) < 0.06
    run = Run(fewstep.Denoiser(RING.model(VP), VP), ts, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(run.noise_like(x, 0, 0, 2), run.noise_like(x, 0, 1, 2))
    with pytest.raises(ValueError, match="need 0 <= part < parts"):
        run.noise_like(x, 0, 2, 2)


# Errors ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, options, match",
    [
        ("euler", {"space": "sigma"}, "space='sigma' is not known; allowed values: time, edm"),
        ("heun", {"space": 1}, "space=1 is not known"),
        ("lms", {"order": 5}, r"order must be an integer in \[1, 4\]"),
        ("lms", {"order": 2.0}, "order must be an integer"),
        ("ddim_eta", {"eta": 1.5}, r"eta must be a finite number in \[0.0, 1.0\]"),
        ("euler_ancestral", {"eta": -0.1}, "eta must be"),
        ("euler_ancestral", {"s_noise": float("nan")}, "s_noise must be"),
        ("edm_sde", {"s_churn": -1.0}, "s_churn must be"),
        ("edm_sde", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmax must be"),
        ("ddpm", {"variance": "fixed_large"}, "variance='fixed_large' is not known; allowed values: posterior, beta"),
        ("pc", {"snr": -0.1}, "snr must be"),
        ("pc", {"corrector_steps": 1.5}, "corrector_steps must be an integer"),
        ("pc", {"predictor": "heun"}, "predictor='heun' is not known"),
        ("pc", {"norms": "l1"}, "norms='l1' is not known"),
        ("interpolant_sde", {"diffusion": -1.0}, "diffusion must be"),
        ("euler_ancestral", {"churn": 1.0}, "does not take option"),
    ],
)
def test_bad_options_raise(solver, options, match):
    with pytest.raises(ValueError, match=match):
        fewstep.sample(RING.model(VP), NOISE64, process=VP, solver=solver, steps=4, **options)


def test_singular_sde_raises_before_evaluating():
    rf = fewstep.RectifiedFlow()
    calls = []

    def model(x, t):
        calls.append(1)
        return RING.model(rf, "velocity")(x, t)

    for solver in ("euler_maruyama", "pc"):
        with pytest.raises(ValueError, match="singular at t=1.0"):
            fewstep.sample(model, NOISE64, process=rf, prediction="velocity", solver=solver, steps=4)
    assert not calls
    # Started below t = 1 it runs.
    x = fewstep.sample(model, NOISE64, process=rf, prediction="velocity", solver="euler_maruyama", steps=4, t_start=0.99)
    assert torch.isfinite(x).all()


def test_brownian_tree_errors():
    with pytest.raises(ValueError, match="seed holds 2 seeds but the batch has 3 samples"):
        BrownianTreeNoise((3, 2), 0.0, 1.0, seed=[1, 2])
    with pytest.raises(ValueError, match="need finite t_min < t_max"):
        BrownianTreeNoise((3, 2), 1.0, 0.0)
    with pytest.raises(ValueError, match="tol must be positive"):
        BrownianTreeNoise((3, 2), 0.0, 1.0, tol=0.0)
    tree = BrownianTreeNoise((3, 2), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"made for shape \(3, 2\)"):
        tree(torch.zeros(4, 2), 1.0, 0.5)
    with pytest.raises(ValueError, match="outside the Brownian tree's range"):
        tree(torch.zeros(3, 2), 1.5, 0.5)
    with pytest.raises(ValueError, match="must differ"):
        tree(torch.zeros(3, 2), 0.5, 0.5)
