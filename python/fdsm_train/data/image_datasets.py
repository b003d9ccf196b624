"""Image training sets as in-memory ``uint8`` tensors ``(N, C, H, W)``.

- ``"shapes"`` (the offline default): procedurally drawn 16x16 RGB images, a colour gradient with one
  soft-edged disc, square or ring; generated from a seed, nothing read or downloaded.
- ``"cifar10"``, ``"svhn"``, ``"mnist"``, ``"celeba"``: read from a user ``root`` through torchvision
  with ``download=False`` (nothing is ever downloaded). A missing file raises ``FileNotFoundError``
  naming the path that should exist. CIFAR-10's python batches are read directly when torchvision is
  not importable (the torchvision wheel on PyPI fails to import against some torch builds), and so are
  MNIST's raw IDX files (by :func:`fdsm_train.data.images.read_mnist`, the package's one MNIST reader).
  The CIFAR-10 pickles are read by :class:`CifarBatchUnpickler`, which builds only what a batch holds
  (so a crafted file cannot run code).

Pixels stay ``uint8`` until a batch is drawn (:func:`to_unit_interval`), so CIFAR-10 takes 150 MB.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_DATASETS", "load_images", "procedural_shapes", "random_hflip", "to_unit_interval"]

#: dataset names :func:`load_images` knows, the offline one first
IMAGE_DATASETS = ("shapes", "cifar10", "svhn", "mnist", "celeba")

# What must exist under ``root`` for each dataset (torchvision's layouts).
_REQUIRED = {
    "cifar10": lambda root, split: os.path.join(root, "cifar-10-batches-py",
                                                "data_batch_1" if split == "train" else "test_batch"),
    "svhn": lambda root, split: os.path.join(root, f"{split}_32x32.mat"),
    "mnist": lambda root, split: os.path.join(root, "MNIST", "raw"),
    "celeba": lambda root, split: os.path.join(root, "celeba", "img_align_celeba"),
}


def procedural_shapes(n: int, size: int = 16, *, seed: int = 0) -> Tensor:
    """``n`` procedurally drawn RGB images, ``uint8`` of shape ``(n, 3, size, size)``.

    Each image is a linear gradient between two random colours in a random direction, with one
    disc, square or ring of a third colour at a random position and size; the shape's edge is a
    one-pixel logistic ramp, so the images are smooth but far from Gaussian. The same ``seed`` gives
    the same images on every machine (drawn on the CPU in float64).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(f"`size` must be an integer >= 4, got {size!r}")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    coords = (torch.arange(size, dtype=f64) + 0.5) / size                 # pixel centres in (0, 1)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    colour = lambda: torch.rand(n, 3, 1, 1, generator=g, dtype=f64)
    angle = torch.rand(n, 1, 1, generator=g, dtype=f64) * 2 * torch.pi
    t = (xx * angle.cos() + yy * angle.sin())                            # (n, size, size)
    t = (t - t.amin((1, 2), keepdim=True)) / (t.amax((1, 2), keepdim=True) - t.amin((1, 2), keepdim=True))
    c0, c1, c2 = colour(), colour(), colour()
    img = c0 + (c1 - c0) * t[:, None]

    cx, cy = (0.2 + 0.6 * torch.rand(2, n, 1, 1, generator=g, dtype=f64)).unbind(0)
    radius = 0.15 + 0.2 * torch.rand(n, 1, 1, generator=g, dtype=f64)
    kind = torch.randint(0, 3, (n, 1, 1), generator=g)
    dx, dy = xx - cx, yy - cy
    disc = torch.sqrt(dx**2 + dy**2) - radius                             # signed distances (< 0 inside)
    square = torch.maximum(dx.abs(), dy.abs()) - radius
    ring = (torch.sqrt(dx**2 + dy**2) - radius).abs() - 0.35 * radius
    dist = torch.where(kind == 0, disc, torch.where(kind == 1, square, ring))
    mask = torch.sigmoid(-dist * size * 2.0)[:, None]                     # ~1-pixel soft edge
    img = img * (1 - mask) + c2 * mask
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def _torchvision(name: str):
    try:
        import torchvision  # noqa: F401
        import torchvision.datasets
    except Exception as exc:  # a torchvision built for another torch raises RuntimeError, not ImportError
        raise ImportError(f"dataset {name!r} is read through torchvision, which cannot be imported here "
                          f"({type(exc).__name__}: {exc}); install the torchvision build that matches torch "
                          f"{torch.__version__}, or use the offline dataset 'shapes'") from exc
    return torchvision


class CifarFormatError(pickle.UnpicklingError, ValueError):
    """A file that is not a CIFAR-10 python batch, or that asks for more than a batch holds."""


def _latin1_bytes(text: str, encoding: str) -> bytes:
    # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CifarFormatError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class CifarBatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch and nothing else.

    A batch is a dict of str/bytes keys holding a ``uint8`` numpy array, lists of ints and of
    bytes/str, and a str: building it needs only numpy's array reconstructor (``_frombuffer`` in
    protocol 5), ``numpy.ndarray``, ``numpy.dtype`` and, for bytes in protocol-2 pickles, a latin-1
    ``_codecs.encode``. Any other global (``os.system``, ``builtins.eval``, ...) is refused by name with
    :class:`CifarFormatError` (a ``pickle.UnpicklingError`` and a ``ValueError``) before it is looked
    up, so a crafted file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],  # pickles of numpy 1
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],  # pickles of numpy 2
        ("numpy.core.numeric", "_frombuffer"): np.ndarray(1).__reduce_ex__(5)[0],  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): np.ndarray(1).__reduce_ex__(5)[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise CifarFormatError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only a dict "
                                         "of numpy uint8 arrays, lists and strings") from None


def read_cifar10_batch(path: str) -> np.ndarray:
    """The ``data`` array ``uint8 (N, 3072)`` of one CIFAR-10 python batch file, read safely.

    Raises:
        CifarFormatError: (a ``ValueError``) the file is not a CIFAR-10 batch, or asks
            the unpickler for anything but the types a batch holds; the message names the file.
    """
    try:
        with open(path, "rb") as fh:
            batch = CifarBatchUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CifarFormatError(f"{path}: not a CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise CifarFormatError(f"{path}: not a CIFAR-10 batch (holds a {type(batch).__name__}, not a dict)")
    data = batch.get("data", batch.get(b"data"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarFormatError(f"{path}: not a CIFAR-10 batch ('data' is {what}, not uint8 (N, 3072))")
    return data


def _cifar10_batches(root: str, split: str) -> Tensor:
    """CIFAR-10's python pickles read directly (the same files torchvision's CIFAR10 reads)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    arrays = []
    for name in names:
        path = os.path.join(root, "cifar-10-batches-py", name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-10 file not found: {path!r}")
        arrays.append(read_cifar10_batch(path))
    return torch.from_numpy(np.concatenate(arrays).reshape(-1, 3, 32, 32))


def _celeba(tv, root: str, split: str, image_size: int, limit: int | None) -> Tensor:
    # NCSN's CelebA preprocessing: centre crop 140x140, then resize.
    from torchvision import transforms

    tf = transforms.Compose([transforms.CenterCrop(140), transforms.Resize(image_size), transforms.PILToTensor()])
    ds = tv.datasets.CelebA(root, split="valid" if split == "val" else split, target_type=[], transform=tf,
                            download=False)
    count = len(ds) if limit is None else min(limit, len(ds))
    return torch.stack([ds[i][0] for i in range(count)])


def load_images(name: str, root: str | None = None, *, split: str = "train", limit: int | None = None,
                shapes_count: int = 2048, image_size: int | None = None, seed: int = 0) -> Tensor:
    """The images of dataset ``name`` as ``uint8`` ``(N, C, H, W)`` (see the module docstring).

    Args:
        name: one of :data:`IMAGE_DATASETS`.
        root: directory holding the dataset in torchvision's layout (not used by ``"shapes"``):
            ``root/cifar-10-batches-py/``, ``root/{train,test}_32x32.mat`` (SVHN),
            ``root/MNIST/raw/`` (MNIST), ``root/celeba/img_align_celeba/`` and its list files (CelebA).
        split: ``"train"`` or ``"test"`` (CelebA also ``"val"``).
        limit: keep at most this many images (the first ones).
        shapes_count: how many images ``"shapes"`` draws.
        image_size: side length for ``"shapes"`` (default 16) and ``"celeba"`` (default 64); the others
            keep their native size (32, or 28 for MNIST).
        seed: seed of ``"shapes"`` (the train and test splits use different streams).

    Raises:
        ValueError: unknown ``name`` or ``split``, or no ``root`` for a file-backed dataset; a CIFAR-10
            batch that is not one (:class:`CifarFormatError`, also when it asks for other types).
        FileNotFoundError: the dataset's files are not under ``root`` (the message names the path).
        ImportError: the dataset needs torchvision and it cannot be imported.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(IMAGE_DATASETS)}")
    if split not in ("train", "test", "val") or (split == "val" and name != "celeba"):
        raise ValueError(f"`split` must be 'train' or 'test' (CelebA also 'val'), got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be None or an integer >= 1, got {limit!r}")
    if name == "shapes":
        images = procedural_shapes(shapes_count, image_size or 16, seed=seed * 2 + (split != "train"))
        return images[:limit]
    if not root:
        raise ValueError(f"dataset {name!r} is read from disk: give its directory as `root` (data_root), e.g. the "
                         f"directory holding {os.path.relpath(_REQUIRED[name]('ROOT', split), 'ROOT')!r}")
    root = os.path.expanduser(root)
    required = _REQUIRED[name](root, "train" if split == "val" else split)
    if not os.path.exists(required):
        raise FileNotFoundError(f"{name} {split} split not found: {required!r} does not exist (data_root={root!r}; "
                                "nothing is downloaded: place the dataset there in torchvision's layout)")
    if name == "cifar10":
        try:
            tv = _torchvision(name)
        except ImportError:
            images = _cifar10_batches(root, split)
        else:
            data = tv.datasets.CIFAR10(root, train=split == "train", download=False).data    # (N, 32, 32, 3)
            images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()
    elif name == "svhn":
        data = _torchvision(name).datasets.SVHN(root, split=split, download=False).data      # (N, 3, 32, 32)
        images = torch.from_numpy(np.ascontiguousarray(data))
    elif name == "mnist":
        from .images import read_mnist   # torchvision when it imports, else the raw IDX files

        images = torch.from_numpy(np.ascontiguousarray(read_mnist(root, split))).unsqueeze(1)   # (N, 1, 28, 28)
    else:
        images = _celeba(_torchvision(name), root, split, image_size or 64, limit)
    return images[:limit].to(torch.uint8)


def to_unit_interval(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``uint8`` pixels to ``[0, 1]`` floats (``x / 255``); float input is returned as ``dtype``."""
    if images.dtype == torch.uint8:
        return images.to(dtype) / 255.0
    return images.to(dtype)


def random_hflip(images: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Flip each image of ``(B, C, H, W)`` left-right with probability ``p`` (NCSNv2's augmentation).

    The coin flips come from ``generator`` (on ``images``' device), so a seeded run is reproducible.
    """
    device = generator.device if generator is not None else images.device
    flip = (torch.rand(images.shape[0], generator=generator, device=device) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
