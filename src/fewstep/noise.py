"""Brownian-tree noise: the same Brownian path W(t) per sample whatever the time grid, for stochastic solvers.

A noise source for `fewstep.sample(..., generator=source)`: `source(x, t_from, t_to)` returns the standard
normal increment (W(t_to) - W(t_from)) / sqrt(|t_to - t_from|), shaped like x [batch, ...]. W is a "virtual
Brownian tree" (Gaines & Lyons, "Random generation of stochastic area integrals", SIAM J. Appl. Math. 1994; Li et
al., "Scalable Gradients for Stochastic Differential Equations", AISTATS 2020; used for SDE samplers by
k-diffusion, Crowson): W(t_max) - W(t_min) is drawn first, and the value at the midpoint of every interval is
drawn from the Brownian bridge between its ends, recursively, down to intervals shorter than `tol` (or, at most
MAX_DEPTH levels down, intervals with no float64 strictly inside: the depth is bounded whatever `tol`); inside the
last interval W is interpolated linearly (its variance is then short by at most a quarter of its length).

Each node's normal draw is a pure function of (sample seed, node, element) through a counter-based hash
(splitmix64 + Box-Muller), so a sample's path does not depend on the batch it is in, on the order of the
queries or on the step count, and no generator state is carried between calls.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .checks import check_int, check_real
from .processes import Process

_MASK64 = (1 << 64) - 1
MAX_DEPTH = 64  # tree levels at most: 2^-64 of the range is below float64 resolution at its upper end


def _signed(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def hashed_normal(seeds: torch.Tensor, node: int, numel: int) -> torch.Tensor:
    """Standard normals [len(seeds), numel] (float64), a pure function of (seed, node, element index)."""
    key = _mix(_mix(seeds.to(torch.int64)[:, None] * _GOLDEN + _GOLDEN) + _signed((node * 0xD1B54A32D192ED03) & _MASK64))
    elem = torch.arange(numel, dtype=torch.int64, device=seeds.device)[None]
    h1 = _mix(key + (2 * elem + 1) * _GOLDEN)
    h2 = _mix(key + (2 * elem + 2) * _GOLDEN)
    u1 = (_shr(h1, 11).to(torch.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = _shr(h2, 11).to(torch.float64) * 2.0**-53  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _check_shape(like: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    """The shape [batch, ...] of a tensor, or a sequence of integers >= 1, or a ValueError naming `like`."""
    if isinstance(like, torch.Tensor):
        shape = tuple(like.shape)
    elif isinstance(like, Sequence) and not isinstance(like, (str, bytes)):
        shape = tuple(check_int(n, "like (a shape)", minimum=1) for n in like)
    else:
        raise ValueError(f"like must be a tensor or a shape [batch, ...] of integers, got {type(like).__name__}")
    if len(shape) < 1 or any(n < 1 for n in shape):
        raise ValueError(f"like must be a tensor or shape [batch, ...] with positive sizes, got {shape}")
    return shape


def _check_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """One int64 seed per sample: seed + b for one int, or the sequence itself (one per sample)."""
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a sequence of ints, one per sample")
    if isinstance(seed, torch.Tensor) and not seed.is_floating_point() and not seed.is_complex() and seed.dtype != torch.bool:
        seed = seed.tolist()
    if isinstance(seed, numbers.Integral):
        seeds = [int(seed) + b for b in range(batch)]
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        seeds = [check_int(s, "seed", minimum=-(1 << 63), maximum=(1 << 63) - 1) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"seed holds {len(seeds)} seeds but the batch has {batch} samples")
    else:
        raise TypeError(f"seed must be an int or a sequence of ints, one per sample, got {type(seed).__name__}")
    if not -(1 << 63) <= min(seeds) <= max(seeds) < 1 << 63:
        raise ValueError(f"seeds must lie in the int64 range [-2**63, 2**63 - 1], got seed={seed!r} for {batch} samples")
    return seeds


class BrownianTreeNoise:
    """Per-sample Brownian paths on [t_min, t_max]; `source(x, t_from, t_to)` gives their normalised increment.

    like: a tensor [batch, ...] or its shape; seed: one int (sample b gets seed + b) or one int per sample (then a
    sample's noise does not depend on the batch it is in); tol: time resolution of the tree (default
    (t_max - t_min) * 1e-9). Works on any device (the hash is computed where x lives); result in x's dtype.
    """

    def __init__(
        self,
        like: torch.Tensor | Sequence[int],
        t_min: float,
        t_max: float,
        seed: int | Sequence[int] = 0,
        *,
        tol: float | None = None,
    ):
        shape = _check_shape(like)
        t_min, t_max = check_real(t_min, "t_min"), check_real(t_max, "t_max")
        if not (t_min < t_max and math.isfinite(t_max - t_min)):
            raise ValueError(f"need finite t_min < t_max with a finite difference, got t_min={t_min}, t_max={t_max}")
        seeds = _check_seeds(seed, shape[0])
        tol = (t_max - t_min) * 1e-9 if tol is None else check_real(tol, "tol", positive=True)
        self.shape, self.t_min, self.t_max, self.tol = shape, t_min, t_max, tol
        self.seeds = torch.tensor(seeds, dtype=torch.int64)
        self._numel = math.prod(shape[1:])
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def for_process(
        cls, like: torch.Tensor | Sequence[int], process: Process, seed: int | Sequence[int] = 0, *, tol: float | None = None
    ) -> BrownianTreeNoise:
        """A tree over the whole time range [t_min, t_max] of a fewstep process."""
        return cls(like, process.t_min, process.t_max, seed, tol=tol)

    def _node(self, node: int, device: torch.device) -> torch.Tensor:
        """The standard normal draw of tree node `node` (heap numbering: root 1, children 2n and 2n + 1)."""
        key = (node, str(device))
        z = self._cache.get(key)
        if z is None:
            if len(self._cache) > 8192:
                self._cache.clear()
            z = self._cache[key] = hashed_normal(self.seeds.to(device), node, self._numel)
        return z

    def brownian(self, t: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """W(t) - W(t_min) for every sample, float64 [batch, numel]."""
        t = check_real(t, "t")
        tol_t = 1e-12 * max(1.0, abs(self.t_max), abs(self.t_min))
        if not self.t_min - tol_t <= t <= self.t_max + tol_t:
            raise ValueError(f"time {t} is outside the Brownian tree's range [{self.t_min}, {self.t_max}]")
        device = torch.device(device)
        a, b = self.t_min, self.t_max
        w_a = torch.zeros(self.shape[0], self._numel, dtype=torch.float64, device=device)
        w_b = math.sqrt(b - a) * self._node(1, device)
        node = 1
        for _ in range(MAX_DEPTH):
            m = 0.5 * (a + b)
            if not (b - a > self.tol and a < m < b):  # resolution reached, or no float64 strictly between a and b
                break
            w_m = 0.5 * (w_a + w_b) + 0.5 * math.sqrt(b - a) * self._node(2 * node, device)
            if t < m:
                b, w_b, node = m, w_m, 2 * node
            else:
                a, w_a, node = m, w_m, 2 * node + 1
        s = min(max((t - a) / (b - a), 0.0), 1.0)
        return w_a + s * (w_b - w_a)

    def __call__(self, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """(W(t_to) - W(t_from)) / sqrt(|t_to - t_from|), standard normal, shaped like x."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"the Brownian tree was made for shape {self.shape}, got x of shape {tuple(x.shape)}")
        dt = abs(check_real(t_to, "t_to") - check_real(t_from, "t_from"))
        if dt == 0:
            raise ValueError("t_from and t_to must differ")
        dw = self.brownian(t_to, x.device) - self.brownian(t_from, x.device)
        return (dw / math.sqrt(dt)).to(x.dtype).reshape(x.shape)
