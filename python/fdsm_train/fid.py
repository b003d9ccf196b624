"""Fréchet Inception Distance with torchmetrics' implementation and Inception weights from a local file.

The arithmetic is torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` (running
float64 sums of the features and their outer products, unbiased covariances,
``||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))``). Its default extractor needs torch-fidelity,
which imports torchvision; here the extractor is passed in as a module instead, so neither is needed:

- :func:`load_inception` reads the FID Inception-v3 (the TF "2015-12-05" graph) from a path, as the
  TorchScript file that StyleGAN2-ADA and clean-fid publish (``inception-2015-12-05.pt``: uint8 images
  of any size in, ``(N, 2048)`` pool features out with ``return_features=True``) or as a
  ``torch.export`` archive (``.pt2``). Nothing is downloaded; a missing file is a ``FileNotFoundError``.
- :class:`FeatureExtractor` adapts any such module (or a randomly initialised one, in tests) to
  images in ``[0, 1]``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["FIDMeter", "FeatureExtractor", "frechet_distance", "load_inception"]


def _torchmetrics_fid():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except Exception as exc:  # a torchvision built for another torch makes `import torchmetrics` raise RuntimeError
        raise ImportError(f"FID needs torchmetrics, which cannot be imported here ({type(exc).__name__}: {exc}). "
                          "Install the pinned version (pip install torchmetrics==1.9.0); if a torchvision that "
                          "does not match torch is installed, uninstall it or install the matching build") from exc
    return FrechetInceptionDistance


def load_inception(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """The FID Inception network saved at ``path`` (TorchScript ``.pt`` or ``torch.export`` ``.pt2``), in eval mode.

    Raises ``FileNotFoundError`` naming ``path`` when it does not exist; nothing is downloaded.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path!r} does not exist or is not a file (give the "
                                "FID Inception-v3 as a TorchScript file, e.g. inception-2015-12-05.pt from "
                                "StyleGAN2-ADA / clean-fid; nothing is downloaded)")
    if path.endswith(".pt2"):
        model = torch.export.load(path).module()
    else:
        with warnings.catch_warnings():
            # The published FID Inception weights exist only as TorchScript, whose loader torch now deprecates.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(path, map_location=device)
    model = model.to(device)
    if hasattr(model, "eval"):
        model.eval()
    return model


class FeatureExtractor(nn.Module):
    """Features ``(B, num_features)`` of images ``(B, C, H, W)`` in ``[0, 1]`` from an Inception-like ``net``.

    Grey images are repeated to three channels. With ``uint8_input`` (the TorchScript FID Inception),
    images are rounded to ``uint8`` in ``[0, 255]`` first; ``call_kwargs`` go to every call
    (``{"return_features": True}`` for that network). The extractor never takes gradients.

    Args:
        net: the feature network.
        num_features: its feature width (2048 for Inception-v3's pool features).
        uint8_input: feed ``uint8`` pixels rather than the floats.
        call_kwargs: keyword arguments of every ``net`` call.
    """

    def __init__(self, net: Callable[..., Tensor], num_features: int, *, uint8_input: bool = True,
                 call_kwargs: dict | None = None):
        super().__init__()
        self.net = net
        self.num_features = int(num_features)
        self.uint8_input = uint8_input
        self.call_kwargs = dict(call_kwargs or {})

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FeatureExtractor:
        """The FID Inception of :func:`load_inception` as a 2048-feature extractor."""
        return cls(load_inception(path, device), 2048, uint8_input=True, call_kwargs={"return_features": True})

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8) if self.uint8_input else x.float()
        feats = self.net(x, **self.call_kwargs)
        return feats.reshape(feats.shape[0], -1).float()


class _Features(nn.Module):
    """Identity 'extractor': torchmetrics receives the features themselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _metric(num_features: int):
    # sync_on_compute=False: only rank 0 samples and evaluates, so compute() must not wait for the others.
    return _torchmetrics_fid()(feature=_Features(num_features), sync_on_compute=False)


def frechet_distance(real_features: Tensor, fake_features: Tensor) -> float:
    """FID between two sets of features ``(N, F)`` and ``(M, F)`` (N, M >= 2), by torchmetrics' arithmetic."""
    if real_features.dim() != 2 or fake_features.dim() != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"expected features (N, F) and (M, F), got {tuple(real_features.shape)} and "
                         f"{tuple(fake_features.shape)}")
    metric = _metric(real_features.shape[1])
    metric.update(real_features.detach().cpu().double(), real=True)
    metric.update(fake_features.detach().cpu().double(), real=False)
    return float(metric.compute())


class FIDMeter:
    """Accumulates extractor features of real and generated images batch by batch; :meth:`compute` gives FID.

    Args:
        extractor: a :class:`FeatureExtractor` (or any module ``(B, C, H, W) -> (B, F)`` with ``num_features``).
        batch_size: images per extractor call.
    """

    def __init__(self, extractor: nn.Module, batch_size: int = 100):
        self.extractor = extractor
        self.batch_size = int(batch_size)
        self.metric = _metric(int(extractor.num_features))

    def _add(self, images: Tensor | Iterable[Tensor], real: bool) -> None:
        batches = images.split(self.batch_size) if isinstance(images, Tensor) else images
        device = next((p.device for p in self.extractor.parameters()), torch.device("cpu")) \
            if isinstance(self.extractor, nn.Module) else torch.device("cpu")
        for batch in batches:
            feats = self.extractor(batch.to(device))
            self.metric.update(feats.detach().cpu().double(), real=real)

    def add_real(self, images: Tensor | Iterable[Tensor]) -> None:
        """Add real images ``(N, C, H, W)`` in ``[0, 1]`` (a tensor or an iterable of batches)."""
        self._add(images, True)

    def add_fake(self, images: Tensor | Iterable[Tensor]) -> None:
        """Add generated images ``(N, C, H, W)`` in ``[0, 1]``."""
        self._add(images, False)

    def compute(self) -> float:
        """The FID of everything added so far (needs at least two images of each kind)."""
        return float(self.metric.compute())
