"""Training for fewstep: objectives for any process, EMA, checkpoints, the Trainer and `fewstep train`.

Public API used by other modules: `save_checkpoint`, `load_checkpoint` (-> `LoadedCheckpoint`), `build_process`.

    trainer = Trainer(TrainConfig(data="digits", steps=5000, out_dir="runs/digits"))
    trainer.train()                                   # checkpoints, samples-*.png, loss.png in runs/digits
    ckpt = load_checkpoint("runs/digits")             # EMA weights, eval mode
    x = fewstep.sample(ckpt.model, torch.randn(16, 1, 8, 8), process=ckpt.process, prediction=ckpt.prediction)

Command line: `fewstep train --config run.toml --set steps=5000`, `--resume auto` to continue; two processes:
`torchrun --standalone --nproc_per_node 2 -m fewstep.cli train --config run.toml` (see `distributed`).
Objectives: Ho et al. (2020), Salimans & Ho (2022), Karras et al. (2022), Hang et al. (2023), Li et al. (2024).
"""

from __future__ import annotations

from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .distributed import DistContext, init_distributed
from .ema import EMA
from .immiscible import immiscible_assign, knn_noise
from .losses import WEIGHTINGS, diffusion_loss, loss_weight
from .process_config import build_process, process_config
from .timesteps import TIME_SAMPLINGS, sample_time
from .trainer import Trainer

__all__ = [
    "EMA",
    "TIME_SAMPLINGS",
    "WEIGHTINGS",
    "CheckpointError",
    "DistContext",
    "LoadedCheckpoint",
    "TrainConfig",
    "Trainer",
    "build_process",
    "diffusion_loss",
    "immiscible_assign",
    "init_distributed",
    "knn_noise",
    "load_checkpoint",
    "load_config",
    "loss_weight",
    "process_config",
    "read_checkpoint",
    "sample_time",
    "save_checkpoint",
]
