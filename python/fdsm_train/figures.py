"""PNG figures: image grids and the toy experiment's data | density | samples panels.

Image grids use ``torchvision.utils.save_image`` when torchvision imports (it does not with every torch
build: the CPU torch wheels newer than the newest torchvision lack its compiled ops), and matplotlib
otherwise. Figures are drawn on :class:`matplotlib.figure.Figure` directly, without pyplot, so no GUI
backend is ever needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor


def _torchvision_save_image():
    try:
        from torchvision.utils import save_image
    except Exception:  # ImportError, or a RuntimeError from a torchvision built for another torch
        return None
    return save_image


def tile_images(images: Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """``(N, C, H, W)`` images in [0, 1] tiled row-major into one ``(H', W', C)`` array (white gaps)."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    canvas = torch.ones(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        canvas[:, top:top + h, left:left + w] = images[i]
    return canvas.permute(1, 2, 0).numpy()


def save_image_grid(images: Tensor, path: str, nrow: int = 8) -> None:
    """Write ``(N, C, H, W)`` images with values in [0, 1] as one PNG grid.

    Images smaller than 32 pixels are enlarged by an integer factor (nearest neighbour) so that 8x8
    digits stay visible.
    """
    images = images.detach().float().cpu().clamp(0, 1)
    factor = max(1, 32 // images.shape[-1])
    if factor > 1:
        images = images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    save_image = _torchvision_save_image()
    if save_image is not None:
        save_image(images, path, nrow=nrow)
        return
    grid = tile_images(images, nrow)
    fig = Figure(figsize=(grid.shape[1] / 100, grid.shape[0] / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    fig.savefig(path)


def toy_panels(path: str, rows: Sequence[dict], box: float) -> None:
    """One row per run of three panels: training data | learned density | Langevin samples.

    Each row is a dict with ``title``, ``data`` ``(N, 2)``, ``density`` (a normalised density on a
    square grid over ``[-box, box]^2``, ``(G, G)``, row index = y) and ``samples`` ``(M, 2)``.
    """
    fig = Figure(figsize=(9, 3 * len(rows)), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    bins = np.linspace(-box, box, 121)
    for ax_row, row in zip(axes, rows):
        ax_row[0].hist2d(*row["data"].T.numpy(), bins=bins, cmap="viridis")
        ax_row[1].imshow(row["density"].numpy(), origin="lower", extent=(-box, box, -box, box), cmap="viridis")
        ax_row[2].hist2d(*row["samples"].T.numpy(), bins=bins, cmap="viridis")
        for ax, name in zip(ax_row, ("data", "learned density", "Langevin samples")):
            ax.set_xlim(-box, box)
            ax.set_ylim(-box, box)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row['title']}: {name}", fontsize=9)
    fig.savefig(path)


def plot_loss_curve(ax, csv_path: str, title: str) -> None:
    """The ``train/loss`` curve of a run's ``scalars.csv`` on ``ax``."""
    from .scalars import read_scalars

    curve = read_scalars(csv_path, "train/loss")
    ax.plot([s for s, _ in curve], [v for _, v in curve], lw=1)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
