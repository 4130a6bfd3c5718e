"""UniPC, DEIS, PNDM/PLMS and iPNDM: convergence order on the exact Gaussian-mixture flow, parity with diffusers,
NFE accounting and option errors."""

import math

import pytest
import torch

import fewstep
from fewstep.accuracy import empirical_order, solver_error

# A smooth mixture (stds >= 0.2): the asymptotic regime starts at modest step counts.
MIXTURE = fewstep.GaussianMixture([1, 2, 1], [[-0.8, 0.2], [0.3, 0.5], [0.6, -0.7]], [[0.3, 0.4], [0.25, 0.3], [0.4, 0.2]])
NOISE = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STEPS = (32, 64, 128)

# (process, prediction, sample kwargs). On RectifiedFlow the order is measured on [0.01, 0.99]: over the full
# range [0, 1] the first step (from alpha = 0) and the last (to sigma = 0) are first-order DDIM steps of size 1/N
# with local error O(1/N^2), which caps every solver at order 2 there (tested separately below).
SETUPS = {
    "DiscreteVP": (fewstep.DiscreteVP.linear(), "eps", dict(schedule="logsnr")),
    "EDM": (fewstep.EDM(), "eps", dict(schedule="karras")),
    "RectifiedFlow": (fewstep.RectifiedFlow(), "velocity", dict(schedule="logsnr", t_start=0.99, t_end=0.01)),
}

# Observed order (+-0.3). UniPC-p with the corrector is of order p + 1, without it p. (UniPC-3's warm-up step,
# UniPC-1, has local error O(h^3), which in principle caps it at 3; that error scales with d^2 x0 / d lambda^2 at
# the start, ~alpha^2 there, and stays invisible: 3.9 is still measured from 256 to 512 steps.)
# PNDM, PLMS and iPNDM are second order on these grids: their RK4 / Adams-Bashforth weights are those of steps
# uniform in rho = sigma / alpha (DDIM is Euler's method for y = x / alpha in rho), and on any other grid the
# weights miss the step-size variation by O(h), a local error O(h^3) (see
# test_pseudo_methods_are_fourth_order_on_a_rho_uniform_grid for the order where the weights fit).
ORDER_CASES = [
    ("unipc", dict(order=1), 2),
    ("unipc", dict(order=2), 3),
    ("unipc", dict(order=2, variant="bh1"), 3),
    ("unipc", dict(order=3), 4),
    ("unipc", dict(order=2, corrector=False), 2),
    ("unipc", dict(order=3, corrector=False), 3),
    ("deis", dict(order=1), 1),
    ("deis", dict(order=2), 2),
    ("deis", dict(order=3), 3),
    ("pndm", {}, 2),
    ("plms", {}, 2),
    ("ipndm", dict(order=2), 2),
    ("ipndm", dict(order=3), 2),
    ("ipndm", {}, 2),
]
_references: dict = {}


def reference(setup: str, process, kwargs) -> torch.Tensor:
    key = (setup, kwargs.get("t_start"), kwargs.get("t_end"))
    if key not in _references:
        _references[key] = MIXTURE.ode_solution(NOISE, process, t_start=kwargs.get("t_start"), t_end=kwargs.get("t_end"))
    return _references[key]


def errors(setup: str, solver: str, options: dict, steps=STEPS, **overrides) -> list[float]:
    process, prediction, kwargs = SETUPS[setup]
    kwargs = {**kwargs, **overrides}
    ref = reference(setup, process, kwargs)
    return [
        solver_error(MIXTURE, process, NOISE, ref, prediction=prediction, solver=solver, steps=n, **kwargs, **options)[0]
        for n in steps
    ]


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("solver,options,expected", ORDER_CASES, ids=[f"{s}-{o}" for s, o, _ in ORDER_CASES])
def test_convergence_order(setup, solver, options, expected):
    errs = errors(setup, solver, options)
    order = empirical_order(STEPS, errs)
    assert abs(order - expected) <= 0.3, f"{solver} {options} on {setup}: errors {errs}, order {order:.2f}"


def test_pseudo_methods_are_fourth_order_on_a_rho_uniform_grid():
    """On EDM (alpha = 1, rho = sigma = t) a time-uniform grid is uniform in rho: PNDM is classical RK4 + AB4.

    PLMS's first step (pseudo improved Euler, local error O(h^3)) and iPNDM's (Euler, O(h^2)) bound their
    asymptotic orders by 3 and 2; iPNDM-2 is second order throughout.
    """
    grid = dict(schedule="time_uniform", t_start=2.0, t_end=0.5)
    assert abs(empirical_order(STEPS, errors("EDM", "pndm", {}, **grid)) - 4) <= 0.3
    assert 2.7 <= empirical_order(STEPS, errors("EDM", "plms", {}, **grid)) <= 4.3
    assert abs(empirical_order(STEPS, errors("EDM", "ipndm", dict(order=2), **grid)) - 2) <= 0.3


FULL_RANGE_CASES = [
    ("unipc", {}),
    ("unipc", dict(order=3, variant="bh1")),
    ("deis", {}),
    ("pndm", {}),
    ("plms", {}),
    ("ipndm", {}),
]


@pytest.mark.parametrize("solver,options", FULL_RANGE_CASES)
def test_rectified_flow_full_range_is_finite_and_converges(solver, options):
    """From t = 1 (log-SNR -inf) to t = 0 (+inf): finite, below 1e-3 at 128 steps, order >= 1.5 (capped at 2)."""
    errs = errors("RectifiedFlow", solver, options, steps=(32, 128), schedule="time_uniform", t_start=1.0, t_end=0.0)
    assert all(math.isfinite(e) for e in errs)
    assert errs[1] < 1e-3 and errs[0] / errs[1] >= 8, errs


@pytest.mark.parametrize(
    "solver,extra",
    [("unipc", 0), ("deis", 0), ("ipndm", 0), ("plms", 1), ("pndm", 9)],
)
def test_nfe_and_callbacks(solver, extra):
    """One evaluation per step (+1 final denoise); PLMS's first step costs 2, PNDM's three PRK steps cost 4 each."""
    process, prediction, _ = SETUPS["DiscreteVP"]
    seen = []
    x = fewstep.sample(
        MIXTURE.model(process, prediction),
        NOISE,
        process=process,
        solver=solver,
        steps=12,
        callback=lambda info: seen.append(info["step"]),
    )
    assert x.nfe == 12 + extra + 1
    assert seen == list(range(12))


def test_pndm_first_step_from_alpha_zero_is_ddim():
    """On RectifiedFlow from t = 1 the transfer is singular at alpha = 0: the first step is DDIM (1 NFE, not 4)."""
    process = fewstep.RectifiedFlow()
    x = fewstep.sample(MIXTURE.model(process, "velocity"), NOISE, process=process, prediction="velocity", solver="pndm", steps=10)
    assert x.nfe == 10 + 2 * 3  # PRK on steps 1 and 2 only; the last step ends at sigma = 0 (no final denoise)
    assert torch.isfinite(x).all()


def test_unipc_corrector_is_free_and_not_applied_after_the_last_step():
    process, prediction, _ = SETUPS["DiscreteVP"]
    model = MIXTURE.model(process, prediction)

    def run(steps, corrector):
        return fewstep.sample(
            model, NOISE, process=process, solver="unipc", steps=steps, corrector=corrector, denoise_to_zero=False
        )

    with_c, without_c = run(6, True), run(6, False)
    assert with_c.nfe == without_c.nfe == 6
    assert (with_c - without_c).abs().max() > 1e-4  # the corrector acts on steps 1..5
    assert torch.equal(run(1, True), run(1, False))  # one step: nothing to correct after the last step


@pytest.mark.parametrize(
    "solver,options,message",
    [
        ("unipc", dict(variant="bh3"), "variant='bh3'.*allowed values: bh1, bh2"),
        ("unipc", dict(order=5), r"order must be an integer in \[1, 3\], got order=5"),
        ("unipc", dict(order=0), "order=0"),
        ("unipc", dict(corrector="yes"), "corrector='yes'"),
        ("deis", dict(order=4), r"order must be an integer in \[1, 3\], got order=4"),
        ("ipndm", dict(order=5), r"order must be an integer in \[1, 4\], got order=5"),
        ("pndm", dict(order=3), "does not take option"),
        ("plms", dict(variant="bh1"), "does not take option"),
    ],
)
def test_bad_options_raise(solver, options, message):
    process, prediction, _ = SETUPS["DiscreteVP"]
    with pytest.raises(ValueError, match=message):
        fewstep.sample(MIXTURE.model(process, prediction), NOISE, process=process, solver=solver, steps=4, **options)


# Parity with diffusers ----------------------------------------------------------------------------------------------
#
# All three diffusers schedulers call the model at integer timesteps k_0 > ... > k_{n-1}; fewstep time t = (k + 1)/N.
# - UniPCMultistepScheduler: final_sigmas_type="zero" ends with a step to sigma = 0 from k_{n-1}, i.e. the data
#   prediction there = fewstep's denoise_to_zero=True on the grid of the n timesteps (n - 1 steps). Its
#   lower_order_final lowers the order of the last two steps for *every* n (no 15-step threshold), and fewstep keeps
#   the order when it denoises to zero, so this mapping is exact for orders 1-2. final_sigmas_type="sigma_min" ends
#   at timestep 0 without evaluating there = fewstep's grid of the n timesteps plus t = 1/N, n steps,
#   denoise_to_zero=False, where fewstep lowers the final orders like diffusers when n < 15: exact for orders 1-3.
#   (diffusers 0.42.1 returns NaN for solver_type="bh1" with final_sigmas_type="zero": B(h) = -inf times 0.)
# - DEISMultistepScheduler always ends at timestep 0 (sigma_min) with lower_order_final below 15 steps: the
#   "sigma_min" mapping above, for any n.
# - PNDMScheduler (timestep_spacing="leading", set_alpha_to_one=False): timesteps k = (n-1)r, ..., r, 0 with
#   r = N // n. PRK midpoints are k - r // 2 (the time midpoint when r is even); PLMS's last call at k = 0 steps to
#   alphas_cumprod[0] = itself, an identity, so diffusers spends one evaluation more than fewstep's grid of the n
#   timesteps (n - 1 steps, denoise_to_zero=False). PNDM never lowers its order at the end, fewstep does below 15
#   steps, so n >= 16. set_alpha_to_one=True ends with a 4th-order PLMS step to sigma = 0, which fewstep's
#   final-step policy (a step to sigma = 0 is pure denoising) does not reproduce.

diffusers = pytest.importorskip("diffusers", reason="parity tests need the dev extra (pip install -e .[dev])")

PARITY_PROCESS = fewstep.DiscreteVP.linear()
PARITY_MIXTURE = fewstep.mixture_nd(dim=6, components=4)
PARITY_NOISE = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
PARITY_TOL = 1e-10  # float64 throughout: the measured differences are ~1e-15
CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _eps_at_timestep(x, k):
    t = PARITY_PROCESS.time_from_timestep(torch.as_tensor(float(k), dtype=torch.float64)).expand(x.shape[0])
    return PARITY_MIXTURE.model(PARITY_PROCESS, "eps")(x, t)


def _float64_schedule(scheduler, steps, final_sigma=None):
    """set_timesteps on the float64 alphas_cumprod; sigmas (stored as float32 by diffusers) recomputed in float64."""
    scheduler.alphas_cumprod = PARITY_PROCESS.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    if final_sigma is not None:
        ac = PARITY_PROCESS.alphas_cumprod[scheduler.timesteps.long()]
        scheduler.sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.tensor([final_sigma], dtype=torch.float64)])


def _run_diffusers(scheduler, timesteps):
    x = PARITY_NOISE * float(PARITY_PROCESS.sigma(PARITY_PROCESS.time_from_timestep(float(timesteps[0]))))
    calls = 0
    for k in scheduler.timesteps:
        x = scheduler.step(_eps_at_timestep(x, k), k, x).prev_sample
        calls += 1
    return x, calls


def _run_fewstep(solver, timesteps, ending, **options):
    """ending: "zero" (denoise to zero at the last timestep), "sigma_min" (step on to t = 1/N), "none" (stop there)."""
    grid = PARITY_PROCESS.time_from_timestep(torch.tensor(timesteps, dtype=torch.float64))
    if ending == "sigma_min":
        grid = torch.cat([grid, torch.tensor([PARITY_PROCESS.t_min], dtype=torch.float64)])
    return fewstep.sample(
        PARITY_MIXTURE.model(PARITY_PROCESS, "eps"),
        PARITY_NOISE,
        process=PARITY_PROCESS,
        solver=solver,
        schedule=grid,
        steps=len(grid) - 1,
        denoise_to_zero=ending == "zero",
        **options,
    )


SIGMA_MIN = float(((1 - PARITY_PROCESS.alphas_cumprod[0]) / PARITY_PROCESS.alphas_cumprod[0]).sqrt())


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [6, 10])
def test_unipc_matches_diffusers_to_sigma_min(variant, order, steps):
    sched = diffusers.UniPCMultistepScheduler(**CONFIG, solver_order=order, solver_type=variant, final_sigmas_type="sigma_min")
    _float64_schedule(sched, steps, SIGMA_MIN)
    timesteps = sched.timesteps.tolist()
    expected, calls = _run_diffusers(sched, timesteps)
    got = _run_fewstep("unipc", timesteps, "sigma_min", order=order, variant=variant)
    assert got.nfe == calls == steps
    assert (got - expected).abs().max() < PARITY_TOL


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [6, 20])
def test_unipc_matches_diffusers_to_zero(order, steps):
    sched = diffusers.UniPCMultistepScheduler(**CONFIG, solver_order=order, solver_type="bh2", final_sigmas_type="zero")
    _float64_schedule(sched, steps, 0.0)
    timesteps = sched.timesteps.tolist()
    expected, calls = _run_diffusers(sched, timesteps)
    got = _run_fewstep("unipc", timesteps, "zero", order=order, variant="bh2")
    assert got.nfe == calls == steps
    assert (got - expected).abs().max() < PARITY_TOL


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [6, 10, 20])
def test_deis_matches_diffusers(order, steps):
    sched = diffusers.DEISMultistepScheduler(**CONFIG, solver_order=order)
    _float64_schedule(sched, steps, SIGMA_MIN)
    timesteps = sched.timesteps.tolist()
    expected, calls = _run_diffusers(sched, timesteps)
    got = _run_fewstep("deis", timesteps, "sigma_min", order=order)
    assert got.nfe == calls == steps
    assert (got - expected).abs().max() < PARITY_TOL


@pytest.mark.parametrize("skip_prk_steps", [False, True])
@pytest.mark.parametrize("steps", [16, 20])
def test_pndm_and_plms_match_diffusers(skip_prk_steps, steps):
    sched = diffusers.PNDMScheduler(**CONFIG, skip_prk_steps=skip_prk_steps)
    _float64_schedule(sched, steps)
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    ratio = CONFIG["num_train_timesteps"] // steps
    timesteps = [k * ratio for k in reversed(range(steps))]  # "leading" spacing; the PRK midpoints are extra calls
    assert set(timesteps) <= set(sched.timesteps.tolist())
    expected, calls = _run_diffusers(sched, timesteps)
    got = _run_fewstep("plms" if skip_prk_steps else "pndm", timesteps, "none")
    assert got.nfe == calls - 1 == (steps if skip_prk_steps else steps - 1 + 9)
    assert (got - expected).abs().max() < PARITY_TOL
