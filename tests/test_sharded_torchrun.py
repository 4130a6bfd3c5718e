"""Many samples split over processes: `torchrun --nproc_per_node 2 -m fewstep.cli sample --model digits_vp ...` (gloo,
CPU) writes exactly the shards of the one-process run, one index that lists every shard once, and resumes after an
interruption (shards recorded only in a rank's index part, a shard lost) rewriting only what is missing, with any
number of processes; settings that differ are refused; RANK / WORLD_SIZE that do not fit together are a usage
error. `write_shards` itself is also run by 2 and 3 ranks as threads with a threading barrier (no process group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.sharded import Ranks, check_resume, index_path, part_path, part_paths, ranks_from_env, shard_path, write_shards

N, SHARD = 24, 5  # 5 shards: rank 0 of 2 writes 0, 2, 4; rank 1 writes 1, 3
ARGS = f"sample --model digits_vp --num-samples {N} --shard-size {SHARD} --steps 2 --batch-size 4".split()
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fewstep.cli"]


def torchrun(out) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([*LAUNCH, *ARGS, "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def shards(out) -> list[np.ndarray]:
    return [np.load(shard_path(out, k)) for k in range(-(-N // SHARD))]


def listed(out) -> list[str]:
    return [e["file"] for e in json.loads(index_path(out).read_text())["shards"]]


def test_two_processes_write_the_shards_of_one_process_and_resume(tmp_path):
    torch.set_num_threads(1)
    one, two = tmp_path / "one" / "x.npy", tmp_path / "two" / "x.npy"
    one.parent.mkdir()
    ref = CliRunner().invoke(app, [*ARGS, "--out", str(one)])
    assert ref.exit_code == 0, ref.output
    log = torchrun(two)
    assert "over 2 processes" in " ".join(log.split())
    names = [shard_path(two, k).name for k in range(5)]
    assert listed(two) == names and json.loads(index_path(two).read_text())["complete"]
    assert part_paths(two) == [] and not two.exists()
    # per-sample seeds and the same batches within each shard: bit-identical, not only to float32 round-off
    for a, b in zip(shards(one), shards(two), strict=True):
        np.testing.assert_array_equal(a, b)
    # interrupted: shard 1 lost, and rank 1's shard 3 recorded only in its index part (the merge never ran)
    index = json.loads(index_path(two).read_text())
    entry3 = next(e for e in index["shards"] if e["file"] == names[3])
    index["shards"] = [e for e in index["shards"] if e["file"] not in (names[1], names[3])]
    index["complete"] = False
    index_path(two).write_text(json.dumps(index))
    part_path(two, 1).write_text(json.dumps({**index, "shards": [entry3]}))
    shard_path(two, 1).unlink()
    kept = {k: shard_path(two, k).stat().st_mtime_ns for k in (0, 2, 3, 4)}
    log = " ".join(torchrun(two).split())
    assert "samples 5..9 -> x-00001.npy" in log and log.count("is complete: skipped") == 4, log
    assert {k: shard_path(two, k).stat().st_mtime_ns for k in kept} == kept  # only the missing shard was rewritten
    assert listed(two) == names and part_paths(two) == [] and json.loads(index_path(two).read_text())["complete"]
    for a, b in zip(shards(one), shards(two), strict=True):
        np.testing.assert_array_equal(a, b)
    # another seed into the same shards: refused, naming --out and what differs
    other = CliRunner().invoke(app, [*ARGS, "--seed", "3", "--out", str(two)])
    assert other.exit_code == 2 and "--out" in other.output and "seed" in other.output, other.output


def run_ranks(out, world: int, make, settings=None, fail_rank: int | None = None) -> list[BaseException | None]:
    """write_shards by `world` threads as ranks with a threading barrier; rank `fail_rank` dies on its second shard."""
    barrier, errors = threading.Barrier(world), [None] * world

    def rank(r: int) -> None:
        made = []

        def make_r(start: int, stop: int) -> torch.Tensor:
            if r == fail_rank and made:
                raise KeyboardInterrupt  # killed
            made.append(start)
            return make(start, stop)

        try:
            write_shards(out, make_r, n=N, shard_size=SHARD, settings=settings or {"seed": 0}, ranks=Ranks(r, world),
                         barrier=lambda: barrier.wait(timeout=20))  # fmt: skip
        except BaseException as err:  # noqa: BLE001 - a rank's death, as a test outcome
            errors[r] = err
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_write_shards_by_ranks_resumes_with_any_number_of_ranks(tmp_path):
    calls: list[int] = []
    lock = threading.Lock()

    def make(start: int, stop: int) -> torch.Tensor:
        with lock:
            calls.append(start)
        return torch.arange(start, stop, dtype=torch.float32)[:, None] * torch.ones(3)

    out = tmp_path / "x.npy"
    errors = run_ranks(out, 2, make, fail_rank=1)  # rank 1 writes shard 1, dies on shard 3
    assert isinstance(errors[1], KeyboardInterrupt)
    assert sorted(calls) == [0, 5, 10, 20] and listed(out) == ["x-00000.npy", "x-00002.npy", "x-00004.npy"]
    assert part_paths(out) == [part_path(out, 1)] and check_resume(out, n=N, shard_size=SHARD, settings={"seed": 0}) == 4
    with pytest.raises(ValueError, match=r"out: .*x-index.json .*differ: seed"):
        check_resume(out, n=N, shard_size=SHARD, settings={"seed": 1})
    other = tmp_path / "y.npy"  # a part alone, of other settings, is refused too
    part_path(other, 1).write_text(part_path(out, 1).read_text())
    with pytest.raises(ValueError, match=r"out: .*y-index-rank00001.json .*differ: seed"):
        check_resume(other, n=N, shard_size=SHARD, settings={"seed": 1})
    calls.clear()
    assert run_ranks(out, 3, make) == [None, None, None]  # another world size: only shard 3 is made
    assert calls == [15]
    index = json.loads(index_path(out).read_text())
    assert index["complete"] and listed(out) == [f"x-{k:05d}.npy" for k in range(5)] and part_paths(out) == []
    assert [(e["start"], e["stop"], e["shape"]) for e in index["shards"]] == [(0, 5, [5, 3]), (5, 10, [5, 3]), (10, 15, [5, 3]),
                                                                              (15, 20, [5, 3]), (20, 24, [4, 3])]  # fmt: skip
    x = np.concatenate([np.load(shard_path(out, k)) for k in range(5)])
    np.testing.assert_array_equal(x, np.arange(N, dtype=np.float32)[:, None] * np.ones(3, dtype=np.float32))
    calls.clear()
    write_shards(out, make, n=N, shard_size=SHARD, settings={"seed": 0})  # one process: all complete
    assert calls == [] and listed(out) == [f"x-{k:05d}.npy" for k in range(5)]
    with pytest.raises(ValueError, match="barrier"):
        write_shards(out, make, n=N, shard_size=SHARD, settings={"seed": 0}, ranks=Ranks(0, 2))


MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}


@pytest.mark.parametrize(
    "env, words",
    [
        ({"WORLD_SIZE": "two"}, ["WORLD_SIZE must be an integer >= 1", "'two'"]),
        ({"WORLD_SIZE": "0", "RANK": "0"}, ["WORLD_SIZE must be an integer >= 1"]),
        ({"WORLD_SIZE": "2", **MASTER}, ["RANK is not set", "torchrun"]),
        ({"RANK": "1"}, ["WORLD_SIZE is not", "RANK='1'"]),
        ({"WORLD_SIZE": "2", "RANK": "2", **MASTER}, ["RANK=2 must be below WORLD_SIZE=2"]),
        ({"WORLD_SIZE": "2", "RANK": "-1", **MASTER}, ["RANK must be an integer >= 0"]),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **MASTER}, ["LOCAL_RANK=2"]),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_WORLD_SIZE": "3", **MASTER}, ["LOCAL_WORLD_SIZE=3", "WORLD_SIZE=2"]),
        ({"WORLD_SIZE": "2", "RANK": "1"}, ["MASTER_ADDR and MASTER_PORT not set"]),
    ],
)
def test_inconsistent_rank_environment_is_refused(env, words):
    with pytest.raises(ValueError) as err:
        ranks_from_env(env)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_rank_environment_of_torchrun_and_usage_errors(tmp_path):
    assert ranks_from_env({}) == Ranks(0, 1, 0) and ranks_from_env({"RANK": "0"}) == Ranks()
    torchrun_env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", **MASTER}
    ranks = ranks_from_env(torchrun_env)
    assert ranks == Ranks(3, 4, 1) and list(ranks.shards(10)) == [3, 7]
    runner = CliRunner()
    bad = runner.invoke(app, [*ARGS, "--out", str(tmp_path / "x.npy")], env={"WORLD_SIZE": "2", "RANK": "5", **MASTER})
    assert bad.exit_code == 2 and "RANK=5 must be below WORLD_SIZE=2" in " ".join(bad.output.split()), bad.output
    png = runner.invoke(app, [*ARGS, "--out", str(tmp_path / "x.png")], env={"WORLD_SIZE": "2", "RANK": "0", **MASTER})
    assert png.exit_code == 2 and "--shard-size" in png.output and "split the samples by shard" in " ".join(png.output.split())
