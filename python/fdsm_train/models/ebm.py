"""A convolutional energy model for grey-scale images (the deep-EBM experiment)."""

from __future__ import annotations

import math

from torch import Tensor, nn


class ConvLogDensity(nn.Module):
    """``f(x) = -E(x)``: images ``(N, C, H, W) -> (N,)``.

    Two 3x3 convolutions at full resolution, then stride-2 stages (doubling the width) down to at most
    4x4, then a linear read-out. ELU activations, as the authors' deep EBM: smooth enough for the
    double backward of the gradient-based DSM baseline.

    Args:
        channels: image channels.
        image_size: height (= width) of the images.
        width: channels of the first convolutions.
    """

    def __init__(self, channels: int = 1, image_size: int = 28, width: int = 64):
        super().__init__()
        layers = [nn.Conv2d(channels, width, 3, padding=1), nn.ELU(), nn.Conv2d(width, width, 3, padding=1), nn.ELU()]
        size, w = image_size, width
        while size > 4:
            layers += [nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ELU()]
            size, w = math.ceil(size / 2), 2 * w
        self.features = nn.Sequential(*layers)
        self.readout = nn.Linear(w * size * size, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.features(x).flatten(1)).squeeze(-1)
