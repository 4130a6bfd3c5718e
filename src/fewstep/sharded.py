"""Many samples of one model: per-sample seeds (a sample does not depend on the batch it was drawn in) and shards
on disk that a rerun resumes.

Sample i of seed S draws its noise, and a stochastic solver's noise, from its own `torch.Generator` seeded
S * SEED_STRIDE + i, so any batch size, shard size or resumed run gives sample i the same noise, hence the same
sample up to the network's own float32 round-off (a convolution may sum in another order at another batch size).
`write_shards` writes samples [start, stop) per shard as `<stem>-00000.npy`, ... beside `out` with an index
`<stem>-index.json` (every write atomic, `fewstep.io`): a rerun with the same settings skips the shards the index
lists as complete; an index of other settings (or other model weights) is refused, never mixed.

Several processes (`torchrun --nproc_per_node P`, or `accelerate launch`, which set RANK and WORLD_SIZE; see
`ranks_from_env`) split the shards: shard k belongs to rank k % P, and each rank writes only its own shards. The
index has one writer, rank 0: it records its own shards there as it goes, rank r > 0 records its shards in its own
part `<stem>-index-rank<r>.json`, and after a barrier (torch.distributed, gloo) rank 0 merges the parts into the
index and deletes them. A run that stopped early leaves shards listed in the index or in parts; the next run, with
any number of processes, first merges the parts of every earlier run (rank 0, between two barriers), so it resumes
from every shard that is complete, and the samples do not depend on the number of processes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_write, atomic_write_text

SEED_STRIDE = 1_000_003
FORMAT = "fewstep-samples"
VERSION = 1
BARRIER_TIMEOUT = timedelta(hours=24)  # ranks wait at most this long for the slowest one (a resume may be unbalanced)

# draw(generators [b], noise [b, ...], indices [b]) -> samples [b, ...]
Draw = Callable[[list[torch.Generator], torch.Tensor, torch.Tensor], torch.Tensor]


def sample_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    """One CPU generator per sample index in [start, stop), seeded seed * SEED_STRIDE + index."""
    return [torch.Generator().manual_seed(seed * SEED_STRIDE + i) for i in range(start, stop)]


def per_sample_noise(shape: Sequence[int], generators: list[torch.Generator], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [len(generators), *shape]: row b drawn from generators[b] alone."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in generators])


def sample_range(
    draw: Draw,
    shape: Sequence[int],
    seed: int,
    start: int,
    stop: int,
    *,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Samples start..stop-1 [stop - start, ...] in batches of at most `batch_size`: `draw(generators, noise,
    indices)` samples one batch from its per-sample noise; the generators (already past the noise) serve a stochastic
    solver. `on_batch(count)` is called after each batch (progress)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
    parts = []
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        generators = sample_generators(seed, lo, hi)
        noise = per_sample_noise(shape, generators, dtype)
        parts.append(draw(generators, noise, torch.arange(lo, hi)))
        if on_batch is not None:
            on_batch(hi - lo)
    return torch.cat(parts)


def shard_path(out: str | os.PathLike, k: int) -> Path:
    """The file of shard k of `out` (x.npy -> x-00000.npy)."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{k:05d}{out.suffix}")


def index_path(out: str | os.PathLike) -> Path:
    """The index of the shards of `out` (x.npy -> x-index.json)."""
    out = Path(out)
    return out.with_name(f"{out.stem}-index.json")


def save_npy(path: str | os.PathLike, x: torch.Tensor) -> Path:
    """Write x as a .npy file, atomically."""

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, x.detach().cpu().numpy())

    return atomic_write(path, save)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes that split the shards: shard k belongs to rank k % world_size."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def shards(self, count: int) -> range:
        """The shards of `count` this rank writes."""
        return range(self.rank, count, self.world_size)


def ranks_from_env(environ: Mapping[str, str] | None = None) -> Ranks:
    """This process's Ranks from RANK, WORLD_SIZE and LOCAL_RANK (set by torchrun / accelerate launch; one process
    when WORLD_SIZE is unset); ValueError naming the variable that is malformed or inconsistent."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1, minimum=1)
    if "RANK" not in env and world > 1:
        raise ValueError(f"WORLD_SIZE={world} but RANK is not set: start the processes with torchrun or accelerate "
                         "launch (they set RANK, WORLD_SIZE and LOCAL_RANK)")  # fmt: skip
    if "WORLD_SIZE" not in env and env.get("RANK", "0").strip() != "0":
        raise ValueError(f"RANK={env['RANK']!r} is set but WORLD_SIZE is not: set both (torchrun does) or neither")
    rank = _env_int(env, "RANK", 0, minimum=0)
    if rank >= world:
        raise ValueError(f"RANK={rank} must be below WORLD_SIZE={world} (ranks are 0 to {world - 1})")
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world, minimum=1)
    local = _env_int(env, "LOCAL_RANK", 0, minimum=0)
    if local_world > world or local >= local_world:
        raise ValueError(f"LOCAL_RANK={local} must be below LOCAL_WORLD_SIZE={local_world}, and LOCAL_WORLD_SIZE at most "
                         f"WORLD_SIZE={world}")  # fmt: skip
    if world > 1 and not _group_exists():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: the processes meet there; start them "
                             "with torchrun or accelerate launch")  # fmt: skip
    return Ranks(rank, world, local)


def _env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    text = env.get(name)
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={text!r}")
    return value


def _group_exists() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextmanager
def rank_barrier(ranks: Ranks) -> Iterator[Callable[[], None]]:
    """A barrier over all ranks (nothing to wait for with one process): torch.distributed with gloo, on CPU, so no
    NCCL or GPU is needed. Joins the process group from the environment (MASTER_ADDR, MASTER_PORT) unless one
    exists, and leaves it at the end if it joined it."""
    if ranks.world_size == 1:
        yield lambda: None
        return
    import torch.distributed as dist

    joined = not _group_exists()
    if joined:
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=BARRIER_TIMEOUT)
    elif (dist.get_rank(), dist.get_world_size()) != (ranks.rank, ranks.world_size):
        raise ValueError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment "
                         f"RANK={ranks.rank} of WORLD_SIZE={ranks.world_size}")  # fmt: skip
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield lambda: dist.barrier(group=group)
    finally:
        if joined:
            dist.destroy_process_group()


def part_path(out: str | os.PathLike, rank: int) -> Path:
    """Rank `rank`'s part of the index of `out` (x.npy, rank 1 -> x-index-rank00001.json)."""
    out = Path(out)
    return out.with_name(f"{out.stem}-index-rank{rank:05d}.json")


def part_paths(out: str | os.PathLike) -> list[Path]:
    """The index parts of `out` on disk (of any rank, of this run or of an earlier one), sorted."""
    out = Path(out)
    pattern = re.compile(rf"{re.escape(out.stem)}-index-rank\d{{5,}}\.json")
    folder = out.parent
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


def write_shards(
    out: str | os.PathLike,
    make: Callable[[int, int], torch.Tensor],
    *,
    n: int,
    shard_size: int,
    settings: dict[str, Any],
    log: Callable[[str], None] | None = None,
    ranks: Ranks = Ranks(),
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Write samples 0..n-1 as shards of `shard_size` (`make(start, stop)` samples one shard) and their index; returns
    the index path. Shards the index or its parts (of the same n, shard size and `settings`) list whose file still
    holds the recorded shape are skipped; ValueError naming `out` when they were written with other settings.
    With several processes every rank calls this with its `ranks` and a `barrier` over all ranks (`rank_barrier`):
    it writes the shards k with k % world_size == rank; rank 0 alone writes the index."""
    if ranks.world_size > 1 and barrier is None:
        raise ValueError(f"barrier: {ranks.world_size} ranks write one index: pass a barrier over them (rank_barrier)")
    wait = barrier or (lambda: None)
    say = log or (lambda text: None)
    count = -(-n // shard_size)
    check_resume(out, n=n, shard_size=shard_size, settings=settings)  # every rank reads before rank 0 rewrites
    wait()
    if ranks.rank == 0:
        _merge(out, n, shard_size, settings)
    wait()
    own_file = index_path(out) if ranks.rank == 0 else part_path(out, ranks.rank)
    own = _resume(own_file, n, shard_size, settings)
    done = {entry["file"] for entry in _listed(out, n, shard_size, settings, parts=False)}
    for k in ranks.shards(count):
        path, start, stop = shard_path(out, k), k * shard_size, min((k + 1) * shard_size, n)
        if path.name in done:
            say(f"shard {k + 1}/{count} ({path.name}) is complete: skipped")
            continue
        x = make(start, stop)
        save_npy(path, x)
        dtype = str(x.dtype).removeprefix("torch.")
        own["shards"].append({"file": path.name, "start": start, "stop": stop, "shape": list(x.shape), "dtype": dtype})
        own["shards"].sort(key=lambda e: e["start"])
        own["complete"] = len(own["shards"]) == count
        atomic_write_text(own_file, json.dumps(own, indent=1))
        say(f"shard {k + 1}/{count}: samples {start}..{stop - 1} -> {path.name}")
    wait()
    if ranks.rank == 0:
        _merge(out, n, shard_size, settings)
    wait()
    return index_path(out)


def check_resume(out: str | os.PathLike, *, n: int, shard_size: int, settings: dict[str, Any]) -> int:
    """How many complete shards of `out` the index and its parts list for these settings (0 without any); ValueError
    naming out when one of them was written with other settings or is unreadable. Reads only."""
    return len(_listed(out, n, shard_size, settings))


def _listed(out: str | os.PathLike, n: int, shard_size: int, settings: dict[str, Any], *, parts: bool = True) -> list[dict]:
    """The entries, once per shard and sorted, of the index (and its parts) whose shard file is complete."""
    files = [index_path(out), *(part_paths(out) if parts else [])]
    names = {shard_path(out, k).name for k in range(-(-n // shard_size))}
    entries = {}
    for file in files:
        for entry in _resume(file, n, shard_size, settings)["shards"]:
            if entry["file"] in names and _complete(file.parent / entry["file"], entry):
                entries[entry["file"]] = entry
    return sorted(entries.values(), key=lambda e: e["start"])


def _merge(out: str | os.PathLike, n: int, shard_size: int, settings: dict[str, Any]) -> None:
    """Rank 0: the index := every complete shard the index and the parts list; then the parts are deleted."""
    index_file, parts = index_path(out), part_paths(out)
    index = _resume(index_file, n, shard_size, settings)
    index["shards"] = _listed(out, n, shard_size, settings)
    index["complete"] = len(index["shards"]) == -(-n // shard_size)
    atomic_write_text(index_file, json.dumps(index, indent=1))
    for part in parts:
        part.unlink(missing_ok=True)


def _resume(index_file: Path, n: int, shard_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The index to continue: the existing one if it was written with the same n, shard size and settings, else a
    new one (ValueError when an index of other settings is there)."""
    fresh = {"format": FORMAT, "version": VERSION, "n": n, "shard_size": shard_size,
             "settings": json.loads(json.dumps(settings)), "complete": False, "shards": []}  # fmt: skip
    if not index_file.exists():
        return fresh
    try:
        old = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"out: the shard index {index_file} is unreadable ({err}); delete it or choose another out") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT or not isinstance(old.get("shards"), list):
        raise ValueError(f"out: {index_file} is not a fewstep shard index; delete it or choose another out")
    differ = [key for key in ("n", "shard_size", "settings") if old.get(key) != fresh[key]]
    if differ:
        old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
        changed = sorted(k for k, v in fresh["settings"].items() if old_settings.get(k) != v)
        keys = [k for k in differ if k != "settings"] + changed
        raise ValueError(
            f"out: {index_file} indexes shards written with other settings (differ: {', '.join(dict.fromkeys(keys))}); "
            "rerun with the same settings to resume, or choose another out"
        )
    return {**fresh, "shards": [e for e in old["shards"] if isinstance(e, dict) and isinstance(e.get("file"), str)]}


def _complete(path: Path, entry: dict[str, Any]) -> bool:
    """Whether the shard file holds the shape the index recorded for it (header read only)."""
    try:
        return list(np.load(path, mmap_mode="r").shape) == entry.get("shape")
    except (OSError, ValueError):
        return False
