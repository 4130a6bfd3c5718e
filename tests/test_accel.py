"""fewstep.accel: DeepCache (bit-identical at interval 1, exact at refresh calls), compile (no recompiles), quantization
(calibration across timesteps beats one timestep), T-Stitch (equals the two-stage exact-mixture sample), bad input."""

import warnings

import pytest
import torch
from torch import nn

import fewstep
from fewstep import accel
from fewstep.accel import quant as quant_module
from fewstep.nets import MLP, DiffusersUNet, DiffusionModel, UNet


def _randomize(module: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    """Every parameter normal(0, std): the UNet's zero-initialised output layers would make every output 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def _unet_model(process=None, **kwargs) -> DiffusionModel:
    net = UNet(**{"channels": (8, 16), "attention": (1,), "emb_features": 16, **kwargs})
    return DiffusionModel(_randomize(net), process or fewstep.DiscreteVP.linear(), prediction="eps")


def _diffusers_model() -> DiffusionModel:
    net = DiffusersUNet(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, attention_head_dim=8)  # fmt: skip
    return DiffusionModel(_randomize(net, 0.1), fewstep.DiscreteVP.linear(), prediction="eps")


def _noise(n: int = 4, shape=(1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _sample(model, noise, process, **kwargs):
    return fewstep.sample(model, noise, process=process, prediction="eps", **{"solver": "dpmpp_2m", "steps": 8, **kwargs})


# --- the split forward -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"channels": (8, 8, 16), "blocks": 2, "attention": (0, 2)}])
def test_unet_split_is_the_forward_at_every_depth(kwargs):
    net = _unet_model(**kwargs).net
    x, level = _noise(3, (1, 7, 9)), torch.randn(3)
    full = net(x, level)
    for depth in range(1, net.skips + 1):
        out, feature = net.forward_split(x, level, depth)
        assert torch.equal(out, full)
        assert torch.equal(net.forward_split(x, level, depth, deep=feature)[0], full)  # the deep branch fed back


def test_diffusers_split_is_the_forward_at_every_depth():
    from fewstep.accel.diffusers_split import unet2d_forward_split

    unet = _diffusers_model().net.unet
    x, t = _noise(2), torch.tensor([3.0, 40.0])
    full = unet(x, t).sample
    for depth in (1, 2):
        out, feature = unet2d_forward_split(unet, x, t, depth)
        assert torch.equal(out, full)
        assert torch.equal(unet2d_forward_split(unet, x, t, depth, deep=feature)[0], full)


# --- DeepCache ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver, steps", [("dpmpp_2m", 8), ("heun", 4), ("dpm_solver_2", 4)])
@pytest.mark.parametrize("make", [_unet_model, _diffusers_model])
def test_deepcache_interval_one_is_bit_identical(make, solver, steps):
    model = make()
    noise = _noise()
    plain = _sample(model, noise, model.process, solver=solver, steps=steps)
    cache = accel.DeepCache(model, interval=1, depth=1)
    with cache.plan(accel.sampling_grid(model.process, steps)):
        cached = _sample(cache, noise, model.process, solver=solver, steps=steps)
    assert torch.equal(cached, plain)
    assert cache.counts["reuse"] == 0 and cache.counts["refresh"] == plain.nfe


@pytest.mark.parametrize("solver, steps", [("dpmpp_2m", 9), ("heun", 6), ("dpm_solver_2", 6)])
@pytest.mark.parametrize("make", [_unet_model, _diffusers_model])
def test_deepcache_refreshes_by_time_and_is_exact_there(make, solver, steps):
    """Refresh calls (at the planned grid times, also Heun's corrector there) equal the plain model; others reuse."""
    model = make()
    ts = accel.sampling_grid(model.process, steps)
    cache = accel.DeepCache(model, interval=3, depth=1).plan(ts)
    refresh_times = set(cache.refresh_times())
    assert refresh_times == {float(ts[i]) for i in range(0, steps + 1, 3)}
    seen = []

    def probe(x, t):
        out = cache(x, t)
        seen.append((float(t[0]), torch.equal(out, model(x, t))))
        return out

    x = _sample(probe, _noise(), model.process, solver=solver, steps=steps)
    assert torch.isfinite(x).all()
    for t, exact in seen:
        refresh = any(abs(t - r) <= 1e-6 * max(1.0, abs(r)) for r in refresh_times)
        assert exact == refresh, (t, exact, refresh)
    assert cache.counts == {"refresh": sum(e for _, e in seen), "reuse": sum(not e for _, e in seen)}
    assert cache.counts["reuse"] > 0


def test_deepcache_on_a_diffusers_unet2d_through_from_diffusers():
    import diffusers

    unet = _diffusers_model().net.unet  # a random UNet2DModel
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    model, process, prediction = fewstep.from_diffusers(unet, scheduler.config)
    noise, steps = _noise(), 6
    plain = fewstep.sample(model, noise, process=process, prediction=prediction, solver="heun", steps=steps)
    ts = accel.sampling_grid(process, steps)
    with accel.DeepCache(model, interval=1).plan(ts) as cache:
        same = fewstep.sample(cache, noise, process=process, prediction=prediction, solver="heun", steps=steps)
    assert torch.equal(same, plain)
    cache = accel.DeepCache(model, interval=3, depth=1).plan(ts)
    x, t = noise, torch.full((4,), float(ts[3]))
    assert torch.equal(cache(x, t), model(x, t))  # a refresh point: exact
    assert not torch.equal(cache(x, t.new_full((4,), float(ts[4]))), model(x, t.new_full((4,), float(ts[4]))))
    assert cache.counts == {"refresh": 1, "reuse": 1}
    with pytest.raises(TypeError, match="UNet2DModel or UNet2DConditionModel"):
        accel.DeepCache(fewstep.from_diffusers(lambda x, timestep: x, scheduler.config)[0])


def _sd_unet():
    """A random Stable-Diffusion-style UNet2DConditionModel (cross-attention in one down and one up block)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("size", [8, 7])  # 7: an odd size, where the forward passes each up block its output size
def test_unet2d_condition_split_equals_the_forward(size):
    from fewstep.accel.diffusers_split import unet2d_forward_split

    unet = _sd_unet()
    x, t = _noise(2, (4, size, size)), torch.tensor([3.0, 400.0])
    text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = unet(x, t, encoder_hidden_states=text).sample
        for depth in (1, 2):
            out, feature = unet2d_forward_split(unet, x, t, depth, encoder_hidden_states=text)
            assert torch.equal(out, full)
            assert torch.equal(unet2d_forward_split(unet, x, t, depth, feature, encoder_hidden_states=text)[0], full)
        other = unet2d_forward_split(unet, x, t, encoder_hidden_states=text.flip(0))[0]
    assert not torch.allclose(other, full)  # the text conditioning reaches the network


def test_deepcache_on_a_stable_diffusion_unet_with_classifier_free_guidance():
    import diffusers

    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    model, process, prediction = fewstep.from_diffusers(_sd_unet(), scheduler.config)
    text, empty = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    noise, steps = _noise(2, (4, 8, 8)), 8
    common = {"process": process, "prediction": prediction, "solver": "dpmpp_2m", "steps": steps}

    def guided(m):
        return fewstep.cfg_kwargs(m, {"encoder_hidden_states": text}, {"encoder_hidden_states": empty}, 5.0)

    ts = accel.sampling_grid(process, steps)
    with torch.no_grad():
        plain = fewstep.sample(guided(model), noise, **common)
        with accel.DeepCache(model, interval=1).plan(ts) as cache:
            assert torch.equal(fewstep.sample(guided(cache), noise, **common), plain)
        cache = accel.DeepCache(model, interval=2, depth=1).plan(ts)
        cached = fewstep.sample(guided(cache), noise, **common)
    assert cache.counts == {"refresh": 5, "reuse": 4}  # one call per step for both CFG halves; 9 grid points
    assert not torch.equal(cached, plain) and float((cached - plain).abs().max()) < 0.5 * float(plain.abs().max())
    with pytest.raises(TypeError, match="passes only encoder_hidden_states"):
        cache(noise, torch.full((2,), float(ts[0])), class_labels=torch.zeros(2))


def test_encoder_propagation_reuses_the_encoder_and_ignores_x_between_refreshes():
    model = _unet_model()
    noise, steps = _noise(), 8
    ts = accel.sampling_grid(model.process, steps)
    plain = _sample(model, noise, model.process, solver="dpmpp_2m", steps=steps)
    with accel.EncoderPropagation(model, interval=1).plan(ts) as same:
        assert torch.equal(_sample(same, noise, model.process, solver="dpmpp_2m", steps=steps), plain)
    cache = accel.EncoderPropagation(model, interval=2).plan(ts)
    refresh, reuse = torch.full((4,), float(ts[2])), torch.full((4,), float(ts[3]))
    assert torch.equal(cache(noise, refresh), model(noise, refresh))  # a refresh point: the full UNet
    other = _noise(seed=5)
    out = cache(other, reuse)  # the decoder at t_3 on the encoder features of `noise` at t_2: x is not looked at
    assert torch.equal(out, cache(noise, reuse)) and not torch.equal(out, model(other, reuse))
    assert cache.counts == {"refresh": 1, "reuse": 2}
    _, full = accel.count_flops(model, noise, reuse)
    _, decoder = accel.count_flops(cache, noise, reuse)
    assert 0.3 * full < decoder < 0.9 * full  # the encoder's share is saved
    with pytest.raises(TypeError, match="EncoderPropagation needs fewstep's UNet"):
        accel.EncoderPropagation(_diffusers_model())


def test_newton_extrapolation_is_exact_on_polynomials():
    """The forecast through k + 1 features at uneven times reproduces any degree-k polynomial in t, at any t."""
    a, b, c = _noise(1, seed=1)[0], _noise(1, seed=2)[0], _noise(1, seed=3)[0]
    times = [0.9, 0.75, 0.4]
    cubic_free = [a + b * t + c * t**2 for t in times]
    for t in (0.3, 0.1, 0.0):
        assert torch.allclose(accel.newton_extrapolate(times, cubic_free, t), a + b * t + c * t**2, atol=1e-5)
        assert torch.allclose(accel.newton_extrapolate(times[1:], cubic_free[1:], t),
                              cubic_free[2] + (t - times[2]) * (cubic_free[2] - cubic_free[1]) / (times[2] - times[1]),
                              atol=1e-5)  # fmt: skip
    assert torch.equal(accel.newton_extrapolate(times[:1], cubic_free[:1], 0.0), cubic_free[0])


@pytest.mark.parametrize("make", [_unet_model, _diffusers_model])
def test_forecast_reuse_calls_extrapolate_the_last_two_refreshes(make):
    """A reusing call's deep feature is the straight line in t through the last two computed ones: on a model whose
    deep feature is recorded, the forecast output equals the split forward with that extrapolated feature."""
    model = make()
    ts = accel.sampling_grid(model.process, 6)
    cache = accel.DeepCache(model, interval=2, forecast=1).plan(ts)
    x = _noise()
    t0, t2, t3 = (torch.full((4,), float(ts[i])) for i in (0, 2, 3))
    cache(x, t0)
    d0 = cache._net.deep
    cache(x, t2)
    d2 = cache._net.deep
    expected = d2 + (float(ts[3]) - float(ts[2])) * (d2 - d0) / (float(ts[2]) - float(ts[0]))
    assert torch.allclose(cache._net.reused(), d2)  # the call time is still t2's
    out = cache(x, t3)
    assert torch.allclose(cache._net.history[-1][1], d2) and cache.counts == {"refresh": 2, "reuse": 1}
    plain = accel.DeepCache(model, interval=2).plan(ts)
    for t in (t0, t2):
        plain(x, t)
    plain._net.deep = expected
    assert torch.allclose(out, plain(x, t3), atol=1e-6)
    cache(x, t2)  # a second computation at the same time replaces the first: no division by a zero time step
    assert [t for t, _ in cache._net.history] == pytest.approx([float(ts[0]), float(ts[2])], rel=1e-6)
    assert torch.isfinite(cache(x, t3)).all()


@pytest.mark.parametrize("kind", ["deep", "adaptive"])
def test_forecasting_the_deep_feature_beats_reusing_it(kind):
    """TaylorSeer-style forecasting (order 1) keeps the shipped model's samples closer to the uncached ones than plain
    reuse at the same refresh calls; interval 1 / threshold 0 stay bit-identical with forecasting on."""
    from fewstep.shipped import load_model

    loaded = load_model("digits_vp")
    model, steps = loaded.model, 30
    noise = _noise(32, seed=4)
    ts = accel.sampling_grid(model.process, steps)
    with torch.no_grad():
        plain = _sample(model, noise, model.process, steps=steps)

        def run(order, strength):
            cache = (accel.DeepCache(model, interval=strength, forecast=order) if kind == "deep"
                     else accel.AdaptiveCache(model, threshold=strength, forecast=order))  # fmt: skip
            with cache.plan(ts):
                return _sample(cache, noise, model.process, steps=steps), cache.counts

        assert torch.equal(run(1, 1 if kind == "deep" else 0.0)[0], plain)
        (reused, counts0), (forecast, counts1) = run(0, 2 if kind == "deep" else 0.1), run(1, 2 if kind == "deep" else 0.1)
    assert counts0 == counts1 if kind == "deep" else counts1["reuse"] > 0
    err0, err1 = (reused - plain).pow(2).mean().sqrt(), (forecast - plain).pow(2).mean().sqrt()
    assert err1 < 0.7 * err0, (float(err0), float(err1))  # measured: 0.049 -> 0.030 (DeepCache)


def test_deepcache_flops_are_refresh_plus_shallow_calls():
    model = _unet_model()
    noise = _noise()
    steps = 9
    x, t = noise, torch.full((4,), 0.5)
    _, full = accel.count_flops(model, x, t)
    cache = accel.DeepCache(model, interval=3, depth=1).plan(accel.sampling_grid(model.process, steps))
    cache(x, t.new_full((4,), float(cache.refresh_times()[0])))  # fills the cache
    _, shallow = accel.count_flops(cache, x, t)  # t = 0.5 is off the grid: a reuse call
    assert 0 < shallow < 0.5 * full
    cache.reset()
    _, total = accel.count_flops(_sample, cache, noise, model.process, steps=steps)
    counts = cache.counts
    assert total == counts["refresh"] * full + counts["reuse"] * shallow


def test_deepcache_log_snr_plan():
    process = fewstep.EDM()
    log_uniform = torch.logspace(torch.log10(torch.tensor(80.0)), -2.0, 13, dtype=torch.float64)
    assert accel.refresh_indices(log_uniform, 3, "log_snr", process) == [0, 3, 6, 9, 12]  # = the uniform plan
    # linear in sigma: 72% of the log-SNR travel is the last step, a quarter of it is reached at point 11; the
    # quantiles beyond fall on point 12, and the two points left over go to the first unused uniform points, 3 and 6
    linear = torch.linspace(80.0, 0.01, 13, dtype=torch.float64)
    assert accel.refresh_indices(linear, 3, "log_snr", process) == [0, 3, 6, 11, 12]


def test_deepcache_warns_where_it_cannot_help():
    model = _unet_model()
    with pytest.warns(UserWarning, match="caching saves little or nothing"):
        accel.DeepCache(model, interval=3).plan(accel.sampling_grid(model.process, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accel.DeepCache(model, interval=3).plan(accel.sampling_grid(model.process, 12))
        accel.DeepCache(model, interval=1).plan(accel.sampling_grid(model.process, 2))


def test_deepcache_bad_input():
    mlp_model = DiffusionModel(MLP(dim=2), fewstep.EDM(), prediction="eps")
    with pytest.raises(TypeError, match="UNet.*DiffusersUNet"):
        accel.DeepCache(mlp_model)
    model = _unet_model()
    with pytest.raises(ValueError, match="depth must be an integer in 1..4"):
        accel.DeepCache(model, depth=5)
    with pytest.raises(ValueError, match="interval"):
        accel.DeepCache(model, interval=0)
    with pytest.raises(ValueError, match="uniform, log_snr"):
        accel.DeepCache(model, refresh="random")
    for forecast in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match=r"forecast must be an integer in 0..3"):
            accel.DeepCache(model, forecast=forecast)
    with pytest.raises(RuntimeError, match="plan"):
        accel.DeepCache(model)(_noise(), torch.ones(4))


# --- compile -----------------------------------------------------------------------------------------------------


def test_compiled_sampling_compiles_once_and_matches_eager():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _unet_model()
    noise = _noise()
    counter = CompileCounter()
    compiled = accel.compile_model(model, backend=counter)
    eager = _sample(model, noise, model.process, steps=10)
    out = _sample(compiled, noise, model.process, steps=10)
    assert counter.frame_count == 1  # one graph for the 11 calls: no recompilation per step
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_bf16_and_channels_last_inference():
    model = _unet_model()
    x, t = _noise(), torch.full((4,), 0.3)
    fast = accel.compile_model(model, mode=None, dtype="bf16", channels_last=True)
    with torch.no_grad():
        ref, out = model(x, t), fast(x, t)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert 1e-5 < float((out - ref).norm() / ref.norm()) < 0.05  # bf16 rounding: different, but close
    assert model.net.inp.weight.is_contiguous()  # the caller's network is not converted to channels_last


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ipndm", "heun", "dpmpp_2s", "lms",
                                    "dc_solver"])  # fmt: skip
def test_linear_plan_is_the_solver_itself(solver):
    # the plan read off the solver reproduces fewstep.sample on the exact mixture's model to round-off
    mixture, process = fewstep.ring2d(), fewstep.DiscreteVP.linear()
    plan = accel.LinearPlan.of(process, solver, 7)
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = fewstep.sample(mixture.model(process), noise, process=process, solver=solver, steps=7)
    assert plan.nfe == expected.nfe
    assert float((plan.run(mixture.model(process), noise, process, "eps") - expected).abs().max()) < 1e-12


def test_compiled_loop_is_one_graph_and_matches_sample():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, noise = _unet_model(), _noise()
    counter = CompileCounter()
    sampler = accel.compile_sampler(model, model.process, solver="dpmpp_2m", steps=6, backend=counter,
                                    schedule="quadratic")  # fmt: skip
    out = sampler(noise)
    assert counter.frame_count == 1 and out.nfe == 7  # the whole run, 7 network calls, in one graph
    with torch.no_grad():
        eager = fewstep.sample(model, noise, process=model.process, solver="dpmpp_2m", steps=6, schedule="quadratic")
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    sampler(noise)
    assert counter.frame_count == 1  # no recompilation on the next call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
def test_compiled_loop_under_cuda_graphs_matches_sample():
    model, noise = _unet_model().cuda(), _noise(8).cuda()
    sampler = accel.compile_sampler(model, model.process, solver="dpmpp_2m", steps=6, mode="reduce-overhead")
    first, second = sampler(noise), sampler(noise)  # the second call replays the captured graph
    with torch.no_grad():
        eager = fewstep.sample(model, noise, process=model.process, solver="dpmpp_2m", steps=6)
    torch.testing.assert_close(second, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first, second)  # the first output was not overwritten by the replay


def test_compiled_loop_refuses_what_is_not_a_fixed_linear_run():
    process = fewstep.DiscreteVP.linear()
    for solver in ("ddpm", "euler_ancestral"):
        with pytest.raises(ValueError, match=f"solver='{solver}' with these options is not linear"):
            accel.LinearPlan.of(process, solver, 5)
    with pytest.raises(ValueError, match="x0_fn is not supported"):
        accel.LinearPlan.of(process, "ddim", 5, x0_fn=fewstep.StaticClipping())
    with pytest.raises(ValueError, match="solver='auto'"):
        accel.LinearPlan.of(process, "auto", 5)
    with pytest.raises(ValueError, match="mode="):
        accel.compile_sampler(_unet_model(), process, mode="fastest")


def test_compile_bad_input():
    model = _unet_model()
    with pytest.raises(ValueError, match="reduce-overhead"):
        accel.compile_model(model, mode="fastest")
    with pytest.raises(ValueError, match="bf16"):
        accel.compile_model(model, dtype="int4")
    with pytest.raises(ValueError, match="backend='no_such_backend' is not available"):
        accel.compile_model(model, backend="no_such_backend")
    with pytest.raises(TypeError, match="DeepCache"):
        accel.compile_model(lambda x, t: x)


# --- quantization --------------------------------------------------------------------------------------------------


def _quant_setup():
    """A tiny UNet on a DDPM process, and the states of an exact sampler (a 64-d Gaussian mixture as 8x8 images): the
    network's input goes from N(0, 1) at t_max to the narrower data (std ~0.55) and its noise embedding moves with t."""
    model = _unet_model(fewstep.DiscreteVP.linear(), channels=(8, 8), attention=())
    exact = fewstep.mixture_nd(dim=64, components=3).model(model.process, "eps")
    kwargs = {"process": model.process, "prediction": "eps", "solver": "euler", "steps": 8}
    states = accel.calibration_states(lambda x, t: exact(x.flatten(1), t).view_as(x), _noise(8, seed=1), **kwargs)
    return model, kwargs, states


def _relative_error(model, quantized, states) -> float:
    with torch.no_grad():
        return max(float((quantized(x, t) - model(x, t)).norm() / model(x, t).norm()) for x, t in states)


def test_quantization_calibrated_across_timesteps_beats_one_timestep():
    model, _, states = _quant_setup()
    assert len(states) == 9 and float(states[0][1][0]) > float(states[-1][1][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-timestep model warns about the mismatch (tested below)
        errors = {
            (w, a, name): _relative_error(model, accel.quantize(model, calib, w, a), states)
            for w, a in ((8, 8), (4, 8))
            for name, calib in (("all", states), ("one", states[-1:]))
        }
    assert errors[8, 8, "all"] < 0.05  # W8A8 calibrated on the sampler's states: within a few percent everywhere
    assert errors[8, 8, "all"] < 0.2 * errors[8, 8, "one"]
    assert errors[4, 8, "all"] < errors[4, 8, "one"]
    assert errors[8, 8, "all"] < errors[4, 8, "all"]


def test_gptq_weights_spread_rounding_error_where_inputs_correlate():
    """GPTQ equals round-to-nearest on the same per-channel grid when the inputs are uncorrelated (diagonal second
    moment), and has a smaller output error than it, tr((W - Q) H (W - Q)^T), when they are correlated."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    scale = quant_module._weight_scale(w, 4, "mse").double()
    nearest = (w / scale[:, None]).round().clamp(-7, 7) * scale[:, None]
    diagonal = torch.diag(torch.rand(24, generator=g, dtype=torch.float64) + 0.5)
    assert torch.allclose(quant_module._gptq(w, diagonal, 4, damp=0.0), nearest, atol=1e-12)
    inputs = torch.randn(500, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 24, generator=g, dtype=torch.float64)
    inputs += 0.1 * torch.randn(500, 24, generator=g, dtype=torch.float64)
    h = inputs.T @ inputs
    q = quant_module._gptq(w, h, 4)
    assert set((q / scale[:, None]).round().unique().tolist()) <= set(range(-7, 8))  # still on the 4-bit grid

    def output_error(rounded):
        return float(torch.trace((w - rounded) @ h @ (w - rounded).T))

    assert output_error(q) < 0.5 * output_error(nearest)


def test_gptq_weights_beat_round_to_nearest_at_w4():
    model, _, states = _quant_setup()
    errors = {rule: _relative_error(model, accel.quantize(model, states, 4, 8, weights=rule), states)
              for rule in ("minmax", "gptq")}  # fmt: skip
    assert errors["gptq"] < 0.8 * errors["minmax"], errors  # measured: 0.095 against 0.138
    with pytest.raises(ValueError, match="weights='awq' is not known; allowed values: minmax, gptq"):
        accel.quantize(model, states, weights="awq")


def test_time_grouped_activation_ranges():
    """One activation range per group of timesteps (TDQ) fits the moving ranges better than one for all; each call
    picks its group by t, and groups split the distinct calibration times into contiguous runs."""
    model, _, states = _quant_setup()
    one, grouped = accel.quantize(model, states, 8, 8), accel.quantize(model, states, 8, 8, time_groups=9)
    assert _relative_error(model, grouped, states) < 0.85 * _relative_error(model, one, states)
    times = sorted({float(t[0]) for _, t in states})
    three = accel.quantize(model, states, 8, 8, time_groups=3)
    assert [three.set_group(torch.tensor([t])) for t in times] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    layer = next(m for m in three.modules() if isinstance(m, quant_module.QuantLayer))
    assert layer.lo.shape == (3,) and bool((layer.lo < layer.hi).all()) and len(set(layer.hi.tolist())) == 3
    with pytest.raises(ValueError, match="time_groups=10 exceeds the 9 distinct calibration times"):
        accel.quantize(model, states, time_groups=10)
    with pytest.raises(ValueError, match="time_groups must be an integer >= 1"):
        accel.quantize(model, states, time_groups=0)


def test_quantization_warns_on_a_calibration_timestep_mismatch():
    model, kwargs, states = _quant_setup()
    noise = _noise(8, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fewstep.sample(accel.quantize(model, states), noise, **kwargs)  # calibrated on this sampler: silent
    with pytest.warns(UserWarning, match="calibrated on states at t in"):
        fewstep.sample(accel.quantize(model, states[-1:]), noise, **kwargs)


def test_dynamic_int8_is_real_int8_and_close():
    model = _unet_model()
    quantized = accel.dynamic_int8(model)
    kinds = {type(m).__module__ for m in quantized.net.modules()}
    assert any("quantized.dynamic" in k for k in kinds)
    assert type(model.net.embed.mlp[0]) is nn.Linear  # the original is untouched
    x, t = _noise(), torch.full((4,), 0.4)
    assert _relative_error(model, quantized, [(x, t)]) < 0.05


def test_int8_kernels_run_the_calibrated_model_on_quantized_ops():
    """The real int8 model uses torch.ao quantized Conv2d / Linear, stays within a few percent of the float model and
    within the output requantization of the simulated one; refusals name what is needed."""
    import torch.ao.nn.quantized as nnq

    model, _, states = _quant_setup()
    simulated = accel.quantize(model, states, 8, 8)
    real = accel.int8_kernels(simulated)
    ops = [m for m in real.modules() if isinstance(m, (nnq.Conv2d, nnq.Linear))]
    kept = [m for m in real.modules() if isinstance(m, quant_module.QuantLayer)]
    assert ops and len(kept) == 1 and kept[0].layer.out_channels == 1  # the output convolution stays simulated
    every = accel.int8_kernels(simulated, keep_output_layer=False)
    assert not any(isinstance(m, quant_module.QuantLayer) for m in every.modules())
    assert _relative_error(model, real, states) < _relative_error(model, every, states)
    sim_err, real_err = _relative_error(model, simulated, states), _relative_error(model, real, states)
    assert real_err < 0.05 and real_err < 2 * sim_err + 0.01, (sim_err, real_err)
    with torch.no_grad():
        gap = max(float((real(x, t) - simulated(x, t)).norm() / simulated(x, t).norm()) for x, t in states)
    assert 0 < gap < 0.05
    with pytest.raises(ValueError, match="a_bits=8, time_groups=1"):
        accel.int8_kernels(accel.quantize(model, states, 8, 8, time_groups=2))
    with pytest.raises(TypeError, match="from fewstep.accel.quantize"):
        accel.int8_kernels(model)
    from fewstep.accel import int8 as int8_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8_module, "_engines", lambda: [])
        with pytest.raises(RuntimeError, match="no quantized CPU engine.*keep the simulated model"):
            accel.int8_kernels(simulated)


def test_quantization_bad_input(monkeypatch):
    model, _, states = _quant_setup()
    with pytest.raises(ValueError, match="w_bits must be an integer in 2..8"):
        accel.quantize(model, states, w_bits=16)
    with pytest.raises(ValueError, match="at least one calibration input"):
        accel.quantize(model, [])
    with pytest.raises(ValueError, match="mse, minmax"):
        accel.quantize(model, states, ranges="p99")
    monkeypatch.setattr(quant_module, "_engines", lambda: [])
    with pytest.raises(RuntimeError, match="simulated"):
        accel.dynamic_int8(model)


# --- T-Stitch -----------------------------------------------------------------------------------------------------


def test_shipped_small_model_stitches_early_not_late():
    """T-Stitch's premise on the shipped pair (digits_vp_small, digits_vp): the small model for the first 40 % of a
    20-step DDIM run costs little FD, for the last 40 % much more; 500 samples of seed 0 (measured: large 1.93,
    small first 2.37, small alone 4.33)."""
    from fewstep.shipped import load_model
    from fewstep.tools.evaluate import sample_metrics

    large, small = load_model("digits_vp"), load_model("digits_vp_small")
    assert (repr(small.process), small.prediction) == (repr(large.process), large.prediction)
    kwargs = {"process": large.process, "prediction": "eps", "solver": "ddim", "steps": 20}
    noise, ts = torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)), accel.sampling_grid(large.process, 20)
    early = accel.Stitch(small.model, large.model, fraction=0.4).plan(ts)
    late = accel.Stitch(large.model, small.model, fraction=0.6).plan(ts)
    with torch.no_grad():
        fd = {name: sample_metrics(fewstep.sample(model, noise, **kwargs))["fd"]
              for name, model in (("large", large.model), ("small", small.model), ("early", early), ("late", late))}  # fmt: skip
    # late's "large" slot holds the small model: the last 8 grid points and the final denoising call
    assert early.counts["small"] == 8 and late.counts["large"] == 8 + 1
    assert fd["early"] < 1.4 * fd["large"] and fd["early"] < 0.75 * fd["small"] and fd["early"] < fd["late"], fd


def test_stitch_equals_the_two_stage_sample_of_exact_mixtures():
    """small = one exact mixture, large = another: the stitched Euler run is run small to the switch, then large."""
    process = fewstep.VP("linear")
    small = fewstep.mixture_nd(dim=3, components=2, seed=1).model(process, "eps")
    large = fewstep.mixture_nd(dim=3, components=3, seed=2).model(process, "eps")
    noise = _noise(5, (3,)).double()
    steps, k = 10, 4
    ts = accel.sampling_grid(process, steps)
    stitch = accel.Stitch(small, large, fraction=k / steps).plan(ts)
    common = {"process": process, "prediction": "eps", "solver": "euler"}
    out = fewstep.sample(stitch, noise, steps=steps, **common)
    first = fewstep.sample(small, noise, steps=k, schedule=ts[: k + 1], t_end=float(ts[k]), denoise_to_zero=False, **common)
    sigma = float(process.sigma(ts[k]))
    second = fewstep.sample(large, first / sigma, steps=steps - k, schedule=ts[k:], t_start=float(ts[k]), **common)
    torch.testing.assert_close(out, second, rtol=1e-12, atol=1e-12)
    assert stitch.counts == {"small": k, "large": steps - k + 1}  # + the final denoising at t_end
    assert not torch.allclose(out, fewstep.sample(large, noise, steps=steps, **common))


def test_stitch_by_time_and_bad_input():
    process = fewstep.EDM()
    calls = []
    stitch = accel.Stitch(lambda x, t: calls.append("s") or x, lambda x, t: calls.append("l") or x, time=1.0)
    for t in (5.0, 1.0, 0.5):
        stitch(torch.zeros(2, 1), torch.full((2,), t))
    assert calls == ["s", "l", "l"] and stitch.process is None
    with pytest.raises(ValueError, match="exactly one of fraction"):
        accel.Stitch(lambda x, t: x, lambda x, t: x)
    with pytest.raises(ValueError, match="fraction must be in"):
        accel.Stitch(lambda x, t: x, lambda x, t: x, fraction=1.5)
    with pytest.raises(RuntimeError, match="plan"):
        accel.Stitch(lambda x, t: x, lambda x, t: x, fraction=0.5)(torch.zeros(1, 1), torch.ones(1))
    assert process.t_max > 1.0


def test_bench_speed_runs_the_chosen_groups_against_the_plain_model():
    from fewstep.tools.bench_speed import bench_speed, report

    result = bench_speed("digits_vp", steps=5, n=16, batch=8, groups=("stitch",), log=lambda line: None)
    labels = [row.label for row in result.rows]
    assert labels == ["plain (eager fp32)", "small model alone (digits_vp_small)"] + [
        f"T-Stitch: first {f}% of the steps on digits_vp_small" for f in (20, 40, 60)]
    plain, small = result.rows[0], result.rows[1]
    assert plain.speedup == 1.0 and plain.nfe == small.nfe == 6  # 5 steps + the final denoising evaluation
    assert small.flops < 0.5 * plain.flops  # half the channel widths
    stitched = [row.flops for row in result.rows[2:]]
    assert plain.flops > stitched[0] > stitched[1] > stitched[2] > small.flops  # more steps on the small model
    assert "T-Stitch: first 40%" in report(result) and "decide with --n 2048" in report(result)
    with pytest.raises(ValueError, match="groups: gpu not known; allowed values: cache, forecast, compile, quant, stitch"):
        bench_speed("digits_vp", groups=("gpu",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 10 steps: the interval-3 caches warn that they save little
        result = bench_speed("digits_vp", steps=10, n=8, batch=8, groups=("forecast",), log=lambda line: None)
    rows = result.rows[1:]
    assert [row.label for row in rows][:2] == [f"DeepCache interval 2, depth 1, forecast {k}" for k in (1, 2)]
    assert len(rows) == 6
    assert all(row.group == "forecast" and row.flops < result.rows[0].flops for row in rows)


def test_bench_speed_times_a_whole_compiled_loop_like_a_model():
    from fewstep.shipped import load_model
    from fewstep.tools.bench_speed import _Runner

    loaded = load_model("digits_vp")
    noise = _noise(8)
    runner = _Runner(loaded, "dpmpp_2m", 4, noise, 4, lambda x: float(x.std()), baseline=loaded.model)
    loop = accel.compile_sampler(loaded.model, loaded.process, loaded.prediction, "dpmpp_2m", 4, mode=None)
    plain, row = runner.run("plain", "plain", loaded.model), runner.run("loop", "compile", loop, flops=1.0)
    assert row.nfe == plain.nfe == 5 and row.fd == pytest.approx(plain.fd, rel=1e-5)  # the same samples


def test_pooled_fd_separates_real_from_shuffled_images():
    from fewstep.data import load_dataset
    from fewstep.tools.bench_learned import pooled_digits_fd

    digits = load_dataset("digits")
    big = torch.nn.functional.interpolate(digits, size=(24, 24), mode="nearest")  # 8x8 digits blown up 3x
    fd = pooled_digits_fd(big[:900])
    shuffled = big[900:].flatten(1)[:, torch.randperm(576, generator=torch.Generator().manual_seed(0))].view_as(big[900:])
    assert fd(big[900:]) < 5 and fd(shuffled) > 20 * fd(big[900:])
