"""Predictor-corrector sampling of the variance-exploding SDE (score_sde, Song et al. 2021) on the fused
Langevin step.

:func:`pc_sampler` alternates Langevin corrector steps at a noise level with a reverse-diffusion
predictor step to the next level. Both are steps of the form ``x + a s + b z`` and run as one
:func:`fdsm_ext.ops.langevin_step_` call each (the corrector adds one norms-only call; see
:func:`pc_sampler`); on CUDA each kind of step can be captured in a CUDA graph and replayed (the
runner of :func:`fdsm_ext.annealed_langevin`). Formulas: docs/likelihood.md, section
"Predictor-corrector sampling".
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks, ops, reference
from ._checks import check_int, check_positive, resolve_backend_for
from .sampling import (_check_clamp, _check_cuda_graph, _check_sigmas, _FiniteWatch, _graph_wanted, _GraphRunner,
                       _Stepper, _StepNorms)

__all__ = ["PCStepInfo", "pc_sampler"]

_PREDICTORS = ("reverse_diffusion", "none")


@dataclass
class PCStepInfo(_StepNorms):
    """What :func:`pc_sampler`'s ``callback`` receives after every corrector and predictor step.

    ``level`` (0-based ``i - 1`` for ``sigma_i``) and ``step`` (0-based within the level: the
    corrector steps ``0 .. n_corrector - 1``, then the predictor) locate the step; ``kind`` is
    ``"corrector"`` or ``"predictor"``. ``step_size`` is the score's coefficient ``a`` and
    ``noise_scale`` the noise's ``b`` in ``x + a s + b z``, as 1-element tensors on ``x``'s device (the
    corrector's is computed there; reading it syncs). ``x`` is the live ``(B, *shape)`` state and
    ``norms`` the kernel's ``(3, B)`` per-sample norms, whose rows are :attr:`score_norm` (``||s||``),
    :attr:`noise_norm` (``||z||``) and :attr:`x_norm` (``||x_new||``), views made when read: all are
    overwritten by the next step of the same kind, so clone what you keep.
    """

    level: int
    step: int
    kind: str
    sigma: float
    step_size: Tensor
    noise_scale: Tensor
    x: Tensor
    norms: Tensor


class _PCStepper(_Stepper):
    """Corrector and predictor steps on :class:`fdsm_ext.sampling._Stepper`'s buffers and noise stream:
    ``x`` (the state), ``sigma`` (B,), the corrector's step size ``alpha`` (1,) (computed on the device
    by the SNR rule), the predictor's ``delta`` and ``noise_scale`` (1,) (filled per level by
    :meth:`set_level`), the last three in the loss dtype, all on ``x``'s device: every input of a step is a device
    tensor updated in place, so each kind of step can be captured in a CUDA graph and replayed. Fused
    (``step_op``, the C++ or Triton ``langevin_step_``): ``z`` from the kernel's Philox stream, one
    offset per step (:meth:`fdsm_ext.sampling._Stepper.advance`). Composite: ``torch.randn`` from
    ``generator`` and :func:`fdsm_ext.reference.langevin_step`.
    """

    def __init__(self, score_fn, x: Tensor, clamp, generator, step_op, snr: float):
        super().__init__(score_fn, x, clamp, generator, step_op, with_norms=True)
        self.snr = snr
        self.delta = torch.empty_like(self.alpha)
        self.noise_scale = torch.empty_like(self.alpha)
        if step_op is not None:
            self.zero = torch.zeros(1, dtype=self.alpha.dtype, device=x.device)

    def set_level(self, sigma: float, delta: float = 0.0) -> None:  # alpha is set per step (SNR rule)
        """Fills the level's buffers: ``sigma``, and the predictor's ``a = delta`` and ``b = sqrt(delta)``
        (fill_ from host floats: a kernel launch on a GPU, no sync, outside any captured graph; sqrt in
        float64, rounded once to the buffers' dtype, the kernels' accumulation dtype)."""
        self.sigma.fill_(sigma)
        self.delta.fill_(delta)
        self.noise_scale.fill_(math.sqrt(delta))

    def _noise(self) -> Tensor:
        gen = self.generator
        z = torch.randn(self.x.shape, generator=gen, dtype=reference.acc_dtype(self.x.dtype),
                        device=gen.device if gen is not None else self.x.device)
        return z.to(self.x.device)

    def _composite_step(self, s: Tensor, z: Tensor, alpha: Tensor, noise_scale: Tensor | None = None) -> Tensor:
        new, norms = reference.langevin_step(self.x, s, alpha, z, self.lo, self.hi, noise_scale)
        self.x.copy_(new)
        return norms

    def corrector(self) -> Tensor:
        """``x + e s + sqrt(2 e) z``, ``e = 2 (snr mean_b ||z_b|| / mean_b ||s_b||)^2``; returns the norms (3, B)."""
        s = self.score()
        if self.step_op is not None:
            # e needs ||z|| of the very z the step will draw, before the step: a norms-only call with
            # alpha = 0 and so b = 0 (x + 0 s + 0 z: x unchanged up to the sign of zero, no clamp) regenerates this
            # seed's z and returns ||s|| and ||z|| in the same pass; the step then redraws the same z.
            probe = self.step_op(self.x, s, self.zero, self.seed, None, None, True)
            self._snr_step(probe[0], probe[1])
            norms = self.step_op(self.x, s, self.alpha, self.seed, self.lo, self.hi, True)
            self.advance()
            return norms
        z = self._noise()
        acc = reference.acc_dtype(self.x.dtype)
        self._snr_step(torch.linalg.vector_norm(s.reshape(s.shape[0], -1).to(acc), dim=1),
                       torch.linalg.vector_norm(z.reshape(z.shape[0], -1), dim=1))
        return self._composite_step(s, z, self.alpha)

    def _snr_step(self, s_norm: Tensor, z_norm: Tensor) -> None:
        """``alpha = 2 (snr mean ||z|| / mean ||s||)^2`` on the device (no host sync)."""
        ratio = z_norm.mean() / s_norm.mean()
        self.alpha.copy_((ratio * self.snr).square().mul(2).reshape(1))

    def predictor(self) -> Tensor:
        """``x + delta s + sqrt(delta) z`` (reverse diffusion), one kernel call with ``a = delta`` and the
        noise scale ``b = sqrt(delta)`` of :meth:`set_level`; returns the norms (3, B)."""
        s = self.score()
        if self.step_op is not None:
            norms = self.step_op(self.x, s, self.delta, self.seed, self.lo, self.hi, True, self.noise_scale)
            self.advance()
            return norms
        return self._composite_step(s, self._noise(), self.delta, self.noise_scale)


def _eager_step(step: Callable[[], Tensor], watch: _FiniteWatch) -> Callable[[int], tuple[Tensor, int | None]]:
    """``step`` run eagerly as global step ``k``: its norms and the bad step found now (CPU), else None;
    the signature of :meth:`fdsm_ext.sampling._GraphRunner.step`."""
    def run(k: int) -> tuple[Tensor, int | None]:
        norms = step()
        return norms, watch.record(norms, k)
    return run


def _non_finite_error(level: int, step: int, kind: str, sigma: float, score_bad: bool | None) -> FloatingPointError:
    cause = {True: "the score returned NaN or inf", False: "x overflowed to NaN or inf (the score was finite)",
             None: "NaN or inf in the score or in x"}[score_bad]
    if kind == "corrector" and score_bad is False:
        cause += "; a score of zero for the whole batch makes the corrector's SNR step infinite"
    return FloatingPointError(
        f"pc_sampler: stopped at level {level + 1} (sigma={sigma:.6g}), {kind} step (step {step + 1} of the level): "
        f"{cause}. A diverging score model, or a corrector step too large for it (lower `snr`), are the usual causes.")


@torch.no_grad()
def pc_sampler(score_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, *, n_corrector: int = 1,
               snr: float = 0.16, predictor: str = "reverse_diffusion", denoise: bool = True,
               clamp: tuple[float | None, float | None] | None = None, generator: torch.Generator | None = None,
               callback: Callable[[PCStepInfo], None] | None = None, progress: bool = False,
               snapshot_every: int | None = None, check_finite: bool = True, cuda_graph: bool | str = "auto",
               backend: str = "auto"):
    """Predictor-corrector sampler of the VE SDE (score_sde's ``pc_sampler`` with ``LangevinCorrector``
    and ``ReverseDiffusionPredictor``).

    ``sigmas`` are ``sigma_1 > sigma_2 > ... > sigma_L`` (largest first, as :func:`geometric_sigmas`
    returns them); set ``sigma_{L+1} = 0``. For each level ``i = 1..L``, with ``s = s(x, sigma_i)``
    recomputed before every step and fresh ``z ~ N(0, I)`` per step:

    1. ``n_corrector`` Langevin corrector steps ``x <- x + e s + sqrt(2 e) z`` with the signal-to-noise
       step ``e = 2 (snr mean_b ||z_b|| / mean_b ||s_b||)^2``: per-sample norms averaged over the
       batch, as score_sde does (a per-sample ratio blows up where a sample's score vanishes);
    2. the reverse-diffusion predictor ``x <- x + (sigma_i^2 - sigma_{i+1}^2) s + sqrt(sigma_i^2 -
       sigma_{i+1}^2) z`` (score_sde writes it with ascending indices, ``sigma_i^2 - sigma_{i-1}^2``).
       At ``i = L`` it steps to ``sigma_{L+1} = 0``; with ``denoise`` that last step omits its noise,
       ``x <- x + sigma_L^2 s(x, sigma_L)`` (score_sde's ``noise_removal``, NCSNv2's denoising).

    With ``predictor="none"`` only the correctors run (annealed Langevin with the SNR step), and
    ``denoise`` applies the same final ``x + sigma_L^2 s``. ``clamp`` applies after every step.

    Each step is a fused :func:`fdsm_ext.ops.langevin_step_` call ``x + a s + b z``. The predictor is
    one call with ``a = delta`` and the noise scale ``b = sqrt(delta)`` (1-element tensors on ``x``'s
    device). The corrector steps with ``a = e`` and no noise scale (the kernel's ``b = sqrt(2 e)``), but
    its ``e`` depends on the batch means of ``||z||`` and ``||s||``, which need a whole pass before any
    element can move, so it first calls the kernel with ``a = 0`` to read both norms of this step's
    ``z`` (two kernel calls, no host sync). The
    noise of step ``k`` (corrector and predictor steps counted in order from 0) is the kernel's Philox
    stream at offset ``offset_0 + k``, the seed drawn once from ``generator``: a seed gives the same
    samples on every run, bitwise, and the same on the C++ and Triton kernels up to the model's own
    rounding. ``backend="torch"`` draws ``z`` with ``torch.randn(generator=...)`` (also bitwise
    reproducible, other samples) and steps with :func:`fdsm_ext.reference.langevin_step`.

    On CUDA with a fused kernel each kind of step (score and update; the corrector's probe and SNR
    step size included) is captured in its own CUDA graph after 3 eager warm-up steps of that kind
    and replayed: every input is a device buffer updated in place (the state, the seed offset the step
    advances, the predictor's ``delta`` and ``sqrt(delta)`` filled per level between replays), so the
    samples are those of the eager loop.

    Args:
        score_fn: ``score_fn(x, sigma)`` with ``x`` ``(B, *shape)`` and ``sigma`` a ``(B,)`` tensor in
            ``x``'s dtype; returns the score ``(B, *shape)`` (cast to ``x``'s dtype).
        x: the initial state ``(B, *shape)``, a draw from the prior ``N(0, sigma_1^2 I)`` (plus the
            data's mean, if any); not modified.
        sigmas: noise levels, strictly decreasing, at least one.
        n_corrector: corrector steps per level, ``>= 0``.
        snr: the corrector's signal-to-noise ratio ``> 0`` (score_sde: 0.16 for CIFAR-10 VE models).
        predictor: ``"reverse_diffusion"`` or ``"none"``.
        denoise: the last step to ``sigma = 0`` without noise (above).
        clamp: ``None`` or ``(min, max)`` (either may be None), applied to every step's result.
        generator: ``torch.Generator`` for the noise seed; ``torch.manual_seed`` fixes it if None.
        callback: called after every corrector and predictor step with a :class:`PCStepInfo`.
        progress: a tqdm bar over the levels with the mean norms (syncs once per level).
        snapshot_every: ``k``: also return the state after every ``k``-th level and the last, ``(K, B, *shape)``.
        check_finite: stop with a ``FloatingPointError`` naming the level and step at which the score or
            ``x`` became NaN or inf (checked every step on the CPU; without host syncs on a GPU, reported
            at the end of the level).
        cuda_graph: ``"auto"``, True or False, as :func:`fdsm_ext.annealed_langevin` (one graph per kind of
            step; ``score_fn`` must then be capturable: static shapes, no host sync).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"torch"``, as :func:`fdsm_ext.annealed_langevin`.

    Returns:
        The samples ``(B, *shape)`` in ``x``'s dtype, or ``(samples, snapshots)`` with ``snapshot_every``.
    """
    _checks.check_callable(score_fn, "score_fn", "score_fn(x, sigma)")
    _checks.check_state(x)
    levels = _check_sigmas(sigmas, x.dtype)
    check_int(n_corrector, "n_corrector", 0)
    snr = check_positive(snr, "snr")
    if predictor not in _PREDICTORS:
        raise ValueError(f"`predictor` must be one of {', '.join(map(repr, _PREDICTORS))}, got {predictor!r}")
    if predictor == "none" and n_corrector == 0:
        raise ValueError("`n_corrector` must be >= 1 when `predictor` is 'none' (there would be no step)")
    denoise = _checks.check_bool(denoise, "denoise")
    progress = _checks.check_bool(progress, "progress")
    check_finite = _checks.check_bool(check_finite, "check_finite")
    lo, hi = _check_clamp(clamp)
    _checks.check_generator(generator)
    if callback is not None:
        _checks.check_callable(callback, "callback", "callback(info)")
    if snapshot_every is not None:
        check_int(snapshot_every, "snapshot_every", 1)
    _check_cuda_graph(cuda_graph)
    _checks.check_choice(backend, "backend", _checks.BACKENDS)
    backend = resolve_backend_for(backend, x.device.type)
    step_op = {"cpp": ops._ops.langevin_step_.default, "torch": None}.get(backend)
    if backend == "triton":
        step_op = torch.ops.fdsm_ext_triton.langevin_step_.default

    state = x.detach().clone(memory_format=torch.contiguous_format)
    stepper = _PCStepper(score_fn, state, (lo, hi), generator, step_op, snr)
    watch = _FiniteWatch(state.device, check_finite)
    take_step = {"corrector": stepper.corrector, "predictor": stepper.predictor}
    if _graph_wanted(cuda_graph, stepper):  # one runner (and graph) per kind of step
        take_step = {kind: _GraphRunner(fn, state.device, check=watch.record, record=watch.record, warmup=3,
                                        strict=cuda_graph is True, name="pc_sampler").step
                     for kind, fn in take_step.items()}
    else:
        take_step = {kind: _eager_step(fn, watch) for kind, fn in take_step.items()}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(levels), desc="pc_sampler", unit="level", file=sys.stderr)
    L, k, snapshots = len(levels), 0, []
    steps = []  # (level, step within the level, kind, sigma) of each global step, to name a deferred bad one

    def deferred_error(found):
        bad, score_bad = found
        level, t, kind, sig = steps[bad]
        return _non_finite_error(level, t, kind, sig, score_bad)
    try:
        for i, sigma in enumerate(levels):
            next2 = levels[i + 1] ** 2 if i + 1 < L else 0.0
            stepper.set_level(sigma, sigma * sigma - next2)
            plan = ["corrector"] * n_corrector
            if predictor == "reverse_diffusion" and not (denoise and i == L - 1):
                plan.append("predictor")
            for t, kind in enumerate(plan):
                norms, bad = take_step[kind](k)
                steps.append((i, t, kind, sigma))
                if bad is not None:
                    raise _non_finite_error(i, t, kind, sigma, not bool(torch.isfinite(norms[0]).all()))
                if callback is not None:
                    # the kernel's (a, b): b = sqrt(2 a) computed in-kernel for the corrector
                    if kind == "corrector":
                        a = stepper.alpha.clone()
                        b = (2 * a).sqrt()
                    else:
                        a, b = stepper.delta.clone(), stepper.noise_scale.clone()
                    callback(PCStepInfo(i, t, kind, sigma, a, b, state, norms))
                k += 1
            found = watch.level_end()  # deferred (GPU): the first bad global step whose record has landed
            if found is not None:
                raise deferred_error(found)
            if snapshot_every is not None and ((i + 1) % snapshot_every == 0 or i == L - 1) and not (
                    denoise and i == L - 1):
                snapshots.append(state.clone())
            if bar is not None:
                bar.update(1)
                if plan:  # the last step's mean norms
                    bar.set_postfix(sigma=f"{sigma:.4g}", s=f"{float(norms[0].mean()):.4g}",
                                    x=f"{float(norms[2].mean()):.4g}")
        found = watch.finish()
        if found is not None:
            raise deferred_error(found)
        if denoise:
            stepper.set_level(levels[-1])
            state.add_(stepper.score(), alpha=levels[-1] ** 2)
            if lo is not None or hi is not None:
                state.clamp_(lo, hi)
            if check_finite and not bool(torch.isfinite(state).all()):
                raise FloatingPointError("pc_sampler: the final denoising step x + sigma_L^2 s(x, sigma_L) is not "
                                         "finite")
            if snapshot_every is not None:
                snapshots.append(state.clone())
    finally:
        if bar is not None:
            bar.close()
    if snapshot_every is not None:
        return state, torch.stack(snapshots)
    return state
