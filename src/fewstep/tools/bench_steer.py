"""`fewstep bench steer`: inference-time control measured (FK steering, best-of-N, inversion).

1. Digits: the unconditional shipped model steered to class k by FK steering (Singhal et al., 2025) with the digits
   classifier's log p(k | x0) as reward: class accuracy (by the classifier) and Frechet distance in its features to
   real digits of class k, beside the real-class reference (FD between two disjoint halves of the real class-k
   digits, the same sample sizes), unsteered sampling and best-of-N at the same particle count (Ma et al., 2025).
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
from ..processes import VP
from ..sampling import sample
from ..steer import FK, RewardGuided, best_of_n, invert, linear, log_normalizer, regenerate, tilted_mixture
from ..steer.rewards import Reward, class_log_prob
from .classifier import features_and_logits, load_classifier

DIGIT_SHAPE = (1, 8, 8)


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


def steer_digits(
    k: int, *, model_name: str = "digits_vp", particles: int = 8, steps: int = 40, lam: float = 10.0,
    guidance: float = 0.5, solver: str = "ddpm", seed: int = 0, pool: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Class-k accuracy and FD of FK steering with and without reward-gradient guidance, unsteered sampling, best-of-N
    and rejection sampling (from `pool`) on the shipped model (see the module doc)."""
    from ..shipped import load_model

    loaded = load_model(model_name)
    common = {"process": loaded.process, "prediction": loaded.prediction, "steps": steps}
    half_a, half_b = real_class_halves(k, seed)
    n = len(half_a)
    reward = digits_class_reward(k)
    row: dict[str, Any] = {"class": k, "n": n, "particles": particles, "steps": steps, "lam": lam, "guidance": guidance,
                           "solver": solver, "fd_real": frechet_distance(half_b, half_a)}  # fmt: skip
    noise = torch.randn(n * particles, *DIGIT_SHAPE, generator=torch.Generator().manual_seed(seed))
    fk = FK(reward, lam=lam, particles=particles, seed=seed, target_lam=1.0)  # target p(x) p(k | x) = p(x | k)
    runs = {"fk_guided": dataclasses.replace(fk, guidance=guidance),  # gradient proposal, reweighed (TDS ratio)
            "fk_guided_uncorrected": dataclasses.replace(fk, guidance=guidance, correct_proposal=False), "fk": fk}
    for name, steering in runs.items():
        start = time.perf_counter()
        x = sample(loaded.model, noise, solver=solver, generator=torch.Generator().manual_seed(seed + 1),
                   steering=steering, **common)  # fmt: skip
        row[f"{name}_seconds"] = time.perf_counter() - start
        row[f"{name}_accuracy"], row[f"{name}_fd"] = _class_scores(x, k, half_b)
        row[f"{name}_nfe"], row[f"{name}_reward_calls"] = x.nfe, x.reward_calls
    guided = RewardGuided(loaded.model, reward, guidance, process=loaded.process, prediction=loaded.prediction)
    x = sample(guided, noise[:n], solver=solver, generator=torch.Generator().manual_seed(seed + 1), **common)
    row["guided_accuracy"], row["guided_fd"] = _class_scores(x, k, half_b)
    plain = sample(loaded.model, noise[:n], solver=solver, generator=torch.Generator().manual_seed(seed + 1), **common)
    row["plain_accuracy"], row["plain_fd"] = _class_scores(plain, k, half_b)
    best = best_of_n(loaded.model, noise, reward, n=particles, solver="dpmpp_2m", **{**common, "steps": 20})
    row["best_of_n_accuracy"], row["best_of_n_fd"] = _class_scores(best, k, half_b)
    if pool is not None:
        kept = pool[0][pool[1] == k][:n]
        row["rejection_n"], row["rejection_fd"] = len(kept), frechet_distance(half_b, kept)
    return row


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
    """The three tables of the benchmark."""
    lines = ["### Steering the unconditional digits model to a class (classifier reward log p(k | x0))", "",
             "| class | n | FK + gradient: acc | FD | uncorrected: acc | FD | FK alone: acc | FD | best-of-N: acc | FD |"
             " plain: acc | FD | gradient alone: acc | FD | rejection FD | real FD | FK + gradient FD / real |"
             " NFE + reward calls | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in digits_rows:
        lines.append(
            f"| {r['class']} | {r['n']} | {r['fk_guided_accuracy']:.1%} | {r['fk_guided_fd']:.2f} | "
            f"{r['fk_guided_uncorrected_accuracy']:.1%} | {r['fk_guided_uncorrected_fd']:.2f} | {r['fk_accuracy']:.1%} | "
            f"{r['fk_fd']:.2f} | {r['best_of_n_accuracy']:.1%} | {r['best_of_n_fd']:.2f} | {r['plain_accuracy']:.1%} | "
            f"{r['plain_fd']:.2f} | {r['guided_accuracy']:.1%} | {r['guided_fd']:.2f} | "
            f"{r.get('rejection_fd', float('nan')):.2f} | {r['fd_real']:.2f} | "
            f"{r['fk_guided_fd'] / r['fd_real']:.2f} | {r['fk_guided_nfe']} + {r['fk_guided_reward_calls']} | "
            f"{r['fk_guided_seconds']:.0f} |"
        )
    if digits_rows:
        acc = sum(r["fk_guided_accuracy"] for r in digits_rows) / len(digits_rows)
        ratio = max(r["fk_guided_fd"] / r["fd_real"] for r in digits_rows)
        r0 = digits_rows[0]
        lines += ["", f"FK + gradient: mean accuracy {acc:.1%}, worst FD / real-class FD {ratio:.2f}. {r0['particles']} "
                  f"particles, {r0['solver']} {r0['steps']} steps, lam {r0['lam']} (potential diff, resampling at ESS < K/2, "
                  f"target tilt 1 = p(x | k), final particle drawn by weight), gradient guidance scale {r0['guidance']} as "
                  "the proposal, reweighed by the model's transition over the guided one (the twisted diffusion "
                  "sampler's ratio; 'uncorrected': without it); best-of-N: "
                  f"{r0['particles']} noises, dpmpp_2m 20 steps; rejection: the unsteered model's class-k samples (its "
                  "ceiling); real: FD between two halves of the real class-k digits. NFE counts batched calls on the "
                  f"{r0['particles']} x n particles; the guided model also runs one backward pass per call."]  # fmt: skip
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
    steps: Annotated[int, typer.Option(min=2, max=1000, help="Steps of the steered sampler.")] = 40,
    lam: Annotated[float, typer.Option(min=1e-6, help="Tilt exp(lam * log p(k | x0)), > 0.")] = 10.0,
    guidance: Annotated[float, typer.Option(min=0.0, help="Reward-gradient guidance scale of the guided run.")] = 0.5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the noise and the resampling.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for steer.md and steer.json.")] = Path("out/bench"),
) -> None:
    """FK steering of the digits model to a class, FK on the exact bed, and inversion errors (DDIM vs BDIA)."""
    from ..cli import console
    from ..train.cli import parse_ints, writable_dir

    class_list = parse_ints(classes, "--classes", minimum=0)
    if any(k > 9 for k in class_list):
        raise typer.BadParameter("digit classes are 0..9", param_hint="--classes")
    writable_dir(out, "--out")
    start = time.perf_counter()
    digits_rows, pool = [], rejection_pool(steps=steps, seed=seed)
    for k in class_list:
        digits_rows.append(steer_digits(k, particles=particles, steps=steps, lam=lam, guidance=guidance, seed=seed, pool=pool))
        r = digits_rows[-1]
        console.print(f"class {k}: FK + gradient accuracy {r['fk_guided_accuracy']:.1%}, FD {r['fk_guided_fd']:.2f} "
                      f"(real {r['fd_real']:.2f}); FK alone {r['fk_accuracy']:.1%}, FD {r['fk_fd']:.2f}")  # fmt: skip
    bed_rows, inversion_rows = exact_bed(seed=seed), inversion_errors(seed=seed)
    text = markdown(digits_rows, bed_rows, inversion_rows)
    command = (f"fewstep bench steer --classes {classes} --particles {particles} --steps {steps} --lam {lam} "
               f"--guidance {guidance} --seed {seed}")  # fmt: skip
    text += f"\n`{command}`: {time.perf_counter() - start:.0f} s in all (one CPU thread)\n"
    atomic_write_text(out / "steer.md", text)
    atomic_write_text(out / "steer.json", json.dumps({"digits": digits_rows, "exact_bed": bed_rows,
                                                      "inversion": inversion_rows}, indent=1))  # fmt: skip
    console.print(text)


def main() -> None:
    """`python -m fewstep.tools.bench_steer` = `fewstep bench steer`."""
    typer.run(bench_steer_command)


if __name__ == "__main__":
    main()
