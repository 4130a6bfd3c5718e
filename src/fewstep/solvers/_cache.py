"""Calibration caches on disk: stable keys, atomic writes (temporary file + os.replace), corruption detection."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_text


class CacheError(ValueError):
    """A cache file exists but cannot be used (unreadable, truncated, wrong key or contents)."""


def digest(key: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> list:
    """[shape, dtype, sha256 of the bytes] of a tensor: identifies calibration data in a cache key."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return [list(t.shape), str(t.dtype), hashlib.sha256(raw).hexdigest()]


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=1))


def read_json(path: str | os.PathLike, key: dict[str, Any]) -> dict[str, Any]:
    """Read a JSON cache record {"key": key, ...}; CacheError if it is not valid JSON or its key differs."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"cache file {path} is corrupted ({err}); delete it to recompute") from err
    if not isinstance(record, dict) or record.get("key") != json.loads(json.dumps(key)):
        raise CacheError(f"cache file {path} does not hold the expected record (key mismatch); delete it to recompute")
    return record
