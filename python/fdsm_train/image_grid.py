"""Image grids as PNG files, drawn with matplotlib (torchvision is not needed)."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tile ``(B, C, H, W)`` images in ``[0, 1]`` into one ``(H', W', C)`` float array (C is 1 or 3).

    ``nrow`` images per row (default: about ``sqrt(B)``); ``padding`` pixels of ``pad_value`` between
    and around the tiles. Values are clamped to ``[0, 1]``.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    grid = torch.full((c, padding + rows * (h + padding), padding + nrow * (w + padding)), float(pad_value))
    imgs = images.detach().float().cpu().clamp(0, 1)
    for k in range(b):
        r, q = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = imgs[k]
    return grid.permute(1, 2, 0)


def save_image_grid(images: Tensor, path: str, nrow: int | None = None, *, scale: int = 4) -> str:
    """Write ``images`` (``(B, C, H, W)`` in ``[0, 1]``) as one PNG grid at ``path``; returns ``path``.

    Each pixel becomes a ``scale x scale`` block so that 16x16 samples stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow)
    if scale > 1:
        grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    array = grid.numpy()
    if array.shape[-1] == 1:
        plt.imsave(path, array[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, array)
    return path
