"""The NCSNv2 recipe for score-based sampling (Song & Ermon 2020): noise levels, step size, EMA.

Formulas: shared/MATH.md, section "NCSNv2 techniques". T1 :func:`max_pairwise_distance` (the initial
noise scale), T2 :func:`geometric_ratio` and :func:`geometric_sigmas` (the noise ladder), T3
:class:`NoiseConditionalScore` (``s(x, sigma) = s(x) / sigma``), T4 :func:`solve_step_size` and
:func:`step_size_objective`, T5 :func:`ema_model`. Energy or log-density models get a score through
:func:`score_from_log_density` / :func:`score_from_energy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "NoiseConditionalScore",
    "ema_model",
    "geometric_ratio",
    "geometric_sigmas",
    "max_pairwise_distance",
    "score_from_energy",
    "score_from_log_density",
    "solve_step_size",
    "step_size_objective",
]


# --------------------------------------------------------------------------- argument checks
def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _check_positive(value, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a positive float, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be finite and > 0, got {value!r}")
    return float(value)


# =========================================================================== recipe (T1-T5)
def max_pairwise_distance(x: Tensor, *, block_size: int = 2048) -> float:
    """T1: the largest Euclidean distance between two rows of ``x``, NCSNv2's choice of sigma_1.

    ``x`` is ``(N, *shape)`` (flattened to ``(N, d)``), any floating dtype on any device. The
    distances are computed block by block (``block_size`` rows against ``block_size`` rows, through
    ``||a||^2 + ||b||^2 - 2 a.b`` in float32, or float64 for float64 input), so memory stays
    ``O(block_size^2 + N)``; the distance of the winning pair is then recomputed directly in float64.
    Returns a Python float (0.0 for fewer than two rows).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("`x` must be a floating-point tensor of shape (N, *shape)")
    _check_int(block_size, "block_size", 1)
    flat = x.detach().reshape(x.shape[0], -1)
    n = flat.shape[0]
    if n < 2:
        return 0.0
    work = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
    sq = work.square().sum(-1)
    best, best_pair = -1.0, (0, 1)
    for i in range(0, n, block_size):
        a, sa = work[i:i + block_size], sq[i:i + block_size]
        for j in range(i, n, block_size):
            d2 = (sa[:, None] + sq[None, j:j + block_size]).addmm_(a, work[j:j + block_size].T, alpha=-2)
            k = int(d2.argmax())
            value = float(d2.flatten()[k])
            if value > best:
                best, best_pair = value, (i + k // d2.shape[1], j + k % d2.shape[1])
    p, q = best_pair
    return float((flat[p].double() - flat[q].double()).norm())


def _t2_overlap(gamma: float, dim: int) -> float:
    """``Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma)`` (MATH.md, T2)."""
    c = math.sqrt(2.0 * dim) * (gamma - 1.0)
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2.0))  # noqa: E731  standard normal CDF
    return phi(c + 3.0 * gamma) - phi(c - 3.0 * gamma)


def geometric_ratio(dim: int, *, target: float = 0.5) -> float:
    """T2: the ratio ``gamma = sigma_{i-1} / sigma_i`` of NCSNv2's geometric noise ladder.

    Solves ``Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = target``
    (``target = 0.5`` in the paper; ``D = dim`` the data dimension, ``Phi`` the standard normal CDF)
    for ``gamma > 1`` by bisection: the left side is 0.997 at ``gamma = 1`` and falls to 0 as
    ``gamma`` grows. Returns a Python float; e.g. about 1.0398 for CIFAR-10 (``D = 3072``).
    """
    _check_int(dim, "dim", 1)
    if dim < 5:  # sqrt(2D) <= 3: the interval's left end never passes the mean, the overlap never falls
        raise ValueError(f"T2 needs `dim` >= 5 (for smaller dims the overlap never falls to the target), got {dim}")
    if not 0.0 < target < _t2_overlap(1.0, dim):
        raise ValueError(f"`target` must be in (0, {_t2_overlap(1.0, dim):.4f}), got {target!r}")
    lo, hi = 1.0, 2.0
    while _t2_overlap(hi, dim) > target:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t2_overlap(mid, dim) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def geometric_sigmas(sigma_max: float, sigma_min: float, num: int | None = None, *, gamma: float | None = None,
                     dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The geometric noise ladder ``sigma_i = sigma_max (sigma_min / sigma_max)^{(i-1)/(L-1)}``, i = 1..L.

    Give the number of levels ``num`` (L), or the ratio ``gamma`` (T2, e.g. from
    :func:`geometric_ratio`), in which case ``L = 1 + ceil(ln(sigma_max / sigma_min) / ln gamma)``:
    the fewest levels whose ratio does not exceed ``gamma``. Returns a decreasing 1-D tensor of ``L``
    noise levels (``sigma_max`` first, ``sigma_min`` last).
    """
    sigma_max, sigma_min = _check_positive(sigma_max, "sigma_max"), _check_positive(sigma_min, "sigma_min")
    if sigma_min >= sigma_max:
        raise ValueError(f"need `sigma_min` < `sigma_max`, got {sigma_min!r} and {sigma_max!r}")
    if (num is None) == (gamma is None):
        raise ValueError("give exactly one of `num` (the number of levels) and `gamma` (the ratio)")
    if gamma is not None:
        gamma = _check_positive(gamma, "gamma")
        if gamma <= 1.0:
            raise ValueError(f"`gamma` must be > 1, got {gamma!r}")
        num = 1 + math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-12)
    _check_int(num, "num", 2)
    exps = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    ladder = torch.exp(math.log(sigma_max) + exps * (math.log(sigma_min) - math.log(sigma_max)))
    ladder[0], ladder[-1] = sigma_max, sigma_min
    return ladder.to(dtype=dtype, device=device)


def step_size_objective(eps: float, sigma_min: float, gamma: float, n_steps_each: int) -> float:
    """T4's ``g(eps)`` (MATH.md): the variance ratio after ``T`` steps of one level, ideally 1.

    ``g = (1 - eps/s^2)^{2T} (gamma^2 - 2 eps / (s^2 - s^2 (1 - eps/s^2)^2)) + 2 eps / (s^2 - s^2 (1 - eps/s^2)^2)``
    with ``s = sigma_min`` and ``T = n_steps_each``, for ``0 < eps < sigma_min^2``.
    """
    s2 = sigma_min * sigma_min
    u = eps / s2
    stationary = 2.0 * eps / (s2 - s2 * (1.0 - u) ** 2)
    return (1.0 - u) ** (2 * n_steps_each) * (gamma * gamma - stationary) + stationary


def solve_step_size(sigma_min: float, gamma: float, n_steps_each: int) -> float:
    """T4: the step size ``step_lr`` (eps) that brings :func:`step_size_objective` closest to 1.

    With ``u = eps / sigma_min^2`` the objective is ``b + (1 - u)^{2T} (gamma^2 - b)``,
    ``b = 2 / (2 - u)``: it lies between ``gamma^2`` and ``b``, both > 1, so it never reaches 1 and
    ``|g - 1|`` is minimised where ``g`` is. Found by a log-spaced scan of ``u`` in (1e-12, 1)
    refined by golden-section search. CIFAR-10 (``sigma_1 = 50``, ``L = 232``, ``sigma_L = 0.01``,
    ``T = 5``): about 6.2e-6, with ``g`` about 1.056. Returns a Python float.
    """
    sigma_min = _check_positive(sigma_min, "sigma_min")
    gamma = _check_positive(gamma, "gamma")
    if gamma <= 1.0:
        raise ValueError(f"`gamma` must be > 1, got {gamma!r}")
    _check_int(n_steps_each, "n_steps_each", 1)
    s2 = sigma_min * sigma_min
    dist = lambda log_u: abs(step_size_objective(math.exp(log_u) * s2, sigma_min, gamma, n_steps_each) - 1.0)  # noqa: E731
    grid = [math.log(1e-12) + k * (math.log(1.0 - 1e-9) - math.log(1e-12)) / 4000 for k in range(4001)]
    values = [dist(g) for g in grid]
    k = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = dist(a), dist(b)
    for _ in range(200):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - inv_phi * (hi - lo)
            fa = dist(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = dist(b)
    return math.exp(0.5 * (lo + hi)) * s2


class NoiseConditionalScore(nn.Module):
    """T3: ``s(x, sigma) = net(x) / sigma``, a noise-conditional score from an unconditional network.

    ``net`` maps ``(B, *shape)`` to ``(B, *shape)``; ``sigma`` is ``(B,)`` (or a float), broadcast over
    the event dimensions. The output has ``net``'s dtype.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        out = self.net(x)
        if isinstance(sigma, Tensor):
            sigma = sigma.to(out.dtype).reshape(sigma.shape + (1,) * (out.dim() - sigma.dim()))
        return out / sigma


def ema_model(model: nn.Module, decay: float = 0.999) -> torch.optim.swa_utils.AveragedModel:
    """T5: an exponential moving average of ``model``'s weights, ``w_ema <- decay w_ema + (1 - decay) w``.

    A :class:`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn(decay)`` that also
    averages buffers. Call ``ema.update_parameters(model)`` after every optimizer step (the first
    call copies the weights); sample and evaluate with ``ema.module`` (or ``ema(x, ...)``).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"`decay` must be in [0, 1], got {decay!r}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def score_from_log_density(log_density: Callable[..., Tensor], *, takes_sigma: bool = True) -> Callable:
    """A ``score_fn(x, sigma)`` computing ``grad_x log_density`` by autograd, for energy-type models.

    ``log_density(x, sigma)`` (or ``log_density(x)`` when ``takes_sigma=False``) maps ``(B, *shape)``
    to ``(B,)`` or ``(B, 1)`` unnormalized log-densities; the score is the gradient of their sum
    with respect to a detached copy of ``x`` (samples are independent), returned detached in the
    model's dtype. Grad mode is turned on inside, so it works in the samplers' ``no_grad`` loops.
    """

    def score_fn(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            f = log_density(xg, sigma) if takes_sigma else log_density(xg)
            if not isinstance(f, Tensor) or f.reshape(-1).shape != (x.shape[0],):
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"`log_density` must return one value per sample, shape ({x.shape[0]},), got {got}")
            (grad,) = torch.autograd.grad(f.sum(), xg)
        return grad

    return score_fn


def score_from_energy(energy: Callable[..., Tensor], *, takes_sigma: bool = True) -> Callable:
    """``score_fn(x, sigma) = -grad_x energy(x, sigma)`` by autograd (see :func:`score_from_log_density`)."""
    return score_from_log_density(lambda *args: -energy(*args), takes_sigma=takes_sigma)
