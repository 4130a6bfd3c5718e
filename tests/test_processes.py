import math

import pytest
import torch
from conftest import all_processes

import fewstep

PROCESSES = all_processes()
IDS = [repr(p) for p in PROCESSES]


def interior_times(process, n=101):
    lo, hi = process.t_min, process.t_max
    pad = 1e-3 * (hi - lo)
    return torch.linspace(lo + pad, hi - pad, n, dtype=torch.float64)


@pytest.mark.parametrize("process", [p for p in PROCESSES if isinstance(p, (fewstep.DiscreteVP, fewstep.VP))])
def test_vp_is_variance_preserving(process):
    t = interior_times(process)
    assert torch.allclose(process.alpha(t) ** 2 + process.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_log_snr_inverse_round_trip(process):
    t = interior_times(process)
    back = process.t_from_log_snr(process.log_snr(t))
    assert torch.allclose(back, t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_log_snr_is_log_alpha_over_sigma_and_decreasing(process):
    t = interior_times(process)
    lam = process.log_snr(t)
    assert torch.allclose(lam, torch.log(process.alpha(t) / process.sigma(t)), atol=1e-10)
    assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must decrease from data to noise"


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_time_derivatives_match_finite_differences(process):
    t = interior_times(process, 37)
    h = 1e-6 * (process.t_max - process.t_min)
    if isinstance(process, fewstep.DiscreteVP):  # mid-segment: log alpha is piecewise linear between knots
        t = (torch.arange(5, process.num_timesteps - 5, 27, dtype=torch.float64) + 1.5) / process.num_timesteps
    for f, df in ((process.alpha, process.dalpha_dt), (process.sigma, process.dsigma_dt)):
        numeric = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), numeric, rtol=1e-5, atol=1e-6 * float(df(t).abs().max() + 1))


def test_discrete_vp_matches_alphas_cumprod_at_integer_timesteps():
    process = fewstep.DiscreteVP.linear()
    k = torch.arange(0, 1000, 37)
    t = process.time_from_timestep(k)
    assert torch.allclose(process.alpha(t) ** 2, process.alphas_cumprod[k], rtol=1e-12)
    assert torch.allclose(process.timestep(t), k.to(torch.float64))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(process.alphas_cumprod, torch.cumprod(1 - betas, 0))


def test_discrete_vp_log_alpha_is_piecewise_linear_between_knots():
    process = fewstep.DiscreteVP.linear(10)
    t0, t1 = 0.3, 0.4  # knots k = 2, 3
    mid = process.log_alpha(0.35)
    assert float(mid) == pytest.approx(0.5 * float(process.log_alpha(t0) + process.log_alpha(t1)), abs=1e-14)


def test_beta_constructors():
    sl = fewstep.DiscreteVP.scaled_linear(1000)
    assert float(sl.betas[0]) == pytest.approx(0.00085) and float(sl.betas[-1]) == pytest.approx(0.012)
    cos = fewstep.DiscreteVP.cosine(1000)
    s = 0.008
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert float(cos.alphas_cumprod[499]) == pytest.approx(f(0.5) / f(0.0), rel=1e-9)


def test_continuous_vp_linear_closed_form():
    process = fewstep.VP("linear", beta_min=0.1, beta_max=20.0)
    t = 0.4
    log_mean = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    assert float(process.alpha(t)) == pytest.approx(math.exp(log_mean), rel=1e-12)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_add_noise_is_alpha_x0_plus_sigma_eps(process):
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = interior_times(process, 5)
    xt = process.add_noise(x0, t, eps)
    expected = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    assert torch.allclose(xt, expected)


def test_endpoints_of_rectified_flow_and_edm():
    rf = fewstep.RectifiedFlow()
    assert float(rf.log_snr(1.0)) == -math.inf and float(rf.log_snr(0.0)) == math.inf
    assert float(rf.t_from_log_snr(0.0)) == 0.5
    edm = fewstep.EDM()
    assert (edm.t_min, edm.t_max) == (0.002, 80.0)
    assert float(edm.sigma(3.0)) == 3.0 and float(edm.alpha(3.0)) == 1.0


def test_bad_process_arguments():
    with pytest.raises(ValueError, match="schedule"):
        fewstep.VP("quadratic")
    with pytest.raises(ValueError, match="sigma_min"):
        fewstep.VE(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="betas"):
        fewstep.DiscreteVP(torch.tensor([0.1, 1.5]))


def test_betas_given_as_python_floats_keep_float64():
    """A list of floats (e.g. from a JSON checkpoint config) is read in float64, not rounded through float32."""
    betas = [0.0001 + 0.0199 * i / 999 for i in range(1000)]
    process = fewstep.DiscreteVP(betas)
    assert torch.equal(process.betas, torch.tensor(betas, dtype=torch.float64))
    assert process.betas[1].item() == betas[1]
