import itertools

import pytest
import torch
from conftest import all_processes

import fewstep
from fewstep.parameterization import PREDICTIONS, convert

PROCESSES = all_processes()
IDS = [repr(p) for p in PROCESSES]


def interior_batch(process, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = process.t_min, process.t_max
    t = lo + (hi - lo) * (0.02 + 0.96 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * 2
    return x, t


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("source,target", list(itertools.permutations(PREDICTIONS, 2)))
def test_round_trip_every_pair(process, source, target):
    x, t = interior_batch(process)
    pred = torch.randn_like(x)
    there = convert(pred, x, t, process, source=source, target=target)
    back = convert(there, x, t, process, source=target, target=source)
    assert torch.allclose(back, pred, rtol=1e-6, atol=1e-6 * float(pred.abs().max()))


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_conversion_matches_independent_ground_truth(process, target):
    """x0 and eps drawn first, x formed from them: every prediction has a known closed form."""
    g = torch.Generator().manual_seed(1)
    x, t = interior_batch(process)
    x0, eps = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g, dtype=torch.float64)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    da, ds = process.dalpha_dt(t)[:, None], process.dsigma_dt(t)[:, None]
    x = a * x0 + s * eps
    truth = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "velocity": da * x0 + ds * eps, "score": -eps / s}
    for source in PREDICTIONS:
        got = convert(truth[source], x, t, process, source=source, target=target)
        assert torch.allclose(got, truth[target], rtol=1e-6, atol=1e-6), (source, target)


def test_v_and_velocity_are_finite_where_alpha_or_sigma_vanish():
    rf = fewstep.RectifiedFlow()
    x = torch.randn(4, 2, dtype=torch.float64)
    for t in (0.0, 1.0):
        tt = torch.full((4,), t, dtype=torch.float64)
        for source in ("v", "velocity"):
            for target in ("x0", "eps", "v", "velocity"):
                assert torch.isfinite(convert(torch.randn_like(x), x, tt, rf, source=source, target=target)).all()


def test_gmm_models_agree_through_conversion():
    mixture = fewstep.ring2d()
    for process in (fewstep.DiscreteVP.linear(), fewstep.EDM(), fewstep.RectifiedFlow()):
        x, t = interior_batch(process, 8)
        x = x[:, :2]
        eps = mixture.model(process, "eps")(x, t)
        for target in PREDICTIONS:
            direct = mixture.model(process, target)(x, t)
            assert torch.allclose(convert(eps, x, t, process, source="eps", target=target), direct, rtol=1e-8, atol=1e-8)


def test_denoiser_counts_and_converts():
    process = fewstep.EDM()
    mixture = fewstep.ring2d()
    den = fewstep.Denoiser(mixture.model(process, "v"), process, "v")
    x = torch.randn(6, 2, dtype=torch.float64) * 3
    pred = den(x, 3.0)
    x0, eps = mixture.posterior_mean(x, 1.0, 3.0)
    assert torch.allclose(pred.x0, x0) and torch.allclose(pred.eps, eps)
    den(x, 1.0)
    assert den.nfe == 2


def test_unknown_prediction():
    with pytest.raises(ValueError, match="allowed values: eps, x0, v, velocity, score"):
        fewstep.Denoiser(lambda x, t: x, fewstep.EDM(), "noise")
