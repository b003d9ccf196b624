"""Deep kernel exponential family (DKEF; Wenliang et al. 2019), the model of the FD paper's Table 1.

``log p~(x) = sum_m alpha_m k(x, z_m) + log q0(x)`` with ``k = sum_j w_j exp(-||phi_j(x) - phi_j(z)||^2
/ (2 * 10^s_j))``: three Gaussian kernels (softmax weights ``w``, log10 bandwidths ``s`` initialised to
0, 0.5185, 1 as in the authors' code, which does not square the bandwidth) on the features of their own
3-layer softplus MLP ``phi_j`` (width 30, plus a linear skip), ``M`` trainable inducing points ``z`` and
``q0 = N(0, 2^2 I)``.

``alpha`` is not a parameter: for a fixed kernel the score-matching objectives are quadratic in it,
``J(alpha) = 1/2 alpha^T G alpha + b^T alpha + const``, so it is solved in closed form,
``alpha = -(G + lambda I)^-1 b`` (``lambda = 10^l``, ``l`` trainable), on one part of each batch while
the loss is taken on the other; gradients flow through the solve. ``G`` and ``b`` come from first
and second directional derivatives of the kernel row ``K(x) = [k(x, z_m)]_m`` (forward-mode autograd):

- ``exact`` (exact SM): along every coordinate ``e_i``: ``G = E sum_i K_i' K_i'^T``,
  ``b = E sum_i (K_i'' + K_i' d_i log q0)``;
- ``sliced`` (SSM, FD-SSM; the authors' code solves FD-SSM's alpha this way too): one Rademacher
  ``v`` per sample: ``G = E K_v' K_v'^T``, ``b = E (K_v'' + K_v' v^T grad log q0)``;
- ``sliced_vr`` (SSM-VR): ``G`` of ``exact``, ``b = E (K_v'' + sum_i K_i' d_i log q0)``;
- ``dsm`` (DSM, FD-DSM): at ``x~ = x + sigma eps``: ``G`` of ``exact`` at ``x~``,
  ``b = E sum_i K_i'(x~) (d_i log q0(x~) + (x~ - x)_i / sigma^2)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from .mlp import softplus_mlp

ALPHA_METHODS = ("exact", "sliced", "sliced_vr", "dsm")


class FeatureMLP(nn.Module):
    """``phi(x)``: 3 linear layers with softplus between them, plus a bias-free linear skip."""

    def __init__(self, dim: int, hidden: int = 30, skip: bool = True):
        super().__init__()
        self.net = softplus_mlp(dim, hidden, hidden, 3)
        self.skip = nn.Linear(dim, hidden, bias=False) if skip else None
        for m in self.modules():  # the authors' init: N(0, 1/fan_out) weights and biases
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1 / math.sqrt(m.weight.shape[0]))
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1 / math.sqrt(m.bias.shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out + self.skip(x) if self.skip is not None else out


class DKEF(nn.Module):
    """The DKEF log-density; see the module docstring.

    Args:
        inducing: initial inducing points ``(M, dim)`` (the authors draw them from the training set).
        n_kernels: number of Gaussian kernels (each with its own feature network).
        hidden: feature width.
        log10_bandwidths: initial ``s_j``; cycled if shorter than ``n_kernels``.
        q0_std: standard deviation of the base density ``q0 = N(0, q0_std^2 I)``.
        log10_lambda: initial log10 of the ridge ``lambda`` of the alpha solve.
    """

    def __init__(self, inducing: Tensor, n_kernels: int = 3, hidden: int = 30,
                 log10_bandwidths=(0.0, 0.5185, 1.0), q0_std: float = 2.0, log10_lambda: float = -2.0,
                 skip: bool = True):
        super().__init__()
        dim = inducing.shape[1]
        self.features = nn.ModuleList(FeatureMLP(dim, hidden, skip) for _ in range(n_kernels))
        self.log10_bandwidth = nn.Parameter(torch.tensor([log10_bandwidths[j % len(log10_bandwidths)]
                                                          for j in range(n_kernels)], dtype=torch.float32))
        self.kernel_logits = nn.Parameter(torch.zeros(n_kernels))
        self.z = nn.Parameter(inducing.clone().float())
        self.log10_lambda = nn.Parameter(torch.tensor(float(log10_lambda)))
        self.q0_std = q0_std
        # the alpha of the last full solve, used by forward when no alpha is passed (evaluation)
        self.register_buffer("alpha", torch.zeros(inducing.shape[0]))

    @property
    def num_inducing(self) -> int:
        """``M``, the number of inducing points."""
        return self.z.shape[0]

    def log_q0(self, x: Tensor) -> Tensor:
        """Unnormalised base log-density ``-||x||^2 / (2 q0_std^2)``, ``(N,)``."""
        return -0.5 * x.square().sum(-1) / self.q0_std**2

    def _kernel_rows(self, x: Tensor, z_features: list[Tensor]) -> Tensor:
        weights = torch.softmax(self.kernel_logits, 0)
        out = 0
        for j, phi in enumerate(self.features):
            d2 = (phi(x)[..., None, :] - z_features[j]).square().sum(-1)
            out = out + weights[j] * torch.exp(-d2 / (2 * 10.0 ** self.log10_bandwidth[j]))
        return out

    def kernel_rows(self, x: Tensor) -> Tensor:
        """``K(x)``: ``(N, M)`` kernel values between ``x (N, dim)`` and the inducing points."""
        return self._kernel_rows(x, [phi(self.z) for phi in self.features])

    def forward(self, x: Tensor, alpha: Tensor | None = None) -> Tensor:
        """``log p~(x) = K(x) alpha + log q0(x)``, ``(N,)`` (``alpha``: the stored one if None)."""
        alpha = self.alpha if alpha is None else alpha
        return self.kernel_rows(x) @ alpha + self.log_q0(x)

    # ------------------------------------------------------------------ closed-form alpha
    def _directional(self, x: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        """First and second derivatives of ``K`` at ``x (B, D)`` along ``dirs (B, U, D)``: two ``(B, U, M)``."""
        z_features = [phi(self.z) for phi in self.features]

        def row(y):
            return self._kernel_rows(y, z_features)

        def derivs(y, u):
            def first(p):
                return jvp(row, (p,), (u,))[1]

            return jvp(first, (y,), (u,))

        return vmap(vmap(derivs, in_dims=(None, 0)))(x, dirs)

    def quadratic_terms(self, x: Tensor, method: str, generator: torch.Generator | None = None,
                        dsm_sigma: float = 0.1) -> tuple[Tensor, Tensor]:
        """Sums over the rows of ``x`` of ``G (M, M)`` and ``b (M,)``, as the module docstring defines them."""
        if method not in ALPHA_METHODS:
            raise ValueError(f"unknown alpha method {method!r}; choose from {', '.join(ALPHA_METHODS)}")
        B, D = x.shape
        dev = x.device
        basis = torch.eye(D, dtype=x.dtype, device=dev).expand(B, D, D)
        if method == "dsm":
            noise = dsm_sigma * torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
            x = x + noise
        grad_q0 = -x / self.q0_std**2
        if method in ("sliced", "sliced_vr"):
            v = torch.randint(0, 2, (B, 1, D), generator=generator, device=dev).to(x.dtype) * 2 - 1
        if method == "sliced":
            k1, k2 = self._directional(x, v)
            G = torch.einsum("bum,bun->mn", k1, k1)
            b = (k2[:, 0] + k1[:, 0] * (v[:, 0] * grad_q0).sum(-1, keepdim=True)).sum(0)
            return G, b
        k1, k2 = self._directional(x, basis)
        G = torch.einsum("bum,bun->mn", k1, k1)
        if method == "exact":
            b = (k2.sum(1) + torch.einsum("bum,bu->bm", k1, grad_q0)).sum(0)
        elif method == "sliced_vr":
            _, kv2 = self._directional(x, v)
            b = (kv2[:, 0] + torch.einsum("bum,bu->bm", k1, grad_q0)).sum(0)
        else:
            b = torch.einsum("bum,bu->bm", k1, grad_q0 + noise / dsm_sigma**2).sum(0)
        return G, b

    def solve_alpha(self, G_sum: Tensor, b_sum: Tensor, count: int) -> Tensor:
        """``alpha = -(G + lambda I)^-1 b`` from row sums of ``G`` and ``b`` over ``count`` rows."""
        eye = torch.eye(G_sum.shape[0], dtype=G_sum.dtype, device=G_sum.device)
        return -torch.linalg.solve(G_sum / count + 10.0 ** self.log10_lambda * eye, b_sum / count)

    def fit_alpha(self, x: Tensor, method: str, generator: torch.Generator | None = None,
                  dsm_sigma: float = 0.1) -> Tensor:
        """The closed-form ``alpha (M,)`` on the rows of ``x``, differentiable w.r.t. the parameters."""
        G, b = self.quadratic_terms(x, method, generator, dsm_sigma)
        return self.solve_alpha(G, b, x.shape[0])

    @torch.no_grad()
    def fit_alpha_on(self, data: Tensor, method: str, generator: torch.Generator | None = None,
                     dsm_sigma: float = 0.1, chunk: int = 100) -> Tensor:
        """Solve ``alpha`` on a whole dataset (accumulated in chunks), store it in ``self.alpha``, return it."""
        G = torch.zeros(self.num_inducing, self.num_inducing, device=data.device)
        b = torch.zeros(self.num_inducing, device=data.device)
        for part in data.split(chunk):
            g_part, b_part = self.quadratic_terms(part, method, generator, dsm_sigma)
            G += g_part
            b += b_part
        self.alpha.copy_(self.solve_alpha(G, b, data.shape[0]))
        return self.alpha
