"""The training loop: data, noise and time sampling, an objective's loss, AdamW, EMA, checkpoints, figures.

One step: draw the global batch of data (resumable sampler), the objective's randomness (times, ...) and noise from
dedicated torch generators (optionally re-paired by immiscible assignment; Li et al., 2024), take this process's
slice, compute the objective's per-sample loss (`fewstep.train.objective`: the weighted denoising loss of
`fewstep.train.losses`, or a distillation objective of `fewstep.distill`; under bf16 autocast if asked), stop on a
non-finite loss before any weight changes, back-propagate (DistributedDataParallel averages gradients across
processes), clip, step AdamW (Loshchilov & Hutter, 2019) and update the EMA. Because every rank draws the same global
batch, N processes reproduce the 1-process run. Checkpoints hold every RNG state, the sampler position and the
objective's state, so `resume` continues a run exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..data import BatchSampler, load_dataset
from ..nets import DiffusionModel, build_model
from ..sampling import sample
from .checkpoint import (
    CheckpointError,
    capture_rng,
    check_process,
    load_state,
    read_checkpoint,
    require,
    restore_rng,
    save_checkpoint,
    section,
    sidecar_path,
    unflatten_optimizer,
)
from .config import TrainConfig
from .distributed import DistContext
from .ema import EMA
from .immiscible import immiscible_assign, knn_noise
from .objective import Objective, build_objective
from .plots import save_loss_curve, save_samples
from .process_config import build_process


class NonFiniteLossError(FloatingPointError):
    """The loss of a training step was NaN or Inf; the weights were not updated and no checkpoint was written."""


class Trainer:
    """Train a `DiffusionModel` as `config` says; `data` overrides `config.data` with an in-memory tensor [N, ...].

    `teacher`: for distillation (`config.distill`), a teacher given in memory instead of `distill.teacher` (see
    `fewstep.distill.Teacher`).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        data: torch.Tensor | None = None,
        dist: DistContext | None = None,
        teacher: Any = None,
    ):
        self.config = config
        self.dist = dist or DistContext()
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self.device = torch.device(_device(config.device))
        self.data = (load_dataset(config.data, **config.data_options) if data is None else data).float()
        self.process = build_process(config.process)
        self.objective: Objective = build_objective(config, self.process, self.data, teacher)
        model_config = self.objective.model_config(config, tuple(self.data.shape[1:]))
        self.full_config = {"model": model_config, "process": dict(config.process), "train": config.to_dict()}
        torch.manual_seed(config.seed)
        self.model: DiffusionModel = build_model(model_config, self.process).to(self.device)
        self.objective.setup(self)  # e.g. the student starts from the teacher's weights, before the EMA copies them
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup, config.ema_halflife, config.ema_rampup)
        self.train_model = DistributedDataParallel(self.model) if self.dist.enabled else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
        self.data_generator = torch.Generator().manual_seed(config.seed + 1)
        self.noise_generator = torch.Generator().manual_seed(config.seed + 2)
        self.sampler = BatchSampler(self.data, config.batch_size, self.data_generator)
        self.step = 0
        self.loss_history: list[float] = []
        self.out_dir = Path(config.out_dir)
        self._check_options()

    def _check_options(self) -> None:
        self.config.validate()  # again: fields may have been changed after the config was built
        self.dist.shard(self.config.batch_size)  # divisibility check

    # One step --------------------------------------------------------------------------------------------------

    def _global_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x0, eps, the objective's draws) for the whole global batch; the draws come before eps."""
        c = self.config
        x0 = self.sampler.next()
        draws = self.objective.draw(x0, self.noise_generator, self.step)
        if c.immiscible == "knn":
            eps = knn_noise(x0, c.knn_k, self.noise_generator)
        else:
            eps = torch.randn(x0.shape, generator=self.noise_generator, dtype=x0.dtype)
            if c.immiscible == "assign":
                eps = eps[immiscible_assign(x0, eps)]
        return x0, eps, draws

    def _lr(self) -> float:
        """The learning rate of the step about to be taken: linear warm-up, then constant or cosine-decayed to 0 at
        `steps` (Loshchilov & Hutter, 2017, without restarts)."""
        c, step = self.config, self.step + 1
        warm = min(1.0, step / c.lr_warmup) if c.lr_warmup > 0 else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, self.step / c.steps))) if c.lr_decay == "cosine" else 1.0
        return c.lr * warm * decay

    def train_step(self) -> float:
        """One optimisation step on the global batch; returns its mean loss (averaged over processes).

        A NaN or Inf loss raises NonFiniteLossError naming the step before the weights change.
        """
        c = self.config
        self.objective.begin_step(self)
        x0, eps, draws = self._global_batch()
        part = self.dist.shard(len(x0))
        x0, eps = x0[part].to(self.device), eps[part].to(self.device)
        draws = {k: v[part].to(self.device) for k, v in draws.items()}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if c.bf16 else contextlib.nullcontext()
        with autocast:
            losses = self.objective.loss(self.train_model, x0, eps, draws)
        loss = losses.mean()
        value = float(self.dist.mean(loss.detach()))  # every rank sees the same value, so all of them stop together
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the {self.objective.name} loss is {value} at step {self.step + 1}: training stopped before the weights "
                f"changed; the last checkpoint written (if any, in {self.out_dir}) is kept"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.objective.after_step(self)
        self.step += 1
        self.loss_history.append(value)
        return value

    # Loop ------------------------------------------------------------------------------------------------------

    def train(self, steps: int | None = None) -> list[float]:
        """Train until `steps` (default config.steps) total steps; checkpoints, figures and a progress bar on rank 0."""
        from tqdm.auto import tqdm

        c = self.config
        total = c.steps if steps is None else int(steps)
        show = c.progress and self.dist.is_main
        bar = tqdm(total=total, initial=self.step, disable=not show, dynamic_ncols=True, unit="it")
        start, start_step = time.perf_counter(), self.step
        while self.step < total:
            loss = self.train_step()
            bar.update(1)
            if self.step % 10 == 0 or self.step == total:
                bar.set_postfix(loss=f"{loss:.4g}")
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < total:
                self.save()
            if c.sample_every and self.step % c.sample_every == 0 and self.step < total:
                self.write_figures()
        bar.close()
        self.seconds = time.perf_counter() - start
        self.iterations_per_second = (self.step - start_step) / self.seconds if self.seconds > 0 else math.nan
        self.save()
        self.write_figures()
        return self.loss_history

    # Output ----------------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.json"

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write a checkpoint (rank 0 only) with the complete training state."""
        if not self.dist.is_main:
            return None
        perm, pos = self.sampler.state()
        objective_tensors, objective_values = self.objective.state()
        extra = {"sampler_pos": pos, "ema_updates": self.ema.updates, "world_size": self.dist.world_size}
        extra.update(self.objective.checkpoint_extra())
        if objective_values:
            extra["objective"] = objective_values
        return save_checkpoint(
            path or self.checkpoint_path,
            model=self.model,
            config=self.full_config,
            ema=self.ema.module,
            optimizer=self.optimizer,
            step=self.step,
            rng=capture_rng({"data": self.data_generator, "noise": self.noise_generator}, self.device),
            loss_history=self.loss_history,
            tensors={"sampler_perm": perm},
            objective=objective_tensors,
            extra=extra,
        )

    def generate(self, n: int, seed: int = 0) -> torch.Tensor:
        """n samples from the EMA model with the configured solver and steps (a student's: its own sampler)."""
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *self.data.shape[1:]), generator=g).to(self.device)
        plan = self.objective.sampling(self.config)
        return sample(self.ema.module, noise, process=self.process, prediction=self.model.prediction, generator=g, **plan)

    def write_figures(self) -> None:
        """samples-<step>.png (EMA model) and loss.png in out_dir (rank 0 only)."""
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        c = self.config
        x = self.generate(c.sample_count)
        plan = self.objective.sampling(c)
        title = f"step {self.step}, {plan['solver']} {plan['steps']} steps"
        reference = self.data[:2000] if self.data.ndim == 2 else None
        save_samples(x, self.out_dir / f"samples-{self.step:08d}.png", title, reference)
        if self.loss_history:
            save_loss_curve(self.loss_history, self.out_dir / "loss.png")

    # Resume ----------------------------------------------------------------------------------------------------

    def resume(self, path: str | os.PathLike | None = None) -> int:
        """Restore the complete training state from a checkpoint (default out_dir/checkpoint.json); returns the step.

        The stored state is checked before anything is restored: a malformed one raises CheckpointError naming the
        file and the key.
        """
        path = sidecar_path(path or self.checkpoint_path)
        meta, tensors = read_checkpoint(path)
        where = f"checkpoint {path}"
        saved = meta["config"]
        if saved["model"] != self.full_config["model"]:
            raise CheckpointError(
                f"cannot resume from {path}: its model config {saved['model']} differs from {self.full_config['model']}"
            )
        check_process(self.process, saved, where)
        distill = saved.get("train", {}).get("distill", {})
        if distill != self.config.distill:
            raise CheckpointError(f"cannot resume from {path}: its distill table {distill} differs from {self.config.distill}")
        pos = require(meta, "extra.sampler_pos", int, where)
        updates = require(meta, "extra.ema_updates", int, where)
        history = require(meta, "loss_history", list, where)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in history):
            raise CheckpointError(f"{where}: key 'loss_history' must be a list of numbers")
        perm = tensors.get("data.sampler_perm")
        n = len(self.data)
        fits = perm is not None and perm.dtype == torch.int64 and perm.shape == (n,)
        fits = fits and torch.equal(perm.sort().values, torch.arange(n))  # a permutation of the data set
        if not fits or not 0 <= pos <= n or updates < 0:
            raise CheckpointError(
                f"{where}: the sampler state (tensor 'data.sampler_perm', key 'extra.sampler_pos') or key "
                f"'extra.ema_updates' does not fit a data set of {n} items"
            )
        if meta.get("optimizer") is None or meta.get("rng") is None:
            key = "optimizer" if meta.get("optimizer") is None else "rng"
            raise CheckpointError(f"{where}: key {key!r} is missing or null: this checkpoint holds no training state to resume")
        load_state(self.model, section(tensors, "model"), where)
        load_state(self.ema.module, section(tensors, "ema"), f"EMA in {where}")
        unflatten_optimizer(self.optimizer, tensors, meta["optimizer"], where)
        self.objective.load_state(section(tensors, "objective"), meta["extra"].get("objective", {}), where)
        restore_rng(meta["rng"], {"data": self.data_generator, "noise": self.noise_generator}, self.device, where)
        self.sampler.load_state(perm, pos)
        self.ema.updates = updates
        self.step = meta["step"]
        self.loss_history = [float(v) for v in history]
        return self.step


def _device(name: str) -> str:
    if name == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if name != "cpu":
        raise ValueError(f"device={name!r} is not known; allowed values: cpu, cuda")
    return name
