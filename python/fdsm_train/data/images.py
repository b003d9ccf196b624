"""Grey-scale image data for the NICE and deep-EBM experiments, as integer pixel levels.

- ``digits`` (offline default): scikit-learn's bundled 8x8 handwritten digits (1797 images, levels
  0..16). Shuffled with seed 2020; the last 360 images (20%) are the test split.
- ``mnist``: MNIST 28x28 (levels 0..255) from a user directory ``root`` laid out as torchvision's
  ``MNIST(root)`` expects (``root/MNIST/raw/*-ubyte[.gz]``); read by torchvision with
  ``download=False`` when it imports, otherwise from the same raw IDX files. The official 60000/10000
  train/test split. Nothing is ever downloaded.

Images are returned as float tensors of levels ``(N, 1, H, W)`` plus the number of levels ``L``;
:func:`dequantize` turns a batch into ``[0, 1)`` values ``(v + u) / L`` with uniform noise ``u``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError

IMAGE_DATASETS = ("digits", "mnist")
_MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def _read_idx_images(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if int.from_bytes(raw[:4], "big") != 2051:
        raise ConfigError(f"{path!r} is not an MNIST image file (IDX magic 2051)")
    n, h, w = (int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=16).reshape(n, h, w)  # writable


def read_mnist(root: str, split: str) -> np.ndarray:
    """MNIST's ``split`` ("train" or "test") images under ``root`` as ``uint8`` ``(N, 28, 28)``.

    Through torchvision's ``MNIST(root, download=False)`` when torchvision imports, otherwise from the
    same raw IDX files (``root/MNIST/raw/*-idx3-ubyte[.gz]``). Raises :class:`ConfigError` (a
    ``ValueError``) naming the expected path when they are missing. The one MNIST reader of the package.
    """
    try:
        from torchvision.datasets import MNIST
    except Exception:  # not installed, or built for another torch
        MNIST = None
    if MNIST is not None:
        try:
            return MNIST(root, train=split == "train", download=False).data.numpy()
        except RuntimeError as exc:  # torchvision's "Dataset not found"
            raise ConfigError(f"MNIST not found under --data-root {root!r} ({exc})") from exc
    raw = os.path.join(root, "MNIST", "raw")
    for name in (_MNIST_FILES[split], _MNIST_FILES[split] + ".gz"):
        if os.path.isfile(os.path.join(raw, name)):
            return _read_idx_images(os.path.join(raw, name))
    raise ConfigError(f"MNIST {split} images not found: expected {os.path.join(raw, _MNIST_FILES[split])}[.gz] "
                      f"under --data-root {root!r} (torchvision's MNIST layout; nothing is downloaded)")


def load_images(name: str, root: str | None = None) -> tuple[dict[str, Tensor], int]:
    """``({"train": (N, 1, H, W), "test": ...}, levels)`` for ``name`` in :data:`IMAGE_DATASETS`."""
    if name == "digits":
        from sklearn.datasets import load_digits

        images = load_digits().images.astype(np.float32)
        images = images[np.random.default_rng(2020).permutation(len(images))]
        split = {"train": images[:-360], "test": images[-360:]}
        levels = 17
    elif name == "mnist":
        if not root:
            raise ConfigError("dataset 'mnist' needs --data-root, the directory holding MNIST/raw/")
        if not os.path.isdir(root):
            raise ConfigError(f"MNIST --data-root not found: {root!r} is not a directory")
        split = {k: read_mnist(root, k).astype(np.float32) for k in ("train", "test")}
        levels = 256
    else:
        raise ConfigError(f"unknown image dataset {name!r}; choose from {', '.join(IMAGE_DATASETS)}")
    return {k: torch.from_numpy(np.ascontiguousarray(v))[:, None] for k, v in split.items()}, levels


def dequantize(levels_batch: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """``(v + u) / levels`` with ``u ~ U[0, 1)`` per pixel: continuous values in ``[0, 1)``."""
    u = torch.rand(levels_batch.shape, generator=generator, device=levels_batch.device, dtype=levels_batch.dtype)
    return (levels_batch + u) / levels


def to_logit(x: Tensor, lam: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Logit transform ``y = logit(lam + (1 - 2 lam) x)`` of ``x`` in [0, 1] and ``log |dy/dx|`` per image.

    ``lam`` keeps ``y`` finite at 0 and 1 (the authors clamp x to [1e-3, 1 - 1e-3] instead, which is not
    invertible). Returns ``y`` flattened to ``(N, D)`` and the log-Jacobian ``(N,)``, so that
    ``log p_x(x) = log p_y(y) + logdet``.
    """
    s = lam + (1 - 2 * lam) * x.flatten(1)
    y = torch.log(s) - torch.log1p(-s)
    logdet = (np.log(1 - 2 * lam) - torch.log(s) - torch.log1p(-s)).sum(1)
    return y, logdet


def from_logit(y: Tensor, lam: float = 1e-3) -> Tensor:
    """Inverse of :func:`to_logit` (values in [0, 1], same shape as ``y``)."""
    return ((torch.sigmoid(y) - lam) / (1 - 2 * lam)).clamp(0, 1)
