"""`fewstep sample --model` on a local diffusers folder: the file equals `fewstep.sample` on `from_diffusers` of the
same folder, per-sample seeds make samples independent of the batch size, many samples go to resumable shards, and
bad input ends in one usage error naming the option. Tiny random-weight UNet2DModels saved with save_pretrained
(nothing downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fewstep
from fewstep.cli import app
from fewstep.integrations import convention
from fewstep.sharded import per_sample_noise, sample_generators

diffusers = pytest.importorskip("diffusers", reason="diffusers folders need the dev extra (pip install -e .[dev])")
diffusers.utils.logging.set_verbosity_error()
runner = CliRunner()
UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A DDPMPipeline folder, a bare UNet folder with its scheduler config beside it, a class-conditional bare UNet
    folder without one, a scheduler folder and a folder with no config."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    # x0 prediction keeps a random network well conditioned: float32 round-off between batch sizes stays ~1e-6
    unet, scheduler = diffusers.UNet2DModel(**UNET), diffusers.DDPMScheduler(prediction_type="sample")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "pipe")
    unet.save_pretrained(root / "bare")
    scheduler.save_pretrained(root / "bare")
    diffusers.UNet2DModel(**UNET, num_class_embeds=3).save_pretrained(root / "cond")
    scheduler.save_pretrained(root / "sched")
    (root / "empty").mkdir()
    return root


def cli(*args: str):
    return runner.invoke(app, ["sample", *args])


def expected(folder, n: int, seed: int, steps: int, **kwargs) -> torch.Tensor:
    """fewstep.sample on from_diffusers of the folder, from the per-sample noise of samples 0..n-1."""
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", local_files_only=True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    model, process, prediction = fewstep.from_diffusers(unet, config)
    x0_fn = convention(config).x0_fn  # DDPMScheduler's clip_sample=True: StaticClipping, as the CLI applies it
    generators = sample_generators(seed, 0, n)
    noise = per_sample_noise(SHAPE, generators)
    with torch.no_grad():
        x = fewstep.sample(model, noise, process=process, prediction=prediction, steps=steps, generator=generators,
                           x0_fn=x0_fn, **kwargs)  # fmt: skip
    return x.clamp(-1, 1)


def test_pipeline_folder_equals_sample_of_from_diffusers_at_any_batch_size(folders, tmp_path):
    outs = {}
    for batch in (1, 3, 5):
        result = cli("--model", str(folders / "pipe"), "--steps", "3", "--n", "5", "--seed", "7", "--batch-size", str(batch),
                     "--out", str(tmp_path / f"b{batch}.npy"))  # fmt: skip
        assert result.exit_code == 0, result.output
        outs[batch] = np.load(tmp_path / f"b{batch}.npy")
    assert "dpmpp_2m 3 steps, NFE 4" in " ".join(result.output.split())
    ref = expected(folders / "pipe", 5, 7, 3).numpy()
    for batch, x in outs.items():
        assert x.shape == (5, *SHAPE)
        np.testing.assert_allclose(x, ref, atol=1e-5, err_msg=f"batch size {batch}")  # float32 convs by batch
    # a stochastic solver: its noise also comes from each sample's own generator
    a = cli("--model", str(folders / "pipe"), "--solver", "ddpm", "--steps", "3", "--n", "3", "--batch-size", "1", "--out",
            str(tmp_path / "s1.npy"))  # fmt: skip
    b = cli("--model", str(folders / "pipe"), "--solver", "ddpm", "--steps", "3", "--n", "3", "--batch-size", "3", "--out",
            str(tmp_path / "s3.npy"))  # fmt: skip
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    np.testing.assert_allclose(np.load(tmp_path / "s1.npy"), np.load(tmp_path / "s3.npy"), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "s3.npy"), expected(folders / "pipe", 3, 0, 3, solver="ddpm"), atol=1e-5)


def test_bare_folder_with_scheduler_config_beside_or_given(folders, tmp_path):
    bare = cli("--model", str(folders / "bare"), "--steps", "2", "--n", "3", "--out", str(tmp_path / "bare.npy"))
    assert bare.exit_code == 0, bare.output
    np.testing.assert_allclose(np.load(tmp_path / "bare.npy"), expected(folders / "pipe", 3, 0, 2).numpy(), atol=1e-5)
    png = cli("--model", str(folders / "bare"), "--steps", "2", "--n", "3", "--out", str(tmp_path / "bare.png"))
    assert png.exit_code == 0 and (tmp_path / "bare.png").stat().st_size > 0, png.output


def test_class_labels_and_guidance(folders, tmp_path):
    common = ("--model", str(folders / "cond"), "--scheduler-config", str(folders / "sched"), "--steps", "2", "--n", "4")
    plain = cli(*common, "--class-label", "0,2", "--out", str(tmp_path / "c.npy"))
    guided = cli(*common, "--class-label", "2", "--guidance", "3", "--uncond-label", "1", "--out", str(tmp_path / "g.npy"))
    assert plain.exit_code == guided.exit_code == 0, plain.output + guided.output
    assert "NFE 3," in " ".join(plain.output.split()) and "NFE 6," in " ".join(guided.output.split())  # guided: 2 per call
    unet = diffusers.UNet2DModel.from_pretrained(folders / "cond", local_files_only=True)
    config = json.loads((folders / "sched" / "scheduler_config.json").read_text())
    model, process, prediction = fewstep.from_diffusers(unet, config)
    common = dict(process=process, prediction=prediction, steps=2, x0_fn=convention(config).x0_fn)
    noise = per_sample_noise(SHAPE, sample_generators(0, 0, 4))
    labels = torch.tensor([0, 2, 0, 2])  # cycled over the samples
    with torch.no_grad():
        ref = fewstep.sample(model, noise, model_kwargs={"class_labels": labels}, **common)
        guide = fewstep.cfg_kwargs(model, {"class_labels": torch.full((4,), 2)}, {"class_labels": torch.tensor([1])}, 3.0)
        ref_guided = fewstep.sample(guide, noise, **common)
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), ref.clamp(-1, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), ref_guided.clamp(-1, 1).numpy(), atol=1e-5)


def test_many_samples_are_written_as_shards_and_resumed(folders, tmp_path):
    args = ("--model", str(folders / "pipe"), "--steps", "2", "--n", "7", "--shard-size", "3", "--batch-size", "2")
    first = cli(*args, "--out", str(tmp_path / "x.npy"))
    assert first.exit_code == 0, first.output
    shards = [tmp_path / f"x-0000{k}.npy" for k in range(3)]
    index = json.loads((tmp_path / "x-index.json").read_text())
    assert index["complete"] and [s["file"] for s in index["shards"]] == [p.name for p in shards]
    assert not (tmp_path / "x.npy").exists()
    whole = cli("--model", str(folders / "pipe"), "--steps", "2", "--n", "7", "--out", str(tmp_path / "whole.npy"))
    assert whole.exit_code == 0, whole.output
    np.testing.assert_allclose(np.concatenate([np.load(p) for p in shards]), np.load(tmp_path / "whole.npy"), atol=1e-5)
    # resume: the missing shard is written again, the complete ones are skipped (their files untouched)
    kept = shards[0].stat().st_mtime_ns
    saved = np.load(shards[1])
    shards[1].unlink()
    again = cli(*args, "--out", str(tmp_path / "x.npy"))
    assert again.exit_code == 0 and again.output.count("is complete: skipped") == 2, again.output
    assert shards[0].stat().st_mtime_ns == kept
    np.testing.assert_array_equal(np.load(shards[1]), saved)
    # other settings into the same shards: refused, naming --out and what differs
    other = cli(*args, "--seed", "1", "--out", str(tmp_path / "x.npy"))
    assert other.exit_code == 2 and "--out" in other.output and "seed" in other.output, other.output


COND = ["--model", "{root}/cond", "--scheduler-config", "{root}/sched"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "{root}/missing"], ["--model", "does not exist", "diffusers folder"]),
        (["--model", "{root}/empty"], ["--model", "model_index.json", "config.json"]),
        (["--model", "{root}/cond"], ["--model", "scheduler_config.json", "--scheduler-config"]),
        (["--model", "{root}/cond", "--scheduler-config", "{root}/empty"], ["--scheduler-config", "does not exist"]),
        (["--model", "{root}/cond", "--scheduler-config", "{root}/sched"], ["--class-label", "num_class_embeds=3", "0 to 2"]),
        (["--model", "{root}/cond", "--scheduler-config", "{root}/sched", "--class-label", "3"], ["--class-label", "0 to 2"]),
        (["--model", "{root}/cond", "--scheduler-config", "{root}/sched", "--class-label", "x"], ["--class-label"]),
        ([*COND, "--class-label", "1", "--guidance", "2"], ["--guidance/--uncond-label"]),
        ([*COND, "--class-label", "1", "--guidance", "2", "--uncond-label", "7"], ["--uncond-label", "0 to 2"]),
        (["--model", "{root}/pipe", "--class-label", "1"], ["--class-label", "not class-conditional"]),
        (["--model", "{root}/pipe", "--scheduler-config", "{root}/sched", "--steps", "0"], ["--steps"]),
        (["--model", "{root}/pipe", "--solver", "bogus"], ["--solver", "dpmpp_2m"]),
        (["--model", "digits_vp", "--scheduler-config", "{root}/sched"], ["--scheduler-config", "diffusers model folder"]),
        (["--class-label", "1"], ["--class-label", "goes with --model"]),
    ],
)
def test_bad_input_is_one_usage_error_naming_the_option(folders, tmp_path, args, words):
    result = cli(*[a.format(root=folders) for a in args], "--n", "2", "--out", str(tmp_path / "x.npy"))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in text, result.output
    for word in words:
        assert word in text, (word, text)
