import math

import pytest
import torch
from scipy.stats import multivariate_normal

import fewstep


def single(mu=(0.3, -0.5), s=(0.7, 0.2)):
    return fewstep.GaussianMixture([1.0], [list(mu)], [list(s)])


def test_single_gaussian_posterior_mean_closed_form():
    g = single()
    mu, s2 = g.means[0], g.stds[0] ** 2
    x = torch.randn(10, 2, dtype=torch.float64)
    for alpha, sigma in ((0.8, 0.6), (1.0, 2.5), (0.0, 1.0), (0.5, 0.0)):
        x0, eps = g.posterior_mean(x, alpha, sigma)
        var = alpha**2 * s2 + sigma**2
        assert torch.allclose(x0, mu + alpha * s2 * (x - alpha * mu) / var)
        assert torch.allclose(eps, sigma * (x - alpha * mu) / var)


def test_posterior_mean_matches_monte_carlo():
    """E[x0 | x_t] by self-normalised importance sampling with prior samples."""
    mixture = fewstep.ring2d()
    gen = torch.Generator().manual_seed(0)
    x0_samples = mixture.sample(400_000, generator=gen)
    alpha, sigma = 0.8, 0.6
    x = torch.tensor([[0.5, 0.4], [-0.9, 0.1], [0.0, -0.7]], dtype=torch.float64)
    exact, _ = mixture.posterior_mean(x, alpha, sigma)
    for i in range(x.shape[0]):
        logw = -((x[i] - alpha * x0_samples) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0_samples).sum(0)
        ess = 1 / (w**2).sum()
        assert ess > 1000
        assert torch.allclose(mc, exact[i], atol=0.02), (mc, exact[i])


def test_log_prob_matches_scipy():
    mixture = fewstep.mixture_nd(dim=4, components=3)
    x = torch.randn(7, 4, dtype=torch.float64)
    expected = torch.zeros(7, dtype=torch.float64)
    for w, m, s in zip(mixture.weights, mixture.means, mixture.stds, strict=True):
        expected += w * torch.from_numpy(multivariate_normal(m.numpy(), torch.diag(s**2).numpy()).pdf(x.numpy()))
    assert torch.allclose(mixture.log_prob(x), torch.log(expected), atol=1e-10)


def test_score_is_gradient_of_log_prob():
    mixture = fewstep.ring2d()
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    alpha, sigma = 0.7, 0.4
    (grad,) = torch.autograd.grad(mixture.log_prob(x, alpha, sigma).sum(), x)
    assert torch.allclose(mixture.score(x.detach(), alpha, sigma), grad, atol=1e-10)


def test_samples_have_the_mixture_moments():
    mixture = fewstep.ring2d(modes=4, radius=1.0, std=0.2)
    x = mixture.sample(200_000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.01)
    # Var per axis: mean of mu_d^2 (=0.5) + std^2
    assert torch.allclose(x.var(0), torch.full((2,), 0.5 + 0.04, dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize(
    "process", [fewstep.DiscreteVP.linear(), fewstep.VP("cosine"), fewstep.EDM(), fewstep.RectifiedFlow(), fewstep.VE()], ids=repr
)
def test_ode_reference_matches_single_gaussian_closed_form(process):
    g = single()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t_start, t_end = process.t_max, process.t_min
    ref = g.ode_solution(noise, process, t_start, t_end, denoise_to_zero=False)
    exact = g.single_gaussian_flow(noise, process, t_start, t_end)
    assert (ref - exact).abs().max() < 1e-8


def test_ode_reference_denoises_at_the_end():
    g = fewstep.ring2d()
    process = fewstep.EDM()
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    raw = g.ode_solution(noise, process, denoise_to_zero=False)
    den = g.ode_solution(noise, process)
    assert torch.allclose(den, g.posterior_mean(raw, 1.0, process.t_min)[0], atol=1e-12)


def test_named_problems_and_errors():
    assert fewstep.problem("ring2d").dim == 2
    assert fewstep.problem("mixture16d").dim == 16
    with pytest.raises(ValueError, match="ring2d"):
        fewstep.problem("moons")
    with pytest.raises(ValueError, match="means"):
        fewstep.GaussianMixture([1.0], [0.0, 1.0], [1.0])
    assert math.isclose(float(fewstep.ring2d().weights.sum()), 1.0)


def test_flow_map_matches_single_gaussian_to_data():
    g = single()
    process = fewstep.DiscreteVP.linear()
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # At sigma = 0 (alpha = 1): x = mu + s * z with z the standardised start.
    a0, s0 = process.alpha(1.0), process.sigma(1.0)
    z = (s0 * noise - a0 * g.means[0]) / torch.sqrt(a0**2 * g.stds[0] ** 2 + s0**2)
    exact = g.means[0] + z * g.stds[0]
    assert (g.flow_map(noise, process) - exact).abs().max() < 1e-8
