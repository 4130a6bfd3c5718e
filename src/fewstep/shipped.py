"""The models shipped with fewstep (package data in `fewstep/assets/`): names, loading, and the export that made them.

- "digits_vp":   DDPM-style eps model on the 8x8 digits, DiscreteVP linear (Ho et al., 2020), configs/digits_vp.toml;
- "digits_flow": rectified-flow velocity model on the digits (Liu et al., 2023; Lipman et al., 2023),
                 configs/digits_flow.toml;
- "digits_cosine_v": v-prediction model on the digits, DiscreteVP cosine (Nichol & Dhariwal, 2021), configs/digits_cosine_v.toml;
- "digits_vp_small": digits_vp's process and prediction on half its channel widths, the small model of T-Stitch,
                 configs/digits_vp_small.toml.
Each is a `fewstep train` checkpoint reduced to its EMA weights: `<name>.json` + `<name>-<step>.safetensors`.
Made with `python -m fewstep.shipped export out/train/<name>/checkpoint.json <name> --train-seconds S`.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

SHIPPED_MODELS = ("digits_vp", "digits_flow", "digits_cosine_v")
# distilled students (`fewstep distill`, configs/distill_*.toml): sampled by name, not part of the solver benchmarks
SHIPPED_STUDENTS = ("digits_flow_cd", "digits_flow_dmd")
# helper models: the small digits model T-Stitch runs before digits_vp (`fewstep.accel.Stitch`, configs/digits_vp_small.toml)
SHIPPED_HELPERS = ("digits_vp_small",)
SHIPPED_NAMES = SHIPPED_MODELS + SHIPPED_STUDENTS + SHIPPED_HELPERS
ASSETS = Path(__file__).parent / "assets"
STUDENT_KEYS = ("student_times", "student_sampler", "student_times_search")  # a student's extra keys export keeps


def resolve_model(name_or_path: str | Path) -> Path:
    """A checkpoint path as given, or the JSON sidecar of a shipped model given by name (see `SHIPPED_MODELS`)."""
    if str(name_or_path) in SHIPPED_NAMES:
        return Path(str(resources.files("fewstep.assets") / f"{name_or_path}.json"))
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(name_or_path)!r} is neither a file nor a shipped model ({', '.join(SHIPPED_NAMES)})")
    return path


def load_model(name_or_path: str | Path):
    """`fewstep.train.load_checkpoint` of a shipped model name or a checkpoint path (EMA weights, eval mode)."""
    from .train import load_checkpoint

    return load_checkpoint(resolve_model(name_or_path))


def export(checkpoint: str | Path, name: str, out_dir: Path = ASSETS, train_seconds: float | None = None) -> Path:
    """Write the EMA weights and config of a training checkpoint as `<out_dir>/<name>.json` + weights (no optimizer
    state, no loss history); returns the JSON path. A distilled student keeps its sampling times and sampler
    (extra["student_times"], extra["student_sampler"]); train_seconds defaults to the checkpoint's own record."""
    from .io import check_file_name
    from .train.checkpoint import save_checkpoint

    check_file_name(name, "NAME (the shipped model's name)")  # "../x" or "/x" would write outside out_dir
    loaded = load_model(checkpoint)
    extra = {"source": str(checkpoint), "train_steps": loaded.step}
    source = loaded.meta.get("extra") or {}
    extra.update({k: source[k] for k in STUDENT_KEYS if k in source})  # a student keeps its sampling times
    seconds = train_seconds if train_seconds is not None else source.get("train_seconds")
    if seconds is not None:
        extra["train_seconds"] = float(seconds)
    return save_checkpoint(Path(out_dir) / name, model=loaded.model, config=loaded.config, step=loaded.step, extra=extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewstep.shipped", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("export", help="reduce a training checkpoint to a shipped model")
    cmd.add_argument("checkpoint", type=Path)
    cmd.add_argument("name")
    cmd.add_argument("--out-dir", type=Path, default=ASSETS)
    cmd.add_argument("--train-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    from .train.checkpoint import CheckpointError

    try:
        path = export(args.checkpoint, args.name, args.out_dir, args.train_seconds)
    except (ValueError, CheckpointError) as err:
        parser.error(str(err))  # one line, exit code 2
    print(json.dumps({"json": str(path), "weights": json.loads(path.read_text())["weights"]}))


if __name__ == "__main__":
    main()
