"""Diagnostics of a distillation run that its losses cannot give: a cheap quality probe every K steps, and per-step
losses, written to `metrics.json` and `metrics.png` in the run's folder.

Distribution-matching losses do not say whether training works (DMD2's generator loss can rise while samples
improve; SiD's oscillates around 0: Yin et al., 2024; Zhou et al., 2024), so the probe scores the student's samples
of a fixed noise batch directly:
- "energy": energy distance (Szekely & Rizzo, 2013) to the teacher's samples of other fixed noise (50 dpmpp_2m
  steps; on the Gaussian-mixture bed that is the exact distribution up to the solver's error);
- "fd": Fréchet distance in the digits classifier's features (`fewstep.tools.bench_learned.digits_fd`) to the
  training digits.
Shapes: noise and samples [count, *shape]; the energy distance flattens a sample to one vector.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_text, save_figure
from ..sampling import sample
from .teacher import Teacher

REFERENCE_STEPS = 50


class QualityProbe:
    """`measure(generate)`: the probe's score of `generate(noise)` on its fixed noise [count, *shape] (lower is better)."""

    def __init__(self, kind: str, count: int, shape: tuple[int, ...], teacher: Teacher, seed: int = 0):
        if kind not in ("energy", "fd"):
            raise ValueError(f"probe={kind!r} is not known; allowed values: energy, fd")
        self.kind, self.count, self.shape, self.teacher = kind, count, tuple(shape), teacher
        g = torch.Generator().manual_seed(seed + 7919)
        self.noise = torch.randn((count, *self.shape), generator=g)
        self._reference_noise = torch.randn((count, *self.shape), generator=g)
        self._score: Callable[[torch.Tensor], float] | None = None

    def _scorer(self) -> Callable[[torch.Tensor], float]:
        if self._score is None:
            if self.kind == "fd":
                from ..tools.bench_learned import digits_fd

                self._score = digits_fd()
            else:
                reference = self.teacher_samples(self._reference_noise).reshape(self.count, -1).double()
                self._score = lambda x: energy(x.reshape(len(x), -1).double().cpu(), reference)
        return self._score

    @torch.no_grad()
    def teacher_samples(self, noise: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        device = _device(t.model)
        x = sample(t.model, noise.to(device), process=t.process, prediction=t.prediction, solver="dpmpp_2m",
                   steps=REFERENCE_STEPS)  # fmt: skip
        return x.float().cpu()

    @torch.no_grad()
    def measure(self, generate: Callable[[torch.Tensor], torch.Tensor]) -> float:
        x = generate(self.noise).float().cpu()
        return self._scorer()(x) if bool(torch.isfinite(x).all()) else math.inf


def energy(a: torch.Tensor, b: torch.Tensor) -> float:
    from ..metrics import energy_distance

    return energy_distance(a, b)


def _device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class MetricsLog:
    """Rows {"step": k, name: value, ...} of a run; `write(folder)` saves metrics.json and metrics.png atomically."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def add(self, step: int, **values: float) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in values.items()}})

    def series(self, name: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[name]) for r in self.rows if name in r]
        return [int(s) for s, _ in pairs], [v for _, v in pairs]

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metrics.json", json.dumps(self.rows))
        names = sorted({k for r in self.rows for k in r if k != "step"})
        if names:
            self._plot(names, folder / "metrics.png")

    def _plot(self, names: list[str], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            steps, values = self.series(name)
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, lw=1)
            ax.set_title(name)
            ax.set_xlabel("step")
            if values and all(v > 0 for v in values):
                ax.set_yscale("log")
        fig.tight_layout()
        save_figure(fig, path, dpi=90)

    def state(self) -> list[dict[str, float]]:
        return [dict(r) for r in self.rows]

    def load(self, rows: Any) -> None:
        self.rows = [dict(r) for r in rows] if isinstance(rows, list) else []
