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
    for ax_row, row in zip(axes, rows):
        draw_toy_histogram(ax_row[0], row["data"], box)
        draw_toy_density(ax_row[1], row["density"], box)
        draw_toy_histogram(ax_row[2], row["samples"], box)
        for ax, name in zip(ax_row, ("data", "learned density", "Langevin samples")):
            ax.set_title(f"{row['title']}: {name}", fontsize=9)
    fig.savefig(path)


def _square_axes(ax, box: float) -> None:
    ax.set_xlim(-box, box)
    ax.set_ylim(-box, box)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_toy_histogram(ax, points: Tensor, box: float) -> None:
    """A 2-D histogram of ``points (N, 2)`` on ``[-box, box]^2``."""
    bins = np.linspace(-box, box, 121)
    ax.hist2d(*points.T.numpy(), bins=bins, cmap="viridis")
    _square_axes(ax, box)


def draw_toy_density(ax, density: Tensor, box: float, samples: Tensor | None = None) -> None:
    """A density on a ``(G, G)`` grid over ``[-box, box]^2`` (row index = y), with ``samples`` as dots."""
    ax.imshow(density.numpy(), origin="lower", extent=(-box, box, -box, box), cmap="viridis")
    if samples is not None:
        ax.scatter(*samples.T.numpy(), s=1.0, c="white", alpha=0.6, linewidths=0)
    _square_axes(ax, box)


def draw_image_grid(ax, images: Tensor) -> None:
    """``(N, C, H, W)`` images in [0, 1] tiled into a square on ``ax``."""
    grid = tile_images(images.detach().float().cpu().clamp(0, 1), nrow=math.ceil(math.sqrt(images.shape[0])))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def grid_figure(path: str, cells: dict, draw, *, cell_inches: float = 2.6, first_column=None) -> None:
    """A grid of runs: ``cells[(row, column)] = (cfg, metrics)``, drawn by ``draw(ax, cfg, metrics)``.

    Rows and columns keep their first-seen order; the column names head the top row and the row names
    label the first column; a missing combination leaves its cell blank. ``first_column = (title,
    draw_row)`` adds a leading column drawn by ``draw_row(ax, cfg, metrics)`` with the row's first run.
    """
    rows = list(dict.fromkeys(r for r, _ in cells))
    columns = list(dict.fromkeys(c for _, c in cells))
    lead = 1 if first_column else 0
    fig = Figure(figsize=(cell_inches * (len(columns) + lead), cell_inches * len(rows) + 0.3), dpi=100,
                 layout="constrained")
    axes = fig.subplots(len(rows), len(columns) + lead, squeeze=False)
    for i, row in enumerate(rows):
        if first_column:
            cfg, metrics = next(v for (r, _), v in cells.items() if r == row)
            first_column[1](axes[i][0], cfg, metrics)
            if i == 0:
                axes[i][0].set_title(first_column[0], fontsize=10)
        for j, column in enumerate(columns):
            ax = axes[i][j + lead]
            if (row, column) in cells:
                draw(ax, *cells[(row, column)])
            else:
                ax.set_axis_off()
            if i == 0:
                ax.set_title(column, fontsize=10)
        axes[i][0].set_ylabel(row, fontsize=10)
    fig.savefig(path)


def plot_loss_curve(ax, csv_path: str, title: str) -> None:
    """The ``train/loss`` curve of a run's ``scalars.csv`` on ``ax``."""
    from .scalars import read_scalars

    curve = read_scalars(csv_path, "train/loss")
    ax.plot([s for s, _ in curve], [v for _, v in curve], lw=1)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
