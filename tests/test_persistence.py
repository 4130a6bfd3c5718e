"""Persistence under faults and hostile files: atomic writes (exclusive temporaries, umask, clean-up after a crash),
checkpoint sidecars that name files outside their folder, malformed sidecars / resume states / schedule files,
RNG capture (CUDA included), kill -9 during training and during a checkpoint write, and a reader racing saves."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep import io
from fewstep.nets import build_model
from fewstep.train import CheckpointError, TrainConfig, Trainer, distributed, load_checkpoint, read_checkpoint, save_checkpoint
from fewstep.train import checkpoint as checkpoint_module

TINY_MLP = {"type": "mlp", "dim": 2, "width": 32, "depth": 1}
posix_only = pytest.mark.skipif(os.name != "posix", reason="symlinks, umask, flock and kill -9 are POSIX")


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    values = dict(data="ring", net=TINY_MLP, steps=20, batch_size=32, checkpoint_every=0, progress=False, out_dir=str(tmp_path))
    values.update(kw)
    return TrainConfig(**values)


def _saved_trainer(folder: Path, steps: int = 1) -> Trainer:
    trainer = Trainer(tiny_config(folder))
    for _ in range(steps):
        trainer.train_step()
    trainer.save()
    return trainer


def _save_toy(folder: Path, step: int, width: int = 32) -> Path:
    """A small checkpoint (MLP on RectifiedFlow) at `folder/checkpoint.json`."""
    config = {"net": {**TINY_MLP, "width": width}, "prediction": "velocity"}
    model = build_model(config, fewstep.RectifiedFlow())
    return save_checkpoint(folder / "checkpoint", model=model, config={"model": config}, step=step)


def _edit(json_path: Path, change) -> None:
    meta = json.loads(json_path.read_text())
    json_path.write_text(json.dumps(change(meta)))


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and weights files besides the one the sidecar names."""
    named = json.loads((folder / "checkpoint.json").read_text())["weights"]
    stray = [p for p in folder.iterdir() if p.name.endswith(io.TMP_SUFFIX) or (p.suffix == ".safetensors" and p.name != named)]
    return sorted(p.name for p in stray)


# Atomic writes ---------------------------------------------------------------------------------------------------


@posix_only
def test_atomic_write_never_follows_a_planted_symlink(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "out"
    folder.mkdir()
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(io.secrets, "token_hex", lambda n: next(names))
    # the predictable names of fewstep <= 0.x and the next "random" name both lead to the victim
    (folder / f".table.md.tmp-{os.getpid()}").symlink_to(victim)
    (folder / f".table.md.aaaa{io.TMP_SUFFIX}").symlink_to(victim)
    io.atomic_write_text(folder / "table.md", "new")
    assert victim.read_text() == "precious"
    assert (folder / "table.md").read_text() == "new" and not (folder / "table.md").is_symlink()


@posix_only
@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_atomic_write_takes_permissions_from_the_umask(tmp_path, umask):
    """Also when the writer replaces the file instead of writing into it (safetensors' save_file makes it 0600)."""
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        path = io.atomic_write_bytes(tmp_path / "x.bin", b"data")
        weights = io.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask


@posix_only
def test_abandoned_temporaries_are_removed_by_the_next_write(tmp_path):
    import fcntl

    stale = tmp_path / f".checkpoint.json.0123abcd{io.TMP_SUFFIX}"
    stale.write_text("left by a kill -9")
    busy = tmp_path / f".other.json.4567cdef{io.TMP_SUFFIX}"
    busy.write_text("a live writer holds this one")
    unrelated = tmp_path / ".keep.tmp"
    unrelated.write_text("not ours")
    with open(busy, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        io.atomic_write_text(tmp_path / "checkpoint.json", "{}")
    assert not stale.exists() and busy.exists() and unrelated.exists()


# Paths named by a sidecar ----------------------------------------------------------------------------------------


def _hostile_name(case: str, folder: Path, victim: Path) -> str:
    if case == "parent":
        return "../victim.txt"
    if case == "absolute":
        return str(victim)
    if case == "subfolder":
        return "sub/../../victim.txt"
    link = folder / ("checkpoint-00000009.safetensors" if case == "own-pattern-link" else "link.safetensors")
    link.symlink_to(victim)
    return link.name


@posix_only
@pytest.mark.parametrize("case", ["parent", "absolute", "subfolder", "link-out", "own-pattern-link"])
def test_a_sidecar_cannot_name_files_outside_its_folder(tmp_path, case):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    trainer = _saved_trainer(folder)
    name = _hostile_name(case, folder, victim)
    _edit(folder / "checkpoint.json", lambda m: {**m, "weights": name, "size": victim.stat().st_size})
    with pytest.raises(CheckpointError, match=r"checkpoint\.json.*'weights'"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="'weights'"):
        trainer.resume()
    trainer.train_step()
    trainer.save()  # overwrites the hostile sidecar; deletes nothing outside the folder, nothing it did not write
    assert victim.read_text() == "precious"
    assert load_checkpoint(folder).step == 2


def test_a_save_removes_only_this_checkpoints_own_weights(tmp_path):
    _save_toy(tmp_path, 1)
    other = save_checkpoint(tmp_path / "checkpoint-best", model=build_model({"net": TINY_MLP}, fewstep.VE()),
                            config={"model": {"net": TINY_MLP}}, step=3)  # fmt: skip
    mine = tmp_path / "checkpoint-00000002.safetensors"  # an orphan of a crashed save (weights written, no sidecar)
    mine.write_bytes(b"orphan")
    keep = [tmp_path / "checkpoint-final.safetensors", tmp_path / "notes.safetensors"]
    for p in keep:
        p.write_bytes(b"not this checkpoint's")
    _save_toy(tmp_path, 4)
    assert not mine.exists() and all(p.exists() for p in keep)
    assert load_checkpoint(other).step == 3 and load_checkpoint(tmp_path).step == 4
    assert _leftovers(tmp_path) == sorted(["checkpoint-best-00000003.safetensors", *(p.name for p in keep)])


def test_model_names_and_export_names_are_plain_names(tmp_path):
    process = fewstep.VP()
    samples = torch.zeros(4, 2)
    for bad in ("../x", "a/b", "/abs", ".."):
        with pytest.raises(ValueError, match="model_name"):
            fewstep.v3_statistics(lambda x, t: x, process, samples, model_name=bad, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="model_name must be a string"):
        fewstep.v3_statistics(lambda x, t: x, process, samples, model_name=3)
    from fewstep import shipped

    with pytest.raises(ValueError, match="NAME"):
        shipped.export(tmp_path / "missing.json", "../evil", out_dir=tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        shipped.main(["export", str(tmp_path / "missing.json"), "../evil", "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "evil.json").exists()


# Malformed files -------------------------------------------------------------------------------------------------


def _without(meta: dict, key: str) -> dict:
    return {k: v for k, v in meta.items() if k != key}


SIDECAR_DEFECTS = {
    "list": (lambda m: [m], "JSON object"),
    "no-weights": (lambda m: _without(m, "weights"), "'weights' is missing"),
    "null-weights": (lambda m: {**m, "weights": None}, "'weights'"),
    "no-size": (lambda m: _without(m, "size"), "'size' is missing"),
    "text-size": (lambda m: {**m, "size": "12"}, "'size' must be int"),
    "no-sha256": (lambda m: _without(m, "sha256"), "'sha256' is missing"),
    "short-sha256": (lambda m: {**m, "sha256": "abc"}, "'sha256'"),
    "no-config": (lambda m: _without(m, "config"), "'config.model' is missing"),
    "list-config": (lambda m: {**m, "config": []}, "'config.model' is missing"),
    "null-model": (lambda m: {**m, "config": {**m["config"], "model": None}}, "'config.model' must be dict"),
    "number-process": (lambda m: {**m, "config": {**m["config"], "process": 3}}, "'config.process' must be dict"),
    "bad-process": (lambda m: {**m, "config": {**m["config"], "process": {"type": "nope"}}}, "'config.process'"),
    "bad-net": (lambda m: {**m, "config": {**m["config"], "model": {"nett": {}}}}, "'config.model'"),
    "no-step": (lambda m: _without(m, "step"), "'step' is missing"),
    "float-step": (lambda m: {**m, "step": 1.5}, "'step' must be int"),
    "bool-step": (lambda m: {**m, "step": True}, "'step' must be int"),
    "negative-step": (lambda m: {**m, "step": -1}, "'step' must be >= 0"),
    "text-has-ema": (lambda m: {**m, "has_ema": "yes"}, "'has_ema' must be bool"),
}


@pytest.mark.parametrize("defect", list(SIDECAR_DEFECTS))
def test_malformed_sidecars_fail_naming_file_and_key(tmp_path, defect):
    change, message = SIDECAR_DEFECTS[defect]
    _save_toy(tmp_path, 1)
    _edit(tmp_path / "checkpoint.json", change)
    with pytest.raises(CheckpointError, match="checkpoint.json") as info:
        load_checkpoint(tmp_path)
    assert message in str(info.value)


def _rng(m: dict, **change) -> dict:
    return {**m, "rng": {**m["rng"], **change}}


RESUME_DEFECTS = {
    "no-sampler-pos": (lambda m: {**m, "extra": _without(m["extra"], "sampler_pos")}, "'extra.sampler_pos' is missing"),
    "text-sampler-pos": (lambda m: {**m, "extra": {**m["extra"], "sampler_pos": "3"}}, "'extra.sampler_pos' must be int"),
    "huge-sampler-pos": (lambda m: {**m, "extra": {**m["extra"], "sampler_pos": 10**9}}, "sampler"),
    "null-extra": (lambda m: {**m, "extra": None}, "'extra.sampler_pos' is missing"),
    "null-ema-updates": (lambda m: {**m, "extra": {**m["extra"], "ema_updates": None}}, "'extra.ema_updates' must be int"),
    "null-rng": (lambda m: {**m, "rng": None}, "'rng'"),
    "list-rng": (lambda m: {**m, "rng": [1, 2]}, "'rng'"),
    "null-torch-rng": (lambda m: _rng(m, torch=None), "'rng.torch'"),
    "short-torch-rng": (lambda m: _rng(m, torch="AAAA"), "'rng.torch' holds 3 bytes"),
    "bad-base64": (lambda m: _rng(m, **{"generator.data": "!!not base64!!"}), "'rng.generator.data'"),
    "no-noise-rng": (lambda m: {**m, "rng": _without(m["rng"], "generator.noise")}, "'rng.generator.noise'"),
    "bad-numpy-rng": (lambda m: _rng(m, numpy={**m["rng"]["numpy"], "keys": "abc"}), "'rng.numpy'"),
    "null-numpy-rng": (lambda m: _rng(m, numpy=None), "'rng.numpy' must be dict"),
    "null-optimizer": (lambda m: {**m, "optimizer": None}, "'optimizer'"),
    "null-param-groups": (lambda m: {**m, "optimizer": {**m["optimizer"], "param_groups": None}}, "'optimizer.param_groups'"),
    "bad-param-groups": (lambda m: {**m, "optimizer": {**m["optimizer"], "param_groups": [{}]}}, "'optimizer'"),
    "list-scalars": (lambda m: {**m, "optimizer": {**m["optimizer"], "scalars": []}}, "'optimizer.scalars' must be dict"),
    "text-loss-history": (lambda m: {**m, "loss_history": "x"}, "'loss_history' must be list"),
    "null-loss": (lambda m: {**m, "loss_history": [None]}, "'loss_history' must be a list of numbers"),
}


@pytest.mark.parametrize("defect", list(RESUME_DEFECTS))
def test_malformed_resume_state_fails_naming_file_and_key(tmp_path, defect):
    change, message = RESUME_DEFECTS[defect]
    _saved_trainer(tmp_path, 2)
    _edit(tmp_path / "checkpoint.json", change)
    fresh = Trainer(tiny_config(tmp_path))
    torch_state = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="checkpoint.json") as info:
        fresh.resume()
    assert message in str(info.value)
    assert fresh.step == 0 and torch.equal(torch.get_rng_state(), torch_state)  # nothing restored


def _schedule() -> fewstep.SearchedSchedule:
    return fewstep.SearchedSchedule(torch.tensor([1.0, 0.5, 0.0]), process="VP()", solver="euler", nfe=2, steps=2)


SCHEDULE_DEFECTS = {
    "list": (lambda d: [d], "JSON object"),
    "no-times": (lambda d: _without(d, "times"), "'times' is missing"),
    "null-times": (lambda d: {**d, "times": None}, "'times' must be list"),
    "text-times": (lambda d: {**d, "times": ["a", "b", "c"]}, "'times' must be a list of numbers"),
    "nan-times": (lambda d: {**d, "times": [1.0, float("nan"), 0.0]}, "'times' must hold finite"),
    "short-times": (lambda d: {**d, "times": [1.0, 0.0]}, "'times'"),
    "rising-times": (lambda d: {**d, "times": [0.0, 0.5, 1.0]}, "'times'"),
    "text-steps": (lambda d: {**d, "steps": "2"}, "'steps' must be int"),
    "bool-nfe": (lambda d: {**d, "nfe": True}, "'nfe' must be int"),
    "zero-steps": (lambda d: {**d, "steps": 0, "times": [1.0]}, "'steps'"),
    "list-options": (lambda d: {**d, "solver_options": []}, "'solver_options' must be dict"),
    "null-history": (lambda d: {**d, "history": None}, "'history' must be list"),
    "null-solver": (lambda d: {**d, "solver": None}, "'solver' must be str"),
    "unknown-key": (lambda d: {**d, "_FIELD_TYPES": 1}, "unknown field"),
}


@pytest.mark.parametrize("defect", list(SCHEDULE_DEFECTS))
def test_malformed_schedule_files_fail_naming_file_and_key(tmp_path, defect):
    change, message = SCHEDULE_DEFECTS[defect]
    path = _schedule().save(tmp_path / "schedule.json")
    assert torch.equal(fewstep.SearchedSchedule.load(path).times, _schedule().times)
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match="schedule.json") as info:
        fewstep.SearchedSchedule.load(path)
    assert message in str(info.value)


def test_schedule_file_that_is_not_json_fails_naming_it(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="schedule.json is not valid JSON"):
        fewstep.SearchedSchedule.load(path)


# RNG states and devices ------------------------------------------------------------------------------------------


class _FakeCuda:
    """Stands in for torch.cuda: one generator state per device index, calls recorded."""

    def __init__(self):
        self.states = {0: torch.arange(16, dtype=torch.uint8), 1: torch.arange(16, 32, dtype=torch.uint8)}
        self.calls = []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: self.states[device].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: self.calls.append(("set_device", i)))

    def set_rng_state(self, state, device=0):
        self.calls.append(("set_rng_state", device))
        self.states[device] = state.clone()


def test_rng_capture_includes_the_training_devices_cuda_generator(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    state = checkpoint_module.capture_rng(device="cuda:1")
    assert "cuda" in state and "cuda" not in checkpoint_module.capture_rng(device="cpu")
    fake.states[1] = torch.zeros(16, dtype=torch.uint8)  # the generator moves on
    checkpoint_module.restore_rng(state, device="cpu")  # a CPU run ignores the CUDA state
    assert fake.calls == []
    checkpoint_module.restore_rng(state, device="cuda:1")
    assert fake.calls == [("set_rng_state", 1)] and torch.equal(fake.states[1], torch.arange(16, 32, dtype=torch.uint8))
    checkpoint_module.restore_rng(checkpoint_module.capture_rng(device="cpu"), device="cuda:1")  # CPU checkpoint on GPU
    assert len(fake.calls) == 1


def test_nccl_process_group_starts_after_set_device(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    for name, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FEWSTEP_BACKEND", raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: fake.calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    ctx = distributed.init_distributed()
    assert fake.calls == [("set_device", 1), ("init", "nccl")] and ctx.rank == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_round_trip_and_exact_resume_with_dropout_on_gpu(tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    state = checkpoint_module.capture_rng(device=device)
    first = torch.rand(1000, device=device)
    checkpoint_module.restore_rng(json.loads(json.dumps(state)), device=device)
    assert torch.equal(torch.rand(1000, device=device), first)
    net = {"type": "unet", "channels": [8, 16], "attention": [1], "dropout": 0.2}  # dropout draws from the GPU generator
    from fewstep.data import load_dataset

    data = load_dataset("digits")[:40]
    kw = dict(net=net, batch_size=16, device="cuda")
    straight = Trainer(tiny_config(tmp_path / "a", **kw), data=data)
    losses = [straight.train_step() for _ in range(6)]
    first = Trainer(tiny_config(tmp_path / "b", **kw), data=data)
    for _ in range(3):
        first.train_step()
    path = first.save()
    torch.rand(1000, device=device)  # move the GPU generator on
    resumed = Trainer(tiny_config(tmp_path / "b", **kw), data=data)
    resumed.resume(path)
    again = [resumed.train_step() for _ in range(3)]  # other dropout masks would change the losses by far more
    assert again == pytest.approx(losses[3:], rel=0, abs=1e-5)


# Fault injection -------------------------------------------------------------------------------------------------

def _train_reporting_steps(args: list[str], log: str) -> None:
    """In a child process: `fewstep train args`, writing each finished step to `log` (unbuffered) as it goes."""
    from typer.testing import CliRunner

    from fewstep.cli import app
    from fewstep.train import trainer as trainer_module

    step, out = trainer_module.Trainer.train_step, open(log, "w", buffering=1)

    def reported(self):
        loss = step(self)
        out.write(f"{self.step}\n")
        return loss

    trainer_module.Trainer.train_step = reported
    CliRunner().invoke(app, args)


def _train_command(out: Path, steps: int, every: int) -> list[str]:
    sets = {"checkpoint_every": every, "net": '{type="mlp", dim=2, width=16, depth=1}', "sample_steps": 2, "sample_count": 8}
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    return ["train", "--data", "ring", "--steps", str(steps), "--batch-size", "32", "--threads", "1", "--no-progress",
            "--out", str(out), *flags]  # fmt: skip


@posix_only
def test_kill_9_during_training_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    steps, every = 200, 10
    from typer.testing import CliRunner

    from fewstep.cli import app

    kill_after = random.randint(every + 1, steps // 2)  # a random point mid-run (printed on failure)
    log = tmp_path / "steps.log"
    run = _fork(_train_reporting_steps, _train_command(tmp_path / "run", steps, every), str(log))
    deadline = time.monotonic() + 60
    while run.is_alive() and time.monotonic() < deadline:
        done = log.read_text().split() if log.exists() else []
        if done and int(done[-1]) >= kill_after:
            break
        time.sleep(0.002)
    assert run.is_alive(), f"the run ended before the kill at step {kill_after}"
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    reached = int(log.read_text().split()[-1])
    saved = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"]
    assert reached - every <= saved <= reached, (kill_after, reached, saved)  # at most one interval lost
    resumed = CliRunner().invoke(app, [*_train_command(tmp_path / "run", steps, every), "--resume", "auto"])
    assert resumed.exit_code == 0 and f"resumed from step {saved}" in resumed.output, resumed.output
    straight = CliRunner().invoke(app, _train_command(tmp_path / "straight", steps, every))
    assert straight.exit_code == 0, straight.output
    history = [json.loads((tmp_path / d / "checkpoint.json").read_text())["loss_history"] for d in ("run", "straight")]
    assert len(history[0]) == steps and history[0] == history[1], kill_after
    assert _leftovers(tmp_path / "run") == []


def _crash_in_save(folder: str, crash: str) -> None:
    """In a child process: one good save, then a save that kills itself (SIGKILL) at the point `crash`."""
    _save_toy(Path(folder), 1)
    calls = {"replace": 0}
    real_replace, real_unlink = os.replace, os.unlink

    def replace(src, dst):
        calls["replace"] += 1
        if (crash == "weights" and calls["replace"] == 1) or (crash == "sidecar" and calls["replace"] == 2):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    def unlink(path, *a, **kw):
        if crash == "old-weights" and str(path).endswith("00000001.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_unlink(path, *a, **kw)

    os.replace, os.unlink = replace, unlink
    _save_toy(Path(folder), 2)


def _save_forever(folder: str) -> None:
    for step in range(1, 10**6):
        _save_toy(Path(folder), step, width=256)


def _fork(target, *args) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


@posix_only
@pytest.mark.parametrize("crash", ["weights", "sidecar", "old-weights"])
def test_kill_9_inside_a_checkpoint_write_leaves_a_valid_checkpoint(tmp_path, crash):
    child = _fork(_crash_in_save, str(tmp_path), crash)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert load_checkpoint(tmp_path).step == (1 if crash != "old-weights" else 2)
    assert _leftovers(tmp_path)  # the crash left a temporary file or an orphaned weights file
    _save_toy(tmp_path, 3)
    assert _leftovers(tmp_path) == [] and load_checkpoint(tmp_path).step == 3


@posix_only
def test_kill_9_at_random_times_while_saving_in_a_loop(tmp_path):
    for _ in range(3):
        child = _fork(_save_forever, str(tmp_path))
        deadline = time.monotonic() + 30
        while not (tmp_path / "checkpoint.json").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(random.uniform(0.0, 0.2))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        read_checkpoint(tmp_path)  # valid (size and SHA-256 checked)
    _save_toy(tmp_path, 10**6, width=256)
    assert _leftovers(tmp_path) == []


@posix_only
def test_a_reader_racing_saves_always_loads_a_complete_checkpoint(tmp_path):
    _save_toy(tmp_path, 0, width=256)
    writer = _fork(_save_forever, str(tmp_path))
    try:
        steps, deadline = set(), time.monotonic() + 1.5
        while time.monotonic() < deadline:
            meta, tensors = read_checkpoint(tmp_path)  # never "missing" nor "corrupt"
            assert any(k.startswith("model.") for k in tensors)
            steps.add(meta["step"])
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
    assert len(steps) >= 5  # the reader did race several saves


def test_read_checkpoint_retries_when_a_save_replaced_the_weights_in_between(tmp_path, monkeypatch):
    _save_toy(tmp_path, 1)
    real = checkpoint_module._read_json
    calls = []

    def read_then_save(json_path):
        meta = real(json_path)
        calls.append(meta["step"])
        if len(calls) == 1:
            _save_toy(tmp_path, 2)  # replaces the sidecar and deletes the weights `meta` names
        return meta

    monkeypatch.setattr(checkpoint_module, "_read_json", read_then_save)
    meta, _ = read_checkpoint(tmp_path)
    assert meta["step"] == 2 and calls == [1, 2]
