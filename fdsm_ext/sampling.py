"""Score-based sampling: annealed Langevin dynamics and the NCSNv2 recipe (Song & Ermon 2020).

Formulas: shared/MATH.md, sections "Langevin dynamics" and "NCSNv2 techniques".

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
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops, reference
from .losses import _draw_seed, _resolve_backend_for

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

    def dist(log_u: float) -> float:
        return abs(step_size_objective(math.exp(log_u) * s2, sigma_min, gamma, n_steps_each) - 1.0)

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


# =========================================================================== the sampler
@dataclass
class LangevinStepInfo:
    """What a sampler's ``callback`` receives after every Langevin step.

    ``level`` and ``step`` are 0-based; ``x`` is the live ``(B, *shape)`` state and the norms are
    ``(B,)`` views of the fused kernel's per-sample diagnostics (``||s||``, ``||z||``, ``||x_new||``):
    all are overwritten by the next step, so clone what you keep. NCSNv2's signal-to-noise ratio is
    ``sqrt(alpha) * score_norm / noise_norm``.
    """

    level: int
    step: int
    sigma: float
    alpha: float
    x: Tensor
    score_norm: Tensor
    noise_norm: Tensor
    x_norm: Tensor


def _check_sigmas(sigmas) -> list[float]:
    try:
        levels = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"`sigmas` must be a 1-D sequence or tensor of noise levels ({exc})") from None
    if levels.dim() != 1 or levels.numel() == 0:
        raise ValueError(f"`sigmas` must be a non-empty 1-D sequence of noise levels, got shape {tuple(levels.shape)}")
    if not bool((levels > 0).all() & torch.isfinite(levels).all()):
        raise ValueError("`sigmas` must all be finite and > 0")
    if levels.numel() > 1 and not bool((levels[1:] < levels[:-1]).all()):
        k = int((levels[1:] >= levels[:-1]).nonzero()[0])
        raise ValueError(f"`sigmas` must be strictly decreasing (sigma_1 > ... > sigma_L), but sigmas[{k}] = "
                         f"{float(levels[k])} <= sigmas[{k + 1}] = {float(levels[k + 1])}")
    return levels.tolist()


def _check_clamp(clamp) -> tuple[float | None, float | None]:
    if clamp is None:
        return None, None
    if not isinstance(clamp, Sequence) or len(clamp) != 2:
        raise ValueError(f"`clamp` must be None or a (min, max) pair, got {clamp!r}")
    lo, hi = (None if v is None else float(v) for v in clamp)
    if (lo is not None and math.isnan(lo)) or (hi is not None and math.isnan(hi)) or (
            lo is not None and hi is not None and lo >= hi):
        raise ValueError(f"`clamp` must be a (min, max) pair with min < max, got {clamp!r}")
    return lo, hi


class _Stepper:
    """One Langevin step on fixed buffers: ``x`` (the state), ``sigma`` (B,) and ``alpha`` (1,).

    Fused (``step_op``: the C++ or the Triton ``langevin_step_``, which draw the same noise): the noise
    comes from the kernel's Philox stream with a seed tensor on x's device whose offset the step itself
    advances (``seed += (0, 1)``), so eager steps and CUDA-graph replays read the same seeds without any
    host value baked into a graph. Composite (``step_op`` None, no kernel for the device): torch.randn
    from ``generator`` and :func:`fdsm_ext.reference.langevin_step`.
    """

    def __init__(self, score_fn, x, clamp, generator, step_op=None):
        self.score_fn, self.x, self.generator, self.step_op = score_fn, x, generator, step_op
        self.lo, self.hi = clamp
        B, dev = x.shape[0], x.device
        self.sigma = torch.empty(B, dtype=x.dtype, device=dev)
        self.alpha = torch.empty(1, dtype=reference.loss_dtype(x.dtype), device=dev)
        if step_op is not None:
            self.seed = _draw_seed(generator).to(dev)
            self.seed_step = torch.tensor([0, 1], dtype=torch.int64, device=dev)

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
        return s.detach().to(self.x.dtype)

    def step(self) -> Tensor:
        """Advances ``x`` by one step and returns the norms (3, B)."""
        s = self.score()
        if self.step_op is not None:
            norms = self.step_op(self.x, s, self.alpha, self.seed, self.lo, self.hi, True)
            self.seed.add_(self.seed_step)
            return norms
        acc = reference.acc_dtype(self.x.dtype)
        gen = self.generator
        z = torch.randn(self.x.shape, generator=gen, dtype=acc, device=gen.device if gen is not None else self.x.device)
        new, norms = reference.langevin_step(self.x, s, self.alpha, z.to(self.x.device), self.lo, self.hi)
        self.x.copy_(new)
        return norms


class _FiniteWatch:
    """Finds the first step whose score or new x is not finite, from the step's norms.

    On the CPU every step is checked at once. On other devices the first bad step is recorded in a
    device tensor (no host sync, so it also runs inside a CUDA graph) and read at the end of a level.
    """

    def __init__(self, device: torch.device, enabled: bool, deferred: bool | None = None):
        self.enabled = enabled
        self.immediate = device.type == "cpu" if deferred is None else not deferred
        if enabled and not self.immediate:
            self.counter = torch.zeros((), dtype=torch.int64, device=device)
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            self.bad_score = torch.zeros((), dtype=torch.bool, device=device)

    def record(self, norms: Tensor, k: int) -> int | None:
        """Notes the norms of global step ``k``; returns the bad step when known now, else None."""
        if not self.enabled:
            return None
        if self.immediate:
            return None if bool(torch.isfinite(norms).all()) else k
        bad = ~torch.isfinite(norms).all()
        new = bad & (self.first_bad < 0)
        self.bad_score.logical_or_(new & ~torch.isfinite(norms[0]).all())
        self.first_bad.copy_(torch.where(new, self.counter, self.first_bad))
        self.counter.add_(1)
        return None

    def pending(self) -> int | None:
        if not self.enabled or self.immediate:
            return None
        k = int(self.first_bad)
        return None if k < 0 else k


def _non_finite_error(k: int, n_steps: int, levels: list[float], score_bad: bool | None,
                      name: str) -> FloatingPointError:
    level, step = divmod(k, n_steps)
    cause = {True: "the score returned NaN or inf", False: "x overflowed to NaN or inf (the score was finite)",
             None: "NaN or inf in the score or in x"}[score_bad]
    return FloatingPointError(
        f"{name}: stopped at level {level + 1}/{len(levels)} (sigma={levels[level]:.6g}), step {step + 1}/{n_steps}: "
        f"{cause}. A step size too large for this level (lower `step_lr`) or a diverging score model are the "
        "usual causes.")


class _GraphRunner:
    """Runs ``stepper.step`` eagerly for a few warm-up steps (on a side stream), then captures it in a
    CUDA graph (recording, not running) and replays the graph for every later step."""

    def __init__(self, stepper: _Stepper, watch: _FiniteWatch, warmup: int, strict: bool):
        self.stepper, self.watch, self.warmup, self.strict = stepper, watch, warmup, strict
        self.calls, self.graph, self.norms, self.failed = 0, None, None, False
        self.side = torch.cuda.Stream(device=stepper.x.device)

    def _eager(self, k: int) -> tuple[Tensor, int | None]:
        norms = self.stepper.step()
        return norms, self.watch.record(norms, k)

    def step(self, k: int) -> tuple[Tensor, int | None]:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.norms, None
        if self.failed:
            return self._eager(k)
        if self.calls <= self.warmup:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self._eager(k)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                norms = self.stepper.step()
                self.watch.record(norms, k)
        except Exception as exc:  # the model does something a graph cannot hold (a host sync, ...)
            if self.strict:
                raise
            warnings.warn(f"annealed_langevin: CUDA-graph capture of the step failed ({exc!r}); continuing "
                          "eagerly (pass cuda_graph=False to skip the attempt)", RuntimeWarning, stacklevel=4)
            self.failed = True
            return self._eager(k)
        self.graph, self.norms = graph, norms
        graph.replay()
        return norms, None


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
        sigmas: noise levels, strictly decreasing, e.g. :func:`geometric_sigmas`.
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
            or x became NaN or inf (checked every step on the CPU; on the GPU without host syncs, and
            reported at the end of that level).
        backend: ``"auto"`` (the compiled kernel when the device has one, else on CUDA the Triton
            kernel when triton imports, else the composite), ``"cpp"`` (require the compiled kernel),
            ``"triton"`` (the Triton kernel of :mod:`fdsm_ext.triton`: the same noise stream, so the same
            samples as ``"cpp"`` for a seed; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
            ``"torch"`` (the composite: ``torch.randn`` noise and :func:`fdsm_ext.reference.langevin_step`).

    Returns:
        The samples ``(B, *shape)`` in ``x``'s dtype, or ``(samples, snapshots)`` when ``snapshot_every``.
    """
    name = "annealed_langevin"
    if not callable(score_fn):
        raise TypeError(f"`score_fn` must be callable as score_fn(x, sigma), got {type(score_fn).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point tensor (batch, *shape), got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"`x` must be a non-empty batch (batch, *shape), got shape {tuple(x.shape)}")
    levels = _check_sigmas(sigmas)
    _check_int(n_steps_each, "n_steps_each", 1)
    step_lr = _check_positive(step_lr, "step_lr")
    lo, hi = _check_clamp(clamp)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("`callback` must be callable or None")
    if snapshot_every is not None:
        _check_int(snapshot_every, "snapshot_every", 1)
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"`cuda_graph` must be 'auto', True or False, got {cuda_graph!r}")
    if backend not in ("auto", "cpp", "triton", "torch"):
        raise ValueError(f"`backend` must be 'auto', 'cpp', 'triton' or 'torch', got {backend!r}")
    # The losses' rule (and errors): the compiled kernels where built, else Triton on CUDA, else the
    # composite. Resolving "triton" imports fdsm_ext.triton, which registers its ops.
    backend = _resolve_backend_for(backend, x.device.type)
    step_op = None  # the composite
    if backend == "cpp":
        step_op = ops._ops.langevin_step_.default
    elif backend == "triton":
        step_op = torch.ops.fdsm_ext_triton.langevin_step_.default
    fused = step_op is not None

    state = x.detach().clone(memory_format=torch.contiguous_format)
    stepper = _Stepper(score_fn, state, (lo, hi), generator, step_op)
    watch = _FiniteWatch(state.device, check_finite)
    runner = None
    if cuda_graph is not False and state.is_cuda and fused:
        runner = _GraphRunner(stepper, watch, warmup=3, strict=cuda_graph is True)
    elif cuda_graph is True:
        raise RuntimeError("cuda_graph=True needs `x` on a CUDA device and a fused langevin_step kernel (fdsm_ext's "
                           "CUDA build, or backend='triton'); "
                           f"got a {state.device.type} tensor (kernel available: {fused})")

    sigma_last2 = levels[-1] ** 2
    snapshots = []
    k = 0
    for i, sigma in enumerate(levels):
        alpha = step_lr * sigma * sigma / sigma_last2
        stepper.set_level(sigma, alpha)
        for t in range(n_steps_each):
            if runner is not None:
                norms, bad = runner.step(k)
            else:
                norms = stepper.step()
                bad = watch.record(norms, k)
            if bad is not None:
                raise _non_finite_error(bad, n_steps_each, levels, not bool(torch.isfinite(norms[0]).all()), name)
            if callback is not None:
                callback(LangevinStepInfo(i, t, sigma, alpha, state, norms[0], norms[1], norms[2]))
            k += 1
        bad = watch.pending()
        if bad is not None:
            raise _non_finite_error(bad, n_steps_each, levels, bool(watch.bad_score), name)
        if snapshot_every is not None and ((i + 1) % snapshot_every == 0 or i == len(levels) - 1):
            snapshots.append(state.clone())
        if progress:
            print(f"{name}: level {i + 1}/{len(levels)} sigma={sigma:.4g} alpha={alpha:.3g} "
                  f"|s|={float(norms[0].mean()):.4g} |z|={float(norms[1].mean()):.4g} "
                  f"|x|={float(norms[2].mean()):.4g}", file=sys.stderr)

    if denoise:
        stepper.set_level(levels[-1], 0.0)
        state.add_(stepper.score(), alpha=sigma_last2)
        if lo is not None or hi is not None:
            state.clamp_(lo, hi)
        if check_finite and not bool(torch.isfinite(state).all()):
            raise FloatingPointError(f"{name}: the final denoising step x + sigma_L^2 s(x, sigma_L) is not finite")
    if snapshot_every is not None:
        return state, torch.stack(snapshots)
    return state


def langevin_dynamics(score_fn: Callable[[Tensor], Tensor], x: Tensor, n_steps: int, step_size: float, *,
                      clamp: tuple[float | None, float | None] | None = None, generator: torch.Generator | None = None,
                      callback: Callable[[LangevinStepInfo], None] | None = None, **kwargs) -> Tensor:
    """Plain Langevin dynamics ``x <- clamp(x + eps s(x) + sqrt(2 eps) z)``, ``n_steps`` times.

    ``score_fn(x)`` is unconditional; ``x`` ``(B, *shape)``; ``step_size`` is eps. The single-level
    case of :func:`annealed_langevin` (one level, no denoising); other keyword arguments go to it.
    """
    return annealed_langevin(lambda y, sigma: score_fn(y), x, [1.0], n_steps, step_size, denoise=False,
                             clamp=clamp, generator=generator, callback=callback, **kwargs)
