"""A user mistake on any `fewstep` command ends in one usage error naming the option (exit code 2, no traceback), and
the training config is checked before anything runs, from the command line and from Python alike."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.train import TrainConfig, build_process, load_config
from fewstep.train.config import ConfigError, make_config

runner = CliRunner()


def _flat(text: str) -> str:
    """The output without the error panel's frame and line breaks (the panel wraps long messages)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder holding a regular file (file.txt), a corrupt checkpoint and a malformed TOML file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "corrupt.json").write_text('{"weights": 3')
    (tmp_path / "bad.toml").write_text("steps = = 3\n")
    return tmp_path


BAD_INVOCATIONS = [
    # (arguments, words the message must contain: the option and, for a finite set, some allowed values)
    (["sample", "--solver", "bogus"], ["--solver", "dpmpp_2m", "heun"]),
    (["sample", "--steps", "0"], ["--steps"]),
    (["sample", "--steps", "-3"], ["--steps"]),
    (["sample", "--steps", "x"], ["--steps"]),
    (["sample", "--schedule", "bogus"], ["--schedule", "karras", "logsnr"]),
    (["sample", "--n", "0"], ["--n"]),
    (["sample", "--n", "-5"], ["--n"]),
    (["sample", "--problem", "bogus"], ["--problem", "ring2d", "mixture16d"]),
    (["sample", "--process", "bogus"], ["--process", "discrete_vp", "rectified_flow"]),
    (["sample", "--seed", "-1"], ["--seed"]),
    (["sample", "--seed", str(2**64)], ["--seed"]),
    (["sample", "--n", "8", "--out", "file.txt/x.npy"], ["--out"]),
    (["sample", "--n", "8", "--out", "x.txt"], ["--out", ".npy", ".png"]),
    (["bench", "accuracy", "--solvers", "bogus"], ["--solvers", "ddim", "heun"]),
    (["bench", "accuracy", "--solvers", "ddim,bogus"], ["--solvers", "'bogus'", "heun"]),
    (["bench", "accuracy", "--solvers", ","], ["--solvers"]),
    (["bench", "accuracy", "--schedules", "bogus"], ["--schedules", "karras", "time_uniform"]),
    (["bench", "accuracy", "--problems", "bogus"], ["--problems", "ring2d", "mixture16d"]),
    (["bench", "accuracy", "--process", "bogus"], ["--process", "edm", "vp"]),
    (["bench", "accuracy", "--nfes", "5,x"], ["--nfes", "'x'"]),
    (["bench", "accuracy", "--nfes", "0"], ["--nfes"]),
    (["bench", "accuracy", "--nfes", ""], ["--nfes"]),
    (["bench", "accuracy", "--samples", "0"], ["--samples"]),
    (["bench", "accuracy", "--out", "file.txt"], ["--out"]),
    (["bench", "accuracy", "--peers", "--nfes", "x"], ["--nfes"]),
    (["bench", "accuracy", "--peers", "--search-iters", "0"], ["--search-iters"]),
    (["bench", "overhead", "--solvers", "bogus"], ["--solvers", "ddim"]),
    (["bench", "overhead", "--batch", "2,x"], ["--batch"]),
    (["bench", "overhead", "--batch", "0"], ["--batch"]),
    (["bench", "overhead", "--steps", "0"], ["--steps"]),
    (["bench", "overhead", "--repeats", "0"], ["--repeats"]),
    (["bench", "overhead", "--out", "file.txt"], ["--out"]),
    (["bench", "train", "--data", "bogus"], ["--data", "moons", "digits"]),
    (["bench", "train", "--batch-size", "0"], ["--batch-size"]),
    (["bench", "train", "--steps", "0"], ["--steps"]),
    (["bench", "train", "--threads", "0"], ["--threads"]),
    (["train", "--steps", "0"], ["--steps"]),
    (["train", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--lr", "0"], ["--lr"]),
    (["train", "--lr", "nan"], ["--lr"]),
    (["train", "--data", "bogus"], ["--data", "moons", "swiss_roll"]),
    (["train", "--prediction", "score"], ["--prediction", "eps", "velocity"]),
    (["train", "--process", "bogus"], ["--process", "discrete_vp", "rectified_flow"]),
    (["train", "--seed", "-1"], ["--seed"]),
    (["train", "--threads", "0"], ["--threads"]),
    (["train", "--out", "file.txt/run"], ["--out"]),
    (["train", "-s", "sample_solver=bogus"], ["sample_solver", "dpmpp_2m", "heun"]),
    (["train", "-s", "sample_steps=0"], ["sample_steps"]),
    (["train", "-s", "grad_clip=nan"], ["grad_clip"]),
    (["train", "-s", "checkpoint_every=-1"], ["checkpoint_every"]),
    (["train", "-s", "steps=abc"], ["steps", "integer"]),
    (["train", "-s", "batch_size=[1, 2]"], ["batch_size", "integer"]),
    (["train", "-s", "ema_decay=1"], ["ema_decay"]),
    (["train", "-s", "ema_warmup=bogus"], ["ema_warmup", "power", "karras"]),
    (["train", "-s", "weighting=bogus"], ["weighting", "min_snr"]),
    (["train", "-s", "time_sampling=bogus"], ["time_sampling", "logit_normal"]),
    (["train", "-s", "immiscible=bogus"], ["immiscible", "knn"]),
    (["train", "-s", "precond=bogus"], ["precond", "edm"]),
    (["train", "-s", "process.type=bogus"], ["process", "discrete_vp", "rectified_flow"]),
    (["train", "-s", "process.schedule=[1]"], ["process", "schedule", "scaled_linear", "cosine"]),
    (["train", "-s", "process.num_timesteps=0"], ["process", "num_timesteps"]),
    (["train", "-s", "process=3"], ["process", "table"]),
    (["train", "-s", "foo"], ["--set", "key=value"]),
    (["train", "-s", "stepz=5"], ["stepz", "sample_solver"]),
    (["train", "-s", "net.type=bogus", "--steps", "1", "--out", "run"], ["net", "mlp", "unet"]),
    (["train", "-c", "missing.toml"], ["--config", "missing.toml"]),
    (["train", "-c", "bad.toml"], ["--config", "bad.toml", "TOML"]),
    (["train", "-c", "corrupt.json"], ["--config", "corrupt.json"]),
    (["train", "--resume", "corrupt.json", "--steps", "1", "--out", "run"], ["--resume", "corrupt.json"]),
    (["train", "--resume", "missing.json", "--steps", "1", "--out", "run"], ["--resume", "missing.json"]),
    (["eval", "bogus"], ["CHECKPOINT", "digits_vp"]),
    (["eval", "corrupt.json"], ["CHECKPOINT", "corrupt.json"]),
    (["eval", "digits_vp", "--solvers", "bogus"], ["--solvers", "dpmpp_2m"]),
    (["eval", "digits_vp", "--nfe", "5,x"], ["--nfe", "'x'"]),
    (["eval", "digits_vp", "--nfe", "0"], ["--nfe"]),
    (["eval", "digits_vp", "--nfe", "1", "--solvers", "heun"], ["--nfe", "heun"]),
    (["eval", "digits_vp", "--n", "0"], ["--n"]),
    (["eval", "digits_vp", "--seed", "-1"], ["--seed"]),
    (["eval", "digits_vp", "--schedule", "bogus"], ["--schedule", "karras"]),
    (["eval", "digits_vp", "--n", "10", "--out", "file.txt"], ["--out"]),
    (["demo", "--samples", "0"], ["--samples"]),
    (["demo", "--seed", "-1"], ["--seed"]),
    (["demo", "--out", "file.txt"], ["--out"]),
    (["solvers", "--bogus"], ["--bogus"]),
    # valid names, but no cell of the table can be computed (heun needs 2 evaluations per step)
    (["bench", "accuracy", "--solvers", "heun", "--nfes", "1", "--schedules", "logsnr", "--problems", "ring2d",
      "--samples", "4"], ["--solvers/--schedules/--nfes"]),  # fmt: skip
]


@pytest.mark.parametrize(("args", "words"), BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_user_mistake_is_a_usage_error_naming_the_option(in_tmp, args, words):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert type(result.exception) is SystemExit, result.exception
    assert "Traceback" not in result.output
    text = _flat(result.output)
    for word in words:
        assert word in text, text
    written = sorted(p.name for p in in_tmp.rglob("*") if p.is_file())
    assert written == ["bad.toml", "corrupt.json", "file.txt"]  # no file written


def test_cheap_valid_invocations_still_work(in_tmp):
    result = runner.invoke(app, ["sample", "--steps", "2", "--n", "8", "--out", "out/x.npy"])
    assert result.exit_code == 0, result.output
    assert np.load(in_tmp / "out" / "x.npy").shape == (8, 2)
    result = runner.invoke(app, ["sample", "--steps", "2", "--n", "8", "--schedule", "karras", "--out", "x.png"])
    assert result.exit_code == 0 and (in_tmp / "x.png").stat().st_size > 0, result.output
    result = runner.invoke(app, ["solvers"])
    assert result.exit_code == 0 and "dpmpp_2m" in result.output
    args = ["bench", "accuracy", "--solvers", "ddim,heun", "--schedules", "logsnr", "--nfes", "1,4", "--problems", "ring2d",
            "--samples", "8", "--out", "b"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = (in_tmp / "b" / "accuracy.md").read_text()
    assert "| heun | logsnr | - |" in table  # an unreachable cell of a computable table stays a dash


# The training config, from Python ----------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"steps": "abc"}, "steps"),
    ({"steps": [1]}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": True}, "steps"),
    ({"steps": 0}, "steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": 0}, "lr"),
    ({"lr": math.inf}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"lr": 10**400}, "lr"),
    ({"grad_clip": math.nan}, "grad_clip"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"sample_every": -1}, "sample_every"),
    ({"sample_solver": "bogus"}, "sample_solver"),
    ({"sample_steps": 0}, "sample_steps"),
    ({"sample_count": 0}, "sample_count"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"ema_decay": -0.1}, "ema_decay"),
    ({"ema_warmup": "bogus"}, "ema_warmup"),
    ({"prediction": "score"}, "prediction"),
    ({"precond": "edm"}, "prediction"),  # EDM preconditioning makes a denoiser: prediction must be x0
    ({"precond": "bogus"}, "precond"),
    ({"weighting": "bogus"}, "weighting"),
    ({"time_sampling": "bogus"}, "time_sampling"),
    ({"time_sampling": "discrete", "process": {"type": "ve"}}, "time_sampling"),
    ({"time_std": 0.0}, "time_std"),
    ({"immiscible": "bogus"}, "immiscible"),
    ({"knn_k": 0}, "knn_k"),
    ({"data": "bogus"}, "data"),
    ({"data_options": [1]}, "data_options"),
    ({"net": "mlp"}, "net"),
    ({"process": {"type": "bogus"}}, "process"),
    ({"process": {"type": "discrete_vp", "schedule": [1]}}, "process"),
    ({"process": "discrete_vp"}, "process"),
    ({"seed": -1}, "seed"),
    ({"threads": 0}, "threads"),
    ({"device": "tpu"}, "device"),
    ({"out_dir": ""}, "out_dir"),
    ({"bf16": "yes"}, "bf16"),
]


@pytest.mark.parametrize(("values", "key"), BAD_CONFIGS, ids=[str(v) for v, _ in BAD_CONFIGS])
def test_bad_config_value_names_its_key(values, key):
    with pytest.raises(ValueError, match=key) as caught:
        make_config(values)
    assert isinstance(caught.value, ConfigError) and caught.value.key == key
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**values)  # the Python API (Trainer(TrainConfig(...))) is checked the same way


def test_load_config_checks_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = "moons"\nsample_solver = "bogus"\n')
    with pytest.raises(ValueError, match="sample_solver='bogus' is not known; allowed values: .*dpmpp_2m"):
        load_config(path)
    assert load_config(path, ["sample_solver='heun'"]).sample_solver == "heun"
    with pytest.raises(ValueError, match="grad_clip"):
        load_config(None, ["grad_clip=nan"])
    path.write_text("steps = = 3\n")
    with pytest.raises(ValueError, match="run.toml is not a valid TOML file"):
        load_config(path)
    with pytest.raises(ValueError, match="config"):
        make_config([("steps", 3)])


def test_valid_configs_are_kept_and_ints_become_floats():
    config = make_config({"lr": 1, "checkpoint_every": 0, "grad_clip": 0, "threads": None, "time_mean": -0.5})
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.checkpoint_every == 0 and config.grad_clip == 0.0
    edm = make_config({"process": {"type": "ve"}, "prediction": "x0", "precond": "edm", "time_sampling": "edm"})
    assert edm.precond == "edm"


@pytest.mark.parametrize("config", [[1], 3, {"type": ["discrete_vp"]}, {"type": "discrete_vp", "schedule": {"a": 1}}, {}])
def test_build_process_rejects_malformed_tables(config):
    with pytest.raises(ValueError, match="process|schedule"):
        build_process(config)


def test_dotted_override_starts_from_the_default_table():
    assert load_config(None, ["process.num_timesteps=500"]).process == {"type": "discrete_vp", "schedule": "linear",
                                                                         "num_timesteps": 500}  # fmt: skip


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--epochs", "x"], ["--seed", "-1"], ["--out", "file.txt/c.safetensors"]])
def test_classifier_command_rejects_bad_arguments(in_tmp, args, capsys):
    from fewstep.tools.classifier import main

    with pytest.raises(SystemExit) as caught:
        main(["train", "--out", "c.safetensors", *args])
    assert caught.value.code == 2 and args[0] in capsys.readouterr().err
    if args[0] == "--epochs":
        args = ["--steps", args[1]]
    with pytest.raises(SystemExit) as caught:
        main(["train-noisy", "--out", "c.safetensors", *args])
    assert caught.value.code == 2 and args[0] in capsys.readouterr().err
