"""Score-based sampling: annealed Langevin dynamics and the NCSNv2 recipe (Song & Ermon 2020).

Formulas: docs/math.md, sections "Langevin dynamics" and "NCSNv2 techniques".

Sampler: :func:`annealed_langevin` (NCSN Algorithm 1 with NCSNv2's final denoising step) and
:func:`langevin_dynamics` (plain, single-level Langevin). Every step is one fused
:func:`fdsm_ext.ops.langevin_step_` call; on CUDA the step (score model + update) can be captured once
in a CUDA graph and replayed.

Recipe (the NCSNv2 techniques): T1 :func:`max_pairwise_distance` (the initial noise scale),
T2 :func:`geometric_ratio` and :func:`geometric_sigmas` (the noise ladder), T3
:class:`NoiseConditionalScore` (``s(x, sigma) = s(x) / sigma``), T4 :func:`solve_step_size` and
:func:`step_size_objective`, T5 :func:`ema_model`. Energy or log-density models get a score through
:func:`score_from_log_density` / :func:`score_from_energy`.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from . import _checks, reference
from ._checks import check_int as _check_int, check_positive as _check_positive, draw_seed as _draw_seed

__all__ = [
    "LangevinStepInfo",
    "NoiseConditionalScore",
    "annealed_langevin",
    "ema_model",
    "geometric_ratio",
    "geometric_sigmas",
    "langevin_dynamics",
    "max_pairwise_distance",
    "score_from_energy",
    "score_from_log_density",
    "solve_step_size",
    "step_size_objective",
]


# =========================================================================== recipe (T1-T5)
#: The longest noise ladder geometric_sigmas builds (NCSNv2's largest, FFHQ 256, has 2311 levels).
MAX_LEVELS = 2**20


def max_pairwise_distance(x: Tensor, *, block_size: int = 2048) -> float:
    """T1: the largest Euclidean distance between two rows of ``x``, NCSNv2's choice of sigma_1.

    ``x`` is ``(N, *shape)`` (flattened to ``(N, d)``), any floating dtype on any device, every value
    finite (a NaN or inf row raises a ValueError naming it). The rows are divided by the largest
    magnitude in ``x`` (so no square overflows, whatever the scale), the distances computed block by
    block (``block_size`` rows against ``block_size`` rows, through ``||a||^2 + ||b||^2 - 2 a.b`` in
    float32, or float64 for float64 input), so memory stays ``O(block_size^2 + N)``; the distance of
    the winning pair is then recomputed directly in float64 and scaled back. Returns a Python float
    (0.0 for fewer than two rows).
    """
    _checks.check_tensor(x, "x")
    _check_int(block_size, "block_size", 1)
    flat = x.detach().reshape(x.shape[0], -1)
    n = flat.shape[0]
    if n < 2 or flat.shape[1] == 0:
        return 0.0
    finite = _checks.host_values(torch.isfinite(flat).all(1))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"`x` must be finite: {bad.size} of {n} rows hold NaN or inf (first: row {int(bad[0])})")
    scale = float(flat.abs().max())
    if scale == 0.0:
        return 0.0
    work = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32) / scale
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
    return float((flat[p].double() / scale - flat[q].double() / scale).norm()) * scale


def _t2_overlap(gamma: float, dim: int) -> float:
    """``Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma)`` (docs/math.md, T2)."""
    c = math.sqrt(2.0 * dim) * (gamma - 1.0)
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2.0))  # noqa: E731  standard normal CDF
    return phi(c + 3.0 * gamma) - phi(c - 3.0 * gamma)


def geometric_ratio(dim: int, *, target: float = 0.5) -> float:
    """T2: the ratio ``gamma = sigma_{i-1} / sigma_i`` of NCSNv2's geometric noise ladder.

    Solves ``Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = target``
    (``target = 0.5`` in the paper; ``D = dim`` the data dimension, an int >= 5; ``Phi`` the standard
    normal CDF) for ``gamma > 1`` by bisection: the left side is 0.997 at ``gamma = 1`` and falls to 0
    as ``gamma`` grows. Returns a Python float; e.g. about 1.0398 for CIFAR-10 (``D = 3072``).
    """
    _check_int(dim, "dim", 1)
    if dim < 5:  # sqrt(2D) <= 3: the interval's left end never passes the mean, the overlap never falls
        raise ValueError(f"T2 needs `dim` >= 5 (for smaller dims the overlap never falls to the target), got {dim}")
    target = _checks.check_real(target, "target")
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

    Give the number of levels ``num`` (L, an int in [2, MAX_LEVELS]), or the ratio ``gamma > 1`` (T2,
    e.g. from :func:`geometric_ratio`), in which case ``L = 1 + ceil(ln(sigma_max / sigma_min) / ln gamma)``:
    the fewest levels whose ratio does not exceed ``gamma``. ``dtype`` is a floating dtype in which
    every level is a positive, finite, strictly decreasing number. Returns a decreasing 1-D tensor of
    ``L`` noise levels (``sigma_max`` first, ``sigma_min`` last).
    """
    sigma_max, sigma_min = _check_positive(sigma_max, "sigma_max"), _check_positive(sigma_min, "sigma_min")
    _checks.check_float_dtype(dtype)
    if sigma_min >= sigma_max:
        raise ValueError(f"need `sigma_min` < `sigma_max`, got {sigma_min!r} and {sigma_max!r}")
    if (num is None) == (gamma is None):
        raise ValueError("give exactly one of `num` (the number of levels) and `gamma` (the ratio)")
    log_ratio = math.log(sigma_max) - math.log(sigma_min)  # no overflow of sigma_max / sigma_min
    if gamma is not None:
        gamma = _check_positive(gamma, "gamma")
        if gamma <= 1.0:
            raise ValueError(f"`gamma` must be > 1, got {gamma!r}")
        count = 1 + math.ceil(log_ratio / math.log(gamma) - 1e-12)
        if count > MAX_LEVELS:
            raise ValueError(f"`gamma`={gamma!r} is too close to 1: the ladder from {sigma_max:g} to {sigma_min:g} "
                             f"would need {count} levels (at most {MAX_LEVELS}); use a larger `gamma`")
        num = count
    _check_int(num, "num", 2, MAX_LEVELS)
    exps = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    ladder = torch.exp(math.log(sigma_max) - exps * log_ratio)
    ladder[0], ladder[-1] = sigma_max, sigma_min
    cast = ladder.to(dtype=dtype)
    back = cast.double()
    if not bool(((back > 0) & torch.isfinite(back)).all()) or not bool((back[1:] < back[:-1]).all()):
        raise ValueError(f"`dtype`={dtype} cannot hold this ladder ({num} levels from {sigma_max:g} to {sigma_min:g}) "
                         "as positive, finite, strictly decreasing numbers; use a wider dtype (the default float64) "
                         "or fewer levels")
    return cast.to(device=device)


def _check_level(value, name: str) -> float:
    """A noise level whose square is a normal float64 number (sigma in [1.5e-154, 1.3e154])."""
    value = _check_positive(value, name)
    lo, hi = math.sqrt(sys.float_info.min), math.sqrt(sys.float_info.max)
    if not lo <= value <= hi:
        raise ValueError(f"`{name}` must be in [{lo:.3g}, {hi:.3g}] (its square must be a normal float), "
                         f"got {value!r}")
    return value


def _check_gamma(gamma) -> float:
    gamma = _check_positive(gamma, "gamma")
    if not 1.0 < gamma <= 1e150:
        raise ValueError(f"`gamma` must be > 1 (and <= 1e150, so that gamma^2 is finite), got {gamma!r}")
    return gamma


def step_size_objective(eps: float, sigma_min: float, gamma: float, n_steps_each: int) -> float:
    """T4's ``g(eps)`` (docs/math.md): the variance ratio after ``T`` steps of one level, ideally 1.

    ``g = (1 - eps/s^2)^{2T} (gamma^2 - 2 eps / (s^2 - s^2 (1 - eps/s^2)^2)) + 2 eps / (s^2 - s^2 (1 - eps/s^2)^2)``
    with ``s = sigma_min`` and ``T = n_steps_each``, for ``0 < eps < sigma_min^2``; with ``u = eps/s^2``
    the stationary term is ``2 / (2 - u)``, which is how it is computed (no cancellation).
    """
    sigma_min = _check_level(sigma_min, "sigma_min")
    gamma = _check_gamma(gamma)
    _check_int(n_steps_each, "n_steps_each", 1)
    eps = _check_positive(eps, "eps")
    s2 = sigma_min * sigma_min
    if eps >= s2:
        raise ValueError(f"`eps` must be in (0, sigma_min^2) = (0, {s2:.6g}), got {eps!r}")
    u = eps / s2
    stationary = 2.0 / (2.0 - u)
    return (1.0 - u) ** (2 * n_steps_each) * (gamma * gamma - stationary) + stationary


def solve_step_size(sigma_min: float, gamma: float, n_steps_each: int) -> float:
    """T4: the step size ``step_lr`` (eps) that brings :func:`step_size_objective` closest to 1.

    With ``u = eps / sigma_min^2`` the objective is ``b + (1 - u)^{2T} (gamma^2 - b)``,
    ``b = 2 / (2 - u)``: it lies between ``gamma^2`` and ``b``, both > 1, so it never reaches 1 and
    ``|g - 1|`` is minimised where ``g`` is. Found by a log-spaced scan of ``u`` in (1e-12, 1)
    refined by golden-section search. CIFAR-10 (``sigma_1 = 50``, ``L = 232``, ``sigma_L = 0.01``,
    ``T = 5``): about 6.2e-6, with ``g`` about 1.056. ``sigma_min`` in [1.5e-154, 1.3e154], ``gamma``
    in (1, 1e150], ``n_steps_each`` an int >= 1. Returns a Python float.
    """
    sigma_min = _check_level(sigma_min, "sigma_min")
    gamma = _check_gamma(gamma)
    _check_int(n_steps_each, "n_steps_each", 1)
    s2 = sigma_min * sigma_min

    def dist(log_u: float) -> float:
        u = math.exp(log_u)
        stationary = 2.0 / (2.0 - u)
        return abs((1.0 - u) ** (2 * n_steps_each) * (gamma * gamma - stationary) + stationary - 1.0)

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

    ``net`` maps ``(B, *shape)`` to ``(B, *shape)``; ``sigma`` is a ``(B,)`` tensor (or a positive
    float), broadcast over the event dimensions, every level finite and > 0 (checked for floats and
    CPU tensors; tensors on other devices are not read, to keep the sampler free of host syncs). The
    output has ``net``'s dtype.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        _checks.check_callable(net, "net", "net(x)")
        self.net = net

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if isinstance(sigma, Tensor):
            if not sigma.is_floating_point():
                raise TypeError(f"`sigma` must be a positive float or a floating tensor of shape (B,), "
                                f"got dtype {sigma.dtype}")
            if sigma.dim() > 1 or (sigma.dim() == 1 and isinstance(x, Tensor) and x.dim() > 0
                                   and sigma.shape[0] not in (1, x.shape[0])):
                raise ValueError(f"`sigma` must be a float or a tensor of shape (B,), got shape {tuple(sigma.shape)}")
            if sigma.device.type == "cpu" and _checks.eager():
                values = _checks.host_values(sigma)
                if not (np.isfinite(values) & (values > 0)).all():
                    raise ValueError("`sigma` must be finite and > 0 for every sample")
        else:
            sigma = _check_positive(sigma, "sigma")
        out = self.net(x)
        if isinstance(sigma, Tensor):
            sigma = sigma.to(out.dtype).reshape(sigma.shape + (1,) * (out.dim() - sigma.dim()))
        return out / sigma


def ema_model(model: nn.Module, decay: float = 0.999) -> torch.optim.swa_utils.AveragedModel:
    """T5: an exponential moving average of ``model``'s weights, ``w_ema <- decay w_ema + (1 - decay) w``.

    A :class:`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn(decay)`` that also
    averages buffers. ``model`` is an ``nn.Module``, ``decay`` a float in [0, 1]. Call
    ``ema.update_parameters(model)`` after every optimizer step (the first call copies the weights);
    sample and evaluate with ``ema.module`` (or ``ema(x, ...)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    decay = _checks.check_real(decay, "decay", "a float in [0, 1]")
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
    _checks.check_callable(log_density, "log_density", "log_density(x, sigma)")
    takes_sigma = _checks.check_bool(takes_sigma, "takes_sigma")

    def score_fn(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            f = log_density(xg, sigma) if takes_sigma else log_density(xg)
            if not isinstance(f, Tensor) or f.reshape(-1).shape != (x.shape[0],):
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"`log_density` must return one value per sample, shape ({x.shape[0]},), got {got}")
            if not f.is_floating_point():
                raise TypeError(f"`log_density` must return a real floating-point tensor, got dtype {f.dtype}")
            (grad,) = torch.autograd.grad(f.sum(), xg)
        return grad

    return score_fn


def score_from_energy(energy: Callable[..., Tensor], *, takes_sigma: bool = True) -> Callable:
    """``score_fn(x, sigma) = -grad_x energy(x, sigma)`` by autograd (see :func:`score_from_log_density`)."""
    _checks.check_callable(energy, "energy", "energy(x, sigma)")
    return score_from_log_density(lambda *args: -energy(*args), takes_sigma=takes_sigma)


# =========================================================================== the sampler
class _StepNorms:
    """The rows of a step's ``(3, B)`` ``norms`` by name, for the samplers' callback records."""

    norms: Tensor

    @property
    def score_norm(self) -> Tensor:
        return self.norms[0]

    @property
    def noise_norm(self) -> Tensor:
        return self.norms[1]

    @property
    def x_norm(self) -> Tensor:
        return self.norms[2]


@dataclass
class LangevinStepInfo(_StepNorms):
    """What a sampler's ``callback`` receives after every Langevin step.

    ``level`` and ``step`` are 0-based; ``x`` is the live ``(B, *shape)`` state and ``norms`` the fused
    kernel's ``(3, B)`` per-sample diagnostics, whose rows are :attr:`score_norm` (``||s||``),
    :attr:`noise_norm` (``||z||``) and :attr:`x_norm` (``||x_new||``), views made when read (a
    callback that never looks pays nothing): all are overwritten by the next step, so clone what you
    keep. NCSNv2's signal-to-noise ratio is ``sqrt(alpha) * score_norm / noise_norm``.
    """

    level: int
    step: int
    sigma: float
    alpha: float
    x: Tensor
    norms: Tensor


@dataclass(frozen=True)
class _SamplerPlan:
    """The checked arguments of a sampler run: the levels and their step sizes, in float64."""

    levels: tuple[float, ...]
    alphas: tuple[float, ...]
    n_steps_each: int
    clamp: tuple[float | None, float | None]
    denoise: bool
    snapshot_every: int | None
    check_finite: bool
    progress: bool
    callback: Callable[[LangevinStepInfo], None] | None
    cuda_graph: bool | str
    backend: str


def _check_sigmas(sigmas, dtype: torch.dtype) -> list[float]:
    """``sigmas`` as a list of floats: 1-D, non-empty, strictly decreasing, each level finite, > 0 and a
    positive normal number in ``dtype`` (the state's; ``x`` is divided by it and multiplied by its square)."""
    if isinstance(sigmas, (str, bytes)):
        raise TypeError(f"`sigmas` must be a 1-D sequence or tensor of noise levels, got {type(sigmas).__name__}")
    if isinstance(sigmas, Tensor) and (sigmas.is_complex() or sigmas.dtype == torch.bool
                                       or sigmas.device.type == "meta"):
        raise TypeError(f"`sigmas` must be a 1-D sequence or real tensor of noise levels, got {sigmas.dtype} "
                        f"on {sigmas.device}")
    if not isinstance(sigmas, Tensor):
        items = list(sigmas) if hasattr(sigmas, "__iter__") else None
        if items is None or any(isinstance(v, (str, bytes, bool, np.bool_, complex)) for v in items):
            raise TypeError(f"`sigmas` must be a 1-D sequence or tensor of real noise levels, got {sigmas!r:.80}")
    try:
        levels = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"`sigmas` must be a 1-D sequence or tensor of noise levels ({exc})") from None
    if levels.dim() != 1 or levels.numel() == 0:
        raise ValueError(f"`sigmas` must be a non-empty 1-D sequence of noise levels, got shape {tuple(levels.shape)}")
    values = levels.numpy()
    if not (np.isfinite(values) & (values > 0)).all():
        raise ValueError("`sigmas` must all be finite and > 0")
    if levels.numel() > 1 and not (values[1:] < values[:-1]).all():
        k = int(np.flatnonzero(values[1:] >= values[:-1])[0])
        raise ValueError(f"`sigmas` must be strictly decreasing (sigma_1 > ... > sigma_L), but sigmas[{k}] = "
                         f"{values[k]} <= sigmas[{k + 1}] = {values[k + 1]}")
    info = torch.finfo(dtype)
    lo, hi = math.sqrt(info.tiny), math.sqrt(info.max)
    if values[-1] < lo or values[0] > hi:
        raise ValueError(f"`sigmas` must lie in [{lo:.3g}, {hi:.3g}] for a {dtype} state (each level and its square "
                         f"must be normal {dtype} numbers), got levels from {values[0]:g} to {values[-1]:g}")
    return values.tolist()


def _check_clamp(clamp) -> tuple[float | None, float | None]:
    if clamp is None:
        return None, None
    if not isinstance(clamp, Sequence) or isinstance(clamp, str) or len(clamp) != 2:
        raise ValueError(f"`clamp` must be None or a (min, max) pair, got {clamp!r:.80}")
    if not all(v is None or (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))) for v in clamp):
        raise ValueError(f"`clamp` must be a (min, max) pair of floats or None, got {clamp!r:.80}")
    lo, hi = (None if v is None else float(v) for v in clamp)
    if (lo is not None and math.isnan(lo)) or (hi is not None and math.isnan(hi)) or (
            lo is not None and hi is not None and lo >= hi):
        raise ValueError(f"`clamp` must be a (min, max) pair with min < max, got {clamp!r}")
    return lo, hi


def _plan(score_fn, x, sigmas, n_steps_each, step_lr, *, denoise, clamp, generator, callback, progress,
          snapshot_every, cuda_graph, check_finite, backend) -> _SamplerPlan:
    """Checks every argument of :func:`annealed_langevin` by name; the step sizes
    ``alpha_i = step_lr (sigma_i / sigma_L)^2`` must be finite in the state's loss dtype."""
    _checks.check_callable(score_fn, "score_fn", "score_fn(x, sigma)")
    _checks.check_state(x)
    levels = _check_sigmas(sigmas, x.dtype)
    _check_int(n_steps_each, "n_steps_each", 1)
    step_lr = _check_positive(step_lr, "step_lr")
    alphas = tuple(step_lr * (sigma / levels[-1]) ** 2 for sigma in levels)
    limit = torch.finfo(reference.loss_dtype(x.dtype)).max
    if not alphas[0] < limit:
        raise ValueError(f"`step_lr` * (sigmas[0] / sigmas[-1])^2 = {alphas[0]:.3g} overflows the step size of a "
                         f"{x.dtype} state (max {limit:.3g}): lower `step_lr` or narrow the range of `sigmas`")
    _checks.check_generator(generator)
    if callback is not None:
        _checks.check_callable(callback, "callback", "callback(info)")
    if snapshot_every is not None:
        _check_int(snapshot_every, "snapshot_every", 1)
    _check_cuda_graph(cuda_graph)
    _checks.check_choice(backend, "backend", _checks.BACKENDS)
    return _SamplerPlan(tuple(levels), alphas, n_steps_each, _check_clamp(clamp),
                        _checks.check_bool(denoise, "denoise"), snapshot_every,
                        _checks.check_bool(check_finite, "check_finite"), _checks.check_bool(progress, "progress"),
                        callback, cuda_graph, backend)


def _step_op_for(backend: str, device: torch.device):
    """The fused ``langevin_step_`` of ``backend`` for ``device`` tensors, or None for the composite.
    The losses' rule (and errors): the compiled kernels where built, else Triton on CUDA, else the
    composite. Resolving "triton" imports fdsm_ext.triton, which registers its ops."""
    backend = _checks.resolve_backend_for(backend, device.type)
    if backend == "cpp":
        return torch.ops.fdsm_ext.langevin_step_.default
    if backend == "triton":
        return torch.ops.fdsm_ext_triton.langevin_step_.default
    return None


class _Stepper:
    """One Langevin step on fixed buffers: ``x`` (the state), ``sigma`` (B,) and ``alpha`` (1,).

    Fused (``step_op``: the C++ or the Triton ``langevin_step_``, which draw the same noise): the noise
    comes from the kernel's Philox stream, step ``k`` reading the seed tensor ``(seed, offset_0 + k)``
    on x's device, which the step advances after its kernel call: on a GPU, or once
    :meth:`seed_in_place` was called (a CUDA graph), by an in-place add on the device, so eager steps
    and graph replays read the same seeds without any host value baked into a graph; a CPU seed is
    advanced through its numpy view (no dispatched op; the CPU kernel has read it by then). Composite
    (``step_op`` None, no kernel for the device): torch.randn from ``generator`` and
    :func:`fdsm_ext.reference.langevin_step`. The fused step computes the per-sample norms only when
    ``with_norms`` (a callback, progress or the deferred NaN watch needs them). ``last_score``: the
    score of the last step, for the CPU's NaN watch.
    """

    def __init__(self, score_fn, x, clamp, generator, step_op=None, with_norms: bool = True):
        self.score_fn, self.x, self.generator = score_fn, x, generator
        # The OpOverload's C++ handle: the same dispatch without OpOverload.__call__'s Python frame.
        self.step_op = step_op if step_op is None else getattr(step_op, "_op", step_op)
        self.lo, self.hi = clamp
        self.with_norms = with_norms
        self.last_score: Tensor | None = None
        B, dev = x.shape[0], x.device
        self.sigma = torch.empty(B, dtype=x.dtype, device=dev)
        self.alpha = torch.empty(1, dtype=reference.loss_dtype(x.dtype), device=dev)
        if step_op is not None:
            self.seed = _draw_seed(generator).to(dev)  # (seed, offset of the current step)
            self.seed_step = torch.tensor([0, 1], dtype=torch.int64, device=dev)
            self._seed_host = self.seed.numpy() if dev.type == "cpu" else None

    def seed_in_place(self) -> None:
        """From now on every step advances ``self.seed`` by an in-place add (what a CUDA graph
        captures and replays). Call before the first step."""
        self._seed_host = None

    def advance(self) -> None:
        """Moves the noise stream to the next step's offset."""
        if self._seed_host is not None:
            self._seed_host[1] += 1
        else:
            self.seed.add_(self.seed_step)

    def set_level(self, sigma: float, alpha: float) -> None:
        self.sigma.fill_(sigma)
        self.alpha.fill_(alpha)

    def score(self) -> Tensor:
        s = self.score_fn(self.x, self.sigma)
        if not isinstance(s, Tensor):
            raise TypeError(f"`score_fn` must return a tensor, got {type(s).__name__}")
        if s.shape != self.x.shape:
            raise ValueError(f"`score_fn` must return a tensor of its input's shape {tuple(self.x.shape)}, "
                             f"got shape {tuple(s.shape)}")
        if s.dtype != self.x.dtype:
            if s.is_complex():
                raise TypeError(f"`score_fn` must return a real tensor, got dtype {s.dtype}")
            s = s.to(self.x.dtype)
        if s.requires_grad:  # an energy model's score through autograd; a plain net under no_grad has none
            s = s.detach()
        return s

    def step(self) -> Tensor:
        """Advances ``x`` by one step and returns the norms (3, B) (or (3, 0) without norms)."""
        s = self.last_score = self.score()
        if self.step_op is not None:
            norms = self.step_op(self.x, s, self.alpha, self.seed, self.lo, self.hi, self.with_norms)
            self.advance()
            return norms
        acc = reference.acc_dtype(self.x.dtype)
        gen = self.generator
        z = torch.randn(self.x.shape, generator=gen, dtype=acc, device=gen.device if gen is not None else self.x.device)
        new, norms = reference.langevin_step(self.x, s, self.alpha, z.to(self.x.device), self.lo, self.hi)
        self.x.copy_(new)
        return norms


#: Up to this many norms per step, the CPU's NaN watch sums them in Python (tolist and sum: ~2 us for
#: a dozen), above it through one torch sum read by numpy (~3 us whatever the size, where Python's sum
#: of 768 norms, batch 256, costs ~17 us; one thread).
_PY_SUM_MAX = 96
#: dtypes the NaN watch sums in their own precision (half types are summed in float32).
_SUM_DTYPES = (torch.float32, torch.float64)
#: From this many state elements on, the CPU's NaN watch sums the score and x rather than have the
#: fused step compute norms: the sums' fixed cost (four ops, ~7 us) against the norms' per-element
#: cost (~1.6 ns with the Python sum) cross near 4k elements (benchmarks/profile_overhead.py: 1.4x
#: slower steps at 16 elements, 5 % faster runs at 16k).
_SUM_WATCH_MIN = 4096


#: The deferred NaN watch's record while no step was bad: above every code 2 k + 1.
_NO_BAD_STEP = 2**62


class _FiniteWatch:
    """Finds the first step whose score or new x is not finite, without a host sync.

    On the CPU every step is checked at once, from the score and the new x themselves
    (:meth:`check_step`: so the fused step need not compute norms for it) or from the step's norms
    (:meth:`record`, read through numpy: no aten op). On other
    devices the first bad step is recorded in a device tensor (so it also runs inside a CUDA graph);
    at the end of each level that record is copied to pinned host memory without blocking, behind an
    event, and judged at the end of the first level by which the copy has landed, or at the end of the
    run (:meth:`finish`, which waits for it).
    """

    def __init__(self, device: torch.device, enabled: bool, deferred: bool | None = None):
        self.enabled = enabled
        self.immediate = device.type == "cpu" if deferred is None else not deferred
        self.copies: list[tuple[Tensor, object]] = []
        if enabled and not self.immediate:
            # The record is one number, the smallest code 2 k + (score bad) of a bad step k, so that a
            # step updates it with one minimum (8 small kernels a step, where flags and a counter took 13:
            # they are launches on every eager GPU step).
            self.code2 = torch.zeros((), dtype=torch.int64, device=device)  # 2 k of the next step k
            self.first = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=device)
            self.no_bad = self.first.clone()  # (a device tensor, not a host scalar: nothing to copy in a graph)

    def check_step(self, stepper: _Stepper, norms: Tensor, k: int) -> int | None:
        """Notes global step ``k`` of ``stepper``, which returned ``norms``; returns the bad step when
        known now, else None. On the CPU, unless the step computed its norms anyway (for a callback or
        progress, or because the state is smaller than ``_SUM_WATCH_MIN``), the score and the new x
        are summed (a sum of finite values is finite unless it overflows, which an elementwise test
        then settles) and the sums read through numpy: cheaper than the fused step's norms for larger
        states, which the step then skips."""
        if not (self.enabled and self.immediate) or norms.numel():
            return self.record(norms, k)
        # Without a clamp a NaN or inf score makes x + alpha s + sqrt(2 alpha) z non-finite too (alpha
        # > 0, or 0 * inf = NaN), so x alone tells; a clamp can bring an infinite step back to its range.
        clamped = stepper.lo is not None or stepper.hi is not None
        for t in (stepper.last_score, stepper.x) if clamped else (stepper.x,):
            total = t.sum() if t.dtype in _SUM_DTYPES else t.sum(dtype=torch.float32)
            if not math.isfinite(total.numpy()) and not np.isfinite(_checks.host_values(t)).all():
                return k
        return None

    def record(self, norms: Tensor, k: int) -> int | None:
        """Notes the norms of global step ``k``; returns the bad step when known now, else None."""
        if not self.enabled:
            return None
        if self.immediate:  # the sum of the (non-negative) norms is finite iff every norm is, barring overflow
            if norms.requires_grad:
                norms = norms.detach()
            values = norms.numpy()  # (the kernels' norms are float32 or float64 CPU tensors here)
            # A few norms are summed by Python's sum: between two model calls a numpy ufunc costs 5-20 µs
            # (measured: benchmarks/profile_overhead.py), more than the step's update; many, by torch.
            if values.size <= _PY_SUM_MAX:
                if math.isfinite(sum(map(sum, values.tolist()))):
                    return None
            elif math.isfinite(norms.sum().numpy()):
                return None
            return None if np.isfinite(values).all() else k  # (not numpy's sum: it warns when it overflows)
        finite = torch.isfinite(norms).all(dim=1)  # (3,): ||s||, ||z||, ||x_new|| all finite
        code = torch.where(finite.all(), self.no_bad, self.code2 + finite[0].logical_not())
        torch.minimum(self.first, code, out=self.first)
        self.code2.add_(2)
        return None

    def level_end(self) -> tuple[int, bool] | None:
        """After a level: start copying the record to the host; return (bad step, score bad) if a copy
        that has landed shows one."""
        if not self.enabled or self.immediate:
            return None
        self.copies.append(_checks.host_copy(self.first))
        return self._landed(wait=False)

    def finish(self) -> tuple[int, bool] | None:
        """At the end of the run: wait for the last copy and return (bad step, score bad) if any."""
        if not self.enabled or self.immediate:
            return None
        return self._landed(wait=True)

    def _landed(self, wait: bool) -> tuple[int, bool] | None:
        while self.copies:
            host, event = self.copies[0]
            if event is not None and not wait and not event.query():
                return None
            if event is not None:
                event.synchronize()
            self.copies.pop(0)
            first = int(host.numpy())
            if first != _NO_BAD_STEP:
                return first // 2, bool(first % 2)
        return None


def _non_finite_error(k: int, n_steps: int, levels, score_bad: bool | None, name: str) -> FloatingPointError:
    level, step = divmod(k, n_steps)
    cause = {True: "the score returned NaN or inf", False: "x overflowed to NaN or inf (the score was finite)",
             None: "NaN or inf in the score or in x"}[score_bad]
    return FloatingPointError(
        f"{name}: stopped at level {level + 1}/{len(levels)} (sigma={levels[level]:.6g}), step {step + 1}/{n_steps}: "
        f"{cause}. A step size too large for this level (lower `step_lr`) or a diverging score model are the "
        "usual causes.")


# torch.cuda, through one name, so that the runner's device logic can be unit-tested on the CPU
_cuda = torch.cuda


class _GraphRunner:
    """Runs one kind of sampler step, ``step()`` (which returns the step's norms), eagerly for a few
    warm-up steps (on a side stream), then captures it in a CUDA graph (recording, not running) and
    replays the graph for every later step. Shared by :func:`annealed_langevin` (its one step) and
    :func:`fdsm_ext.pc_sampler` (one runner for the corrector, one for the predictor).

    What a graph may hold: ``step`` must read every changing input from a device tensor updated in
    place (the state, the seed it advances itself, the step sizes the caller fills between steps) and
    sync nothing with the host. Eager steps are judged by ``check(norms, k)`` (returns the bad global
    step or None), captured ones by ``record(norms, k)``, the NaN watch's device-side record (it counts
    steps on the device, so ``k`` only matters eagerly).

    Device-aware: every stream (the caller's, the warm-up side stream and the capture stream) is on
    ``device``, and every call runs under ``torch.cuda.device(device)``, so sampling on a GPU other
    than the current one orders its work on that GPU's streams and captures there."""

    def __init__(self, step: Callable[[], Tensor], device: torch.device, *, check, record, warmup: int,
                 strict: bool, name: str):
        self.step_fn, self.check, self.record = step, check, record
        self.warmup, self.strict, self.name, self.device = warmup, strict, name, device
        self.calls, self.graph, self.norms, self.failed = 0, None, None, False
        with _cuda.device(self.device):
            self.side = _cuda.Stream(device=self.device)
            self.capture = _cuda.Stream(device=self.device)

    def _eager(self, k: int) -> tuple[Tensor, int | None]:
        norms = self.step_fn()
        return norms, self.check(norms, k)

    def step(self, k: int) -> tuple[Tensor, int | None]:
        """Global step ``k``: returns its norms (the graph's static output once captured) and the bad
        step found now (eager steps on an immediate watch), else None."""
        with _cuda.device(self.device):
            return self._step(k)

    def _step(self, k: int) -> tuple[Tensor, int | None]:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.norms, None
        if self.failed:
            return self._eager(k)
        current = _cuda.current_stream(self.device)
        if self.calls <= self.warmup:
            self.side.wait_stream(current)
            with _cuda.stream(self.side):
                out = self._eager(k)
            current.wait_stream(self.side)
            return out
        graph = _cuda.CUDAGraph()
        try:
            self.capture.wait_stream(current)
            with _cuda.graph(graph, stream=self.capture):
                norms = self.step_fn()
                self.record(norms, k)
            current.wait_stream(self.capture)
        except Exception as exc:  # the model does something a graph cannot hold (a host sync, ...)
            if self.strict:
                raise
            warnings.warn(f"{self.name}: CUDA-graph capture of the step failed ({exc!r}); continuing "
                          "eagerly (pass cuda_graph=False to skip the attempt)", RuntimeWarning, stacklevel=6)
            self.failed = True
            return self._eager(k)
        self.graph, self.norms = graph, norms
        graph.replay()
        return norms, None


def _check_cuda_graph(cuda_graph) -> bool | str:
    if not (isinstance(cuda_graph, bool) or cuda_graph == "auto"):
        raise ValueError(f"`cuda_graph` must be 'auto', True or False, got {cuda_graph!r}")
    return cuda_graph


def _graph_wanted(cuda_graph: bool | str, stepper: _Stepper) -> bool:
    """Whether to capture ``stepper``'s steps: asked for (True or "auto") and possible (a CUDA state and
    a fused kernel); ``cuda_graph=True`` where it is not possible raises. When True, ``stepper`` is
    switched to in-place seeds (what a graph replays)."""
    fused = stepper.step_op is not None
    if cuda_graph is not False and stepper.x.is_cuda and fused:
        stepper.seed_in_place()
        return True
    if cuda_graph is True:
        raise RuntimeError("`cuda_graph`=True needs `x` on a CUDA device and a fused langevin_step kernel (fdsm_ext's "
                           "CUDA build, or backend='triton'); "
                           f"got a {stepper.x.device.type} tensor (kernel available: {fused})")
    return False


def _make_runner(plan: _SamplerPlan, stepper: _Stepper, watch: _FiniteWatch, name: str) -> _GraphRunner | None:
    """The CUDA-graph runner of :func:`annealed_langevin`'s step when asked for and possible, else None
    (eager steps)."""
    if not _graph_wanted(plan.cuda_graph, stepper):
        return None
    return _GraphRunner(stepper.step, stepper.x.device, check=lambda norms, k: watch.check_step(stepper, norms, k),
                        record=watch.record, warmup=3, strict=plan.cuda_graph is True, name=name)


def _run_level(plan: _SamplerPlan, i: int, stepper: _Stepper, watch: _FiniteWatch, runner, k: int,
               name: str) -> tuple[int, Tensor]:
    """The ``n_steps_each`` steps of level ``i`` from global step ``k``; returns the next ``k`` and the
    last step's norms."""
    sigma, alpha = plan.levels[i], plan.alphas[i]
    stepper.set_level(sigma, alpha)
    norms, callback, check_step = None, plan.callback, watch.check_step
    for t in range(plan.n_steps_each):
        if runner is not None:
            norms, bad = runner.step(k)
        else:
            norms = stepper.step()
            bad = check_step(stepper, norms, k)
        if bad is not None:  # (found at once: on the CPU)
            score_bad = not np.isfinite(_checks.host_values(stepper.last_score)).all()
            raise _non_finite_error(bad, plan.n_steps_each, plan.levels, score_bad, name)
        if callback is not None:
            callback(LangevinStepInfo(i, t, sigma, alpha, stepper.x, norms))
        k += 1
    found = watch.level_end()
    if found is not None:
        raise _non_finite_error(found[0], plan.n_steps_each, plan.levels, found[1], name)
    return k, norms


def _report_progress(plan: _SamplerPlan, i: int, norms: Tensor, name: str) -> None:
    """One line per level on stderr (one host sync, for the mean norms)."""
    means = [float(n.mean()) if n.numel() else float("nan") for n in norms]
    print(f"{name}: level {i + 1}/{len(plan.levels)} sigma={plan.levels[i]:.4g} alpha={plan.alphas[i]:.3g} "
          f"|s|={means[0]:.4g} |z|={means[1]:.4g} |x|={means[2]:.4g}", file=sys.stderr)


def _denoise(plan: _SamplerPlan, stepper: _Stepper, name: str) -> None:
    """NCSNv2's last step ``x <- clamp(x + sigma_L^2 s(x, sigma_L))``, checked once (one host read)."""
    sigma_last = plan.levels[-1]
    stepper.set_level(sigma_last, 0.0)
    state = stepper.x
    state.add_(stepper.score(), alpha=sigma_last * sigma_last)
    lo, hi = plan.clamp
    if lo is not None or hi is not None:
        state.clamp_(lo, hi)
    if plan.check_finite and not _checks.host_values(torch.isfinite(state).all()).item():
        raise FloatingPointError(f"{name}: the final denoising step x + sigma_L^2 s(x, sigma_L) is not finite")


@torch.no_grad()
def annealed_langevin(score_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, n_steps_each: int,
                      step_lr: float, *, denoise: bool = True, clamp: tuple[float | None, float | None] | None = None,
                      generator: torch.Generator | None = None,
                      callback: Callable[[LangevinStepInfo], None] | None = None, progress: bool = False,
                      snapshot_every: int | None = None, cuda_graph: bool | str = "auto", check_finite: bool = True,
                      backend: str = "auto"):
    """Annealed Langevin dynamics (NCSN Algorithm 1) with NCSNv2's final denoising step.

    For each level ``i = 1..L`` (``sigmas`` strictly decreasing, ``sigma_1`` first), ``T =
    n_steps_each`` steps of ``x <- clamp(x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z)``,
    ``alpha_i = step_lr sigma_i^2 / sigma_L^2``, ``z ~ N(0, I)``; then, if ``denoise``,
    ``x <- clamp(x + sigma_L^2 s(x, sigma_L))``. Each step is one fused
    :func:`fdsm_ext.ops.langevin_step_` call; ``z`` comes from its Philox stream, seeded once from
    ``generator`` (step ``k`` uses offset ``offset_0 + k``), so a seed gives the same samples on every
    run and on the CPU and GPU kernels up to the model's own rounding.

    Args:
        score_fn: ``score_fn(x, sigma)`` with ``x`` ``(B, *shape)`` and ``sigma`` a ``(B,)`` tensor in
            ``x``'s dtype; returns the score, shape ``(B, *shape)`` (cast to ``x``'s dtype). Energy
            models: :func:`score_from_energy`; unconditional nets: :class:`NoiseConditionalScore`.
        x: the initial state ``(B, *shape)`` (e.g. uniform on the data range); not modified.
        sigmas: noise levels, strictly decreasing, e.g. :func:`geometric_sigmas`; each level and its
            square normal numbers in ``x``'s dtype, and ``step_lr (sigma_1/sigma_L)^2`` finite.
        n_steps_each: ``T >= 1``, steps per level.
        step_lr: ``> 0``, the step size at the last level (:func:`solve_step_size`).
        denoise: apply the final denoising step.
        clamp: ``None`` or ``(min, max)`` (either may be None): every step's result, and the denoised
            output, is clamped to the data range.
        generator: ``torch.Generator`` for the noise seed; ``torch.manual_seed`` fixes it if None.
        callback: called after every step with a :class:`LangevinStepInfo`.
        progress: print one line per level to stderr (mean norms; syncs once per level).
        snapshot_every: if set to ``k``, also return the state at the end of every ``k``-th level and of
            the last level, as a ``(K, B, *shape)`` tensor (for plots of the annealing).
        cuda_graph: on CUDA with the fused kernel, ``"auto"`` or True captures one step (``score_fn``
            and the update) in a CUDA graph after 3 eager warm-up steps and replays it; ``"auto"``
            falls back to eager steps (with a warning) if capture fails, True raises. The samples are
            those of the eager loop. ``score_fn`` must then be capturable: static shapes, no host sync.
        check_finite: stop with a ``FloatingPointError`` naming the level and step at which the score
            or x became NaN or inf. No step syncs with the device: on the CPU every step is checked
            at once; on a GPU the first bad step is kept on the device and reported at the end of the
            first level by which its copy to the host has landed (usually that level or the next),
            and at the latest at the end of the run. With ``check_finite=False``, no callback and no
            progress, the fused step skips its norms (also on the CPU from 4096 state elements on,
            where the watch sums the score and x instead).
        backend: ``"auto"`` (the compiled kernel when the device has one, else on CUDA the Triton
            kernel when triton imports, else the composite), ``"cpp"`` (require the compiled kernel),
            ``"triton"`` (the Triton kernel of :mod:`fdsm_ext.triton`: the same noise stream, so the same
            samples as ``"cpp"`` for a seed; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
            ``"torch"`` (the composite: ``torch.randn`` noise and :func:`fdsm_ext.reference.langevin_step`).

    Returns:
        The samples ``(B, *shape)`` in ``x``'s dtype, or ``(samples, snapshots)`` when ``snapshot_every``.
    """
    name = "annealed_langevin"
    plan = _plan(score_fn, x, sigmas, n_steps_each, step_lr, denoise=denoise, clamp=clamp, generator=generator,
                 callback=callback, progress=progress, snapshot_every=snapshot_every, cuda_graph=cuda_graph,
                 check_finite=check_finite, backend=backend)
    step_op = _step_op_for(plan.backend, x.device)
    state = x.detach().clone(memory_format=torch.contiguous_format)
    watch = _FiniteWatch(state.device, plan.check_finite)
    watch_by_sums = watch.immediate and state.numel() >= _SUM_WATCH_MIN  # see _FiniteWatch.check_step
    with_norms = plan.callback is not None or plan.progress or (plan.check_finite and not watch_by_sums)
    stepper = _Stepper(score_fn, state, plan.clamp, generator, step_op, with_norms)
    runner = _make_runner(plan, stepper, watch, name)

    snapshots, k = [], 0
    for i in range(len(plan.levels)):
        k, norms = _run_level(plan, i, stepper, watch, runner, k, name)
        if plan.snapshot_every is not None and ((i + 1) % plan.snapshot_every == 0 or i == len(plan.levels) - 1):
            snapshots.append(state.clone())
        if plan.progress:
            _report_progress(plan, i, norms, name)
    found = watch.finish()
    if found is not None:
        raise _non_finite_error(found[0], plan.n_steps_each, plan.levels, found[1], name)
    if plan.denoise:
        _denoise(plan, stepper, name)
    if plan.snapshot_every is not None:
        return state, torch.stack(snapshots)
    return state


def langevin_dynamics(score_fn: Callable[[Tensor], Tensor], x: Tensor, n_steps: int, step_size: float, *,
                      clamp: tuple[float | None, float | None] | None = None, generator: torch.Generator | None = None,
                      callback: Callable[[LangevinStepInfo], None] | None = None, **kwargs) -> Tensor:
    """Plain Langevin dynamics ``x <- clamp(x + eps s(x) + sqrt(2 eps) z)``, ``n_steps`` times.

    ``score_fn(x)`` is unconditional; ``x`` ``(B, *shape)``; ``n_steps`` an int >= 1; ``step_size``
    is eps, a finite float > 0. The single-level case of :func:`annealed_langevin` (one level, no
    denoising); other keyword arguments go to it.
    """
    _checks.check_callable(score_fn, "score_fn", "score_fn(x)")
    _check_int(n_steps, "n_steps", 1)
    step_size = _check_positive(step_size, "step_size")
    for key in ("denoise", "sigmas", "n_steps_each", "step_lr"):
        if key in kwargs:
            raise TypeError(f"langevin_dynamics() got an unexpected keyword argument `{key}` (a single level, "
                            "no denoising: use annealed_langevin)")
    return annealed_langevin(lambda y, sigma: score_fn(y), x, [1.0], n_steps, step_size, denoise=False,
                             clamp=clamp, generator=generator, callback=callback, **kwargs)
