"""Checkpoints: safetensors weights (model, EMA, flattened optimizer state) plus a JSON sidecar, written atomically.

Layout for `save_checkpoint("run/checkpoint", ...)`:
- `run/checkpoint-00001000.safetensors`: tensors "model.*", "ema.*", "optim.<param index>.<key>", "data.*" and
  "objective.*" (a training objective's state, e.g. a distillation target network; safetensors: Hugging Face's safe
  tensor format);
- `run/checkpoint.json`: format/version, the weights file name with its byte size and SHA-256, the config
  (model: net/prediction/precond; process; training options), step, RNG states, loss history, optimizer
  hyper-parameters and non-tensor state.
Each file is written to a temporary name, fsync'ed and moved into place with `os.replace`; the JSON goes last and
the weights file name carries the step, so a crash at any point leaves the previous checkpoint readable. A
truncated or altered weights file is detected from the size and checksum in the JSON. The sidecar's "weights"
must be a plain file name in the sidecar's folder (no "..", no folder part, no symlink leading out); a save deletes
only this checkpoint's own earlier weights files (`<stem>-<step>[-n].safetensors` in its folder, not named by another
sidecar there), after the new sidecar is in place, so a reader racing a save finds the weights its sidecar names (and
`read_checkpoint` re-reads the sidecar if they vanished or changed in between).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save_file
from torch import nn

from ..checks import short_repr, typed_key
from ..io import atomic_write, atomic_write_text, check_file_name
from ..nets import DiffusionModel, build_model
from ..processes import Process
from ..tuning import Tuning, tuning_path
from .process_config import build_process, process_config

FORMAT = "fewstep-checkpoint"
VERSION = 1
_READ_ATTEMPTS = 5  # sidecar re-reads when saves keep replacing the weights under a reader


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


def _sidecar_weights(json_path: Path) -> str | None:
    """The "weights" name a JSON file holds, or None when it is unreadable or holds none (no errors raised)."""
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(json_path.read_text())
        if isinstance(meta, dict) and isinstance(meta.get("weights"), str):
            return meta["weights"]
    return None


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a checkpoint given as a .json path, a stem, a directory or a weights file."""
    p = Path(path)
    if p.suffix == ".json":
        return p
    if p.is_dir():
        return p / "checkpoint.json"
    if p.suffix == ".safetensors":
        for candidate in sorted(p.parent.glob("*.json")):
            if _sidecar_weights(candidate) == p.name:
                return candidate
        raise CheckpointError(f"no JSON sidecar in {p.parent} refers to the weights file {p.name}")
    return p.with_name(p.name + ".json")


def weights_path(json_path: Path, name: Any) -> Path:
    """The weights file a sidecar names: a plain file name resolving inside the sidecar's folder (else CheckpointError)."""
    try:
        check_file_name(name, "key 'weights'")
    except ValueError as err:
        raise CheckpointError(f"checkpoint sidecar {json_path}: {err}") from None
    weights = json_path.parent / name
    if weights.resolve().parent != json_path.parent.resolve():
        raise CheckpointError(
            f"checkpoint sidecar {json_path}: key 'weights' names {name!r}, a link that leads out of the checkpoint's folder"
        )
    return weights


def _own_weights(json_path: Path) -> re.Pattern[str]:
    """The names of this checkpoint's weights files: <stem>-<step, 8+ digits>[-n].safetensors."""
    return re.compile(re.escape(json_path.stem) + r"-\d{8,}(-\d+)?\.safetensors")


def _remove_stale_weights(json_path: Path, keep: str) -> None:
    """Delete this checkpoint's earlier weights files in its folder (not `keep`, nor any named by another sidecar)."""
    pattern = _own_weights(json_path)
    stale = [p for p in json_path.parent.iterdir() if p.name != keep and pattern.fullmatch(p.name)]
    if not stale:
        return
    others = {_sidecar_weights(j) for j in json_path.parent.glob("*.json") if j.name != json_path.name}
    for p in stale:
        if p.name not in others and not p.is_symlink() and p.is_file():
            with contextlib.suppress(OSError):  # e.g. still open by a reader on Windows: removed by the next save
                p.unlink()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`data[key]` (dotted keys go into nested objects) of type `kind`, else CheckpointError naming `where` and the key."""
    return typed_key(data, key, kind, error=CheckpointError, where=where)


# RNG states ----------------------------------------------------------------------------------------------------


def _is_cuda(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def _cuda_index(device: str | torch.device) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def capture_rng(generators: dict[str, torch.Generator] | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """JSON-able RNG states: torch's global generator, numpy's global generator, named torch generators, and, when
    `device` is a CUDA device, that device's generator (dropout on the GPU draws from it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if _is_cuda(device):  # only this process's device: in a DDP run rank r draws from cuda:r, all ranks alike
        state["cuda"] = _b64(torch.cuda.get_rng_state(_cuda_index(device)))
    for name, gen in (generators or {}).items():
        state[f"generator.{name}"] = _b64(gen.get_state())
    return state


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def _rng_bytes(state: dict[str, Any], key: str, like: torch.Tensor, where: str) -> torch.Tensor:
    """The decoded generator state `state[key]`, checked to have the length of the current state `like`."""
    text = state.get(key)
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: key 'rng.{key}' must be a base64 string, got {short_repr(text)}")
    try:
        value = _bytes_tensor(text)
    except (ValueError, binascii.Error) as err:
        raise CheckpointError(f"{where}: key 'rng.{key}' is not valid base64 ({err})") from None
    if value.numel() != like.numel():
        raise CheckpointError(f"{where}: key 'rng.{key}' holds {value.numel()} bytes, a generator state has {like.numel()}")
    return value


def _numpy_state(state: dict[str, Any], where: str) -> tuple:
    n = require({"rng": state}, "rng.numpy", dict, where)
    try:
        out = (n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
        np.random.RandomState().set_state(out)  # validates without touching the global generator
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"{where}: key 'rng.numpy' is not a numpy generator state ({type(err).__name__}: {err})") from None
    return out


def restore_rng(
    state: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
    device: str | torch.device | None = None,
    where: str = "checkpoint",
) -> None:
    """Restore what `capture_rng` captured (the named generators and the device must be passed again).

    Everything is checked before anything is set (CheckpointError naming `where` and the key). A CUDA state is
    restored only when `device` is a CUDA device (a checkpoint written on CPU resumes on CPU unchanged, and a CPU
    run ignores a CUDA state).
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: key 'rng' must be an object of generator states, got {short_repr(state)}")
    torch_state = _rng_bytes(state, "torch", torch.get_rng_state(), where)
    numpy_state = _numpy_state(state, where)
    named = {}
    for name, gen in (generators or {}).items():
        key = f"generator.{name}"
        if key not in state:
            raise CheckpointError(f"{where}: the checkpoint has no state for the RNG {name!r} (key 'rng.{key}')")
        named[name] = _rng_bytes(state, key, gen.get_state(), where)
    cuda_state = None
    if _is_cuda(device) and "cuda" in state:
        cuda_state = _rng_bytes(state, "cuda", torch.cuda.get_rng_state(_cuda_index(device)), where)
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    for name, gen in (generators or {}).items():
        gen.set_state(named[name])
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, _cuda_index(device))


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


def unflatten_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str = "checkpoint"
) -> None:
    """Load what `flatten_optimizer` wrote into `optimizer` (CheckpointError naming `where` when it does not fit)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: key 'optimizer' must be an object of optimizer state, got {short_repr(meta)}")
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(
            f"{where}: key 'optimizer.class': the checkpoint holds {meta.get('class')} state, the optimizer is "
            f"{type(optimizer).__name__}"
        )
    scalars = require({"optimizer": meta}, "optimizer.scalars", dict, where)
    groups = require({"optimizer": meta}, "optimizer.param_groups", list, where)
    state: dict[int, dict[str, Any]] = {}
    try:
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        for index, entry in scalars.items():
            state.setdefault(int(index), {}).update(entry)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
        raise CheckpointError(
            f"{where}: the optimizer state (key 'optimizer' and the 'optim.*' tensors) does not match the optimizer: "
            f"{type(err).__name__}: {err}"
        ) from err


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
    objective: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint (weights file, then JSON sidecar, both atomic); returns the JSON path.

    config must hold "model" ({"net": {...}, "prediction", "precond", "sigma_data"}); "process" is taken from
    `model.process` when missing. ema: the EMA model (or its state dict); tensors: further named tensors (stored
    under "data.<name>"); objective: a training objective's tensors (stored under "objective.<name>"); rng: from
    `capture_rng`; extra: any JSON-able data.
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
    out.update({f"objective.{k}": v.detach().cpu().clone().contiguous() for k, v in (objective or {}).items()})

    previous = _sidecar_weights(json_path) if json_path.exists() else None
    stem = json_path.stem
    weights = json_path.with_name(f"{stem}-{int(step):08d}.safetensors")
    n = 0
    while weights.name == previous:  # a reader of the current sidecar still finds its weights unchanged
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
    _remove_stale_weights(json_path, keep=weights.name)  # only now: the new sidecar no longer names them
    return json_path


# Load ------------------------------------------------------------------------------------------------------------


def _read_json(json_path: Path) -> dict[str, Any]:
    """The checked sidecar: a fewstep checkpoint of this version with the keys every reader needs, of their types."""
    try:
        meta = json.loads(json_path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {json_path} does not exist") from err
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint sidecar {json_path} is unreadable or truncated: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint sidecar {json_path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a fewstep checkpoint (format={meta.get('format')!r}, expected {FORMAT!r})")
    if type(meta.get("version")) is not int or meta["version"] != VERSION:  # a JSON true is no version 1
        raise CheckpointError(f"{json_path} has checkpoint version {meta.get('version')}; this fewstep reads version {VERSION}")
    where = f"checkpoint sidecar {json_path}"
    weights_path(json_path, require(meta, "weights", str, where))
    for key in ("size", "step"):
        if require(meta, key, int, where) < 0:
            raise CheckpointError(f"{where}: key {key!r} must be >= 0, got {meta[key]}")
    if not re.fullmatch(r"[0-9a-f]{64}", require(meta, "sha256", str, where)):
        raise CheckpointError(f"{where}: key 'sha256' must be 64 hexadecimal digits, got {short_repr(meta['sha256'])}")
    require(meta, "config.model", dict, where)
    require(meta, "config.process", (dict, str), where)
    require(meta, "has_ema", bool, where)
    return meta


def _read_weights(json_path: Path, meta: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    """The tensors of the weights file `meta` names, after checking its size and (verify) checksum."""
    weights = weights_path(json_path, meta["weights"])
    try:
        with open(weights, "rb") as f:  # read once: a save racing this read cannot swap the file in between
            data = f.read()
    except FileNotFoundError as err:
        raise CheckpointError(f"the weights file {weights} named by {json_path} is missing") from err
    except OSError as err:
        raise CheckpointError(f"the weights file {weights} named by {json_path} cannot be read: {err}") from err
    if len(data) != meta["size"]:
        raise CheckpointError(f"the weights file {weights} is truncated or corrupt: {len(data)} bytes, expected {meta['size']}")
    if verify and hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"the weights file {weights} is corrupt: its SHA-256 does not match the one in {json_path.name}")
    try:
        return load(data)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"the weights file {weights} cannot be read: {err}") from err


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON sidecar and all tensors of a checkpoint, after checking the weights file's size and checksum.

    When the weights cannot be read and the sidecar has changed meanwhile (a save replaced both), it is read again.
    """
    json_path = sidecar_path(path)
    meta = _read_json(json_path)
    for attempt in range(_READ_ATTEMPTS):
        try:
            return meta, _read_weights(json_path, meta, verify)
        except CheckpointError:
            latest = _read_json(json_path)
            if latest == meta or attempt == _READ_ATTEMPTS - 1:
                raise
            meta = latest
    raise AssertionError("unreachable")


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


def _build(what: str, key: str, where: str, build, *args):
    """`build(*args)`; a ValueError/TypeError/KeyError from a malformed stored config becomes a CheckpointError."""
    try:
        return build(*args)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{where}: key {key!r} does not describe a valid {what}: {err}") from err


def check_process(process: Process, config: dict[str, Any], what: str = "checkpoint") -> None:
    """Raise CheckpointError when `process` differs from the process config stored in a checkpoint."""
    expected = _build("process", "config.process", what, build_process, config["process"])
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
    where = f"checkpoint {sidecar_path(path)}"
    config = meta["config"]
    stored = _build("process", "config.process", where, build_process, config["process"])
    if process is not None:
        check_process(process, config, where)
    use = "ema" if ema and meta["has_ema"] else "model"
    if model is None:
        model = _build("model", "config.model", where, build_model, config["model"], stored)
    load_state(model, section(tensors, use), where)
    model = model.to(map_location).eval()
    tuning_file = tuning_path(sidecar_path(path))
    if tuning_file.exists():  # `fewstep tune`'s result; `sample(solver="auto")` uses it only if it matches the weights
        model.tuning = Tuning.load(tuning_file)
    return LoadedCheckpoint(model, stored, config["model"].get("prediction", "eps"), config, meta["step"], use, meta)
