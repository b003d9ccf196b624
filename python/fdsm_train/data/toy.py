"""Two-dimensional toy densities, sampled on the fly from a seeded generator (nothing to download).

Every density lives inside the square ``[-BOX, BOX]^2``, which is also where the toy experiment
draws its density plots, normalises the learned density on a grid and starts Langevin chains.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BOX = 4.0


def _mog(n: int, g: torch.Generator) -> Tensor:
    # 8 equal Gaussians (std 0.25) on the circle of radius 2.5
    k = torch.randint(0, 8, (n,), generator=g)
    angle = k.to(torch.float64) * (2 * math.pi / 8)
    centers = 2.5 * torch.stack([angle.cos(), angle.sin()], 1)
    return centers + 0.25 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _rings(n: int, g: torch.Generator) -> Tensor:
    # 3 concentric rings (radii 1, 2, 3, radial std 0.1), mass proportional to circumference
    radii = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    k = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=g)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    r = radii[k] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return r[:, None] * torch.stack([angle.cos(), angle.sin()], 1)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    # uniform on the 8 dark cells of a 4x4 board covering [-3, 3]^2
    cell = 1.5
    i = torch.randint(0, 4, (n,), generator=g)
    j = (2 * torch.randint(0, 2, (n,), generator=g) + (i % 2)) % 4
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.stack([i, j], 1).to(torch.float64) * cell - 3.0 + u * cell


def _spirals(n: int, g: torch.Generator) -> Tensor:
    # two interleaved Archimedean spirals with Gaussian jitter (std 0.1)
    t = torch.sqrt(torch.rand(n, generator=g, dtype=torch.float64)) * 3 * math.pi
    arm = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * math.pi
    r = t / math.pi
    pts = r[:, None] * torch.stack([(t + arm).cos(), (t + arm).sin()], 1)
    return pts + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)


DENSITIES = {
    "mog": _mog,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "spirals": _spirals,
}


def sample_toy(name: str, n: int, seed: int) -> Tensor:
    """``n`` float32 points ``(n, 2)`` of the density ``name`` (one of :data:`DENSITIES`), seeded."""
    if name not in DENSITIES:
        raise ValueError(f"unknown toy density {name!r}; choose from {', '.join(DENSITIES)}")
    g = torch.Generator().manual_seed(seed)
    return DENSITIES[name](n, g).to(torch.float32)
