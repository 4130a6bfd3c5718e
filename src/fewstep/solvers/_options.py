"""Validation of solver option values, with errors that name the option and its allowed values."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """`value` must be one of `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; allowed values: {', '.join(map(repr, allowed))}")
    return value


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf, *, finite: bool = True) -> float:
    """`value` must be a real number with low <= value <= high (and finite unless finite=False)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok and finite:
        ok = math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number in [{low}, {high}], got {name}={value!r}")
    return float(value)


def check_int(name: str, value: object, low: int, high: int) -> int:
    """`value` must be an int with low <= value <= high."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {name}={value!r}")
    return int(value)
