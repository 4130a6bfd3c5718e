"""Many samples of one model: per-sample seeds (a sample does not depend on the batch it was drawn in) and shards
on disk that a rerun resumes.

Sample i of seed S draws its noise, and a stochastic solver's noise, from its own `torch.Generator` seeded
S * SEED_STRIDE + i, so any batch size, shard size or resumed run gives sample i the same noise, hence the same
sample up to the network's own float32 round-off (a convolution may sum in another order at another batch size).
`write_shards` writes samples [start, stop) per shard as `<stem>-00000.npy`, ... beside `out` with an index
`<stem>-index.json` (every write atomic, `fewstep.io`): a rerun with the same settings skips the shards the index
lists as complete; an index of other settings (or other model weights) is refused, never mixed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_write, atomic_write_text

SEED_STRIDE = 1_000_003
FORMAT = "fewstep-samples"
VERSION = 1

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


def write_shards(
    out: str | os.PathLike,
    make: Callable[[int, int], torch.Tensor],
    *,
    n: int,
    shard_size: int,
    settings: dict[str, Any],
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write samples 0..n-1 as shards of `shard_size` (`make(start, stop)` samples one shard) and their index; returns
    the index path. Shards the index (of the same n, shard size and `settings`) lists whose file still holds the
    recorded shape are skipped; ValueError naming `out` when the index was written with other settings."""
    say = log or (lambda text: None)
    index_file = index_path(out)
    index = _resume(index_file, n, shard_size, settings)
    done = {entry["file"]: entry for entry in index["shards"] if _complete(index_file.parent / entry["file"], entry)}
    index["shards"] = sorted(done.values(), key=lambda e: e["start"])
    count = -(-n // shard_size)
    for k in range(count):
        path, start, stop = shard_path(out, k), k * shard_size, min((k + 1) * shard_size, n)
        if path.name in done:
            say(f"shard {k + 1}/{count} ({path.name}) is complete: skipped")
            continue
        x = make(start, stop)
        save_npy(path, x)
        dtype = str(x.dtype).removeprefix("torch.")
        index["shards"].append({"file": path.name, "start": start, "stop": stop, "shape": list(x.shape), "dtype": dtype})
        index["shards"].sort(key=lambda e: e["start"])
        index["complete"] = len(index["shards"]) == count
        atomic_write_text(index_file, json.dumps(index, indent=1))
        say(f"shard {k + 1}/{count}: samples {start}..{stop - 1} -> {path.name}")
    index["complete"] = True
    atomic_write_text(index_file, json.dumps(index, indent=1))
    return index_file


def check_resume(out: str | os.PathLike, *, n: int, shard_size: int, settings: dict[str, Any]) -> int:
    """How many shards of `out` an existing index lists for these settings (0 without an index); ValueError naming
    out when the index there was written with other settings or is unreadable."""
    return len(_resume(index_path(out), n, shard_size, settings)["shards"])


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
