"""Validation of scalar arguments at the public boundary: one check per kind of value, shared by every module.

The lowest layer of fewstep (imports only torch): every public function that takes a time, a step count or a
numeric option validates it here, so that bad input always gives a ValueError naming the parameter.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any

import torch

MAX_STEPS = 100_000  # a bound on `steps` far beyond any useful grid, so a typo cannot allocate or loop for hours


def short_repr(value: Any) -> str:
    """repr(value), cut to 60 characters, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: Any) -> str:
    """A short description of a rejected value for error messages: its repr (truncated) and type."""
    return f"{short_repr(value)} ({type(value).__name__})"


def typed_key(
    data: Any,
    key: str,
    kind: type | tuple[type, ...],
    *,
    error: type[Exception] = ValueError,
    where: str = "",
    label: str | None = None,
) -> Any:
    """`data[key]` of a loaded JSON record when it is of type `kind` (a dotted key goes into nested objects; a bool is
    no int), else `error` naming `where` (e.g. the file) and the key (`label`, default `key`)."""
    name, prefix = label or key, f"{where}: " if where else ""
    value = data
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise error(f"{prefix}key {name!r} is missing")
        value = value[part]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("a number" if k is float else k.__name__ for k in kinds)
        raise error(f"{prefix}key {name!r} must be {names}, got {short_repr(value)}")
    return value


def check_real(
    value: Any,
    name: str,
    *,
    finite: bool = True,
    positive: bool = False,
    nonnegative: bool = False,
) -> float:
    """`value` as a Python float, or a ValueError naming `name`.

    Accepts Python and NumPy reals and one-element real tensors or arrays; rejects bools, strings, complex numbers,
    tensors of several elements and (when `finite`) NaN and infinities; `positive` / `nonnegative` bound the sign.
    """
    if hasattr(value, "__array__") and not isinstance(value, (torch.Tensor, numbers.Number)):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):  # not convertible: rejected below
            value = torch.as_tensor(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        result = float(value.detach().reshape(()).item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        result = float(value)
    else:
        raise ValueError(f"{name} must be a real number, got {_describe(value)}")
    if finite and not math.isfinite(result):
        raise ValueError(f"{name} must be a finite real number, got {name}={result}")
    if math.isnan(result):
        raise ValueError(f"{name} must be a real number, got {name}=nan")
    if positive and not result > 0:
        raise ValueError(f"{name} must be positive, got {name}={result}")
    if nonnegative and not result >= 0:
        raise ValueError(f"{name} must be >= 0, got {name}={result}")
    return result


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int within [minimum, maximum], or a ValueError naming `name` (bools and floats rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}")
    result = int(value)
    if minimum is not None and maximum is not None and not minimum <= result <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {name}={result}")
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={result}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {name}={result}")
    return result


def check_steps(steps: Any, name: str = "steps", maximum: int = MAX_STEPS) -> int:
    """A step count: an integer with 1 <= steps <= maximum (default MAX_STEPS), or a ValueError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or int(steps) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {name}={_describe(steps)}")
    if int(steps) > maximum:
        raise ValueError(f"{name} must be an integer >= 1 and <= {maximum}, got {name}={int(steps)}")
    return int(steps)
