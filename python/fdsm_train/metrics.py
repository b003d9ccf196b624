"""Evaluation numbers shared by the experiments."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import fdsm_ext


def mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.1, 0.3, 1.0, 3.0)) -> float:
    """Unbiased squared maximum mean discrepancy between samples ``x (N, d)`` and ``y (M, d)``.

    The kernel is a sum of Gaussian kernels ``exp(-||a - b||^2 / (2 h^2))`` over ``bandwidths`` (a mix
    of scales so neither the mode positions nor the fine shape dominate). Computed in float64.
    """
    x, y = x.double().flatten(1), y.double().flatten(1)
    n, m = x.shape[0], y.shape[0]

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def heldout_exact_sm(log_density: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 1000) -> float:
    """Mean exact score-matching loss ``tr hess f + 1/2 ||grad f||^2`` of ``log_density`` on ``x``.

    Evaluated with :func:`fdsm_ext.exact_sm_loss` in chunks of ``chunk`` rows (d backward passes per
    chunk); lower is better, and it equals the Fisher divergence to the data up to a constant.
    """
    total = 0.0
    for part in x.split(chunk):
        total += float(fdsm_ext.exact_sm_loss(log_density, part, reduction="sum").detach())
    return total / x.shape[0]


@torch.no_grad()
def log_density_chunked(log_density: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 4096) -> Tensor:
    """``log_density`` on ``x`` in chunks, without autograd (a ``(N,)`` tensor)."""
    return torch.cat([log_density(part).reshape(-1) for part in x.split(chunk)])


def grid_log_normalizer(log_density: Callable[[Tensor], Tensor], box: float, resolution: int,
                        device: torch.device | str = "cpu") -> tuple[float, Tensor]:
    """``log Z`` of a 2-D model on the square ``[-box, box]^2`` by the midpoint rule, and ``log p`` on the grid.

    Returns ``(log_z, log_prob)`` with ``log_prob`` of shape ``(resolution, resolution)`` (row index = y),
    normalised so that ``exp(log_prob)`` integrates to 1 over the square: a truncated density when the
    model puts mass outside it.
    """
    h = 2 * box / resolution
    centers = torch.linspace(-box + h / 2, box - h / 2, resolution, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(centers, centers, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    f = log_density_chunked(log_density, pts).double()
    log_z = float(torch.logsumexp(f, 0)) + 2 * math.log(h)
    return log_z, (f - log_z).reshape(resolution, resolution).cpu()
