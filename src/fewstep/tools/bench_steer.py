"""`fewstep bench steer`: inference-time control measured (FK steering, guidance, best-of-N, inversion).

1. Digits: the unconditional shipped model steered to class k (target p(x | k)) by FK steering (Singhal et al., 2025)
   twisted by the shipped noise-conditional classifier's log p(k | x_t) (twisted SMC, Wu et al., 2023), by FK with
   the clean classifier's log p(k | x0) on the data prediction, and by guidance, best-of-N (Ma et al., 2025) and
   unsteered sampling: class accuracy (by the clean classifier) and Frechet distance in its features to real digits of
   class k, as a ratio to the real-class reference (FD between two disjoint halves of the real class-k digits, the same
   sample sizes), averaged over seeds (each draws the noise and the halves).
2. Exact bed: FK steering of ring2d toward exp(lam w . x): energy distance to the exact tilted mixture and the error
   of the log normalising-constant estimate as the particles grow.
3. Inversion: reconstruction error (invert, then regenerate) of DDIM inversion and exact BDIA at 10 steps, float64,
   on ring2d and on the digits model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ..gmm import ring2d
from ..io import atomic_write_text
from ..metrics import energy_distance, frechet_distance
from ..processes import VP, Process
from ..sampling import sample
from ..steer import (
    FK,
    RewardGuided,
    best_of_n,
    invert,
    linear,
    log_normalizer,
    noisy_class_log_prob,
    regenerate,
    tilted_mixture,
)
from ..steer.rewards import Reward, Twist, class_log_prob
from .classifier import features_and_logits, load_classifier, load_noisy_classifier

DIGIT_SHAPE = (1, 8, 8)
STEPS = 100  # ddpm steps of every steered run (the twist's proposal ratio needs fine steps: 40 gave FD / real 1.38-1.85)
TWIST_GUIDANCE = 1.0  # noise-conditional classifier guidance scale of FK + twist


def digits_class_reward(k: int) -> Reward:
    """log p(class k | x0) under the shipped digits classifier, x0 [n, 1, 8, 8] clamped to [-1, 1] (float64 [n])."""
    net = load_classifier()

    def logits(x0: torch.Tensor) -> torch.Tensor:
        return net(x0.clamp(-1, 1).reshape(-1, 1, 8, 8).to("cpu", torch.float32))

    return class_log_prob(logits, k)


def real_class_halves(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier features of the real digits of class k, split at random into two halves ([n_a, 64], [n_b, 64])."""
    from sklearn.datasets import load_digits

    from ..data import digits

    x = digits()[torch.as_tensor(load_digits().target) == k]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    feats = features_and_logits(x[perm])[0]
    half = len(x) // 2
    return feats[:half], feats[half:]


def _class_scores(x: torch.Tensor, k: int, reference: torch.Tensor) -> tuple[float, float]:
    """(accuracy, FD to reference) of digit samples x."""
    feats, logits = features_and_logits(x.clamp(-1, 1))
    return float((logits.argmax(1) == k).to(torch.float64).mean()), frechet_distance(reference, feats)


def rejection_pool(
    model_name: str = "digits_vp", n: int = 1200, steps: int = 40, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, 64] and classifier labels [n] of n unsteered ddpm samples: keeping the class-k ones is rejection
    sampling from p(x | k), the best any reward method can do with this model (its FD is the model's ceiling)."""
    from ..shipped import load_model

    loaded = load_model(model_name)
    noise = torch.randn(n, *DIGIT_SHAPE, generator=torch.Generator().manual_seed(seed + 100))
    x = sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, solver="ddpm", steps=steps,
               generator=torch.Generator().manual_seed(seed + 101))  # fmt: skip
    feats, logits = features_and_logits(x.clamp(-1, 1))
    return feats, logits.argmax(1)


def digits_class_twist(k: int, process: Process) -> Twist:
    """log p(class k | x_t) under the shipped noise-conditional digits classifier: the twist of class-k steering."""
    return noisy_class_log_prob(load_noisy_classifier(), k, process)


METHODS = {  # row key: what the table calls it
    "fk_twist": "FK + twist",
    "fk_guided": "FK + x0 gradient",
    "fk": "FK alone",
    "classifier_guided": "classifier guidance",
    "guided": "x0-gradient guidance",
    "best_of_n": "best-of-N",
    "plain": "plain",
}


def steer_digits(
    k: int, *, model_name: str = "digits_vp", particles: int = 8, steps: int = STEPS, lam: float = 10.0,
    guidance: float = 0.5, twist_guidance: float = TWIST_GUIDANCE, solver: str = "ddpm", seed: int = 0,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Class-k accuracy and FD (to one half of the real class-k digits; `seed` draws the halves and the noise) of each
    method of METHODS and of rejection sampling (from `pool`) on the shipped model (see the module doc)."""
    from ..shipped import load_model

    loaded = load_model(model_name)
    common = {"process": loaded.process, "prediction": loaded.prediction, "steps": steps}
    half_a, half_b = real_class_halves(k, seed)
    n = len(half_a)
    reward = digits_class_reward(k)
    row: dict[str, Any] = {"class": k, "seed": seed, "n": n, "particles": particles, "steps": steps, "lam": lam,
                           "guidance": guidance, "twist_guidance": twist_guidance, "solver": solver,
                           "fd_real": frechet_distance(half_b, half_a)}  # fmt: skip
    noise = torch.randn(n * particles, *DIGIT_SHAPE, generator=torch.Generator().manual_seed(seed))
    fk = FK(reward, lam=lam, particles=particles, seed=seed, target_lam=1.0)  # target p(x) p(k | x) = p(x | k)
    twist = digits_class_twist(k, loaded.process)
    runs: dict[str, tuple[Any, torch.Tensor, FK | None]] = {
        # the twist's tilt is 1: it approximates log p(k | x_t), whose exact twisting keeps the weights uniform
        "fk_twist": (loaded.model, noise, dataclasses.replace(fk, lam=1.0, twist=twist, guidance=twist_guidance)),
        "fk_guided": (loaded.model, noise, dataclasses.replace(fk, guidance=guidance)),  # x0-gradient proposal, reweighed
        "fk": (loaded.model, noise, fk),
        "classifier_guided": (RewardGuided(loaded.model, reward, twist_guidance, twist=twist, process=loaded.process,
                                           prediction=loaded.prediction), noise[:n], None),  # fmt: skip
        "guided": (RewardGuided(loaded.model, reward, guidance, process=loaded.process, prediction=loaded.prediction),
                   noise[:n], None),  # fmt: skip
        "plain": (loaded.model, noise[:n], None),
    }
    for name, (model, z, steering) in runs.items():
        begin = time.perf_counter()
        x = sample(model, z, solver=solver, generator=torch.Generator().manual_seed(seed + 1), steering=steering, **common)
        row[f"{name}_seconds"] = time.perf_counter() - begin
        row[f"{name}_accuracy"], row[f"{name}_fd"] = _class_scores(x, k, half_b)
        row[f"{name}_nfe"] = x.nfe
        row[f"{name}_reward_calls"] = getattr(x, "reward_calls", getattr(model, "reward_calls", 0))
    best = best_of_n(loaded.model, noise, reward, n=particles, solver="dpmpp_2m", **{**common, "steps": 20})
    row["best_of_n_accuracy"], row["best_of_n_fd"] = _class_scores(best, k, half_b)
    if pool is not None:
        kept = pool[0][pool[1] == k]  # a different n of them for each seed
        kept = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed))[:n]]
        row["rejection_n"], row["rejection_fd"] = len(kept), frechet_distance(half_b, kept)
    return row


def class_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per class, over its seeds: each method's mean accuracy, its FD / real-class FD as the ratio of the mean FDs
    (the two FDs share their bias at equal sample sizes), and the range of the per-seed ratios."""
    summary = []
    for k in sorted({r["class"] for r in rows}):
        mine = [r for r in rows if r["class"] == k]
        real = sum(r["fd_real"] for r in mine) / len(mine)
        entry: dict[str, Any] = {"class": k, "seeds": [r["seed"] for r in mine], "n": mine[0]["n"], "fd_real": real}
        for name in [*METHODS, "rejection"]:
            if f"{name}_fd" not in mine[0]:
                continue
            per_seed = [r[f"{name}_fd"] / r["fd_real"] for r in mine]
            entry[name] = {"fd_ratio": sum(r[f"{name}_fd"] for r in mine) / len(mine) / real,
                           "fd_ratio_range": (min(per_seed), max(per_seed))}  # fmt: skip
            if f"{name}_accuracy" in mine[0]:
                entry[name]["accuracy"] = sum(r[f"{name}_accuracy"] for r in mine) / len(mine)
        summary.append(entry)
    return summary


def exact_bed(particles: Sequence[int] = (1, 4, 16, 64), groups: int = 512, lam: float = 3.0, steps: int = 20,
              solver: str = "sde_dpmpp_2m", seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """FK steering of ring2d (VP, exact eps model) toward exp(lam x_1): energy distance to the exact tilted mixture,
    mean reward and the mean per-group log Z estimate against the exact log Z, per particle count."""
    mixture, process, w = ring2d(), VP(), torch.tensor([1.0, 0.0], dtype=torch.float64)
    tilted = tilted_mixture(mixture, w, lam)
    reference = tilted.sample(4000, torch.Generator().manual_seed(seed + 1))
    exact_log_z = log_normalizer(mixture, w, lam)
    rows = []
    for k in particles:
        noise = torch.randn(groups * k, 2, generator=torch.Generator().manual_seed(seed + k), dtype=torch.float64)
        fk = FK(linear(w), lam=lam, particles=k, seed=seed)
        x = sample(mixture.model(process), noise, process=process, solver=solver, steps=steps,
                   generator=torch.Generator().manual_seed(seed + 7), steering=fk)  # fmt: skip
        rows.append({"particles": k, "energy_distance": energy_distance(x, reference), "mean_reward": float(x.rewards.mean()),
                     "log_z": float(x.log_z.mean()), "exact_log_z": exact_log_z, "nfe": x.nfe,
                     "reward_calls": x.reward_calls})  # fmt: skip
    return rows


def inversion_errors(steps: int = 10, n: int = 64, seed: int = 0, model_name: str = "digits_vp") -> list[dict[str, Any]]:
    """Max |regenerate(invert(x)) - x| of DDIM inversion and BDIA in float64, on ring2d (VP) and the digits model."""
    from ..shipped import load_model

    loaded = load_model(model_name)
    net = loaded.model.double() if isinstance(loaded.model, torch.nn.Module) else loaded.model
    mixture = ring2d()
    digits_x = sample(net, torch.randn(n, *DIGIT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                      process=loaded.process, prediction=loaded.prediction, steps=20, denoise_to_zero=False)  # fmt: skip
    beds: list[tuple[str, Callable, Any, str, torch.Tensor]] = [
        ("ring2d (VP, exact)", mixture.model(VP()), VP(), "eps", mixture.sample(n, torch.Generator().manual_seed(seed))),
        (f"{model_name} (float64)", net, loaded.process, loaded.prediction, digits_x),
    ]
    rows = []
    for name, model, process, prediction, x in beds:
        for method in ("solver", "bdia"):
            common = {"process": process, "prediction": prediction, "steps": steps, "method": method}
            z = invert(model, x, **common)
            back = regenerate(model, z, **common)
            rows.append({"bed": name, "method": "DDIM inversion" if method == "solver" else "BDIA (exact)",
                         "max_error": float((back - x).abs().max()), "rms_error": float((back - x).pow(2).mean().sqrt()),
                         "nfe": z.nfe + back.nfe})  # fmt: skip
    return rows


def markdown(digits_rows: list[dict], bed_rows: list[dict], inversion_rows: list[dict]) -> str:
    """The three tables of the benchmark (the digits one per class, over its seeds: `class_summary`)."""
    summary = class_summary(digits_rows)
    names = [name for name in METHODS if digits_rows and f"{name}_fd" in digits_rows[0]]
    lines = ["### Steering the unconditional digits model to a class (classifier reward log p(k | x0))", "",
             "Per class: accuracy / FD ÷ real-class FD (ratio of the mean FDs over the seeds; per-seed range in brackets).",
             "", "| class | seeds | n | " + " | ".join(METHODS[m] for m in names) + " | rejection | real FD |",
             "|---" * (len(names) + 5) + "|"]  # fmt: skip
    for entry in summary:
        cells = []
        for name in names:
            m = entry[name]
            lo, hi = m["fd_ratio_range"]
            cells.append(f"{m['accuracy']:.1%} / **{m['fd_ratio']:.2f}** ({lo:.2f}–{hi:.2f})")
        rej = entry.get("rejection")
        rej_cell = "-" if rej is None else "{:.2f} ({:.2f}–{:.2f})".format(rej["fd_ratio"], *rej["fd_ratio_range"])
        lines.append(f"| {entry['class']} | {len(entry['seeds'])} | {entry['n']} | " + " | ".join(cells)
                     + f" | {rej_cell} | {entry['fd_real']:.2f} |")  # fmt: skip
    if digits_rows:
        r0 = digits_rows[0]
        cost = " | ".join(f"{METHODS[m]}: {r0[f'{m}_nfe']} NFE + {r0[f'{m}_reward_calls']} reward calls, "
                          f"{sum(r[f'{m}_seconds'] for r in digits_rows) / len(digits_rows):.0f} s"
                          for m in names if f"{m}_nfe" in r0)  # fmt: skip
        lines += ["", f"{r0['particles']} particles, {r0['solver']} {r0['steps']} steps, target p(x | k) (tilt 1 of "
                  f"log p(k | x)). FK + twist: intermediate potentials and guidance (scale {r0['twist_guidance']}) from the "
                  "shipped noise-conditional classifier's log p(k | x_t), tilt 1, reweighed by the model's transition over the "
                  f"guided one; FK + x0 gradient: potentials of the clean classifier on the data prediction, lam {r0['lam']}, "
                  f"its gradient through the model at scale {r0['guidance']} as the proposal, reweighed; FK alone: the same "
                  "potentials, no gradient; classifier guidance / x0-gradient guidance: one particle, the same guidance; "
                  f"best-of-N: {r0['particles']} noises, dpmpp_2m 20 steps; rejection: the unsteered model's class-k "
                  "samples (its ceiling); real: FD between two halves of the real class-k digits. Per class and seed (the "
                  f"first): {cost}. NFE counts batched calls on the particle batch."]  # fmt: skip
    lines += ["", "### Exact bed: ring2d steered toward exp(3 x_1)", "",
              "| particles | energy distance to tilted mixture | mean reward | mean log Z estimate | exact log Z |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in bed_rows:
        lines.append(f"| {r['particles']} | {r['energy_distance']:.4f} | {r['mean_reward']:.3f} | {r['log_z']:.3f} | "
                     f"{r['exact_log_z']:.3f} |")  # fmt: skip
    lines += ["", "### Inversion round trip (invert, then regenerate), float64", "",
              "| bed | method | max abs error | RMS error | NFE (both ways) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in inversion_rows:
        lines.append(f"| {r['bed']} | {r['method']} | {r['max_error']:.2e} | {r['rms_error']:.2e} | {r['nfe']} |")
    return "\n".join(lines) + "\n"


def bench_steer_command(
    classes: Annotated[str, typer.Option(help="Comma-separated digit classes to steer to.")] = "0,3,7",
    particles: Annotated[int, typer.Option(min=1, max=256, help="FK particles per sample.")] = 8,
    steps: Annotated[int, typer.Option(min=2, max=1000, help="Steps of the steered sampler.")] = STEPS,
    lam: Annotated[float, typer.Option(min=1e-6, help="Tilt exp(lam * log p(k | x0)) of the x0-reward runs, > 0.")] = 10.0,
    guidance: Annotated[float, typer.Option(min=0.0, help="x0-reward gradient guidance scale.")] = 0.5,
    twist_guidance: Annotated[float, typer.Option(min=0.0, help="Noise-conditional classifier guidance scale.")] = TWIST_GUIDANCE,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds: noise sets and real-class splits, averaged.")] = "0,1,2,3",
    out: Annotated[Path, typer.Option(help="Folder for steer.md and steer.json.")] = Path("out/bench"),
) -> None:
    """FK steering of the digits model to a class, FK on the exact bed, and inversion errors (DDIM vs BDIA)."""
    from ..cli import console
    from ..train.cli import parse_ints, writable_dir

    class_list, seed_list = parse_ints(classes, "--classes", minimum=0), parse_ints(seeds, "--seeds", minimum=0)
    if any(k > 9 for k in class_list):
        raise typer.BadParameter("digit classes are 0..9", param_hint="--classes")
    writable_dir(out, "--out")
    start = time.perf_counter()
    digits_rows, pool = [], rejection_pool(n=3000, steps=steps, seed=seed_list[0])
    for k in class_list:
        for seed in seed_list:
            digits_rows.append(steer_digits(k, particles=particles, steps=steps, lam=lam, guidance=guidance,
                                            twist_guidance=twist_guidance, seed=seed, pool=pool))  # fmt: skip
            r = digits_rows[-1]
            console.print(f"class {k} seed {seed}: FK + twist accuracy {r['fk_twist_accuracy']:.1%}, FD "
                          f"{r['fk_twist_fd']:.2f}; FK + x0 gradient {r['fk_guided_accuracy']:.1%}, FD {r['fk_guided_fd']:.2f} "
                          f"(real {r['fd_real']:.2f})")  # fmt: skip
    bed_rows, inversion_rows = exact_bed(seed=seed_list[0]), inversion_errors(seed=seed_list[0])
    text = markdown(digits_rows, bed_rows, inversion_rows)
    command = (f"fewstep bench steer --classes {classes} --particles {particles} --steps {steps} --lam {lam} "
               f"--guidance {guidance} --twist-guidance {twist_guidance} --seeds {seeds}")  # fmt: skip
    text += f"\n`{command}`: {time.perf_counter() - start:.0f} s in all (one CPU thread)\n"
    atomic_write_text(out / "steer.md", text)
    atomic_write_text(out / "steer.json", json.dumps({"digits": digits_rows, "summary": class_summary(digits_rows),
                                                      "exact_bed": bed_rows, "inversion": inversion_rows}, indent=1))  # fmt: skip
    console.print(text)


def main() -> None:
    """`python -m fewstep.tools.bench_steer` = `fewstep bench steer`."""
    typer.run(bench_steer_command)


if __name__ == "__main__":
    main()
