"""Training throughput: the Trainer's step against a bare PyTorch loop (same model, batch, optimiser, loss).

The bare loop is the minimal DDPM training step (Ho et al., 2020): index a batch, draw t and eps, x_t = alpha x0 +
sigma eps, MSE against eps, AdamW step. The Trainer adds its resumable sampler and generators, loss weighting,
gradient clipping, the EMA update and loss logging; the ratio is the overhead of those features. The two loops
run in alternating rounds and the median round is reported, so a change in machine load hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..nets import build_model
from .config import TrainConfig
from .trainer import Trainer


def bare_step_fn(trainer: Trainer, bf16: bool) -> Callable[[], float]:
    """A plain training step on a fresh copy of the trainer's model (same data, process, batch size, lr)."""
    model = build_model(trainer.full_config["model"], trainer.process)
    opt = torch.optim.AdamW(model.parameters(), lr=trainer.config.lr)
    data, process, n = trainer.data, trainer.process, trainer.config.batch_size
    shape = (n,) + (1,) * (data.ndim - 1)

    def step() -> float:
        x0 = data[torch.randint(0, len(data), (n,))]
        t = torch.rand(n, dtype=torch.float64) * (process.t_max - process.t_min) + process.t_min
        eps = torch.randn_like(x0)
        x_t = process.alpha(t).float().reshape(shape) * x0 + process.sigma(t).float().reshape(shape) * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x_t, t.float())
        loss = (out.float() - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _rate(step: Callable[[], float], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def benchmark_training(
    data: str = "digits",
    steps: int = 100,
    batch_size: int = 128,
    bf16: bool = False,
    threads: int | None = None,
    warmup: int = 5,
    rounds: int = 5,
) -> dict[str, float]:
    """{"bare": it/s, "trainer": it/s, "parameters": count} for the default network of `data`.

    Each loop runs `rounds` alternating rounds of steps // rounds steps after `warmup` steps; medians are returned.
    """
    config = TrainConfig(data=data, batch_size=batch_size, bf16=bf16, threads=threads, progress=False)
    trainer = Trainer(config)
    loops = {"bare": bare_step_fn(trainer, bf16), "trainer": trainer.train_step}
    for step in loops.values():
        _rate(step, warmup)
    per_round = max(1, steps // rounds)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, step in loops.items():
            rates[name].append(_rate(step, per_round))
    result = {name: statistics.median(r) for name, r in rates.items()}
    result["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    return result
