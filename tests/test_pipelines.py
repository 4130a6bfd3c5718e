"""diffusers pipelines end to end with `FewstepScheduler` (issue 9, item 4): built offline from tiny random-weight
components made from configs (nothing downloaded), run with `pipe.scheduler = FewstepScheduler.from_config(...)`,
compared with `fewstep.sample` on the same components (float64), classifier-free guidance included, and
round-tripped through `save_pretrained` / `from_pretrained` of a local folder.

- `StableDiffusionPipeline`: `UNet2DConditionModel` + `CLIPTextModel` + a `CLIPTokenizer` from an in-memory vocabulary
  + `AutoencoderKL`, DDPM betas (scaled_linear), epsilon prediction.
- `StableDiffusion3Pipeline` (flow matching, `FlowMatchEulerDiscreteScheduler` config with shift 3): `SD3Transformer2DModel`
  + two `CLIPTextModelWithProjection` + `T5EncoderModel` (with a `T5Tokenizer` from an in-memory vocabulary) +
  `AutoencoderKL`: the full SD3 layout, every part built from a config.
- `DDIMPipeline` with a `UNet2DModel` (it passes eta and use_clipped_model_output to step).
"""

import numpy as np
import pytest
import torch

import fewstep

diffusers = pytest.importorskip("diffusers", reason="the pipeline tests need the dev extra (pip install -e .[dev])")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fewstep.integrations.scheduler import FewstepScheduler  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

PARITY = 1e-6  # the target (float64); measured 0 (Stable Diffusion) to 2e-15 (SD3)
PROMPTS = ["a cat", "dog"]
GUIDANCE = 3.0
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _transformers():
    transformers = pytest.importorskip("transformers", reason="text encoders need transformers (the dev extra)")
    transformers.logging.set_verbosity_error()
    return transformers


def clip_tokenizer(transformers, max_length=8):
    """A CLIP BPE tokenizer over single letters (no merges), built in memory: start 0, end/pad 1."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(transformers):
    """A T5 unigram tokenizer over letters and word-initial letters, built in memory."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in LETTERS] + [("\u2581" + c, -1.5) for c in LETTERS]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_config(transformers, vocab_size):
    return transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=24,
                                       num_attention_heads=2, num_hidden_layers=1, vocab_size=vocab_size,
                                       max_position_embeddings=8, projection_dim=16)  # fmt: skip


def tiny_vae(**extra):
    return diffusers.AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                   norm_num_groups=2, sample_size=16, **extra)  # fmt: skip


def finish(pipe):
    """float64, eval mode (T5's dropout is on in a freshly built model), no progress bar."""
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    pipe = pipe.to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe():
    transformers = _transformers()
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(transformers)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4, norm_num_groups=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2,
    )  # fmt: skip
    text = transformers.CLIPTextModel(clip_config(transformers, len(tokenizer)))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=tiny_vae(), text_encoder=text, tokenizer=tokenizer,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)  # fmt: skip
    return finish(pipe)


@pytest.fixture(scope="module")
def sd3_pipe():
    transformers = _transformers()
    torch.manual_seed(0)
    t5_tok = t5_tokenizer(transformers)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        caption_projection_dim=8, joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=8,
    )  # fmt: skip
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=16, num_layers=1,
                                                           num_heads=2, relative_attention_num_buckets=8))  # fmt: skip
    clips = [transformers.CLIPTextModelWithProjection(clip_config(transformers, 2 + 2 * len(LETTERS))) for _ in range(2)]
    vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clips[0], tokenizer=clip_tokenizer(transformers), text_encoder_2=clips[1],
        tokenizer_2=clip_tokenizer(transformers), text_encoder_3=t5, tokenizer_3=t5_tok,
    )  # fmt: skip
    return finish(pipe)


def sd_reference(pipe, solver, steps, seed, **options):
    """fewstep.sample on the pipeline's own UNet and text embeddings, guided by fewstep.cfg_kwargs: the latents the
    pipeline must produce (its noise: randn_tensor from the generator; a stochastic solver's draws follow on it)."""
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    model, process, prediction = fewstep.from_diffusers(pipe.unet, pipe.scheduler.config)
    guided = fewstep.cfg_kwargs(model, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, GUIDANCE)
    g = torch.Generator().manual_seed(seed)
    noise = randn_tensor((len(PROMPTS), 4, 4, 4), generator=g, dtype=torch.float64)
    with torch.no_grad():
        return fewstep.sample(guided, noise, process=process, prediction=prediction, solver=solver, steps=steps, generator=g,
                              **options)  # fmt: skip


def run(pipe, steps, seed, output_type="latent", **kwargs):
    g = torch.Generator().manual_seed(seed)
    out = pipe(PROMPTS, height=8, width=8, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=g,
               output_type=output_type, **kwargs)  # fmt: skip
    return out.images


def decode(pipe, latents):
    """What the pipeline's output_type="np" makes of final latents (VAE decode, [-1, 1] -> [0, 1], NHWC)."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    with torch.no_grad():
        image = vae.decode(latents).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("solver, options", [("dpmpp_2m", {}), ("heun", {}), ("sde_dpmpp_2m", {})])
def test_stable_diffusion_pipeline_equals_fewstep_sample_with_guidance(sd_pipe, solver, options):
    """The pipeline's whole loop (CFG on a batched uncond/cond UNet call, a stochastic solver drawing from the
    pipeline's generator, a two-evaluation Heun step) is fewstep.sample with cfg_kwargs on the same components."""
    pipe = sd_pipe
    default = pipe.scheduler
    pipe.scheduler = FewstepScheduler.from_config(default.config, solver=solver, solver_options=options)
    try:
        latents = run(pipe, 4, seed=1)
        ref = sd_reference(pipe, solver, 4, seed=1, **options)
        assert latents.dtype == torch.float64
        assert (latents - ref).abs().max().item() <= PARITY
        assert len(pipe.scheduler.timesteps) == ref.nfe // 2  # one timestep per guided (2-NFE) UNet call
        if solver == "dpmpp_2m":  # the decoded images: the pipeline's VAE on fewstep's latents
            images = run(pipe, 4, seed=1, output_type="np")
            assert abs(images - decode(pipe, ref)).max() <= PARITY
            assert images.shape == (2, 8, 8, 3)
    finally:
        pipe.scheduler = default


def test_stable_diffusion_pipeline_round_trips_through_a_local_folder(sd_pipe, tmp_path):
    pipe = sd_pipe
    default = pipe.scheduler
    pipe.scheduler = FewstepScheduler.from_config(default.config, solver="unipc", schedule="logsnr")
    try:
        before = run(pipe, 5, seed=2)
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.scheduler = default
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float64)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is FewstepScheduler  # model_index.json names fewstep's class
    assert loaded.scheduler.config.solver == "unipc" and loaded.scheduler.config.schedule == "logsnr"
    assert loaded.scheduler.config.beta_schedule == "scaled_linear" and loaded.scheduler.config.beta_start == 0.00085
    after = run(loaded, 5, seed=2)
    assert (after - before).abs().max().item() <= PARITY
    assert (after - sd_reference(loaded, "unipc", 5, seed=2, schedule="logsnr")).abs().max().item() <= PARITY


def sd3_reference(pipe, solver, steps, seed):
    """fewstep.sample on the pipeline's transformer and its (CLIP x2 + T5) embeddings and pooled projections, guided."""
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=8)  # with CFG's negatives
    model, process, prediction = fewstep.from_diffusers(pipe.transformer, pipe.scheduler.config)
    assert isinstance(process, fewstep.ShiftedFlow) and process.shift == 3.0 and prediction == "velocity"
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
    guided = fewstep.cfg_kwargs(model, cond, uncond, GUIDANCE)
    noise = randn_tensor((len(PROMPTS), 4, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        return fewstep.sample(guided, noise, process=process, prediction=prediction, solver=solver, steps=steps)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_sd3_flow_pipeline_equals_fewstep_sample_with_guidance(sd3_pipe, solver):
    pipe = sd3_pipe
    default = pipe.scheduler
    pipe.scheduler = FewstepScheduler.from_config(default.config, solver=solver)
    try:
        latents = run(pipe, 5, seed=3, max_sequence_length=8)
        ref = sd3_reference(pipe, solver, 5, seed=3)
        assert (latents - ref).abs().max().item() <= PARITY
        assert pipe.scheduler.timesteps[0].item() == 1000.0  # flow convention: timestep = 1000 sigma, from sigma 1
        if solver == "unipc":
            images = run(pipe, 5, seed=3, output_type="np", max_sequence_length=8)
            assert abs(images - decode(pipe, ref)).max() <= PARITY
    finally:
        pipe.scheduler = default


def test_sd3_flow_pipeline_round_trips_through_a_local_folder(sd3_pipe, tmp_path):
    pipe = sd3_pipe
    default = pipe.scheduler
    pipe.scheduler = FewstepScheduler.from_config(default.config, solver="heun")
    try:
        before = run(pipe, 3, seed=4, max_sequence_length=8)
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.scheduler = default
    loaded = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float64)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is FewstepScheduler
    assert loaded.scheduler.config.prediction_type == "flow_prediction" and loaded.scheduler.config.shift == 3.0
    after = run(loaded, 3, seed=4, max_sequence_length=8)
    assert (after - before).abs().max().item() <= PARITY
    assert (after - sd3_reference(loaded, "heun", 3, seed=4)).abs().max().item() <= PARITY


def test_ddim_pipeline_with_fewstep_scheduler_equals_fewstep_sample():
    """DDIMPipeline passes eta (0) and use_clipped_model_output to step(); its output is fewstep.sample's."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4).double().eval()  # fmt: skip
    config = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False).config
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(config))
    pipe.scheduler = FewstepScheduler.from_config(config, solver="dpmpp_3m")  # DDIMPipeline's __init__ makes any scheduler DDIM
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=6, output_type="np").images
    noise = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model, process, prediction = fewstep.from_diffusers(unet, config)
    with torch.no_grad():  # DDIMPipeline starts from randn itself: the state at t_max is the noise
        ref = fewstep.sample(model, noise / float(process.sigma(1.0)), process=process, solver="dpmpp_3m", steps=6)
    expected = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - expected).max() <= PARITY
    with pytest.raises(ValueError, match="eta=0.5 is a DDIMScheduler option; choose solver='ddim_eta'"):
        pipe(batch_size=1, num_inference_steps=3, eta=0.5)


# --- bad input: conditioning of the wrong shape, model folders the loader cannot use --------------------------------


def test_conditioning_of_the_wrong_shape_is_named(sd_pipe, sd3_pipe):
    noise = torch.zeros(2, 4, 4, 4, dtype=torch.float64)
    model, process, _ = fewstep.from_diffusers(sd_pipe.unet, sd_pipe.scheduler.config)
    wide = torch.zeros(2, 8, 32, dtype=torch.float64)  # the UNet's cross_attention_dim is 16
    with pytest.raises(ValueError, match=r"model_kwargs\['encoder_hidden_states'\] must have shape \[batch=2, tokens, 16\] "
                       r"\(the network's cross_attention_dim\), got \(2, 8, 32\)"):  # fmt: skip
        fewstep.sample(model, noise, process=process, steps=2, model_kwargs={"encoder_hidden_states": wide})
    with pytest.raises(ValueError, match=r"model_kwargs\['encoder_hidden_states'\] has shape \(3, 8, 16\)"):
        fewstep.sample(model, noise, process=process, steps=2,
                       model_kwargs={"encoder_hidden_states": torch.zeros(3, 8, 16, dtype=torch.float64)})  # fmt: skip
    with pytest.raises(
        ValueError, match=r"cond\['encoder_hidden_states'\] and uncond\['encoder_hidden_states'\] must be tensors"
    ):
        fewstep.cfg_kwargs(model, {"encoder_hidden_states": wide[:, :, :16]}, {"encoder_hidden_states": wide[:, :4, :16]}, 2.0)
    model3, process3, prediction3 = fewstep.from_diffusers(sd3_pipe.transformer, sd3_pipe.scheduler.config)
    good = {
        "encoder_hidden_states": torch.zeros(2, 8, 32, dtype=torch.float64),
        "pooled_projections": torch.zeros(2, 32, dtype=torch.float64),
    }
    with torch.no_grad():  # the right shapes run
        fewstep.sample(model3, noise, process=process3, prediction=prediction3, steps=1, model_kwargs=good)
    with pytest.raises(ValueError, match=r"\['pooled_projections'\] must have shape \[batch=2, 32\] .*pooled_projection_dim"):
        fewstep.sample(model3, noise, process=process3, prediction=prediction3, steps=1,
                       model_kwargs={**good, "pooled_projections": torch.zeros(2, 16, dtype=torch.float64)})  # fmt: skip
    with pytest.raises(
        ValueError, match=r"\['encoder_hidden_states'\] must have shape \[batch=2, tokens, 32\] .*joint_attention_dim"
    ):
        fewstep.sample(model3, noise, process=process3, prediction=prediction3, steps=1,
                       model_kwargs={**good, "encoder_hidden_states": torch.zeros(2, 8, 16, dtype=torch.float64)})  # fmt: skip


def test_model_folders_the_loader_cannot_use_are_named(sd_pipe, tmp_path):
    from fewstep.integrations.local import load_diffusers_folder

    with pytest.raises(ValueError, match="is not a folder"):
        load_diffusers_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has neither model_index.json .* nor config.json"):
        load_diffusers_folder(tmp_path / "empty")
    sd_pipe.save_pretrained(tmp_path / "sd")
    with pytest.raises(ValueError, match="is a latent pipeline \\(vae\\)"):
        load_diffusers_folder(tmp_path / "sd")
    with pytest.raises(ValueError, match="describes a UNet2DConditionModel; fewstep sample loads UNet2DModel"):
        load_diffusers_folder(tmp_path / "sd" / "unet", scheduler_config=dict(sd_pipe.scheduler.config))
    with pytest.raises(ValueError, match="has no scheduler_config.json beside its config.json"):
        load_diffusers_folder(tmp_path / "sd" / "unet")
    (tmp_path / "sd" / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config: cannot read .*config.json as JSON"):
        load_diffusers_folder(tmp_path / "sd" / "unet", scheduler_config=dict(sd_pipe.scheduler.config))
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "model_index.json").write_text('{"scheduler": ["diffusers", "DDPMScheduler"]}')
    with pytest.raises(ValueError, match="names no unet"):
        load_diffusers_folder(tmp_path / "index")


def test_a_fewstep_model_saved_as_a_diffusers_pipeline_reloads_and_samples_as_fewstep_does(tmp_path):
    from diffusers import DDPMPipeline
    from typer.testing import CliRunner

    import fewstep
    from fewstep.cli import app
    from fewstep.integrations.export import FewstepUNet, to_pipeline
    from fewstep.shipped import load_model
    from fewstep.tuning import model_key

    loaded = load_model("digits_vp")
    to_pipeline(loaded).save_pretrained(tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    assert isinstance(pipe.unet, FewstepUNet) and model_key(pipe.unet) == model_key(loaded.model)  # its tuning applies
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([0, 417, 999])
    torch.testing.assert_close(pipe.unet(x, k).sample, loaded.model(x, (k + 1) / 1000), rtol=0, atol=0)
    # the pipeline with FewstepScheduler(solver="auto") and the shipped tuning = fewstep.sample(solver="auto")
    pipe.scheduler = fewstep.FewstepScheduler.from_config(pipe.scheduler.config, solver="auto", tuning=loaded.model.tuning,
                                                          model=pipe.unet)  # fmt: skip
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="np").images
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    direct = fewstep.sample(loaded.model, noise, process=loaded.process, prediction="eps", solver="auto", nfe=5)
    assert direct.choice["source"] == "tuned"
    expected = (direct / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=2e-5)
    result = CliRunner().invoke(app, ["sample", "--model", str(tmp_path / "pipe"), "--steps", "4", "--n", "3",
                                      "--out", str(tmp_path / "x.npy")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "x.npy").shape == (3, 1, 8, 8)
