"""Training for fewstep: objectives for any process, EMA, checkpoints, the Trainer and `fewstep train`.

Public API used by other modules: `save_checkpoint`, `load_checkpoint` (-> `LoadedCheckpoint`), `build_process`.
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
