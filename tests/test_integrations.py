"""fewstep.integrations: the diffusers scheduler, diffusers model adapters, CFG over keyword conditioning, and the
k-diffusion convention both ways.

Every comparison is numeric: the scheduler driven by a diffusers-style loop against `fewstep.sample` on the same model
and grid (float64), against diffusers' own DDIM / FlowMatchEuler schedulers where the algorithms coincide, and
k-diffusion-style samplers against fewstep's Euler/Heun. Models: exact Gaussian mixtures and tiny random-weight
diffusers UNets built from configs (nothing downloaded).
"""

import math
import threading

import pytest
import torch

import fewstep
from fewstep.integrations import convention, handoff
from fewstep.integrations.handoff import evaluation_plan
from fewstep.integrations.k_diffusion import k_sigma, kdiffusion_sampling

diffusers = pytest.importorskip("diffusers", reason="the diffusers integration needs the dev extra (pip install -e .[dev])")
from fewstep.integrations.scheduler import FewstepScheduler  # noqa: E402  (needs diffusers)

diffusers.utils.logging.set_verbosity_error()

MIXTURE = fewstep.mixture_nd(dim=6, components=4)
NOISE = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
DDPM = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)
PARITY = 1e-6  # the target (float64); measured: 0 to 3e-16
DETERMINISTIC = ["ddim", "dpmpp_2m", "deis", "ipndm", "unipc", "dpmpp_3m", "heun", "dpmpp_2s", "dpm_solver_3", "pndm", "lms"]
STOCHASTIC = ["euler_ancestral", "sde_dpmpp_2m", "ddpm"]


def run_pipeline_loop(scheduler, model, noise, steps, *, generator=None, time_of=None, **set_kwargs):
    """A diffusers pipeline's loop (latents * init_noise_sigma, scale_model_input, model at each timestep, step)."""
    scheduler.set_timesteps(steps, **set_kwargs)
    conv = scheduler._convention
    time_of = time_of or (lambda k: conv.time(k))
    x = noise * scheduler.init_noise_sigma
    outputs = []
    for k in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, k)
        out = scheduler.step(model(x_in, time_of(k).expand(x.shape[0])), k, x, generator=generator)
        outputs.append(out)
        x = out.prev_sample
    return x, outputs


def tiny_unet(**extra):
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=4)  # fmt: skip
    return diffusers.UNet2DModel(**config, **extra).double().eval()


# --- FewstepScheduler: parity with fewstep.sample ---------------------------------------------------------------


@pytest.mark.parametrize("solver", DETERMINISTIC + STOCHASTIC)
def test_scheduler_loop_equals_fewstep_sample_on_exact_mixture(solver):
    scheduler = FewstepScheduler.from_config(diffusers.DDPMScheduler(**DDPM).config, solver=solver)
    process = scheduler._convention.process
    model = MIXTURE.model(process, "eps")
    g = torch.Generator().manual_seed(1) if solver in STOCHASTIC else None
    got, outs = run_pipeline_loop(scheduler, model, NOISE, 6, generator=g)
    g = torch.Generator().manual_seed(1) if solver in STOCHASTIC else None
    ref = fewstep.sample(model, NOISE, process=process, solver=solver, steps=6, generator=g)
    assert (got - ref).abs().max().item() <= PARITY
    assert len(scheduler.timesteps) == ref.nfe  # one timestep per network evaluation
    # the data prediction of the last evaluation is the final sample (denoise_to_zero)
    assert torch.equal(outs[-1].pred_original_sample, outs[-1].denoised)
    assert (outs[-1].denoised - got).abs().max().item() <= PARITY


def test_singlestep_solvers_expose_their_intermediate_times_and_order():
    for solver, per_step in (("heun", 2), ("dpm_solver_3", 3), ("dpmpp_3m", 1)):
        scheduler = FewstepScheduler(**DDPM, solver=solver, schedule="logsnr")
        scheduler.set_timesteps(5)
        assert scheduler.order == per_step
        plan = scheduler._plan
        assert len(scheduler.timesteps) == 5 * per_step + 1  # + the final denoising evaluation
        grid = fewstep.time_grid(scheduler._convention.process, 5, 1.0, 1e-3, "logsnr")
        starts = [plan.times[j * per_step] for j in range(5)]
        assert starts == pytest.approx(grid[:5].tolist(), abs=0)
        assert scheduler.timesteps.tolist() == pytest.approx([t * 1000 - 1 for t in plan.times], abs=1e-9)


def test_scheduler_with_unet_equals_sample_of_from_diffusers_model():
    unet = tiny_unet()
    config = diffusers.DDPMScheduler(**DDPM, prediction_type="v_prediction").config
    model, process, prediction = fewstep.from_diffusers(unet, config)
    assert prediction == "v"
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for solver in ("dpmpp_2m", "heun", "unipc"):
        scheduler = FewstepScheduler.from_config(config, solver=solver)
        scheduler.set_timesteps(4)
        x = noise * scheduler.init_noise_sigma
        with torch.no_grad():
            for k in scheduler.timesteps:
                x = scheduler.step(unet(scheduler.scale_model_input(x, k), k).sample, k, x).prev_sample
            ref = fewstep.sample(model, noise, process=process, prediction=prediction, solver=solver, steps=4)
        assert (x - ref).abs().max().item() <= PARITY, solver


def test_ddpm_pipeline_runs_fewstep_scheduler_end_to_end():
    unet = tiny_unet()
    scheduler = FewstepScheduler.from_config(diffusers.DDPMScheduler(**DDPM).config, solver="unipc")
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5, output_type="np").images
    # DDPMPipeline starts from randn (no init_noise_sigma): the state at t_max is the noise itself.
    noise = diffusers.utils.torch_utils.randn_tensor(
        (2, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    model, process, prediction = fewstep.from_diffusers(unet, scheduler.config)
    with torch.no_grad():
        ref = fewstep.sample(
            model, noise / float(process.sigma(1.0)), process=process, prediction=prediction, solver="unipc", steps=5
        )
    expected = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - expected).max() <= PARITY


def test_scheduler_matches_diffusers_ddim_on_its_own_timesteps():
    unet = tiny_unet()
    # "leading" (the default): DDIM steps from k to k - N // n, consistent with its own timesteps only there
    ddim = diffusers.DDIMScheduler(**DDPM, set_alpha_to_one=True, timestep_spacing="leading")
    ddim.set_timesteps(6)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mine = FewstepScheduler.from_config(ddim.config, solver="ddim")
    mine.set_timesteps(timesteps=ddim.timesteps)
    assert len(mine.timesteps) == len(ddim.timesteps)
    assert mine.timesteps.tolist() == ddim.timesteps.double().tolist()
    xs = []
    for sched in (ddim, mine):
        x = noise.clone()
        with torch.no_grad():
            for k in sched.timesteps:
                x = sched.step(unet(x, k).sample, k, x).prev_sample
        xs.append(x)
    # diffusers keeps alphas_cumprod in float32: agreement to float32 round-off
    assert (xs[0] - xs[1]).abs().max().item() < 1e-5


def test_scheduler_state_is_reset_by_set_timesteps_and_bad_steps_are_refused():
    scheduler = FewstepScheduler(**DDPM, solver="dpmpp_3m")
    process = scheduler._convention.process
    model = MIXTURE.model(process, "eps")
    fresh, _ = run_pipeline_loop(scheduler, model, NOISE, 6)
    # abandon a run after three evaluations; the next run must not see its multistep history
    scheduler.set_timesteps(6)
    x = NOISE * scheduler.init_noise_sigma
    for k in scheduler.timesteps[:3]:
        x = scheduler.step(model(x, process.time_from_timestep(k).expand(8)), k, x).prev_sample
    assert scheduler.step_index == 3
    again, _ = run_pipeline_loop(scheduler, model, NOISE, 6)
    assert torch.equal(again, fresh)
    for _ in range(50):  # the abandoned worker has unwound
        if not any(t.name == "fewstep-solver" and t.is_alive() for t in threading.enumerate()):
            break
        threading.Event().wait(0.01)
    assert not any(t.name == "fewstep-solver" and t.is_alive() for t in threading.enumerate())
    k_last = scheduler.timesteps[-1]
    with pytest.raises(ValueError, match="all 7 evaluations of this run are done"):
        scheduler.step(torch.zeros_like(NOISE), k_last, NOISE)
    scheduler.set_timesteps(6)
    with pytest.raises(ValueError, match="timestep=500.0 is not the timestep of evaluation 0"):
        scheduler.set_begin_index(0)
        scheduler.step(torch.zeros_like(NOISE), 500.0, NOISE)
    scheduler.set_timesteps(6)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(torch.zeros(8, 5, dtype=torch.float64), scheduler.timesteps[0], NOISE)
    with pytest.raises(ValueError, match="call set_timesteps before step"):
        FewstepScheduler().step(NOISE, 999.0, NOISE)


@pytest.fixture(params=["greenlet", "thread"])
def backend(request, monkeypatch):
    """The hand-off that drives fewstep.sample: a greenlet (where installed) or the worker-thread fallback."""
    if request.param == "thread":
        monkeypatch.setattr(handoff, "greenlet", None)
    elif handoff.greenlet is None:
        pytest.skip("greenlet is not installed")
    return request.param


def test_abandoned_scheduler_releases_its_solver_and_churn_at_start_is_refused(backend):
    import gc
    import weakref

    scheduler = FewstepScheduler(**DDPM, solver="unipc")
    process = scheduler._convention.process
    scheduler.set_timesteps(5)
    x = NOISE * scheduler.init_noise_sigma
    for k in scheduler.timesteps[:2]:
        x = scheduler.step(MIXTURE.model(process, "eps")(x, process.time_from_timestep(k).expand(8)), k, x).prev_sample
    if backend == "thread":
        thread = scheduler._thread._thread
        assert isinstance(scheduler._thread, handoff.SolverThread) and thread.is_alive()
    else:
        assert isinstance(scheduler._thread, handoff.SolverGreenlet) and not scheduler._thread._glet.dead
        glet = weakref.ref(scheduler._thread._glet)
    del scheduler
    gc.collect()
    if backend == "thread":
        thread.join(timeout=5)
        assert not thread.is_alive()
    else:
        assert glet() is None  # collected, hence unwound (greenlet throws GreenletExit into a collected greenlet)
    churn = FewstepScheduler(**DDPM, solver="edm_sde")  # sigma/alpha 40 <= s_tmax = 50: churn before evaluation 0
    with pytest.raises(ValueError, match="changes the state before its first evaluation"):
        churn.set_timesteps(sigmas=[40.0, 10.0, 1.0, 0.1, 0.0])


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "euler_ancestral"])
def test_thread_and_greenlet_hand_offs_give_the_same_samples(solver, monkeypatch):
    scheduler = FewstepScheduler(**DDPM, solver=solver)
    model = MIXTURE.model(scheduler._convention.process, "eps")
    runs = []
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(handoff, "greenlet", None)
        x, _ = run_pipeline_loop(scheduler, model, NOISE, 5, generator=torch.Generator().manual_seed(4))
        kind = handoff.SolverThread if fallback else (handoff.SolverGreenlet if handoff.greenlet else handoff.SolverThread)
        assert isinstance(scheduler._thread, kind)
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_hand_off_keeps_each_sides_autograd_mode(backend):
    """fewstep.sample runs its loop under no_grad; the pipeline's own mode survives every step() and an abandoned run."""
    scheduler = FewstepScheduler(**DDPM, solver="dpmpp_2m")
    process = scheduler._convention.process
    model = MIXTURE.model(process, "eps")
    weight = torch.ones((), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        scheduler.set_timesteps(4)
        x = NOISE * scheduler.init_noise_sigma
        for k in scheduler.timesteps[:3]:
            out = model(x, process.time_from_timestep(k).expand(8)) * weight
            assert out.requires_grad  # the pipeline's side records gradients ...
            x = scheduler.step(out, k, x).prev_sample
            assert torch.is_grad_enabled() and not x.requires_grad  # ... the solver's does not
        scheduler.set_timesteps(4)  # abandons the run: unwinding it leaves our mode alone
        assert torch.is_grad_enabled()
    with torch.no_grad():
        run_pipeline_loop(scheduler, model, NOISE, 4)
        assert not torch.is_grad_enabled()


def test_set_timesteps_keeps_its_plan_but_hands_out_fresh_tensors():
    scheduler = FewstepScheduler(**DDPM, solver="heun")
    scheduler.set_timesteps(5)
    first, sigmas, plan = scheduler.timesteps, scheduler.sigmas, scheduler._plan
    first.zero_()  # a pipeline that edits the tensors it was given does not change the next run
    scheduler.set_timesteps(5)
    assert scheduler._plan is plan and scheduler.timesteps is not first and scheduler.sigmas is not sigmas
    assert scheduler.timesteps[0].item() == 999.0 and scheduler.order == 2
    scheduler.set_timesteps(3)
    assert len(scheduler.timesteps) == 7 and scheduler._plan is not plan
    scheduler.set_timesteps(timesteps=[999, 500, 100])
    assert scheduler.timesteps.tolist()[::2] == [999.0, 500.0, 100.0]
    with pytest.raises(ValueError, match="num_inference_steps"):  # equal to 5 but not an int: refused, not reused
        scheduler.set_timesteps(5.0)


def test_img2img_begin_index_and_add_noise_equal_sample_from_that_time():
    scheduler = FewstepScheduler(**DDPM, solver="dpmpp_2m")
    process = scheduler._convention.process
    model = MIXTURE.model(process, "eps")
    scheduler.set_timesteps(8)
    start = 3 * scheduler.order  # the img2img pipelines' t_start * order
    timesteps = scheduler.timesteps[start:]
    scheduler.set_begin_index(start)
    x0 = MIXTURE.sample(8, generator=torch.Generator().manual_seed(2)).double()
    x = scheduler.add_noise(x0, NOISE, timesteps[:1].repeat(8))
    t_start = float(process.time_from_timestep(timesteps[0]))
    assert (x - process.add_noise(x0, t_start, NOISE)).abs().max().item() < 1e-15
    for k in timesteps:
        x = scheduler.step(model(x, process.time_from_timestep(k).expand(8)), k, x).prev_sample
    grid = scheduler._grid[3:]
    ref = fewstep.sample(model, process.add_noise(x0, t_start, NOISE) / float(process.sigma(t_start)), process=process,
                         solver="dpmpp_2m", steps=len(grid) - 1, schedule=grid)  # fmt: skip
    assert (x - ref).abs().max().item() <= PARITY
    heun = FewstepScheduler(**DDPM, solver="heun")
    heun.set_timesteps(4)
    with pytest.raises(ValueError, match="begin_index=3 is not the first evaluation of a step.*allowed values: 0, 2, 4, 6"):
        heun.set_begin_index(3)


def test_per_sample_generators_and_clip_sample_follow_fewstep_sample():
    scheduler = FewstepScheduler.from_config(diffusers.DDIMScheduler(**{**DDPM, "clip_sample": True}).config, solver="ddpm")
    process = scheduler._convention.process
    model = MIXTURE.model(process, "eps")
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    got, _ = run_pipeline_loop(scheduler, model, NOISE, 5, generator=gens)
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    ref = fewstep.sample(model, NOISE, process=process, solver="ddpm", steps=5, generator=gens, x0_fn=fewstep.StaticClipping(1.0))
    assert (got - ref).abs().max().item() <= PARITY
    assert got.abs().max() <= 1.0 + 1e-12  # the final data prediction was clipped


def test_zero_terminal_snr_config():
    config = diffusers.DDPMScheduler(**DDPM, rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    scheduler = FewstepScheduler.from_config(config, solver="unipc")
    process = scheduler._convention.process
    assert process.zero_terminal_snr and float(process.alpha(1.0)) == 0.0
    ours = diffusers.DDPMScheduler(**DDPM, rescale_betas_zero_snr=True).alphas_cumprod.double()
    assert (process.alphas_cumprod - ours).abs().max().item() < 1e-6
    model = MIXTURE.model(process, "v")
    got, _ = run_pipeline_loop(scheduler, model, NOISE, 6)
    assert scheduler.init_noise_sigma == 1.0
    ref = fewstep.sample(model, NOISE, process=process, prediction="v", solver="unipc", steps=6)
    assert (got - ref).abs().max().item() <= PARITY
    with pytest.raises(ValueError, match="prediction='eps' cannot give the data prediction at t_start=1.0"):
        FewstepScheduler.from_config({**config, "prediction_type": "epsilon"}).set_timesteps(6)


# --- flow matching ----------------------------------------------------------------------------------------------


def flow_config(**kw):
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **kw).config


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "unipc", "euler"])
def test_flow_scheduler_equals_sample_on_shifted_flow(solver):
    scheduler = FewstepScheduler.from_config(flow_config(), solver=solver)
    process = scheduler._convention.process
    assert isinstance(process, fewstep.ShiftedFlow) and process.shift == 3.0
    model = MIXTURE.model(process, "velocity")
    got, _ = run_pipeline_loop(scheduler, model, NOISE, 6)
    assert scheduler.timesteps[0].item() == 1000.0  # flow convention: timestep = 1000 sigma
    ref = fewstep.sample(model, NOISE, process=process, prediction="velocity", solver=solver, steps=6)
    assert (got - ref).abs().max().item() <= PARITY
    default_grid = fewstep.time_grid(process, 6, 1.0, 0.0)  # the shifted grid is the process's default
    assert torch.allclose(default_grid, fewstep.integrations.flow.shift_time(torch.linspace(1, 0, 7, dtype=torch.float64), 3.0))


def test_flow_euler_matches_flow_match_euler_and_dynamic_shift():
    n = 6
    u = torch.linspace(1.0, 1.0 / n, n).tolist()  # what the FLUX/SD3 pipelines pass as sigmas
    ref_sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref_sched.set_timesteps(sigmas=u)
    model = MIXTURE.model(fewstep.RectifiedFlow(), "velocity")
    x = NOISE.float()
    for k in ref_sched.timesteps:
        x = ref_sched.step(model(x.double(), (k / 1000).double().expand(8)).float(), k, x).prev_sample
    mine = FewstepScheduler.from_config(flow_config(), solver="euler")
    got, _ = run_pipeline_loop(mine, model, NOISE, None, sigmas=u)
    assert mine.timesteps.tolist() == pytest.approx(ref_sched.timesteps.tolist(), rel=1e-6)
    assert (got.float() - x).abs().max().item() < 1e-5  # diffusers works in float32
    dynamic = FewstepScheduler.from_config(flow_config(use_dynamic_shifting=True), solver="euler")
    with pytest.raises(ValueError, match="mu must be passed"):
        dynamic.set_timesteps(n)
    got_mu, _ = run_pipeline_loop(dynamic, model, NOISE, None, sigmas=u, mu=math.log(3.0))
    assert (got_mu - got).abs().max().item() < 1e-12


# --- configuration errors ---------------------------------------------------------------------------------------


def test_bad_configs_and_options_are_clear_value_errors():
    with pytest.raises(ValueError, match="beta_schedule='sigmoidal' is not known; allowed values: linear, scaled_linear"):
        FewstepScheduler(beta_schedule="sigmoidal")
    with pytest.raises(ValueError, match="prediction_type='noise' is not known; allowed values: epsilon, v_prediction"):
        FewstepScheduler.from_config({**DDPM, "prediction_type": "noise"})
    with pytest.raises(ValueError, match="solver='dpmpp_9m' is not known"):
        FewstepScheduler(solver="dpmpp_9m")
    with pytest.raises(ValueError, match="solver='dpm_adaptive' cannot run as a diffusers scheduler"):
        FewstepScheduler(solver="dpm_adaptive")
    with pytest.raises(ValueError, match="does not take option"):
        FewstepScheduler(solver="unipc", solver_options={"eta": 1.0})
    with pytest.raises(ValueError, match="from_config does not take solver_option"):
        FewstepScheduler.from_config(DDPM, solver_option={"order": 2})
    with pytest.raises(ValueError, match="schedule='loglinear' is not known"):
        FewstepScheduler(schedule="loglinear")
    with pytest.raises(ValueError, match="EDM-preconditioned"):
        FewstepScheduler.from_config(diffusers.EDMEulerScheduler().config)
    with pytest.raises(ValueError, match="timestep_spacing='uniform' is not known"):
        FewstepScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="budget='time' is not known"):
        FewstepScheduler(budget="time")


def test_config_round_trip_and_budget_and_spacing(tmp_path):
    scheduler = FewstepScheduler.from_config(flow_config(), solver="unipc", solver_options={"order": 2}, schedule="quadratic")
    scheduler.save_pretrained(tmp_path)
    loaded = FewstepScheduler.from_pretrained(tmp_path)
    assert loaded.config.solver == "unipc" and loaded.config.solver_options == {"order": 2}
    assert loaded.config.prediction_type == "flow_prediction" and loaded.config.shift == 3.0
    scheduler.set_timesteps(5)
    loaded.set_timesteps(5)
    assert torch.equal(scheduler.timesteps, loaded.timesteps)
    nfe = FewstepScheduler(**DDPM, solver="heun", budget="nfe")
    nfe.set_timesteps(7)
    assert len(nfe.timesteps) == 7  # num_inference_steps counted as network evaluations
    spaced = FewstepScheduler(**DDPM, solver="ddim", schedule="diffusers", timestep_spacing="trailing")
    spaced.set_timesteps(4)
    assert spaced.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0, 0.0]


# --- from_diffusers, model_kwargs, CFG ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_from_diffusers_process_matches_diffusers_alphas_cumprod(schedule):
    config = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).config
    conv = convention(config)
    ref = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.double()
    assert (conv.process.alphas_cumprod - ref).abs().max().item() < 1e-6
    assert conv.timestep(torch.tensor(1.0, dtype=torch.float64)).item() == 999.0
    assert conv.time(torch.tensor(0)).item() == pytest.approx(1e-3)


def test_from_diffusers_passes_timesteps_and_model_kwargs():
    unet = tiny_unet(num_class_embeds=5)
    calls = []
    forward = unet.forward

    def spy(sample, timestep, **kwargs):
        calls.append((timestep.clone(), kwargs["class_labels"].clone()))
        return forward(sample, timestep, **kwargs)

    unet.forward = spy
    model, process, prediction = fewstep.from_diffusers(unet, diffusers.DDPMScheduler(**DDPM))
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        x = fewstep.sample(model, noise, process=process, solver="ddim", steps=2, model_kwargs={"class_labels": labels})
        t = torch.full((3,), 1.0, dtype=torch.float64)
        by_hand = unet(noise * float(process.sigma(1.0)), t * 1000 - 1, class_labels=labels).sample
    assert x.nfe == 3
    assert torch.equal(calls[0][0], torch.full((3,), 999.0, dtype=torch.float64))
    assert torch.equal(calls[0][1], labels)
    first = model(noise * float(process.sigma(1.0)), t, class_labels=labels)
    assert torch.equal(first, by_hand)
    with pytest.raises(ValueError, match=r"model_kwargs\['class_labels'\] has shape \(2,\)"):
        fewstep.sample(model, noise, process=process, steps=2, model_kwargs={"class_labels": labels[:2]})
    with pytest.raises(ValueError, match=r"model_kwargs\['class_labels'\] must have shape \[batch=3\]"):
        model(noise, t, class_labels=labels[:, None])


def test_model_kwargs_with_per_sample_solver_slice_the_conditioning():
    def conditional(x, t, shift):
        return MIXTURE.model(fewstep.DiscreteVP.linear(), "eps")(x + shift, t)

    process = fewstep.DiscreteVP.linear()
    shift = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64)[:, None].expand(8, 6)
    x = fewstep.sample(conditional, NOISE, process=process, solver="dpm_adaptive", steps=1, per_sample=True,
                       model_kwargs={"shift": shift})  # fmt: skip
    rows = [fewstep.sample(lambda x, t, b=b: conditional(x, t, shift[b : b + 1]), NOISE[b : b + 1], process=process,
                           solver="dpm_adaptive", steps=1, per_sample=True) for b in range(8)]  # fmt: skip
    assert torch.equal(x, torch.cat(rows))


def test_cfg_kwargs_guides_and_counts_two_evaluations():
    def conditional(x, t, shift, scale=1.0):
        return scale * MIXTURE.model(fewstep.DiscreteVP.linear(), "eps")(x + shift, t)

    process = fewstep.DiscreteVP.linear()
    cond = {"shift": torch.full((8, 6), 0.3, dtype=torch.float64), "scale": 1.0}
    uncond = {"shift": torch.zeros(1, 6, dtype=torch.float64), "scale": 1.0}
    guided = fewstep.cfg_kwargs(conditional, cond, uncond, 4.0)
    t = torch.full((8,), 0.5, dtype=torch.float64)
    expected = conditional(NOISE, t, 0.0) + 4.0 * (conditional(NOISE, t, 0.3) - conditional(NOISE, t, 0.0))
    assert (guided(NOISE, t) - expected).abs().max().item() < 1e-14
    x = fewstep.sample(guided, NOISE, process=process, solver="dpmpp_2m", steps=5)
    assert x.nfe == 12 == fewstep.nfe_for_steps("dpmpp_2m", 5, process, guidance=guided)
    assert fewstep.steps_for_nfe("dpmpp_2m", 12, process, guidance=guided) == 5
    with pytest.raises(ValueError, match=r"cond\['scale'\] and uncond\['scale'\] differ"):
        fewstep.cfg_kwargs(conditional, cond, {**uncond, "scale": 2.0}, 4.0)
    with pytest.raises(ValueError, match="same keys"):
        fewstep.cfg_kwargs(conditional, cond, {"shift": uncond["shift"]}, 4.0)


# --- k-diffusion --------------------------------------------------------------------------------------------------


def k_euler(denoiser, x, sigmas, heun=False):
    """k-diffusion's sample_euler / sample_heun (Karras et al. 2022, Algorithm 1 without churn), in a few lines."""
    for i in range(len(sigmas) - 1):
        d = (x - denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if not heun or sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoiser(x2, sigmas[i + 1] * x.new_ones(x.shape[0]))) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


@pytest.mark.parametrize("process", [fewstep.DiscreteVP.linear(), fewstep.VP("cosine"), fewstep.EDM()], ids=repr)
def test_to_k_diffusion_euler_heun_equal_fewstep(process):
    model = MIXTURE.model(process, "v")
    denoiser = fewstep.to_k_diffusion(model, process, "v")
    ts = fewstep.time_grid(process, 7, process.t_max, process.t_min, "karras")
    sigmas = torch.tensor([k_sigma(process, float(t)) for t in ts] + [0.0], dtype=torch.float64)
    for solver in ("euler", "heun"):
        got = k_euler(denoiser, NOISE * sigmas[0], sigmas, heun=solver == "heun")
        ref = fewstep.sample(model, NOISE, process=process, prediction="v", solver=solver, space="edm", schedule=ts, steps=7)
        assert (got - ref).abs().max().item() <= 1e-10, solver
    kd = kdiffusion_sampling()
    if kd is None:
        return  # k-diffusion is absent: only its own samplers are skipped
    for name, solver in (("sample_euler", "euler"), ("sample_heun", "heun"), ("sample_dpmpp_2m", "dpmpp_2m")):
        got = getattr(kd, name)(denoiser, NOISE * sigmas[0], sigmas, disable=True)
        options = {} if solver == "dpmpp_2m" else {"space": "edm"}
        ref = fewstep.sample(model, NOISE, process=process, prediction="v", solver=solver, schedule=ts, steps=7, **options)
        assert (got - ref).abs().max().item() <= 1e-10, name


def test_from_k_diffusion_round_trip_and_range():
    process = fewstep.DiscreteVP.cosine()
    model = MIXTURE.model(process, "eps")
    denoiser = fewstep.to_k_diffusion(model, process, "eps")
    model2, edm, prediction = fewstep.from_k_diffusion(denoiser)  # sigma_min / sigma_max read from the denoiser
    assert isinstance(edm, fewstep.EDM) and prediction == "x0"
    assert edm.t_max == pytest.approx(k_sigma(process, 1.0))
    ts = fewstep.time_grid(process, 8, 1.0, process.t_min, "logsnr")
    edm_grid = torch.tensor([k_sigma(process, float(t)) for t in ts], dtype=torch.float64)
    for solver in ("ddim", "dpmpp_2m", "unipc"):
        got = fewstep.sample(model2, NOISE, process=edm, prediction=prediction, solver=solver, schedule=edm_grid, steps=8)
        ref = fewstep.sample(model, NOISE, process=process, solver=solver, schedule=ts, steps=8)
        assert (got - ref).abs().max().item() <= 1e-10, solver
    with pytest.raises(ValueError, match="sigma must lie in"):
        denoiser(NOISE, torch.full((8,), 2 * denoiser.sigma_max, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min is needed"):
        fewstep.from_k_diffusion(lambda x, sigma: x)


def test_from_k_diffusion_of_a_discrete_eps_wrapped_diffusers_unet():
    """CompVis/DiscreteEpsDDPMDenoiser-style wrapping (c_in = 1/sqrt(sigma^2 + 1), x0 = x - sigma eps) of a diffusers
    UNet, on integer timesteps, equals the same UNet through from_diffusers (DDIM is the same ODE step in both)."""
    unet = tiny_unet()
    config = diffusers.DDPMScheduler(**DDPM).config
    model, process, prediction = fewstep.from_diffusers(unet, config)
    ac = process.alphas_cumprod

    class DiscreteEps:
        sigmas = ((1 - ac) / ac).sqrt()
        sigma_min, sigma_max = sigmas[0], sigmas[-1]

        def __call__(self, x, sigma):
            k = (sigma[:, None] - self.sigmas[None]).abs().argmin(dim=1)  # quantized to the training timesteps
            eps = unet(x / (sigma**2 + 1).sqrt()[:, None, None, None], k.double()).sample
            return x - sigma[:, None, None, None] * eps

    kmodel, edm, kpred = fewstep.from_k_diffusion(DiscreteEps())
    kd = kdiffusion_sampling()
    wrapped = [DiscreteEps()]
    if kd is not None:
        import k_diffusion.external as external

        wrapped.append(external.DiscreteEpsDDPMDenoiser(lambda x, t: unet(x, t).sample, ac, quantize=True))
    timesteps = torch.tensor([999, 700, 400, 150, 40, 0], dtype=torch.float64)
    grid = process.time_from_timestep(timesteps)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ref = fewstep.sample(model, noise, process=process, prediction=prediction, solver="ddim", schedule=grid, steps=5)
        for denoiser in wrapped:
            kmodel, edm, kpred = fewstep.from_k_diffusion(denoiser)
            edm_grid = torch.tensor([k_sigma(process, float(t)) for t in grid], dtype=torch.float64)
            got = fewstep.sample(kmodel, noise, process=edm, prediction=kpred, solver="ddim", schedule=edm_grid, steps=5)
            assert (got - ref).abs().max().item() <= 1e-10


# --- fewstep.sample boundaries ----------------------------------------------------------------------------------


def test_per_sample_times_are_refused_clearly():
    process = fewstep.DiscreteVP.linear()
    model = MIXTURE.model(process, "eps")
    for name in ("t_start", "t_end"):
        with pytest.raises(ValueError, match=f"{name} must be a number; per-sample times"):
            fewstep.sample(model, NOISE, process=process, steps=3, **{name: torch.full((8,), 0.5)})
    with pytest.raises(ValueError, match="t_start must be a number; per-sample times"):
        fewstep.sample(model, NOISE, process=process, steps=3, t_start=[0.9] * 8)


def test_evaluation_plan_detects_state_changes_before_the_first_evaluation():
    process = fewstep.EDM()
    grid = fewstep.time_grid(process, 4, process.t_max, process.t_min)
    plain = evaluation_plan(process, "x0", "heun", grid, denoise_to_zero=True, options={})
    assert plain.starts_at_state and plain.per_step() == 2
    # EDM churn raises sigma before the first evaluation where sigma(t_start) <= s_tmax (at t_max it is capped)
    assert evaluation_plan(process, "x0", "edm_sde", grid, denoise_to_zero=True, options={}).starts_at_state
    low = fewstep.time_grid(process, 4, 40.0, process.t_min)
    churn = evaluation_plan(process, "x0", "edm_sde", low, denoise_to_zero=True, options={})
    assert not churn.starts_at_state


# --- solver="auto": tunings in the scheduler ----------------------------------------------------------------------

AUTO_MIXTURE = fewstep.mixture_nd(dim=4, components=3, seed=11)
AUTO_NOISE = torch.randn(8, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


class KeyedMixture:
    """The exact eps model of AUTO_MIXTURE on a scheduler's process, known to tunings by a key of its own."""

    tuning_key = "mixture4d-exact"

    def __init__(self, process):
        self.exact = AUTO_MIXTURE.model(process, "eps")

    def __call__(self, x, t):
        return self.exact(x, t)


@pytest.fixture(scope="module")
def auto_tuning():
    """A tuning at NFE 4 of KeyedMixture on the DDPM config's process (tiny settings: about 1 s)."""
    from fewstep.tune import tune

    process = convention(DDPM).process
    candidates = (("dpmpp_2m", "logsnr"), ("unipc", "quadratic"))
    return tune(KeyedMixture(process), process, "eps", [4], model_key=KeyedMixture.tuning_key, shape=(4,), samples=16,
                search_top=1, search_iters=2, reference_steps=100, candidates=candidates)  # fmt: skip


@pytest.mark.parametrize("nfe, tuned", [(4, True), (4, False), (5, False), (8, False)])
def test_auto_scheduler_equals_sample_auto_tuned_and_fallback(auto_tuning, nfe, tuned):
    """The pipeline loop runs exactly `fewstep.sample(solver="auto")`'s choice: the tuned entry, or the fallback
    (below 20 evaluations a grid ending early, at log-SNR 1 / 2 / 3, followed by the final denoising evaluation)."""
    tuning = auto_tuning if tuned else None
    key = KeyedMixture.tuning_key if tuned else None
    scheduler = FewstepScheduler.from_config(diffusers.DDPMScheduler(**DDPM).config, solver="auto", tuning=tuning, model=key)
    process = scheduler._convention.process
    model = KeyedMixture(process)
    got, outs = run_pipeline_loop(scheduler, model, AUTO_NOISE, nfe)
    ref = fewstep.sample(model, AUTO_NOISE, process=process, solver="auto", nfe=nfe, tuning=tuning)
    assert (got - ref).abs().max().item() <= 1e-12
    assert scheduler.choice == ref.choice and scheduler.choice["source"] == ("tuned" if tuned else "fallback")
    assert scheduler.choice["corrected"] == tuned  # the tuning carries learned corrections; the pipeline applies them
    assert len(scheduler.timesteps) == ref.nfe == nfe  # num_inference_steps is the NFE
    if tuned:
        assert scheduler._grid.tolist() == auto_tuning.entry(nfe).times
    else:
        plan = fewstep.recommended(nfe, process)
        t_end = plan.get("t_end", process.t_min)
        assert "t_end" in plan and plan["denoise_to_zero"]
        assert float(scheduler._grid[-1]) == t_end  # the grid ends there ...
        assert scheduler.timesteps[-1].item() == pytest.approx(t_end * 1000 - 1, abs=1e-9)  # ... and is evaluated there
        from fewstep.recommend import VP_BANDS  # DDPM's linear betas start at log-SNR -5.1

        assert float(process.log_snr(t_end)) == pytest.approx(next(e for top, _, _, e in VP_BANDS if nfe <= top))
        assert scheduler.sigmas[-1].item() == 0.0 and torch.equal(outs[-1].denoised, got)


def test_auto_scheduler_checks_the_tuning_key_when_given_a_model(auto_tuning, tmp_path):
    config = diffusers.DDPMScheduler(**DDPM).config
    path = auto_tuning.save(tmp_path / "t.tuning.json")
    unchecked = FewstepScheduler.from_config(config, solver="auto", tuning=path)  # a path works; no model: key unchecked
    unchecked.set_timesteps(4)
    assert unchecked.choice["source"] == "tuned" and "model weights not checked" in unchecked.choice["reason"]
    from fewstep.tuning import TuningError

    with pytest.raises(TuningError, match="model weights .* 'mixture4d-exact', not 'another-model'"):
        FewstepScheduler.from_config(config, solver="auto", tuning=auto_tuning, model="another-model")
    with pytest.raises(TuningError, match="process"):  # the process is always checked
        FewstepScheduler.from_config({**DDPM, "beta_schedule": "squaredcos_cap_v2"}, solver="auto", tuning=auto_tuning)
    # a UNet: its weights' digest is the key (as fewstep.tune / from_diffusers's model_key compute it)
    unet = tiny_unet()
    model, process, prediction = fewstep.from_diffusers(unet, config)
    from fewstep.tuning import Tuning

    data = {**auto_tuning.to_dict(), "model": model.tuning_key}
    unet_tuning = Tuning.from_dict(data)
    scheduler = FewstepScheduler.from_config(config, solver="auto", tuning=unet_tuning, model=unet)
    scheduler.set_timesteps(4)
    assert scheduler.choice["source"] == "tuned" and "not checked" not in scheduler.choice["reason"]
    noise = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        x = fewstep.sample(model, noise, process=process, solver="auto", nfe=4, tuning=unet_tuning)
    assert x.choice == scheduler.choice
    with torch.no_grad():
        next(unet.parameters()).add_(1e-3)  # other weights: the digest (recomputed after the change) differs
    with pytest.raises(TuningError, match="model weights"):
        FewstepScheduler.from_config(config, solver="auto", tuning=unet_tuning, model=unet)


def test_auto_scheduler_bad_input_is_clear():
    config = diffusers.DDPMScheduler(**DDPM).config
    with pytest.raises(ValueError, match="solver='auto' chooses the grid and the solver options itself; do not pass schedule"):
        FewstepScheduler.from_config(config, solver="auto", schedule="logsnr")
    with pytest.raises(ValueError, match="budget must be 'nfe'"):
        FewstepScheduler.from_config(config, solver="auto", budget="steps")
    with pytest.raises(ValueError, match="tuning and model are used only with solver='auto'"):
        FewstepScheduler.from_config(config, solver="dpmpp_2m", model="key")
    with pytest.raises(TypeError, match="tuning must be a fewstep Tuning or the path"):
        FewstepScheduler.from_config(config, solver="auto", tuning=3)
    scheduler = FewstepScheduler.from_config(config, solver="auto")
    with pytest.raises(ValueError, match="do not pass timesteps or sigmas"):
        scheduler.set_timesteps(timesteps=[999, 500, 0])
    with pytest.raises(ValueError, match="num_inference_steps must be >= 2 with solver='auto'"):
        scheduler.set_timesteps(1)
    assert FewstepScheduler.from_config(config, solver="auto").config.budget is None  # tuning/model: not config keys


def test_auto_scheduler_on_a_flow_config_equals_sample_auto():
    scheduler = FewstepScheduler.from_config(flow_config(), solver="auto")
    process = scheduler._convention.process
    model = AUTO_MIXTURE.model(process, "velocity")
    got, _ = run_pipeline_loop(scheduler, model, AUTO_NOISE, 6)
    ref = fewstep.sample(model, AUTO_NOISE, process=process, prediction="velocity", solver="auto", nfe=6)
    assert (got - ref).abs().max().item() <= 1e-12 and scheduler.choice == ref.choice and len(scheduler.timesteps) == 6


def test_step_and_set_timesteps_bad_input_is_clear():
    scheduler = FewstepScheduler(**DDPM, solver="dpmpp_2s")
    scheduler.set_timesteps(3)  # two evaluations per step, the second at a midpoint: steps start at evaluations 0, 2, 4
    mid = scheduler.timesteps[1].item()
    with pytest.raises(ValueError, match=f"timestep={mid!r} is not the first timestep of any step of this run"):
        scheduler.step(torch.zeros_like(NOISE), mid, NOISE)  # a first step at an intermediate (second-stage) time
    with pytest.raises(ValueError, match=r"timestep must be one timestep .* got shape \(2,\)"):
        scheduler.set_begin_index(0)
        scheduler.step(torch.zeros_like(NOISE), scheduler.timesteps[:2], NOISE)
    with pytest.raises(ValueError, match="timestep must be a number or a one-element tensor, got str"):
        scheduler.step(torch.zeros_like(NOISE), "999", NOISE)
    with pytest.raises(TypeError, match="model_output and sample must be tensors"):
        scheduler.step(NOISE.numpy(), 999, NOISE)
    with pytest.raises(ValueError, match="pass timesteps or sigmas to set_timesteps, not both"):
        scheduler.set_timesteps(timesteps=[999, 500], sigmas=[10.0, 1.0])
    with pytest.raises(ValueError, match="num_inference_steps=4 but timesteps has 3 values"):
        scheduler.set_timesteps(4, timesteps=[999, 500, 100])
    with pytest.raises(ValueError, match="timesteps must give at least one step"):
        scheduler.set_timesteps(timesteps=[999])
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.set_timesteps(timesteps=[100, 500, 999])  # increasing
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\] \(the model's range\), got \[0, 1500\]"):
        scheduler.add_noise(NOISE, NOISE, torch.tensor([0, 1500]))
    with pytest.raises(ValueError, match="solver_options must be a dict of options of solver 'unipc'"):
        FewstepScheduler(solver="unipc", solver_options=[("order", 2)])
    with pytest.raises(
        ValueError, match="rho is a parameter of the karras and polyexponential schedules, not of schedule='logsnr'"
    ):
        FewstepScheduler(schedule="logsnr", rho=7.0)
    with pytest.raises(ValueError, match="solver='time_shift' cannot run as a diffusers scheduler"):
        FewstepScheduler(solver="time_shift")
    with pytest.raises(ValueError, match="denoise_to_zero must be True or False, got denoise_to_zero='yes'"):
        FewstepScheduler(denoise_to_zero="yes")


def test_scheduler_configs_fewstep_cannot_represent_are_refused():
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler has neither beta_schedule nor trained_betas nor a flow-matching"):
        FewstepScheduler.from_config(diffusers.ScoreSdeVeScheduler())  # a scheduler: its class is named
    with pytest.raises(ValueError, match="this scheduler has neither beta_schedule nor trained_betas"):
        FewstepScheduler.from_config(diffusers.ScoreSdeVeScheduler().config)
    with pytest.raises(ValueError, match="EDM-preconditioned"):
        FewstepScheduler.from_config({**DDPM, "_class_name": "DPMSolverMultistepScheduler", "timestep_type": "continuous"})
    with pytest.raises(TypeError, match="config must be a diffusers scheduler, its .config or a dict, got int"):
        FewstepScheduler.from_config(3)
    with pytest.raises(ValueError, match="time_shift_type='cubic' is not known"):
        FewstepScheduler.from_config(flow_config(use_dynamic_shifting=True, time_shift_type="exponential"),
                                     time_shift_type="cubic").set_timesteps(4, mu=1.0)  # fmt: skip


def test_scheduler_overhead_benchmark_reports_each_loop():
    from fewstep.integrations.overhead import scheduler_overhead

    result = scheduler_overhead(("ddim", "heun"), batch_shape=(2, 3), steps=3, rounds=2)
    assert set(result.scheduler_us) == set(result.sample_us) == {"ddim", "heun"} and result.diffusers_us > 0
    rows = result.markdown().splitlines()
    assert len(rows) == 4 + 2 * 2 + 1 and rows[-1].endswith("| 1.00 |")
    us = result.scheduler_us["heun"]
    fast, ratio = result.minima["scheduler:heun"], result.ratios["scheduler:heun"]
    assert fast <= us and result.minima["diffusers"] <= result.diffusers_us and result.ratios["diffusers"] == 1.0
    assert f"| FewstepScheduler('heun').step() | {us:.1f} | {fast:.1f} | {ratio:.2f} |" in rows


def test_a_solver_error_reaches_the_pipeline_and_the_next_run_recovers(backend):
    scheduler = FewstepScheduler(**DDPM, solver="dpmpp_2m")
    model = MIXTURE.model(scheduler._convention.process, "eps")
    scheduler.set_timesteps(3)
    x = NOISE * scheduler.init_noise_sigma
    with pytest.raises(fewstep.ModelError, match=r"the model returned NaN or Inf at step 0, evaluation 1"):
        for k in scheduler.timesteps:  # fewstep.sample reports NaN once, at its end: from the last step()
            x = scheduler.step(torch.full_like(NOISE, float("nan")), k, x).prev_sample
    fresh, _ = run_pipeline_loop(scheduler, model, NOISE, 3)
    ref = fewstep.sample(model, NOISE, process=scheduler._convention.process, steps=3)
    assert torch.equal(fresh, ref)
