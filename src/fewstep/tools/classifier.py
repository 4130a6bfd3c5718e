"""Small CNN classifiers of the 8x8 scikit-learn digits: the feature extractor of the digits sample metrics, and a
noise-conditional one for steering.

The clean classifier plays the role Inception-v3 plays for FID (Heusel et al., NeurIPS 2017) on a dataset small enough
to train on a CPU in a minute. Images are [n, 1, 8, 8] (or [n, 64], [n, 8, 8]) scaled to [-1, 1]; features are
[n, 64]; logits [n, 10]. The noise-conditional classifier p(k | x_t) (Dhariwal & Nichol, "Diffusion Models Beat GANs
on Image Synthesis", NeurIPS 2021) sees noised digits x_t = alpha x0 + sigma eps scaled to alpha^2 + sigma^2 = 1 and
their log-SNR, so one network serves every process: the twist of class-conditional FK steering
(`fewstep.steer.noisy_class_log_prob`). The shipped weights live in `fewstep/assets/` and were made with
    python -m fewstep.tools.classifier train --out src/fewstep/assets/digits_classifier.safetensors
    python -m fewstep.tools.classifier train-noisy --out src/fewstep/assets/digits_noisy_classifier.safetensors
The noise-conditional weights retrain bit for bit (torch 2.13, one thread); the clean classifier's were made in
another environment (torch version or thread count) and retrain to the same held-out accuracy (1.000) with different
weights (max difference 0.24).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..io import atomic_write

FEATURES = 64
CLASSES = 10
SHIPPED = "digits_classifier.safetensors"
NOISY_SHIPPED = "digits_noisy_classifier.safetensors"
LOG_SNR_RANGE = (-12.0, 12.0)  # the noise-conditional classifier's training range (uniform in log-SNR)


class DigitsClassifier(nn.Module):
    """conv(32) - conv(64) - maxpool - conv(64) - linear(64 features) - linear(10 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.embed = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [n, 64] (before the ReLU) of images in [-1, 1]."""
        return self.embed(self.conv(as_images(x)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [n, 10]."""
        return self.head(F.dropout(F.relu(self.features(x)), 0.3, self.training))


class NoisyDigitsClassifier(nn.Module):
    """p(class | x_t, log-SNR): conv(64) - conv(64) - maxpool - conv(64) - MLP(128) - 10 logits; the log-SNR enters as a
    constant input channel and, as a Fourier embedding, beside the convolutional features."""

    def __init__(self, width: int = 64, frequencies: int = 8):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
        )
        self.register_buffer("freq", torch.linspace(0.05, 1.5, frequencies))
        self.head = nn.Sequential(nn.Linear(width * 16 + 2 * frequencies, 128), nn.SiLU(), nn.Linear(128, CLASSES))

    def forward(self, x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        """Logits [n, 10] of noised digits x [n, 64 | 8, 8 | 1, 8, 8] (alpha^2 + sigma^2 = 1) at log-SNR [n] or []."""
        x = as_images(x)
        log_snr = torch.as_tensor(log_snr, dtype=torch.float32, device=x.device).expand(x.shape[0])
        log_snr = log_snr.clamp(*LOG_SNR_RANGE)  # -inf at pure noise, +inf at the data
        level = (log_snr / 10)[:, None, None, None].expand_as(x)
        angles = log_snr[:, None] * self.freq
        h = self.conv(torch.cat([x, level], 1)).flatten(1)
        return self.head(torch.cat([h, angles.sin(), angles.cos()], 1))


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Digits [n, 64], [n, 8, 8] or [n, 1, 8, 8] as float32 [n, 1, 8, 8]."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x[0].numel() != 64:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"digits must be a tensor of shape [n, 64], [n, 8, 8] or [n, 1, 8, 8], got {shape}")
    return x.reshape(-1, 1, 8, 8).to(torch.float32)


@lru_cache(maxsize=1)
def load_classifier(path: str | None = None) -> DigitsClassifier:
    """The shipped (or the given) classifier in eval mode, on the CPU."""
    return _load(DigitsClassifier(), SHIPPED if path is None else path, path is None)


@lru_cache(maxsize=1)
def load_noisy_classifier(path: str | None = None) -> NoisyDigitsClassifier:
    """The shipped (or the given) noise-conditional classifier in eval mode, on the CPU."""
    return _load(NoisyDigitsClassifier(), NOISY_SHIPPED if path is None else path, path is None)


def _load(net: nn.Module, name: str, shipped: bool) -> nn.Module:
    """net with the weights of a shipped asset (or a file), in eval mode without gradients."""
    if shipped:
        with resources.as_file(resources.files("fewstep.assets") / name) as p:
            state = load_file(str(p))
    else:
        state = load_file(name)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def features_and_logits(
    x: torch.Tensor, net: DigitsClassifier | None = None, batch: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, 64] and logits [n, 10] of digits in [-1, 1] (CPU, float32)."""
    net = load_classifier() if net is None else net
    x = as_images(x.detach().cpu())
    feats = torch.cat([net.features(b) for b in x.split(batch)])
    return feats, net.head(F.relu(feats))


def class_statistics(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Mean confidence (max softmax), entropy of the predicted-class histogram (nats, max log 10) and, given
    labels [n], accuracy, of logits [n, 10]."""
    probs = logits.softmax(-1)
    hist = torch.bincount(probs.argmax(-1), minlength=CLASSES).to(torch.float64) / len(probs)
    entropy = float(-(hist[hist > 0] * hist[hist > 0].log()).sum())
    stats = {"confidence": float(probs.max(-1).values.mean()), "class_entropy": entropy}
    if labels is not None:
        stats["accuracy"] = float((probs.argmax(-1) == labels.to(probs.device)).to(torch.float64).mean())
    return stats


def digits_split(test: int = 360, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x_train, y_train), (x_test, y_test)): the 1797 scikit-learn digits in [-1, 1], [n, 1, 8, 8], split by a
    fixed permutation; the last `test` digits of it are held out."""
    from sklearn.datasets import load_digits

    from ..data import digits

    x = digits()  # the training data of the digits models
    y = torch.as_tensor(load_digits().target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, held = perm[:-test], perm[-test:]
    return (x[train], y[train]), (x[held], y[held])


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (background -1 enters at the border): [n, 1, 8, 8]."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


def _optimizer(net: nn.Module, total_steps: int, seed: int) -> tuple[torch.Generator, torch.optim.Optimizer, Any]:
    """(data generator, AdamW, one-cycle schedule at lr 2e-3) of a classifier's training run."""
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total_steps)
    return torch.Generator().manual_seed(seed), opt, sched


def train_classifier(epochs: int = 40, seed: int = 0, log: bool = True) -> tuple[DigitsClassifier, float]:
    """Train on the digits training split with shifts and noise; returns (net, held-out accuracy)."""
    torch.manual_seed(seed)  # the initial weights
    net = DigitsClassifier()
    (x_train, y_train), (x_test, y_test) = digits_split()
    g, opt, sched = _optimizer(net, epochs * math.ceil(len(x_train) / 64), seed)
    x_train = as_images(x_train)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train), generator=g).split(64):
            xb = _shift(x_train[idx], g) + 0.1 * torch.randn(len(idx), 1, 8, 8, generator=g)
            loss = F.cross_entropy(net(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch + 1) % 10 == 0:
            net.eval()
            acc = class_statistics(features_and_logits(x_test, net)[1], y_test)["accuracy"]
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    net.eval()
    return net, class_statistics(features_and_logits(x_test, net)[1], y_test)["accuracy"]


def noise_digits(x0: torch.Tensor, log_snr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_t = alpha x0 + sigma eps with alpha^2 = sigmoid(log_snr), sigma^2 = sigmoid(-log_snr): x0 [n, 1, 8, 8]."""
    alpha, sigma = (torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt())
    eps = torch.randn(x0.shape, generator=generator)
    return alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps


@torch.no_grad()
def noisy_accuracy(net: NoisyDigitsClassifier, x: torch.Tensor, y: torch.Tensor, log_snr: float, seed: int = 1) -> float:
    """Accuracy of the noise-conditional classifier on digits x [n, 1, 8, 8] noised to one log-SNR."""
    level = torch.full((len(x),), float(log_snr))
    xt = noise_digits(as_images(x), level, torch.Generator().manual_seed(seed))
    return float((net(xt, level).argmax(1) == y).to(torch.float64).mean())


def train_noisy_classifier(steps: int = 8000, seed: int = 0, log: bool = True) -> tuple[NoisyDigitsClassifier, dict]:
    """Train p(k | x_t, log-SNR) on the digits training split (shifts, log-SNR uniform in LOG_SNR_RANGE, batch 256);
    returns (net, held-out accuracy at log-SNR -3, 0, 3)."""
    torch.manual_seed(seed)  # the initial weights
    net = NoisyDigitsClassifier()
    (x_train, y_train), (x_test, y_test) = digits_split()
    g, opt, sched = _optimizer(net, steps, seed)
    x_train = as_images(x_train)
    lo, hi = LOG_SNR_RANGE
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (256,), generator=g)
        level = lo + (hi - lo) * torch.rand(len(idx), generator=g)
        loss = F.cross_entropy(net(noise_digits(_shift(x_train[idx], g), level, g), level), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 1000 == 0:
            net.eval()
            accs = {lvl: noisy_accuracy(net, x_test, y_test, lvl) for lvl in (-3, 0, 3)}
            net.train()
            print(f"step {step + 1}: loss {loss.item():.4f}, held-out accuracy at log-SNR -3 / 0 / 3: "
                  + " / ".join(f"{a:.3f}" for a in accs.values()))  # fmt: skip
    net.eval()
    return net, {f"accuracy_log_snr_{lvl}": noisy_accuracy(net, x_test, y_test, lvl) for lvl in (-3, 0, 3)}


def _int_in(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi] (else a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewstep.tools.classifier", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"train": ("train the digits classifier and save its weights", "--epochs", 40),
                "train-noisy": ("train the noise-conditional digits classifier and save its weights", "--steps", 8000)}
    for name, (text, length, default) in commands.items():
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--out", type=Path, required=True, help="output .safetensors file")
        cmd.add_argument(length, type=_int_in(1, 10_000_000), default=default)
        cmd.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    args = parser.parse_args(argv)
    command = sub.choices[args.command]
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        command.error(f"argument --out: cannot create the folder {args.out.parent}: {err.strerror or err}")
    if args.out.is_dir():
        command.error(f"argument --out: {args.out} is a folder; give a .safetensors file name")
    start = time.perf_counter()
    if args.command == "train":
        net, acc = train_classifier(args.epochs, args.seed)
        meta = {"held_out_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)}
    else:
        net, accs = train_noisy_classifier(args.steps, args.seed)
        meta = {**{k: f"{v:.4f}" for k, v in accs.items()}, "steps": str(args.steps), "seed": str(args.seed)}
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(Path(args.out), lambda tmp: save_file(weights, str(tmp), metadata=meta))
    print(json.dumps({**meta, "seconds": round(time.perf_counter() - start, 1), "out": str(args.out)}))


if __name__ == "__main__":
    main()
