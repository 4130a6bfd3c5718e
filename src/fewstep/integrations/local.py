"""A local diffusers model folder as a fewstep model, loaded from disk only (never downloaded).

Two layouts (diffusers' `save_pretrained`):
- a pipeline folder: `model_index.json` naming a `unet` and a `scheduler`, with `unet/config.json` + weights and
  `scheduler/scheduler_config.json` (e.g. a saved `DDPMPipeline`);
- a bare model folder: `config.json` (+ weights) of a `UNet2DModel`, with the scheduler config beside it
  (`scheduler_config.json`) or given separately (a file, or a folder holding `scheduler_config.json`).
The network is loaded with `from_pretrained(..., local_files_only=True)` and wrapped by `from_diffusers` (its
scheduler config gives the process and prediction). Supported networks: pixel-space `UNet2DModel`, unconditional or
class-conditional (`num_class_embeds`: labels 0..num_class_embeds - 1). Text-conditional UNets and latent pipelines
(a VAE) need prompts / decoding that this loader does not provide: use the pipeline with `FewstepScheduler`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..processes import Process
from .conventions import convention
from .diffusers_model import DiffusersModel

PIPELINE_INDEX = "model_index.json"
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
SUPPORTED_NETS = ("UNet2DModel", "FewstepUNet")  # FewstepUNet: a fewstep model saved as a diffusers model (export.py)
LATENT_PARTS = ("vae", "vqvae")


@dataclass(frozen=True)
class FolderModel:
    """A loaded diffusers folder: the fewstep model, its process and prediction, the x0_fn its scheduler config asks
    for (clipping / thresholding, else None), one sample's shape (C, H, W) and its number of classes (None:
    unconditional)."""

    model: DiffusersModel
    process: Process
    prediction: str
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None
    shape: tuple[int, ...]
    num_classes: int | None
    folder: Path


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a diffusers pipeline index or a diffusers model config."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / PIPELINE_INDEX).is_file():
        return True
    config = path / MODEL_CONFIG
    return config.is_file() and "_class_name" in _read_json(config, "config")


def read_scheduler_config(path: str | os.PathLike) -> dict[str, Any]:
    """A scheduler config from a `scheduler_config.json` file or a folder holding one (ValueError naming
    scheduler_config when it is missing or not JSON)."""
    path = Path(path)
    file = path / SCHEDULER_CONFIG if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"scheduler_config: {file} does not exist (expected a {SCHEDULER_CONFIG} or a folder holding one)")
    return _read_json(file, "scheduler_config")


def load_diffusers_folder(
    path: str | os.PathLike,
    scheduler_config: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> FolderModel:
    """Load a pipeline or bare-model folder (module doc) as a fewstep model; `scheduler_config` overrides the
    folder's. Raises ValueError naming what is missing or unsupported; nothing is downloaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    net_dir, config = _net_and_scheduler(folder)
    if scheduler_config is not None:
        config = scheduler_config
    if config is None:
        raise ValueError(
            f"{folder} has no {SCHEDULER_CONFIG} beside its {MODEL_CONFIG}: the scheduler config (betas, prediction type) "
            "describes the model; save it there or pass scheduler_config (fewstep sample: --scheduler-config)"
        )
    net_config = _read_json(net_dir / MODEL_CONFIG, "config")
    name = net_config.get("_class_name")
    if name not in SUPPORTED_NETS:
        raise ValueError(
            f"{net_dir / MODEL_CONFIG} describes a {name}; fewstep sample loads {', '.join(SUPPORTED_NETS)} (pixel space, "
            "unconditional or class-conditional); run other pipelines with fewstep.FewstepScheduler"
        )
    if net_config.get("class_embed_type") is not None:
        kind = net_config["class_embed_type"]
        raise ValueError(f"class_embed_type={kind!r} is not supported (only integer class labels via num_class_embeds)")
    import diffusers

    try:
        # low_cpu_mem_usage needs accelerate; asking for it only when installed keeps diffusers from warning
        low_memory = importlib.util.find_spec("accelerate") is not None
        if name == "FewstepUNet":
            from .export import FewstepUNet as net_class
        else:
            net_class = diffusers.UNet2DModel
        net = net_class.from_pretrained(net_dir, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=low_memory)
    except OSError as err:
        raise ValueError(f"cannot load the {name} in {net_dir}: {err}") from None
    net = net.eval().requires_grad_(False)
    conv = convention(config)
    size = net.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    classes = net.config.get("num_class_embeds")  # (none for a FewstepUNet)
    return FolderModel(DiffusersModel(net, conv), conv.process, conv.prediction, conv.x0_fn, (net.config.in_channels, *size),
                       int(classes) if classes is not None else None, folder)  # fmt: skip


def _net_and_scheduler(folder: Path) -> tuple[Path, dict[str, Any] | None]:
    """The network's folder and the scheduler config found in `folder` (None when there is none)."""
    index = folder / PIPELINE_INDEX
    if index.is_file():
        parts = _read_json(index, "model_index")
        latent = [p for p in LATENT_PARTS if p in parts]
        if latent:
            raise ValueError(f"{index} is a latent pipeline ({latent[0]}); fewstep sample samples pixel-space UNets only")
        if "unet" not in parts or not (folder / "unet" / MODEL_CONFIG).is_file():
            raise ValueError(f"{index} names no unet with a unet/{MODEL_CONFIG}; fewstep sample needs the pipeline's unet")
        scheduler = folder / "scheduler" / SCHEDULER_CONFIG
        return folder / "unet", _read_json(scheduler, "scheduler") if scheduler.is_file() else None
    if not (folder / MODEL_CONFIG).is_file():
        raise ValueError(
            f"{folder} has neither {PIPELINE_INDEX} (a diffusers pipeline) nor {MODEL_CONFIG} (a diffusers model) "
            "nor a fewstep checkpoint"
        )
    beside = folder / SCHEDULER_CONFIG
    return folder, _read_json(beside, "scheduler_config") if beside.is_file() else None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming `what` and the file when unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{what}: cannot read {path} as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data
