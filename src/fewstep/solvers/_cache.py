"""Calibration caches on disk: stable keys, atomic writes (temporary file + os.replace), corruption detection."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_text, check_file_name


class CacheError(ValueError):
    """A cache file exists but cannot be used (unreadable, truncated, wrong key or contents)."""


def digest(key: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> list:
    """[shape, dtype, sha256 of the bytes] of a tensor: identifies calibration data in a cache key."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return [list(t.shape), str(t.dtype), hashlib.sha256(raw).hexdigest()]


def check_model_name(model_name: object, in_file_name: bool) -> str | None:
    """`model_name` (None or a string); a plain name (no folder part, no '..') when it becomes part of a file name."""
    if model_name is None:
        return None
    if not isinstance(model_name, str):
        raise ValueError(f"model_name must be a string naming the model, got {type(model_name).__name__}")
    return check_file_name(model_name, "model_name") if in_file_name else model_name


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
