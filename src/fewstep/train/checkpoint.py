"""Checkpoints: safetensors weights (model, EMA, flattened optimizer state) plus a JSON sidecar, written atomically.

Layout for `save_checkpoint("run/checkpoint", ...)`:
- `run/checkpoint-00001000.safetensors`: tensors "model.*", "ema.*", "optim.<param index>.<key>", "data.*"
  (safetensors: Hugging Face's safe tensor format);
- `run/checkpoint.json`: format/version, the weights file name with its byte size and SHA-256, the config
  (model: net/prediction/precond; process; training options), step, RNG states, loss history, optimizer
  hyper-parameters and non-tensor state.
Each file is written to a temporary name, fsync'ed and moved into place with `os.replace`; the JSON goes last and
the weights file name carries the step, so a crash at any point leaves the previous checkpoint readable. A
truncated or altered weights file is detected from the size and checksum in the JSON.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_write, atomic_write_text
from ..nets import DiffusionModel, build_model
from ..processes import Process
from .process_config import build_process, process_config

FORMAT = "fewstep-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not match the model or process it is loaded into."""


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` returns: a ready model (EMA weights by default) and how to sample it."""

    model: DiffusionModel
    process: Process
    prediction: str
    config: dict[str, Any]
    step: int = 0
    weights: str = "ema"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


# Paths and atomic files ---------------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a checkpoint given as a .json path, a stem, a directory or a weights file."""
    p = Path(path)
    if p.suffix == ".json":
        return p
    if p.is_dir():
        return p / "checkpoint.json"
    if p.suffix == ".safetensors":
        for candidate in sorted(p.parent.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(candidate.read_text()).get("weights") == p.name:
                    return candidate
        raise CheckpointError(f"no JSON sidecar in {p.parent} refers to the weights file {p.name}")
    return p.with_name(p.name + ".json")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# RNG states ----------------------------------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """JSON-able RNG states: torch's global generator, numpy's global generator, and named torch generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    for name, gen in (generators or {}).items():
        state[f"generator.{name}"] = base64.b64encode(gen.get_state().numpy().tobytes()).decode()
    return state


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `capture_rng` captured (the named generators must be passed again)."""
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    for name, gen in (generators or {}).items():
        key = f"generator.{name}"
        if key not in state:
            raise CheckpointError(f"the checkpoint has no state for the RNG {name!r}")
        gen.set_state(_bytes_tensor(state[key]))


# Optimizer state, flattened --------------------------------------------------------------------------------------


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as tensors "optim.<index>.<key>" plus a JSON-able rest (param groups, non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "class": type(optimizer).__name__}


def unflatten_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load what `flatten_optimizer` wrote into `optimizer`."""
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"the checkpoint holds {meta.get('class')} state, the optimizer is {type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"the optimizer state in the checkpoint does not match the optimizer: {err}") from err


# Save ------------------------------------------------------------------------------------------------------------


def _state(module_or_dict: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = module_or_dict.state_dict() if isinstance(module_or_dict, nn.Module) else module_or_dict
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    config: dict[str, Any],
    ema: nn.Module | dict[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    rng: dict[str, Any] | None = None,
    loss_history: list[float] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint (weights file, then JSON sidecar, both atomic); returns the JSON path.

    config must hold "model" ({"net": {...}, "prediction", "precond", "sigma_data"}); "process" is taken from
    `model.process` when missing. ema: the EMA model (or its state dict); tensors: further named tensors (stored
    under "data.<name>"); rng: from `capture_rng`; extra: any JSON-able data.
    """
    model = _unwrap(model)
    json_path = sidecar_path(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if "model" not in config:
        raise ValueError("config must hold the model config under 'model', e.g. {'net': {'type': 'mlp', 'dim': 2}}")
    if "process" not in config:
        if not isinstance(getattr(model, "process", None), Process):
            raise ValueError("config has no 'process' and the model has no `process` attribute")
        config["process"] = process_config(model.process)
    out = {f"model.{k}": v for k, v in _state(model).items()}
    if ema is not None:
        out.update({f"ema.{k}": v for k, v in _state(_unwrap(ema) if isinstance(ema, nn.Module) else ema).items()})
    optim_meta = None
    if optimizer is not None:
        optim_tensors, optim_meta = flatten_optimizer(optimizer)
        out.update(optim_tensors)
    out.update({f"data.{k}": v.detach().cpu().clone().contiguous() for k, v in (tensors or {}).items()})

    previous = _read_json(json_path).get("weights") if json_path.exists() else None
    stem = json_path.stem
    weights = json_path.with_name(f"{stem}-{int(step):08d}.safetensors")
    n = 0
    while weights.name == previous:
        n += 1
        weights = json_path.with_name(f"{stem}-{int(step):08d}-{n}.safetensors")
    atomic_write(weights, lambda tmp: save_file(out, str(tmp), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "weights": weights.name,
        "size": weights.stat().st_size,
        "sha256": file_digest(weights),
        "step": int(step),
        "prediction": config["model"].get("prediction", "eps"),
        "has_ema": ema is not None,
        "config": config,
        "optimizer": optim_meta,
        "rng": rng,
        "loss_history": [float(v) for v in (loss_history or [])],
        "extra": extra or {},
    }
    text = json.dumps(meta, indent=1)
    atomic_write_text(json_path, text)
    if previous and previous != weights.name:
        with contextlib.suppress(OSError):
            (json_path.parent / previous).unlink()
    return json_path


# Load ------------------------------------------------------------------------------------------------------------


def _read_json(json_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(json_path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {json_path} does not exist") from err
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint sidecar {json_path} is unreadable or truncated: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a fewstep checkpoint (format={meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{json_path} has checkpoint version {meta.get('version')}; this fewstep reads version {VERSION}")
    return meta


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON sidecar and all tensors of a checkpoint, after checking the weights file's size and checksum."""
    json_path = sidecar_path(path)
    meta = _read_json(json_path)
    weights = json_path.parent / meta["weights"]
    if not weights.exists():
        raise CheckpointError(f"the weights file {weights} named by {json_path} is missing")
    size = weights.stat().st_size
    if size != meta["size"]:
        raise CheckpointError(f"the weights file {weights} is truncated or corrupt: {size} bytes, expected {meta['size']}")
    if verify and file_digest(weights) != meta["sha256"]:
        raise CheckpointError(f"the weights file {weights} is corrupt: its SHA-256 does not match the one in {json_path.name}")
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"the weights file {weights} cannot be read: {err}") from err
    return meta, tensors


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored under "<prefix>.", with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """`module.load_state_dict(state)` with a clear error listing missing, unexpected and mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (checkpoint vs model)", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else ""))
        raise CheckpointError(f"the {what} does not match the model; " + "; ".join(parts))
    module.load_state_dict(state)


def check_process(process: Process, config: dict[str, Any], what: str = "checkpoint") -> None:
    """Raise CheckpointError when `process` differs from the process config stored in a checkpoint."""
    expected = build_process(config["process"])
    if process_config(process) != process_config(expected):
        raise CheckpointError(f"the {what} was trained on the process {expected!r}, not {process!r}")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    ema: bool = True,
    model: nn.Module | None = None,
    process: Process | None = None,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint as a ready model: EMA weights when it has them (ema=False for the raw weights).

    The model is rebuilt from the stored config, or `model` is given and filled (it must match). `process`, when
    given, must be the checkpoint's process. The model is returned in eval mode on `map_location`.
    """
    meta, tensors = read_checkpoint(path, verify=verify)
    config = meta["config"]
    stored = build_process(config["process"])
    if process is not None:
        check_process(process, config)
    use = "ema" if ema and meta.get("has_ema") else "model"
    if model is None:
        model = build_model(config["model"], stored)
    load_state(model, section(tensors, use), f"checkpoint {sidecar_path(path)}")
    model = model.to(map_location).eval()
    return LoadedCheckpoint(model, stored, config["model"].get("prediction", "eps"), config, meta["step"], use, meta)
