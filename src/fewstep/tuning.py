"""Tuned defaults: the per-model, per-NFE choice of solver and grid that `fewstep tune` stores, and how
`fewstep.sample(..., solver="auto")` picks it.

A `Tuning` is a small JSON artefact keyed by the model's weights (SHA-256 of its state dict), the process and the
prediction; it holds one `TunedEntry` (solver, steps, grid times, options, measured errors) per NFE budget. Such
per-model artefacts are what Align Your Steps (Sabour et al., 2024), GITS (Chen et al., 2024), DC-Solver (Zhao et
al., 2024) and DPM-Solver-v3 (Zheng et al., 2023) each fit by hand; here `fewstep.tune` searches and this module
stores, validates and applies. A tuning is never silently stale: a model whose weights, process or prediction differ
from the key is refused (`TuningError`), and `solver="auto"` then falls back to `fewstep.recommended`, saying so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checks import check_int, typed_key
from .corrections import Corrections
from .io import atomic_write_text
from .processes import Process
from .recommend import recommended
from .solvers import get_solver

FORMAT = "fewstep-tuning"
VERSION = 1


class TuningError(ValueError):
    """A tuning artefact is malformed, or was made for another model, process or prediction."""


def model_digest(model: Any) -> str:
    """SHA-256 of a torch module's state dict (names, dtypes, shapes and bytes, in name order); the tuning key.

    Raises TypeError for a model that is not a `torch.nn.Module`: give such a model a key of your own
    (`fewstep.tune(..., model_key="my-model-v1")`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_key is needed for a model that is not a torch.nn.Module (got {type(model).__name__})")
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().to("cpu").contiguous()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class TunedEntry:
    """The tuned configuration at one NFE budget; `times`: the grid [steps + 1], decreasing; `corrections`: learned
    per-evaluation corrections of this run (`fewstep.corrections`), which `sample(solver="auto")` applies."""

    nfe: int
    solver: str
    steps: int
    times: list[float]
    denoise_to_zero: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    grid: str = ""  # where the grid came from, e.g. "quadratic" or "searched from 'logsnr'"
    error: float = math.nan  # RMS error against the many-step reference on the selection (confirmation) noise
    fallback_error: float = math.nan  # the same for `fewstep.recommended` (what solver="auto" does untuned)
    # configuration -> selection error (inf: diverged or collapsed; those behind tune.SELECT_TOP are not listed)
    candidates: dict[str, float] = field(default_factory=dict)
    confirmed: dict[str, float] = field(default_factory=dict)  # the best few -> error on the wider confirmation batch
    corrections: dict[str, Any] = field(default_factory=dict)  # `fewstep.corrections.Corrections.to_dict()`, or {}: none

    def fitted_corrections(self) -> Corrections | None:
        """The learned per-evaluation corrections of this configuration (`fewstep.corrections`), or None."""
        return Corrections.from_dict(self.corrections) if self.corrections else None

    def sample_kwargs(self) -> dict[str, Any]:
        """Keywords for `fewstep.sample` that reproduce this configuration (the grid as a tensor of times)."""
        schedule = torch.tensor(self.times, dtype=torch.float64)
        return dict(solver=self.solver, steps=self.steps, schedule=schedule, denoise_to_zero=self.denoise_to_zero, **self.options)


@dataclass
class Tuning:
    """Tuned configurations of one model (key: weights digest, process, prediction) per NFE budget."""

    model: str  # `model_digest` of the weights, or the user's model_key
    process: str  # repr of the process
    prediction: str
    entries: dict[int, TunedEntry] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # how the reference was made and how well it converged
    name: str = ""  # a label (e.g. the shipped model's name)

    def check(self, model_key: str, process: Process, prediction: str) -> None:
        """TuningError unless this tuning was made for exactly this model, process and prediction."""
        for what, mine, theirs in (
            ("model weights (SHA-256)", self.model, model_key),
            ("process", self.process, repr(process)),
            ("prediction", self.prediction, prediction),
        ):
            if mine != theirs:
                label = f" ({self.name})" if self.name else ""
                raise TuningError(f"this tuning{label} was made for {what} {mine[:70]!r}, not {theirs[:70]!r}; run fewstep tune")

    def entry(self, nfe: int) -> TunedEntry | None:
        return self.entries.get(nfe)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "model": self.model,
            "process": self.process,
            "prediction": self.prediction,
            "reference": self.reference,
            "entries": {str(nfe): vars(e) for nfe, e in sorted(self.entries.items())},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artefact as JSON, atomically."""
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, allow_nan=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tuning:
        """Read and validate an artefact; TuningError naming the file and the key when it is malformed."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise TuningError(f"tuning file {path} does not exist") from err
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise TuningError(f"tuning file {path} is unreadable or not JSON: {err}") from err
        try:
            return cls.from_dict(data)
        except TuningError as err:
            raise TuningError(f"tuning file {path}: {err}") from None

    @classmethod
    def from_dict(cls, data: Any) -> Tuning:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TuningError(f"not a fewstep tuning (key 'format' must be {FORMAT!r})")
        if type(data.get("version")) is not int or data["version"] != VERSION:
            raise TuningError(f"key 'version' must be {VERSION}, got {data.get('version')!r}")
        for key in ("model", "process", "prediction"):
            _typed(data, key, str)
        entries = _typed(data, "entries", dict)
        tuning = cls(data["model"], data["process"], data["prediction"], reference=_typed(data, "reference", dict),
                     name=_typed(data, "name", str))  # fmt: skip
        for nfe_text, raw in entries.items():
            entry = _entry(raw, f"entries.{nfe_text}")
            if nfe_text != str(entry.nfe):
                raise TuningError(f"key 'entries.{nfe_text}' holds the entry of nfe={entry.nfe}")
            tuning.entries[entry.nfe] = entry
        return tuning


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    return typed_key(data, key, kind, error=TuningError, label=f"{where}.{key}" if where else key)


def _entry(raw: Any, where: str) -> TunedEntry:
    """A validated TunedEntry from its JSON form."""
    if not isinstance(raw, dict):
        raise TuningError(f"key {where!r} must be an object")
    unknown = sorted(set(raw) - set(TunedEntry.__dataclass_fields__))
    if unknown:
        raise TuningError(f"key {where!r} has unknown field(s) {', '.join(unknown)}")
    nfe, steps = _typed(raw, "nfe", int, where), _typed(raw, "steps", int, where)
    try:
        check_int(nfe, f"{where}.nfe", minimum=1, maximum=100_000)
        check_int(steps, f"{where}.steps", minimum=1, maximum=100_000)
        get_solver(_typed(raw, "solver", str, where))
    except ValueError as err:
        raise TuningError(str(err)) from None
    times = _typed(raw, "times", list, where)
    if len(times) != steps + 1 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in times):
        raise TuningError(f"key '{where}.times' must hold steps + 1 = {steps + 1} numbers")
    if not all(math.isfinite(v) for v in times) or any(a <= b for a, b in zip(times, times[1:], strict=False)):
        raise TuningError(f"key '{where}.times' must be finite and strictly decreasing")
    _typed(raw, "denoise_to_zero", bool, where)
    _typed(raw, "options", dict, where)
    if "confirmed" in raw:  # absent from the artefacts of fewstep before the confirmation step
        _typed(raw, "confirmed", dict, where)
    entry = TunedEntry(**{k: v for k, v in raw.items()})
    if "corrections" in raw:  # absent before the learned corrections
        _typed(raw, "corrections", dict, where)
        try:
            fitted = entry.fitted_corrections()
        except (TypeError, ValueError) as err:
            raise TuningError(f"key '{where}.corrections': {err}") from None
        if fitted is not None and fitted.nfe != nfe:
            raise TuningError(f"key '{where}.corrections' holds {fitted.nfe} evaluations, not nfe={nfe}")
    return entry


def tuning_path(checkpoint_json: str | os.PathLike) -> Path:
    """Where the tuning of a checkpoint lives: `<sidecar stem>.tuning.json` beside its JSON sidecar."""
    path = Path(checkpoint_json)
    return path.with_name(f"{path.stem}.tuning.json")


def model_key(model: Any) -> str:
    """The tuning key of a model: `model_digest` of a torch module, else its attribute `tuning_key` (a string).

    A module's digest is cached on it and recomputed only when a tensor of its state dict was replaced or changed
    in place (torch's version counters), so `sample(solver="auto")` does not hash the weights at every call.
    """
    if isinstance(model, torch.nn.Module):
        stamp = tuple((k, v.data_ptr(), v._version) for k, v in model.state_dict().items())
        cached = getattr(model, "_fewstep_digest", None)
        if cached is None or cached[0] != stamp:
            cached = (stamp, model_digest(model))
            object.__setattr__(model, "_fewstep_digest", cached)  # a plain attribute, not a registered buffer
        return cached[1]
    key = getattr(model, "tuning_key", None)
    if not isinstance(key, str):
        raise TuningError(
            f"a tuning can only be matched to a torch.nn.Module or to a model with a string attribute `tuning_key`; "
            f"got a {type(model).__name__} without one"
        )
    return key


def choose(
    model: Any,
    process: Process,
    prediction: str,
    nfe: int,
    *,
    tuning: Tuning | str | os.PathLike | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What `fewstep.sample(..., solver="auto", nfe=nfe)` runs: (sample keywords, a record of the choice).

    The tuned entry at `nfe` when a tuning applies: `tuning` (a Tuning or its file; it must match the model, else
    TuningError), or the tuning a loaded checkpoint carries as `model.tuning` (used only when it matches; otherwise
    the record says why not). Else the measured fallback `fewstep.recommended(nfe, process)`. The record holds
    "source" ("tuned" or "fallback"), "solver", "schedule", "steps", "nfe", "reason" and "corrected" (whether the
    keywords hold the entry's learned `corrections`, a `fewstep.corrections.Corrections`, which is not a `sample`
    keyword: wrap the model with `corrections.wrap(...)` and sample with prediction="x0", as `sample(solver="auto")` does).
    """
    explicit = tuning is not None
    if tuning is None:
        tuning = getattr(model, "tuning", None)
    elif not isinstance(tuning, Tuning):
        tuning = Tuning.load(tuning)
    reason = "no tuning for this model (run `fewstep tune`)"
    if tuning is not None:
        if not isinstance(tuning, Tuning):
            raise TypeError(f"tuning must be a fewstep Tuning or the path of one, got {type(tuning).__name__}")
        try:
            tuning.check(model_key(model), process, prediction)
        except TuningError as err:
            if explicit:
                raise
            reason = str(err)
        else:
            entry = tuning.entry(nfe)
            if entry is None:
                reason = f"the tuning has no entry at nfe={nfe} (tuned: {', '.join(map(str, sorted(tuning.entries))) or 'none'})"
            elif (t_start is not None and t_start != entry.times[0]) or (t_end is not None and t_end != entry.times[-1]):
                reason = f"the tuned grid runs from t={entry.times[0]} to t={entry.times[-1]}, not the t_start/t_end asked for"
            else:
                reason = f"tuned: RMS error {entry.error:.3g} vs {entry.fallback_error:.3g} for the fallback of the tuning's time"
                corrections = entry.fitted_corrections()
                kwargs = entry.sample_kwargs() | ({"corrections": corrections} if corrections else {})
                record = dict(source="tuned", solver=entry.solver, schedule=entry.grid, steps=entry.steps, nfe=nfe, reason=reason,
                              corrected=corrections is not None)  # fmt: skip
                return kwargs, record
    kwargs = recommended(nfe, process, t_start=t_start, t_end=t_end)
    record = dict(source="fallback", solver=kwargs["solver"], schedule=kwargs["schedule"], steps=kwargs["steps"], nfe=nfe,
                  reason=reason, corrected=False)  # fmt: skip
    return kwargs, record
