"""fewstep.accel.AdaptiveCache (TeaCache / First-Block-Cache style): bit-identical at threshold 0, the decision rule
replayed by hand from the indicator, full computations and FLOPs counted exactly and falling with the threshold,
the error against the uncached sample growing with it, first / last call always computing, warnings, bad input."""

import math
import warnings

import pytest
import torch
from torch import nn

import fewstep
from fewstep import accel
from fewstep.accel.adaptive import relative_l1
from fewstep.nets import MLP, DiffusersUNet, DiffusionModel, UNet


def _randomize(module: nn.Module, std: float, seed: int = 0) -> nn.Module:
    """Every parameter normal(0, std): the UNet's zero-initialised output layers would make every output 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def _unet_model() -> DiffusionModel:
    net = UNet(channels=(8, 16), attention=(1,), emb_features=16)
    return DiffusionModel(_randomize(net, 0.2), fewstep.DiscreteVP.linear(), prediction="eps")


def _diffusers_model() -> DiffusionModel:
    net = DiffusersUNet(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, attention_head_dim=8)  # fmt: skip
    return DiffusionModel(_randomize(net, 0.1), fewstep.DiscreteVP.linear(), prediction="eps")


def _noise(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _sample(model, noise, process, solver="dpmpp_2m", steps=12):
    return fewstep.sample(model, noise, process=process, prediction="eps", solver=solver, steps=steps)


def _cached_sample(model, threshold, solver="dpmpp_2m", steps=12, max_reuse=None, **kwargs):
    cache = accel.AdaptiveCache(model, threshold=threshold, max_reuse=max_reuse, **kwargs)
    with cache.plan(accel.sampling_grid(model.process, steps)):
        x = _sample(cache, _noise(), model.process, solver, steps)
    return x, cache


@pytest.mark.parametrize("solver, steps", [("dpmpp_2m", 8), ("heun", 4)])
@pytest.mark.parametrize("make", [_unet_model, _diffusers_model])
def test_threshold_zero_is_bit_identical(make, solver, steps):
    model = make()
    plain = _sample(model, _noise(), model.process, solver, steps)
    cached, cache = _cached_sample(model, 0.0, solver, steps)
    assert torch.equal(cached, plain)
    assert cache.counts == {"refresh": plain.nfe, "reuse": 0}


def test_threshold_zero_computes_even_an_unchanged_input():
    model = _unet_model()
    ts = accel.sampling_grid(model.process, 6)
    cache = accel.AdaptiveCache(model, threshold=0.0).plan(ts)
    x = _noise()
    for i in (0, 1, 2):  # the same x: the depth-1 indicator (the input convolution of x) does not change
        t = torch.full((4,), float(ts[i]))
        assert torch.equal(cache(x, t), model(x, t))
    assert cache.counts == {"refresh": 3, "reuse": 0} and [a for _, a, _ in cache.trace] == [0.0, 0.0, 0.0]


def test_relative_l1():
    h, prev = torch.tensor([1.0, -1.0, 3.0]), torch.tensor([2.0, 0.0, 2.0])
    assert relative_l1(h, prev) == pytest.approx(0.75)  # mean |h - prev| = 1, mean |prev| = 4/3
    assert relative_l1(torch.zeros(3), torch.zeros(3)) == 0.0 and relative_l1(h, torch.zeros(3)) == math.inf


def test_threshold_zero_bit_identical_on_a_unet2d_through_from_diffusers():
    import diffusers

    unet = _diffusers_model().net.unet
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    model, process, prediction = fewstep.from_diffusers(unet, scheduler.config)
    kw = {"process": process, "prediction": prediction, "solver": "dpmpp_2m", "steps": 6}
    plain = fewstep.sample(model, _noise(), **kw)
    with accel.AdaptiveCache(model, threshold=0.0).plan(accel.sampling_grid(process, 6)) as cache:
        assert torch.equal(fewstep.sample(cache, _noise(), **kw), plain)
    with accel.AdaptiveCache(model, threshold=0.5).plan(accel.sampling_grid(process, 6)) as cache:
        out = fewstep.sample(cache, _noise(), **kw)
    assert cache.counts["reuse"] > 0 and not torch.equal(out, plain)


def test_decisions_replay_the_accumulated_relative_l1_rule():
    """At depth 1 the indicator of fewstep's UNet is its input convolution of x: recompute it from the inputs seen,
    replay TeaCache's rule (accumulate, refresh at >= threshold or after max_reuse reuses in a row, restart at 0;
    first and last grid point compute), and check every decision, every accumulated change, and that refresh calls
    equal the model exactly."""
    model, steps, threshold, max_reuse = _unet_model(), 12, 0.15, 2
    ts = accel.sampling_grid(model.process, steps)
    cache = accel.AdaptiveCache(model, threshold=threshold, max_reuse=max_reuse).plan(ts)
    seen = []

    def probe(x, t):
        out = cache(x, t)
        seen.append((x.clone(), t[0].item(), torch.equal(out, model(x, t))))
        return out

    _sample(probe, _noise(), model.process, steps=steps)
    assert len(seen) == steps + 1 and len(cache.trace) == steps + 1
    accumulated, run, prev, expected = 0.0, 0, None, []
    with torch.no_grad():
        for i, (x, t, _) in enumerate(seen):
            h = model.net.inp(x)
            if i in (0, steps):
                refresh, accumulated = True, 0.0
            else:
                accumulated += float((h - prev).abs().mean() / prev.abs().mean())
                refresh = accumulated >= threshold or run == max_reuse
            expected.append((t, accumulated, refresh))
            accumulated, run = (0.0, 0) if refresh else (accumulated, run + 1)
            prev = h
    for (t, acc, refresh), (t2, acc2, refresh2), (_, _, exact) in zip(expected, cache.trace, seen, strict=True):
        assert t == t2 and math.isclose(acc, acc2, rel_tol=1e-6, abs_tol=1e-9) and refresh == refresh2
        assert exact == refresh  # a full computation is the model's output; a reuse is not
    assert cache.counts == {"refresh": sum(r for *_, r in expected), "reuse": sum(not r for *_, r in expected)}
    assert 2 < cache.counts["refresh"] < steps  # this threshold both reuses and refreshes


@pytest.mark.parametrize("make", [_unet_model, _diffusers_model])
def test_full_computations_and_flops_fall_with_the_threshold(make):
    """FLOPs of a sampling run = full calls x the full pass + reuse calls x the shallow pass, exactly; the number of
    full calls never grows with the threshold and reaches 2 (first and final call) for a huge one."""
    model = make()
    steps = 12
    x, t = _noise(), torch.full((4,), 0.5)
    _, full = accel.count_flops(model, x, t)
    ts = accel.sampling_grid(model.process, steps)
    probe = accel.DeepCache(model, interval=3, depth=1).plan(ts)
    probe(x, t.new_full((4,), float(ts[0])))
    _, shallow = accel.count_flops(probe, x, t)  # a DeepCache reuse call: the same shallow branch
    assert 0 < shallow < 0.8 * full
    refreshes = []
    for threshold in (0.0, 0.05, 0.2, 0.5, 2.0, 1e9):
        cache = accel.AdaptiveCache(model, threshold=threshold, max_reuse=None).plan(ts)
        _, total = accel.count_flops(_sample, cache, _noise(), model.process, "dpmpp_2m", steps)
        counts = cache.counts
        assert counts["refresh"] + counts["reuse"] == steps + 1
        assert total == counts["refresh"] * full + counts["reuse"] * shallow
        refreshes.append(counts["refresh"])
    assert refreshes == sorted(refreshes, reverse=True)
    assert refreshes[0] == steps + 1 and refreshes[-1] == 2 and len(set(refreshes)) >= 4


def test_error_against_the_uncached_sample_grows_with_the_threshold():
    model = _unet_model()
    plain = _sample(model, _noise(), model.process)
    errors, refreshes = [], []
    for threshold in (0.02, 0.2, 1.0):
        cached, cache = _cached_sample(model, threshold)
        errors.append(float((cached - plain).norm() / plain.norm()))
        refreshes.append(cache.counts["refresh"])
    assert refreshes[0] > refreshes[1] > refreshes[2]
    assert 0 < errors[0] < 0.02  # a small threshold: a few reuses, a small error
    assert errors[0] < errors[1] < errors[2]
    assert errors[2] > 5 * errors[0]


def test_first_and_final_calls_compute_and_max_reuse_bounds_a_run():
    model = _unet_model()
    _, cache = _cached_sample(model, 1e9, steps=9)
    assert [r for *_, r in cache.trace] == [True] + [False] * 8 + [True]
    _, cache = _cached_sample(model, 1e9, steps=9, max_reuse=2)
    assert [r for *_, r in cache.trace] == [True, False, False] * 3 + [True]
    _, cache = _cached_sample(model, 1e9, solver="heun", steps=3)  # Heun's corrector at the last point computes too
    assert [r for *_, r in cache.trace] == [True, False, False, False, False, True, True]
    assert cache.trace[-2][0] == cache.trace[-1][0] == pytest.approx(model.process.t_min)


def test_warns_where_no_grid_point_can_reuse():
    model = _unet_model()
    with pytest.warns(UserWarning, match="no grid point can reuse"):
        accel.AdaptiveCache(model, threshold=0.1).plan(accel.sampling_grid(model.process, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accel.AdaptiveCache(model, threshold=0.1).plan(accel.sampling_grid(model.process, 2))
        accel.AdaptiveCache(model, threshold=0.0).plan(accel.sampling_grid(model.process, 1))


def test_bad_input():
    with pytest.raises(TypeError, match="AdaptiveCache cannot instrument MLP.*UNet"):
        accel.AdaptiveCache(DiffusionModel(MLP(dim=2), fewstep.EDM(), prediction="eps"))
    model = _unet_model()
    for threshold in (-0.1, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            accel.AdaptiveCache(model, threshold=threshold)
    for max_reuse in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_reuse must be None"):
            accel.AdaptiveCache(model, max_reuse=max_reuse)
    with pytest.raises(ValueError, match="depth must be an integer in 1..4"):
        accel.AdaptiveCache(model, depth=5)
    with pytest.raises(RuntimeError, match="AdaptiveCache needs the sampling grid"):
        accel.AdaptiveCache(model)(_noise(), torch.ones(4))
    with pytest.raises(ValueError, match="ts must be a 1-D tensor"):
        accel.AdaptiveCache(model).plan(torch.ones(2, 2))
