"""Network FLOPs of a computation, counted by PyTorch's `torch.utils.flop_counter.FlopCounterMode`.

Counts the matrix products, convolutions and attention (the operators FlopCounterMode knows: mm, addmm, bmm,
convolution, scaled_dot_product_attention); elementwise work (GroupNorm, SiLU) is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """(fn(*args, **kwargs), the FLOPs it spent), under torch.no_grad."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())
