"""NICE (Dinh et al. 2014) as in the FD paper's NICE experiment: an exactly normalised flow.

``y = x`` permuted (even coordinates first), then 4 additive coupling layers alternating which half
is shifted, ``h_b <- h_b + m(h_a)`` with ``m`` an MLP of ``mlp_layers`` linear layers (width ``hidden``,
softplus between them), then a diagonal scaling ``y * exp(s)``; the prior is N(0, I):
``log p(x) = log N(exp(s) * g(x); 0, I) + sum(s)`` (coupling layers have unit Jacobian).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .mlp import softplus_mlp


class AdditiveCoupling(nn.Module):
    """``[a, b] -> [a, b + m(a)]`` (or the halves swapped when ``flip``); unit Jacobian."""

    def __init__(self, dim: int, hidden: int, layers: int, flip: bool):
        super().__init__()
        self.half = dim // 2
        self.flip = flip
        n_cond = dim - self.half if flip else self.half
        self.m = softplus_mlp(n_cond, dim - n_cond, hidden, layers)

    def _split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = h[:, : self.half], h[:, self.half:]
        return (hi, lo) if self.flip else (lo, hi)

    def _join(self, cond: Tensor, moved: Tensor) -> Tensor:
        return torch.cat([moved, cond] if self.flip else [cond, moved], 1)

    def forward(self, h: Tensor) -> Tensor:
        cond, moved = self._split(h)
        return self._join(cond, moved + self.m(cond))

    def inverse(self, h: Tensor) -> Tensor:
        cond, moved = self._split(h)
        return self._join(cond, moved - self.m(cond))


class NICE(nn.Module):
    """Normalised log-density ``(N, dim) -> (N,)`` of the NICE flow (see the module docstring).

    Args:
        dim: data dimension (flattened).
        hidden: width of the coupling MLPs (paper: 1000).
        mlp_layers: linear layers per coupling MLP (paper: 5).
        couplings: number of coupling layers (paper: 4).
    """

    def __init__(self, dim: int, hidden: int = 1000, mlp_layers: int = 5, couplings: int = 4):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(AdditiveCoupling(dim, hidden, mlp_layers, flip=i % 2 == 1)
                                    for i in range(couplings))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        perm = torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)

    def to_latent(self, x: Tensor) -> Tensor:
        """``z = exp(s) * g(x)``, ``(N, dim)``."""
        h = x.flatten(1)[:, self.perm]
        for layer in self.layers:
            h = layer(h)
        return h * torch.exp(self.log_scale)

    def forward(self, x: Tensor) -> Tensor:
        z = self.to_latent(x)
        return -0.5 * z.square().sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + self.log_scale.sum()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples ``(n, dim)`` by inverting the flow on N(0, I) draws."""
        dev = self.log_scale.device
        h = torch.randn(n, self.dim, generator=generator, device=dev) * torch.exp(-self.log_scale)
        for layer in reversed(self.layers):
            h = layer.inverse(h)
        return h[:, self.inv_perm]
