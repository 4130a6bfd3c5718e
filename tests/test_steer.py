"""fewstep.steer on the exact bed: particle state permutation, FK steering against the exact tilted mixture, noise
search, and inversion (solver order, BDIA round trip at round-off)."""

from __future__ import annotations

import math

import pytest
import torch

import fewstep
from fewstep.metrics.energy import energy_distance
from fewstep.solvers import Run
from fewstep.steer import (
    FK,
    best_of_n,
    exact_twist,
    invert,
    linear,
    log_normalizer,
    noisy_class_log_prob,
    regenerate,
    tilted_mixture,
    zero_order_search,
)
from fewstep.steer.gradient import RewardGuided
from fewstep.steer.rewards import class_log_prob

RING = fewstep.ring2d()
VP = fewstep.VP()
W = torch.tensor([1.0, 0.0], dtype=torch.float64)
LAM = 3.0


def _noise(n: int, seed: int = 0, dim: int = 2) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _permute_at(step: int, perm: torch.Tensor):
    def callback(info):
        return perm if info["step"] == step else None

    return callback


# The core mechanism: a callback's indices permute x and the solver's history --------------------------------------

HISTORY_SOLVERS = ["dpmpp_2m", "dpmpp_3m", "unipc", "deis", "lms", "plms", "ipndm", "ghvb", "hb", "dpm_multistep_2",
                   "dpmpp_2s", "heun", "dc_solver"]  # fmt: skip


@pytest.mark.parametrize("solver", HISTORY_SOLVERS)
def test_mid_run_permutation_equals_run_on_permuted_noise(solver):
    noise, perm = _noise(16), torch.randperm(16, generator=torch.Generator().manual_seed(1))
    model = RING.model(VP)
    permuted = fewstep.sample(model, noise, process=VP, solver=solver, steps=8, callback=_permute_at(3, perm))
    reference = fewstep.sample(model, noise[perm], process=VP, solver=solver, steps=8)
    assert torch.allclose(permuted, reference, rtol=0, atol=1e-12)


def test_permuting_x_without_the_history_would_differ(monkeypatch):
    noise, perm = _noise(16), torch.randperm(16, generator=torch.Generator().manual_seed(1))
    model = RING.model(VP)
    reference = fewstep.sample(model, noise[perm], process=VP, solver="dpmpp_2m", steps=8)

    def x_only(self, i, x, prediction, *state):
        x = x[perm] if i == 3 else x
        return (x, *state) if state else x

    monkeypatch.setattr(Run, "report", x_only)
    broken = fewstep.sample(model, noise, process=VP, solver="dpmpp_2m", steps=8)
    assert (broken - reference).abs().max() > 1e-3


def test_callback_indices_must_be_an_integer_batch_vector():
    with pytest.raises(ValueError, match="integer tensor of shape"):
        fewstep.sample(RING.model(VP), _noise(4), process=VP, steps=4, callback=lambda info: torch.zeros(4))
    x = fewstep.sample(RING.model(VP), _noise(4), process=VP, steps=4, callback=lambda info: "ignored")
    assert x.shape == (4, 2)


# The exact tilted mixture ------------------------------------------------------------------------------------------


def test_tilted_mixture_is_the_exact_tilt():
    tilted = tilted_mixture(RING, W, LAM)
    x = _noise(50, 3)
    expected = RING.log_prob(x) + LAM * x @ W - log_normalizer(RING, W, LAM)
    assert torch.allclose(tilted.log_prob(x), expected, rtol=0, atol=1e-12)
    z = torch.exp(LAM * (RING.sample(400_000, torch.Generator().manual_seed(0)) @ W)).mean()
    assert abs(math.log(float(z)) - log_normalizer(RING, W, LAM)) < 0.01


# FK steering -------------------------------------------------------------------------------------------------------


def _steer(k: int, solver: str = "sde_dpmpp_2m", groups: int = 256, steps: int = 20, **fk):
    noise = _noise(groups * k, seed=k)
    options = {"lam": LAM, "particles": k, "seed": 0, **fk}
    return fewstep.sample(RING.model(VP), noise, process=VP, solver=solver, steps=steps,
                          generator=torch.Generator().manual_seed(7), steering=FK(linear(W), **options))  # fmt: skip


def test_fk_approaches_the_tilted_mixture_as_particles_grow():
    tilted = tilted_mixture(RING, W, LAM)
    reference = tilted.sample(2000, torch.Generator().manual_seed(1))
    exact_log_z = log_normalizer(RING, W, LAM)
    exact_mean = float((tilted.weights * (tilted.means @ W)).sum())
    runs = {k: _steer(k) for k in (1, 4, 16, 64)}
    ed = {k: energy_distance(x, reference) for k, x in runs.items()}
    # the weighted particle mean of the reward (self-normalised), lower variance than one draw per group
    mean_r = {k: float((x.weights.flatten() * x.all_rewards).sum() / x.weights.shape[0]) for k, x in runs.items()}
    log_z_error = {k: abs(float(x.log_z.mean()) - exact_log_z) for k, x in runs.items()}  # each group's own estimate
    assert ed[64] <= ed[1] / 4 and ed[1] > ed[4] > ed[16]
    assert mean_r[1] < mean_r[4] < mean_r[16] < mean_r[64] + 0.02 and abs(mean_r[64] - exact_mean) < 0.05
    assert log_z_error[1] > log_z_error[4] > log_z_error[16] > log_z_error[64] and log_z_error[64] < 0.1
    assert runs[64].log_z.std() < runs[16].log_z.std() < runs[4].log_z.std() < runs[1].log_z.std()
    assert runs[64].nfe == 21 and runs[64].reward_calls == 20 and runs[1].resamples == 0 < runs[64].resamples


@pytest.mark.parametrize("potential, anneal", [("max", False), ("add", False), ("diff", True)])
def test_fk_other_potentials_target_the_same_tilt(potential, anneal):
    tilted = tilted_mixture(RING, W, LAM)
    reference = tilted.sample(2000, torch.Generator().manual_seed(1))
    one = energy_distance(_steer(1, groups=200, potential=potential, anneal=anneal), reference)
    many = energy_distance(_steer(16, groups=200, potential=potential, anneal=anneal, solver="ddpm"), reference)
    assert many < one / 4


def test_fk_target_lam_decouples_the_steering_from_the_target():
    tilted = tilted_mixture(RING, W, LAM)
    reference = tilted.sample(2000, torch.Generator().manual_seed(1))
    x = _steer(16, lam=2 * LAM, target_lam=LAM)
    over = _steer(16, lam=2 * LAM)  # without target_lam the target is the stronger tilt
    assert energy_distance(x, reference) < 0.02 < energy_distance(over, reference)
    pooled = float(torch.logsumexp(x.log_z, 0)) - math.log(x.log_z.numel())  # the groups' Z estimates are unbiased
    assert abs(pooled - log_normalizer(RING, W, LAM)) < 0.1


def test_fk_gradient_proposal_is_reweighed_to_the_exact_tilt():
    # guidance LAM pushes each particle toward the tilt; the TDS ratio p/q in the weights keeps the target p exp(LAM r)
    tilted = tilted_mixture(RING, W, LAM)
    reference = tilted.sample(2000, torch.Generator().manual_seed(1))
    guided = {k: _steer(k, solver="ddpm", guidance=LAM) for k in (1, 16)}
    uncorrected = _steer(16, solver="ddpm", guidance=LAM, correct_proposal=False)
    ed = {k: energy_distance(x, reference) for k, x in guided.items()}
    assert ed[16] < 0.01 and ed[16] < ed[1] / 4
    assert energy_distance(uncorrected, reference) > 0.05  # the proposal tilts once more: p exp(2 LAM r) roughly
    assert energy_distance(_steer(16, solver="ddpm"), reference) > ed[16]  # the proposal helps at equal particles
    assert guided[16].reward_calls == 20 + 19  # 19 guided evaluations (not the last, deterministic step) + potentials


def test_fk_proposal_correction_needs_gaussian_steps():
    with pytest.raises(ValueError, match="solver must be one of ddpm, ddim_eta, euler_ancestral"):
        _steer(4, groups=2, solver="sde_dpmpp_2m", guidance=1.0)
    with pytest.raises(ValueError, match="needs a Gaussian step with noise"):
        fewstep.sample(RING.model(VP), _noise(8), process=VP, solver="ddim_eta", steps=5, eta=0.0,
                       steering=FK(linear(W), particles=4, guidance=1.0))  # fmt: skip
    with pytest.raises(ValueError, match="guidance"):
        FK(linear(W), guidance=-1.0)


def test_fk_best_selection_and_multinomial_resampling():
    x = _steer(8, groups=32, select="best", resample="multinomial", ess_threshold=1.0)
    assert torch.equal(x.rewards, x.all_rewards.view(32, 8).max(dim=1).values)
    assert x.shape == (32, 2) and x.all_particles.shape == (256, 2)
    assert torch.allclose(x.rewards, x @ W, rtol=0, atol=1e-12)


def test_fk_user_callback_sees_particles():
    seen = []
    fewstep.sample(RING.model(VP), _noise(12), process=VP, solver="ddpm", steps=5, callback=lambda d: seen.append(d["x"].shape),
                   steering=FK(linear(W), particles=4))  # fmt: skip
    assert seen == [(12, 2)] * 5


def test_fk_model_kwargs_are_repeated_per_particle():
    shift = torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    base, seen = RING.model(VP), []

    def model(x, t, shift):
        seen.append(shift)
        return base(x, t)

    x = fewstep.sample(model, _noise(6), process=VP, solver="ddpm", steps=4, model_kwargs={"shift": shift},
                       steering=FK(linear(W), particles=3))  # fmt: skip
    assert x.shape == (2, 2) and len(seen) == 5
    assert all(torch.equal(s, shift.repeat_interleave(3, 0)) for s in seen)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"particles": 0}, "particles"),
        ({"ess_threshold": 0.0}, "ess_threshold"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"ess_threshold": float("nan")}, "ess_threshold"),
        ({"lam": -1.0}, "lam"),
        ({"potential": "sum"}, "potential"),
        ({"resample": "residual"}, "resample"),
        ({"every": 0}, "every"),
        ({"anneal": 1}, "anneal"),
        ({"seed": -1}, "seed"),
        ({"target_lam": 0.0}, "target_lam"),
    ],
)
def test_fk_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FK(linear(W), **kwargs)


def test_fk_rejects_deterministic_solvers_bad_rewards_and_noise():
    model, noise = RING.model(VP), _noise(8)
    with pytest.raises(ValueError, match="stochastic solver"):
        fewstep.sample(model, noise, process=VP, solver="dpmpp_2m", steering=FK(linear(W), particles=4))
    with pytest.raises(ValueError, match="B \\* particles"):
        fewstep.sample(model, noise, process=VP, solver="ddpm", steering=FK(linear(W), particles=3))
    with pytest.raises(ValueError, match="reward returned shape"):
        fewstep.sample(model, noise, process=VP, solver="ddpm", steering=FK(lambda x: x, particles=4))
    with pytest.raises(ValueError, match="reward returned NaN"):
        fewstep.sample(model, noise, process=VP, solver="ddpm", steering=FK(lambda x: x[:, 0] * math.nan, particles=4))
    with pytest.raises(TypeError, match="reward must be a callable"):
        FK("x . w")
    with pytest.raises(TypeError, match="steering must be"):
        fewstep.sample(model, noise, process=VP, solver="ddpm", steering="fk")
    with pytest.raises(ValueError, match="nfe and tuning"):
        fewstep.sample(model, noise, process=VP, solver="ddpm", nfe=5, steering=FK(linear(W)))


def test_class_log_prob_reward():
    classifier = torch.nn.Linear(2, 3).double()
    x = _noise(5)
    r = class_log_prob(classifier, 2)(x)
    assert torch.allclose(r, torch.log_softmax(classifier(x), 1)[:, 2])
    with pytest.raises(ValueError, match="not among"):
        class_log_prob(classifier, 7)(x)
    with pytest.raises(ValueError, match="k must be"):
        class_log_prob(classifier, -1)


def test_reward_gradient_guidance_is_exact_for_a_gaussian_and_a_linear_reward():
    gauss, w = fewstep.GaussianMixture([1.0], [[0.3, -0.2]], [[0.5, 0.8]]), torch.tensor([1.0, 2.0], dtype=torch.float64)
    tilted, z = tilted_mixture(gauss, w, 0.7), _noise(8, 9)
    guided = RewardGuided(gauss.model(VP), linear(w), 0.7, process=VP)
    x = fewstep.sample(guided, z, process=VP, solver="dpmpp_3m", steps=40)
    exact = tilted.ode_solution(z, VP)
    assert (x - exact).abs().max() < 1e-3 < 0.3 < (exact - gauss.ode_solution(z, VP)).abs().max()
    assert guided.reward_calls == 41
    with pytest.raises(ValueError, match="scale"):
        RewardGuided(gauss.model(VP), linear(w), -1.0, process=VP)
    with pytest.raises(ValueError, match="shape"):
        fewstep.sample(RewardGuided(gauss.model(VP), lambda x: x, 1.0, process=VP), z, process=VP, steps=2)


def test_exact_twist_guidance_is_the_tilted_mixtures_own_model():
    # grad of log E[exp(lam w.x0) | x_t] is the tilted marginal's score minus the mixture's: on any state and time the
    # twist-guided model equals the tilted mixture's exact model (classifier guidance with the Bayes classifier)
    twist, x = exact_twist(RING, W, LAM, VP), _noise(16, 3)
    t = torch.linspace(0.05, 1.0, 16, dtype=torch.float64)
    guided = RewardGuided(RING.model(VP), linear(W), LAM, process=VP, twist=twist)
    exact, plain = tilted_mixture(RING, W, LAM).model(VP)(x, t), RING.model(VP)(x, t)
    assert (guided(x, t) - exact).abs().max() < 1e-10 < 0.1 < (plain - exact).abs().max()
    # at the data the twist is the reward itself (h_0 = exp(lam r)), at pure noise a constant (log Z / lam)
    at_data = twist(x, torch.full((16,), 1e-6, dtype=torch.float64))
    assert (at_data - x @ W).abs().max() < 1e-3


def test_guidance_leaves_a_flow_unguided_at_pure_noise():
    # alpha(1) = 0 on rectified flow: no signal to guide there (the x0 shift would be infinite); elsewhere it guides
    flow, x = fewstep.RectifiedFlow(), _noise(4)
    model = RING.model(flow, "velocity")
    guided = RewardGuided(model, linear(W), 1.0, process=flow, prediction="velocity", twist=exact_twist(RING, W, 1.0, flow))
    at_noise, mid = torch.ones(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    assert torch.equal(guided(x, at_noise), model(x, at_noise))
    assert float((guided(x, mid) - model(x, mid)).abs().max()) > 1e-3


def test_fk_with_the_exact_twist_samples_the_tilt_with_one_particle():
    tilted = tilted_mixture(RING, W, LAM)
    reference = tilted.sample(2000, torch.Generator().manual_seed(1))
    twist = exact_twist(RING, W, LAM, VP)
    # measured: one particle 0.0073 (256 exact samples: 0.0049), reward-of-x0 guidance 0.023, unguided 0.60
    one = _steer(1, solver="ddpm", steps=50, guidance=LAM, twist=twist)
    x0_guided = _steer(1, solver="ddpm", steps=50, guidance=LAM)
    unguided = _steer(1, solver="ddpm", steps=50)
    assert energy_distance(one, reference) < 0.012 < energy_distance(x0_guided, reference)
    assert energy_distance(unguided, reference) > 0.5
    eight = _steer(8, solver="ddpm", steps=50, guidance=LAM, twist=twist)
    assert energy_distance(eight, reference) < 0.005
    assert abs(float(eight.log_z.mean()) - log_normalizer(RING, W, LAM)) < 0.1
    assert eight.reward_calls == 50 + 49  # potentials on the twist (49 + the final reward) + 49 twist gradients


def test_noisy_class_log_prob_scales_the_state_and_passes_the_log_snr():
    seen = {}

    def classifier(x, log_snr):
        seen["x"], seen["log_snr"] = x, log_snr
        return torch.stack([x.sum(1), -x.sum(1)], 1)

    flow, x, t = fewstep.RectifiedFlow(), _noise(4), torch.full((4,), 0.5, dtype=torch.float64)
    r = noisy_class_log_prob(classifier, 0, flow)(x, t)
    assert torch.allclose(seen["x"], x / math.sqrt(0.5), atol=1e-12)  # alpha = sigma = 0.5: unit variance scale
    assert torch.allclose(seen["log_snr"], torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(r, torch.log_softmax(classifier(x / math.sqrt(0.5), None), 1)[:, 0])
    with pytest.raises(ValueError, match="not among"):
        noisy_class_log_prob(classifier, 2, flow)(x, t)
    with pytest.raises(TypeError, match="process"):
        noisy_class_log_prob(classifier, 0, "vp")
    with pytest.raises(TypeError, match="twist must be a callable"):
        FK(linear(W), twist="log p")


# Noise search -------------------------------------------------------------------------------------------------------


def test_best_of_n_is_the_best_sample_of_each_group():
    model, noise = RING.model(VP), _noise(40, 5)
    x = best_of_n(model, noise, linear(W), n=8, process=VP, solver="dpmpp_2m", steps=6)
    plain = fewstep.sample(model, noise, process=VP, solver="dpmpp_2m", steps=6)
    assert torch.equal(x, plain.view(5, 8, 2)[torch.arange(5), (plain @ W).view(5, 8).argmax(1)])
    assert (x.nfe, x.reward_calls, x.reward_evaluations) == (plain.nfe, 1, 40)
    assert torch.equal(fewstep.sample(model, x.noise, process=VP, solver="dpmpp_2m", steps=6), x)
    with pytest.raises(ValueError, match="multiple of n=3"):
        best_of_n(model, noise, linear(W), n=3, process=VP)


def test_zero_order_search_never_gets_worse_and_counts_its_calls():
    model = RING.model(VP)
    x = zero_order_search(model, _noise(16, 6), linear(W), neighbours=4, rounds=3, radius=0.5, seed=0, process=VP,
                          solver="dpmpp_2m", steps=6)  # fmt: skip
    assert all(b >= a for a, b in zip(x.history, x.history[1:], strict=False)) and x.history[-1] > x.history[0]
    assert (x.reward_calls, x.reward_evaluations, x.nfe) == (4, 16 * 13, 4 * 7)
    assert torch.allclose(fewstep.sample(model, x.noise, process=VP, solver="dpmpp_2m", steps=6), x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="radius"):
        zero_order_search(model, _noise(4), linear(W), radius=1.5, process=VP)


# Inversion ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver, order", [("ddim", 1), ("dpmpp_2m", 2), ("heun", 2)])
def test_inversion_of_exact_ode_samples_converges_at_the_solver_order(solver, order):
    z = _noise(32, 8)
    x_end = RING.ode_solution(z, VP, denoise_to_zero=False)
    errors = [float((invert(RING.model(VP), x_end, process=VP, solver=solver, steps=n) - z).abs().max()) for n in (20, 40)]
    assert math.log2(errors[0] / errors[1]) > order - 0.3


EXACT_BEDS = [(fewstep.VP(), "eps"), (fewstep.EDM(), "x0"), (fewstep.RectifiedFlow(), "velocity")]


@pytest.mark.parametrize("process, prediction", EXACT_BEDS)
def test_bdia_round_trip_is_exact(process, prediction):
    model, x = RING.model(process, prediction), RING.sample(32, torch.Generator().manual_seed(2))
    z = invert(model, x, process=process, prediction=prediction, steps=10, method="bdia")
    back = regenerate(model, z, process=process, prediction=prediction, steps=10, method="bdia")
    assert (back - x).abs().max() <= 1e-10 and z.nfe == 10 and back.nfe == 9
    zd = invert(model, x, process=process, prediction=prediction, steps=10)
    assert (regenerate(model, zd, process=process, prediction=prediction, steps=10) - x).abs().max() > 1e-3


@pytest.mark.parametrize("method, solver", [("bdia", "ddim"), ("solver", "dpmpp_2m")])
def test_inversion_is_per_sample(method, solver):
    model, x = RING.model(VP), RING.sample(6, torch.Generator().manual_seed(4))
    whole = invert(model, x, process=VP, solver=solver, steps=8, method=method)
    rows = torch.cat([invert(model, x[b : b + 1], process=VP, solver=solver, steps=8, method=method) for b in range(6)])
    assert torch.allclose(whole, rows, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "ddpm"}, "deterministic solver"),
        ({"solver": "euler_ancestral", "method": "bdia"}, "deterministic solver"),
        ({"solver": "dpmpp_2m", "method": "bdia"}, "BDIA-DDIM"),
        ({"method": "bdia", "gamma": 0.0}, "gamma"),
        ({"method": "bdia", "gamma": 1.5}, "gamma"),
        ({"method": "edict"}, "method"),
        ({"solver": "lms"}, "backwards"),
        ({"solver": "dpmpp_2m", "process": fewstep.RectifiedFlow(), "prediction": "velocity"}, "sigma = 0"),
    ],
)
def test_inversion_rejects_bad_input(kwargs, match):
    kwargs = {"process": VP, **kwargs}
    model = RING.model(kwargs["process"], kwargs.get("prediction", "eps"))
    with pytest.raises(ValueError, match=match):
        invert(model, _noise(4), **kwargs)


def test_bench_steer_command_is_registered_and_checks_classes(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    result = CliRunner().invoke(app, ["bench", "steer", "--classes", "12", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "0..9" in result.output
