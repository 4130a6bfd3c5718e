"""Figures written during training (matplotlib, Agg): sample grids / scatter plots and the loss curve (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..io import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_samples(samples: torch.Tensor, path: str | Path, title: str = "", reference: torch.Tensor | None = None) -> Path:
    """Points [N, D] as a scatter plot of their first two coordinates (with `reference` data in grey), images
    [N, C, H, W] in [-1, 1] as a grid."""
    plt = _pyplot()
    x = samples.detach().float().cpu()
    if x.ndim == 2 and x.shape[1] > 2:  # points in D dimensions: their first two coordinates
        title = f"{title} (coordinates 1-2 of {x.shape[1]})"
        x = x[:, :2]
        reference = None if reference is None else reference[:, :2]
    if x.ndim == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        if reference is not None:
            r = reference.float().cpu()
            ax.scatter(r[:, 0], r[:, 1], s=2, c="0.8", label="data")
        ax.scatter(x[:, 0], x[:, 1], s=3, c="C0", label="samples")
        ax.set_aspect("equal")
        ax.legend(loc="upper right")
    elif x.ndim == 4:
        n = x.shape[0]
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        c, h, w = x.shape[1:]
        grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
        for i in range(n):
            r, q = divmod(i, cols)
            grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
        img = ((grid.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        fig, ax = plt.subplots(figsize=(6, 6 * img.shape[0] / img.shape[1]))
        ax.imshow(img[:, :, 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    else:
        raise ValueError(f"cannot plot samples of shape {tuple(x.shape)}: need [N, D >= 2] points or [N, C, H, W] images")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def save_loss_curve(history: list[float], path: str | Path, window: int = 50) -> Path:
    """The per-step loss (light) and its running mean over `window` steps, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    y = np.asarray(history, dtype=np.float64)
    ax.plot(np.arange(1, len(y) + 1), y, c="C0", alpha=0.3, lw=0.5, label="loss")
    if len(y) >= window:
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(y) + 1), smooth, c="C0", lw=1.5, label=f"mean of {window}")
    if len(y) and (y > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
