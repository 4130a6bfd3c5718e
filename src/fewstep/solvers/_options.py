"""Validation of solver option values, with errors that name the option and its allowed values."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .. import checks


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """`value` must be one of `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; allowed values: {', '.join(allowed)}")
    return value


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf, *, finite: bool = True) -> float:
    """`value` must be a real number with low <= value <= high (and finite unless finite=False)."""
    result = checks.check_real(value, name, finite=finite)
    if not low <= result <= high:
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number in [{low}, {high}], got {name}={value!r}")
    return result


def check_int(name: str, value: object, low: int, high: int) -> int:
    """`value` must be an int with low <= value <= high (`fewstep.checks.check_int`, name first like the others here)."""
    return checks.check_int(value, name, minimum=low, maximum=high)
