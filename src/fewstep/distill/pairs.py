"""Coupled (noise, teacher sample) pairs on disk: safetensors shards that a rerun resumes, shared over processes.

The pairs of reflow (Liu et al., "Flow Straight and Fast", ICLR 2023: the teacher's ODE maps noise z to a sample x,
and a new model is trained on the coupling (z, x)) and of DMD's regression loss (Yin et al., 2024). `write_pairs`
samples the teacher with any fewstep solver; shard k holds pairs [k S, min(n, (k + 1) S)) as
`pairs-<k>.safetensors` with tensors "noise" and "sample" [rows, *shape] (float32), its noise drawn from a generator
seeded seed * SEED_STRIDE + k, so a shard does not depend on the batch size, the number of processes or a resume.
Process r of W writes the shards k with k % W == r; a shard already on disk and readable is kept. `pairs.json` holds
the settings: a rerun with other settings into the same folder is refused, never mixed. Every write is atomic.
`load_pairs` reads them all back and names the shard that is missing, empty or corrupted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_bytes, atomic_write_text
from ..sampling import sample
from ..train.process_config import process_config
from .teacher import Teacher, load_teacher

FORMAT = "fewstep-pairs"
VERSION = 1
SEED_STRIDE = 1_000_003
INDEX = "pairs.json"


class PairError(ValueError):
    """A pair folder that cannot be used: missing index or shard, empty or corrupted shard, other settings."""


def shard_file(folder: str | os.PathLike, k: int) -> Path:
    return Path(folder) / f"pairs-{k:05d}.safetensors"


def _settings(teacher: Teacher, n: int, shard_size: int, seed: int, shape: Sequence[int], plan: dict[str, Any]) -> dict:
    return {"format": FORMAT, "version": VERSION, "n": n, "shard_size": shard_size, "seed": seed, "shape": list(shape),
            "process": process_config(teacher.process), "prediction": teacher.prediction, "teacher": teacher.name,
            "sampler": plan}  # fmt: skip


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    return value


def write_pairs(
    teacher: Any,
    folder: str | os.PathLike,
    n: int,
    shape: Sequence[int],
    *,
    shard_size: int = 1024,
    seed: int = 0,
    solver: str = "dpmpp_2m",
    steps: int = 20,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Path:
    """Sample `n` pairs (noise [shape], teacher sample [shape]) with `fewstep.sample(solver, steps, **options)` into
    `folder` (resuming: complete shards are kept); this process (`rank` of `world_size`) writes its shards. Returns
    the index path. `teacher`: a Teacher, shipped name, checkpoint path or model (`load_teacher`)."""
    teacher = load_teacher(teacher)
    for name, value in (("n", n), ("shard_size", shard_size), ("batch_size", batch_size), ("steps", steps),
                        ("world_size", world_size)):  # fmt: skip
        _check_positive(name, value)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    plan = {"solver": solver, "steps": steps, **options}
    settings = _settings(teacher, n, shard_size, seed, shape, plan)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / INDEX
    if index.exists():
        theirs = _read_index(folder)
        if theirs != json.loads(json.dumps(settings)):
            raise PairError(f"{index} holds pairs of other settings ({theirs}); use another folder or remove it")
    else:
        atomic_write_text(index, json.dumps(settings, indent=1))
    say = log or (lambda text: None)
    for k in range(rank, _shards(n, shard_size), world_size):
        path = shard_file(folder, k)
        if path.exists() and _readable(path, _rows(k, n, shard_size), shape):
            continue
        noise, x = _sample_shard(teacher, k, n, shard_size, seed, shape, plan, batch_size)
        from safetensors.torch import save

        atomic_write_bytes(path, save({"noise": noise.contiguous(), "sample": x.contiguous()}))
        say(f"wrote {path} ({len(x)} pairs)")
    return index


def _shards(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def _rows(k: int, n: int, shard_size: int) -> int:
    return min(n, (k + 1) * shard_size) - k * shard_size


@torch.no_grad()
def _sample_shard(teacher: Teacher, k: int, n: int, shard_size: int, seed: int, shape, plan, batch_size: int):
    rows = _rows(k, n, shard_size)
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + k)
    noise = torch.randn((rows, *shape), generator=g)
    parts = []
    for lo in range(0, rows, batch_size):
        z = noise[lo : lo + batch_size]
        x = sample(teacher.model, z, process=teacher.process, prediction=teacher.prediction, generator=g, **plan)
        parts.append(x.float())
    return noise, torch.cat(parts)


def _read_index(folder: Path) -> dict[str, Any]:
    index = folder / INDEX
    try:
        settings = json.loads(index.read_text())
    except FileNotFoundError:
        raise PairError(f"{folder} holds no pair set: {INDEX} is missing (write it with write_pairs)") from None
    except (OSError, ValueError) as err:
        raise PairError(f"{index} cannot be read: {err}") from err
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise PairError(f"{index} is not a fewstep pair index (format {FORMAT!r})")
    return settings


def _read_shard(path: Path, rows: int, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, sample) of one shard; PairError naming the file when it is missing, empty, corrupted or non-finite."""
    from safetensors.torch import load

    if not path.exists():
        raise PairError(f"pair shard {path} is missing: run write_pairs again with the same settings to finish the set")
    data = path.read_bytes()
    if not data:
        raise PairError(f"pair shard {path} is empty (0 bytes): delete it and run write_pairs again")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types for a truncated or garbled file
        raise PairError(f"pair shard {path} is corrupted ({err}): delete it and run write_pairs again") from err
    expected = (rows, *shape)
    for key in ("noise", "sample"):
        t = tensors.get(key)
        if t is None or tuple(t.shape) != expected:
            got = "missing" if t is None else tuple(t.shape)
            raise PairError(f"pair shard {path}: tensor {key!r} is {got}, expected shape {expected}")
        if not bool(torch.isfinite(t).all()):
            raise PairError(f"pair shard {path}: tensor {key!r} has non-finite values")
    return tensors["noise"], tensors["sample"]


def _readable(path: Path, rows: int, shape: Sequence[int]) -> bool:
    try:
        _read_shard(path, rows, shape)
    except PairError:
        return False
    return True


def load_pairs(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(noise [n, ...], teacher samples [n, ...], settings) of a complete pair folder; PairError naming what is wrong."""
    folder = Path(folder)
    settings = _read_index(folder)
    n, size, shape = settings["n"], settings["shard_size"], tuple(settings["shape"])
    if not n:
        raise PairError(f"{folder / INDEX} describes an empty pair set (n = 0)")
    parts = [_read_shard(shard_file(folder, k), _rows(k, n, size), shape) for k in range(_shards(n, size))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), settings


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m fewstep.distill.pairs --teacher digits_flow --n 20000 --out pairs/`; under torchrun each process
    writes its shards (RANK, WORLD_SIZE)."""
    import argparse

    from ..sample_model import sample_shape
    from ..shipped import load_model

    parser = argparse.ArgumentParser(prog="python -m fewstep.distill.pairs", description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="shipped model name or checkpoint path")
    parser.add_argument("--n", type=int, required=True, help="number of pairs")
    parser.add_argument("--out", required=True, help="folder of the pair set")
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    loaded = load_model(args.teacher)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    teacher = Teacher(loaded.model, loaded.process, loaded.prediction, dict(loaded.config["model"]), args.teacher)
    index = write_pairs(teacher, args.out, args.n, sample_shape(loaded), shard_size=args.shard_size, seed=args.seed,
                        solver=args.solver, steps=args.steps, batch_size=args.batch_size, rank=rank, world_size=world,
                        log=print)  # fmt: skip
    print(f"pairs: {index}")


if __name__ == "__main__":
    main()
