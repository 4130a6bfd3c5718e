"""Issue 7, core layer: scalar checks, grid validation, process constructors, zero terminal SNR, BrownianTreeNoise depth."""

import math
import threading

import numpy as np
import pytest
import torch

import fewstep
from fewstep.checks import MAX_STEPS, check_int, check_real, check_steps
from fewstep.grids import Schedule, time_grid
from fewstep.noise import BrownianTreeNoise

# Scalar checks ------------------------------------------------------------------------------------------------------


def test_check_real_accepts_real_scalars_and_rejects_the_rest():
    for good in (2, 2.5, np.float32(2.5), np.int64(2), torch.tensor(2.5), torch.tensor([2.5]), np.array(2.5)):
        assert check_real(good, "x") == float(good)
    for bad in ("2", True, 1j, torch.ones(2), torch.tensor(1 + 1j), None, [1.0], math.nan, math.inf):
        with pytest.raises(ValueError, match="x must be a"):
            check_real(bad, "x")
    assert check_real(math.inf, "x", finite=False) == math.inf
    with pytest.raises(ValueError, match="x must be positive"):
        check_real(0.0, "x", positive=True)


def test_check_steps_and_int():
    assert check_steps(np.int64(3)) == 3
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            check_steps(bad)
    with pytest.raises(ValueError, match=f"<= {MAX_STEPS}"):
        check_steps(MAX_STEPS + 1)
    with pytest.raises(ValueError, match="n must be an integer <= 4"):
        check_int(5, "n", maximum=4)


# BrownianTreeNoise ------------------------------------------------------------------------------------------------


def _within(seconds, fn):
    """fn() run in a daemon thread; fails (instead of hanging the suite) when it takes longer than `seconds`."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert "value" in out, f"did not return within {seconds} s"
    return out["value"]


@pytest.mark.parametrize(
    ("t_min", "t_max", "tol", "t_from", "t_to"),
    [
        (1e6, 1e6 + 1e-3, None, 1e6 + 1e-3, 1e6 + 2e-4),  # default tol below the float spacing of the range
        (0.0, 1.0, 1e-30, 1.0, 0.3),  # tol below float spacing
        (0.0, 1.0, 1e-300, 0.6, 1e-3),  # near 0, where float64 is dense: bounded by the depth cap
    ],
)
def test_brownian_tree_terminates_and_is_standard_normal(t_min, t_max, tol, t_from, t_to):
    x = torch.zeros(4000, 3)
    tree = BrownianTreeNoise(x, t_min, t_max, seed=list(range(4000)), tol=tol)
    z = _within(5.0, lambda: tree(x, t_from, t_to))
    assert abs(float(z.var()) - 1) < 0.06 and abs(float(z.mean())) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tol": "1e-3"}, "tol"),
        ({"tol": True}, "tol"),
        ({"tol": math.nan}, "tol"),
        ({"tol": -1.0}, "tol"),
        ({"seed": 2**63}, "seed"),
        ({"seed": [1.5, 2.5]}, "seed"),
        ({"like": "ab"}, "like"),
        ({"like": (2, 0)}, "like"),
        ({"like": (2, True)}, "like"),
        ({"t_min": "0"}, "t_min"),
        ({"t_max": math.inf}, "t_max"),
    ],
)
def test_brownian_tree_rejects_bad_arguments(kwargs, name):
    args = {"like": (2, 3), "t_min": 0.0, "t_max": 1.0, **kwargs}
    like, t_min, t_max = args.pop("like"), args.pop("t_min"), args.pop("t_max")
    with pytest.raises(ValueError, match=name):
        BrownianTreeNoise(like, t_min, t_max, **args)


# Grids ------------------------------------------------------------------------------------------------------------

EDM = fewstep.EDM()


@pytest.mark.parametrize(
    ("schedule", "steps", "t_end", "words"),
    [
        (Schedule("polyexponential", rho=1e3), 20, 0.002, ("rho", "repeated or near-equal")),
        (Schedule("polyexponential", rho=1e308), 5, 0.002, ("rho", "repeated or near-equal")),
        (Schedule("karras", rho=1e-6), 10, 0.002, ("rho", "non-finite")),
        (Schedule("karras", rho=1e20), 10, 0.002, ("rho", "repeated or near-equal")),
        ("karras", 20, 80.0 - 1e-13, ("t_start", "t_end", "repeated or near-equal")),
        ("time_uniform", 50, 80.0 - 1e-13, ("t_start", "t_end", "repeated or near-equal")),
    ],
)
def test_degenerate_named_grids_raise(schedule, steps, t_end, words):
    with pytest.raises(ValueError, match="schedule=") as info:
        time_grid(EDM, steps, 80.0, t_end, schedule)
    assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(ValueError, match="schedule="):  # the same check before any solver runs
        fewstep.sample(
            lambda x, t: x, torch.zeros(2, 2), process=EDM, solver="euler", steps=steps, t_end=t_end, schedule=schedule
        )


def test_log_snr_must_change_between_times():
    # Distinct times whose log-SNR is equal in float64 would make the solvers divide by lambda_next - lambda = 0.
    ts = torch.tensor([80.0, 80.0 * (1 - 1e-14), 0.002], dtype=torch.float64)  # times apart, log-SNRs within round-off
    with pytest.raises(ValueError, match="log-SNR"):
        time_grid(EDM, 2, 80.0, 0.002, ts)


class _BadSource:
    def grid(self, process, steps, t_start, t_end):
        return torch.tensor([t_start, t_start, t_end][: steps + 1], dtype=torch.float64)


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (torch.tensor([80.0, 80.0, 0.002]), "repeated or near-equal"),
        (torch.tensor([80.0, math.nan, 0.002]), "non-finite"),
        (torch.tensor([0.002, 1.0, 80.0]), "strictly decreasing"),
        (torch.tensor([90.0, 1.0, 0.002]), "schedule\\[0\\]"),
        (torch.tensor([80.0, 1.0]), "steps=2"),
        (_BadSource(), "_BadSource"),
    ],
)
def test_user_grids_go_through_the_same_check(schedule, match):
    with pytest.raises(ValueError, match=match):
        time_grid(EDM, 2, 80.0, 0.002, schedule)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((2.0, 80.0, 0.002), "steps"),
        ((True, 80.0, 0.002), "steps"),
        ((MAX_STEPS + 1, 80.0, 0.002), "steps"),
        ((3, "80", 0.002), "t_start"),
        ((3, torch.tensor([80.0, 1.0]), 0.002), "t_start"),
        ((3, 80.0, 1j), "t_end"),
        ((3, 80.0, True), "t_end"),
        ((3, 80.0, math.nan), "t_end"),
        ((3, 1.0, 2.0), "t_start > t_end"),
        ((3, 80.0, 0.0), "t_end"),
    ],
)
def test_time_grid_validates_its_inputs(args, name):
    with pytest.raises(ValueError, match=name):
        time_grid(EDM, *args)


def test_time_grid_accepts_scalar_tensors_and_rejects_non_processes():
    ts = time_grid(EDM, 3, torch.tensor(80.0), np.float64(0.002), "karras")
    assert ts.shape == (4,) and float(ts[0]) == 80.0 and float(ts[-1]) == 0.002
    with pytest.raises(TypeError, match="process"):
        time_grid("EDM", 3, 80.0, 0.002)


def test_check_time_rejects_non_real_times():
    for bad in ("1", torch.ones(2), 1j, None):
        with pytest.raises(ValueError, match="t_start"):
            EDM.check_time(bad, "t_start")


# Process constructors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("betas", "match"),
    [
        ([0.1, math.nan], "betas"),
        ([0.1, -0.2], r"betas\[1\]"),
        ([0.1, 1.5], r"betas\[1\]"),
        ([1.0, 0.5], r"betas\[0\]"),
        ([0.1, 0.0], r"betas\[1\]"),
        ("0.1,0.2", "betas"),
        (["a", "b"], "betas"),
        ([[0.1, 0.2], [0.3, 0.4]], "1-D"),
        ([0.1], "at least 2"),
        (torch.tensor([0.1 + 1j, 0.2]), "betas"),
        ([0.1, 1e-20, 0.2], r"betas\[1\]"),
        ([0.9999999] * 200, "zero"),
    ],
)
def test_discrete_vp_rejects_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        fewstep.DiscreteVP(betas)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fewstep.VP(schedule=3), "schedule"),
        (lambda: fewstep.VP(beta_min=-1.0), "beta_min"),
        (lambda: fewstep.VP(beta_min=30.0), "beta_min < beta_max"),
        (lambda: fewstep.VP(beta_max=math.nan), "beta_max"),
        (lambda: fewstep.VP(beta_max="20"), "beta_max"),
        (lambda: fewstep.VP(s=-0.1), "s must"),
        (lambda: fewstep.VP(t_min=0.5, t_max=0.5), "t_min < t_max"),
        (lambda: fewstep.VP("cosine", t_max=1.0), "t_max"),
        (lambda: fewstep.VP(t_max=100.0, beta_max=20.0), "t_max"),
        (lambda: fewstep.VE(sigma_min=0.0), "sigma_min"),
        (lambda: fewstep.VE(sigma_min=True), "sigma_min"),
        (lambda: fewstep.VE(sigma_max=math.nan), "sigma_max"),
        (lambda: fewstep.VE(sigma_min=1e-300, sigma_max=1e300), "overflows"),
        (lambda: fewstep.EDM(sigma_min="0"), "sigma_min"),
        (lambda: fewstep.EDM(sigma_max=math.inf), "sigma_max"),
        (lambda: fewstep.EDM(sigma_min=5.0, sigma_max=1.0), "sigma_min < sigma_max"),
        (lambda: fewstep.DiscreteVP.linear(num_timesteps=10.0), "num_timesteps"),
        (lambda: fewstep.DiscreteVP.linear(beta_end=math.nan), "beta_end"),
        (lambda: fewstep.DiscreteVP.linear(zero_terminal_snr="yes"), "zero_terminal_snr"),
    ],
)
def test_process_constructors_reject_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# Zero terminal SNR (Lin et al., 2024) -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [fewstep.DiscreteVP.linear, fewstep.DiscreteVP.scaled_linear, fewstep.DiscreteVP.cosine])
def test_rescale_zero_terminal_snr_matches_diffusers(make):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = make().betas
    ours = fewstep.DiscreteVP.rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours, rescale_zero_terminal_snr(betas.clone()), rtol=0, atol=1e-12)
    assert float(ours[-1]) == 1.0
    torch.testing.assert_close(make(zero_terminal_snr=True).betas, ours, rtol=0, atol=0)


def test_zero_terminal_snr_process_is_exact_at_one_and_finite_elsewhere():
    process = fewstep.DiscreteVP.scaled_linear(zero_terminal_snr=True)
    assert process.zero_terminal_snr and process.default_schedule == "time_uniform"
    assert float(process.alpha(1.0)) == 0.0 and float(process.sigma(1.0)) == 1.0 and float(process.log_snr(1.0)) == -math.inf
    assert float(process.t_from_log_snr(-math.inf)) == 1.0
    assert float(process.dsigma_dt(1.0)) == 0.0 and math.isfinite(float(process.dalpha_dt(1.0)))
    t = torch.cat(
        [torch.linspace(process.t_min, 0.9995, 400, dtype=torch.float64), torch.tensor([0.99999, 1 - 1e-9], dtype=torch.float64)]
    )
    values = [process.alpha(t), process.sigma(t), process.log_snr(t), process.dalpha_dt(t), process.dsigma_dt(t)]
    assert all(bool(torch.isfinite(v).all()) for v in values)
    torch.testing.assert_close(process.alpha(t) ** 2 + process.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(process.t_from_log_snr(process.log_snr(t)), t, rtol=0, atol=1e-12)
    assert bool((process.log_snr(t)[1:] < process.log_snr(t)[:-1]).all())
    # Elsewhere it is the process of the same betas with a last knot at alpha = 0: identical before the last segment.
    knots = process._t_knots[:-1]
    torch.testing.assert_close(process.alpha(knots) ** 2, process.alphas_cumprod[:-1], rtol=1e-12, atol=0)
    for s in (0.99925, 0.9995, 0.9999):  # derivatives on the last segment by central differences
        h = 1e-7
        torch.testing.assert_close(
            process.dalpha_dt(s), (process.alpha(s + h) - process.alpha(s - h)) / (2 * h), rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            process.dsigma_dt(s), (process.sigma(s + h) - process.sigma(s - h)) / (2 * h), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("prediction", ["v", "x0", "velocity"])
def test_zero_terminal_snr_sampling_from_pure_noise_converges(prediction):
    process = fewstep.DiscreteVP.scaled_linear(zero_terminal_snr=True)
    mixture = fewstep.ring2d()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mixture.ode_solution(noise, process)
    model = mixture.model(process, prediction)
    errors = []
    for steps in (10, 100):
        x = fewstep.sample(
            model, noise, process=process, prediction=prediction, solver="ddim", steps=steps, schedule="time_uniform"
        )
        assert bool(torch.isfinite(x).all())
        errors.append(float((x - exact).abs().max()))
    assert errors[0] < 0.6 and errors[1] < 0.1 and errors[1] < 0.25 * errors[0], errors


# DiscreteVP knots on the device ---------------------------------------------------------------------------------


def test_discrete_vp_copies_its_knots_once_per_device_and_dtype(monkeypatch):
    process = fewstep.DiscreteVP.linear()
    copies = []
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out is not self and self.numel() == process.num_timesteps:
            copies.append(out.dtype)
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    t = torch.full((8,), 0.5, dtype=torch.float32)
    for _ in range(50):
        process.alpha(t)
        process.sigma(t)
        process.dsigma_dt(t)
        process.t_from_log_snr(process.log_snr(t))
    assert len(copies) <= 4, f"{len(copies)} copies of the knots for 250 evaluations"
    torch.testing.assert_close(process.alpha(t), process.alpha(t.double()).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_discrete_vp_on_cuda_matches_cpu():
    process = fewstep.DiscreteVP.scaled_linear(zero_terminal_snr=True)
    t = torch.linspace(process.t_min, 1.0, 257, dtype=torch.float64)
    for name in ("alpha", "sigma", "log_snr", "dalpha_dt", "dsigma_dt"):
        on_gpu = getattr(process, name)(t.cuda())
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), getattr(process, name)(t), rtol=1e-12, atol=1e-12)
    lam = process.log_snr(t[:-1]).cuda()
    torch.testing.assert_close(process.t_from_log_snr(lam).cpu(), t[:-1], rtol=0, atol=1e-12)
    assert len(process._device_knots) == 2  # CPU and CUDA float64: one copy each
