"""Typed wrappers of the fused ops, their fake (meta) kernels and their autograd formulas.

The schemas live in csrc/fd_ops.cpp; the device kernels in csrc/<device>/. Everything here works on
flattened ``(batch, features)`` tensors; the losses in :mod:`fdsm_ext.losses` do the reshaping.
The pure-PyTorch oracle of each op is in :mod:`fdsm_ext.reference`.

Random directions are never stored: ``seed`` is a CPU int64 tensor ``(seed, offset)`` from which the
kernels regenerate the same Philox stream (see ``csrc/fd_math.h``) in the forward and the backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ext  # noqa: F401  (registers torch.ops.fdsm_ext)

_ops = torch.ops.fdsm_ext

#: Direction kinds accepted by the ops, by name.
DIRECTION_KINDS = {"sphere": 0, "rademacher": 1, "gaussian": 2}


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a per-sample loss computed from inputs of ``dtype`` (half/bf16 accumulate in fp32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def perturb(x: Tensor, seed: Tensor, eps: float, n_slices: int, kind: int, include_center: bool) -> Tensor:
    """``[x; x+v_1; ..; x+v_n; x-v_1; ..; x-v_n]`` for ``x`` of shape ``(B, d)``.

    Returns ``((include_center + 2 n) B, d)`` in ``x``'s dtype; ``v`` (norm ``eps`` for the sphere
    kind) is drawn in-kernel from ``seed``, row ``k*B + i`` of block k for sample i.
    """
    return _ops.perturb.default(x, seed, eps, n_slices, kind, include_center)


def fd_ssm_quotient(f0: Tensor, fp: Tensor, fm: Tensor, eps: float, dim_scale: float) -> Tensor:
    """Per-sample FD-SSM loss ``c/n sum_k [(f+_k - f-_k)^2/8 + f+_k + f-_k - 2 f0]``, ``c = dim_scale/eps^2``.

    ``f0`` is ``(B,)``, ``fp`` and ``fm`` are ``(n, B)``; the result is ``(B,)`` (fp32 for half inputs).
    """
    return _ops.fd_ssm_quotient.default(f0, fp, fm, eps, dim_scale)


def fd_ssm_vr(sp: Tensor, sm: Tensor, seed: Tensor, eps: float, kind: int, dim_scale: float) -> Tensor:
    """Per-sample FD-SSM-VR loss ``1/n sum_k ||s+ + s-||^2/8 + dim_scale/(2 eps^2) v_k^T (s+ - s-)``.

    ``sp = s(x+v)`` and ``sm = s(x-v)`` are ``(n, B, d)``; ``v`` is regenerated from ``seed``.
    """
    return _ops.fd_ssm_vr.default(sp, sm, seed, eps, kind, dim_scale)


def fd_dsm_quotient(fp: Tensor, fm: Tensor, noise: Tensor, sigma: Tensor, seed: Tensor, eps: float, kind: int,
                    dim_scale: float) -> Tensor:
    """Per-sample FD-DSM loss ``1/n sum_k c/2 [(f+ - f-)/2 + v_k^T noise / sigma^2]^2``.

    ``fp``, ``fm`` are ``(n, B)`` evaluations at ``x~ +- v``; ``noise = x~ - x`` is ``(B, d)``;
    ``sigma`` is ``(B,)`` and is not differentiated.
    """
    return _ops.fd_dsm_quotient.default(fp, fm, noise, sigma, seed, eps, kind, dim_scale)


def stencil_perturb(x: Tensor, v: Tensor, eps: float, order: int) -> Tensor:
    """Rows ``t*B + i`` hold ``x_i + (T - 2t) eps v_i`` for ``t = 0..T``: ``((T+1) B, d)``."""
    return _ops.stencil_perturb.default(x, v, eps, order)


def stencil_combine(f: Tensor, eps: float, order: int) -> Tensor:
    """``(2 eps)^-T sum_t (-1)^t C(T, t) f[t]`` for ``f`` of shape ``(T+1, B)``: ``(B,)``."""
    return _ops.stencil_combine.default(f, eps, order)


def _step_size_tensor(alpha, x: Tensor) -> Tensor:
    if isinstance(alpha, Tensor):
        return alpha
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"`alpha` (the Langevin step size) must be finite and >= 0, got {alpha!r}")
    return torch.full((1,), alpha, dtype=loss_dtype(x.dtype), device=x.device)


def langevin_step(x: Tensor, score: Tensor, alpha: float | Tensor, seed: Tensor, clamp_min: float | None = None,
                  clamp_max: float | None = None, return_norms: bool = False) -> tuple[Tensor, Tensor]:
    """One Langevin step ``x_new = clamp(x + alpha_i s + sqrt(2 alpha_i) z, clamp_min, clamp_max)``.

    ``x`` and ``score`` are ``(B, *event)`` of one floating dtype (half/bf16 are computed in fp32);
    ``alpha`` is a float or a tensor of one element or shape ``(B,)`` (one step size per sample) on
    ``x``'s device, not checked for sign when a tensor; ``z ~ N(0, I)`` is drawn in-kernel from the
    Philox stream of ``seed`` (an int64 ``(seed, offset)`` tensor on the CPU or on ``x``'s device),
    element ``j`` of sample ``i`` being ``reference.philox_raw_directions(seed, B, d, "gaussian")[i, j]``.
    NaN passes through the clamp. Returns ``(x_new, norms)``: ``x_new`` contiguous in ``x``'s dtype
    and ``norms`` ``(3, B)`` = per-sample ``(||s||, ||z||, ||x_new||)`` in :func:`loss_dtype` when
    ``return_norms``, else ``(3, 0)``. Not differentiable: its Autograd kernel
    (csrc/langevin_autograd.cpp) raises when an input requires grad.
    """
    return _ops.langevin_step.default(x, score, _step_size_tensor(alpha, x), seed, clamp_min, clamp_max, return_norms)


def langevin_step_(x: Tensor, score: Tensor, alpha: float | Tensor, seed: Tensor, clamp_min: float | None = None,
                   clamp_max: float | None = None, return_norms: bool = False) -> Tensor:
    """In-place :func:`langevin_step`: writes ``x_new`` into ``x`` (any strides) and returns ``norms``."""
    return _ops.langevin_step_.default(x, score, _step_size_tensor(alpha, x), seed, clamp_min, clamp_max,
                                       return_norms)


def set_poison_outputs(enable: bool) -> bool:
    """Fill every new kernel output with NaN before it is written (a test aid); returns the old value."""
    return _ops._set_poison_outputs(enable)


def set_vector_stream(enable: bool) -> bool:
    """Whether the CPU kernels draw directions 8 Philox blocks per instruction (the default) or with the
    scalar code (a test aid: both must give bitwise the same values); returns the old value."""
    return _ops._set_vector_stream(enable)


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("fdsm_ext::perturb")
def _(x, seed, eps, n_slices, kind, include_center):
    rows = (int(include_center) + 2 * n_slices) * x.shape[0]
    return x.new_empty((rows, x.shape[1]))


@torch.library.register_fake("fdsm_ext::fd_ssm_quotient")
def _(f0, fp, fm, eps, dim_scale):
    return f0.new_empty(f0.shape, dtype=loss_dtype(f0.dtype))


@torch.library.register_fake("fdsm_ext::fd_ssm_quotient_backward")
def _(grad, f0, fp, fm, eps, dim_scale):
    return torch.empty_like(f0), torch.empty_like(fp), torch.empty_like(fm)


@torch.library.register_fake("fdsm_ext::fd_ssm_vr")
def _(sp, sm, seed, eps, kind, dim_scale):
    return sp.new_empty((sp.shape[1],), dtype=loss_dtype(sp.dtype))


@torch.library.register_fake("fdsm_ext::fd_ssm_vr_backward")
def _(grad, sp, sm, seed, eps, kind, dim_scale):
    return torch.empty_like(sp), torch.empty_like(sm)


@torch.library.register_fake("fdsm_ext::fd_dsm_quotient")
def _(fp, fm, noise, sigma, seed, eps, kind, dim_scale):
    return fp.new_empty((fp.shape[1],), dtype=loss_dtype(fp.dtype))


@torch.library.register_fake("fdsm_ext::fd_dsm_quotient_backward")
def _(grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale):
    return torch.empty_like(fp), torch.empty_like(fm)


@torch.library.register_fake("fdsm_ext::fd_dsm_noise_backward")
def _(grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale):
    return torch.empty_like(noise)


@torch.library.register_fake("fdsm_ext::stencil_perturb")
def _(x, v, eps, order):
    return x.new_empty(((order + 1) * x.shape[0], x.shape[1]))


@torch.library.register_fake("fdsm_ext::stencil_perturb_backward")
def _(grad, eps, order):
    rows = grad.shape[0] // (order + 1)
    return grad.new_empty((rows, grad.shape[1])), grad.new_empty((rows, grad.shape[1]))


@torch.library.register_fake("fdsm_ext::stencil_combine")
def _(f, eps, order):
    return f.new_empty((f.shape[1],), dtype=loss_dtype(f.dtype))


@torch.library.register_fake("fdsm_ext::stencil_combine_backward")
def _(grad, f, eps, order):
    return torch.empty_like(f)


@torch.library.register_fake("fdsm_ext::langevin_step")
def _(x, score, alpha, seed, clamp_min, clamp_max, return_norms):
    norms = x.new_empty((3, x.shape[0] if return_norms else 0), dtype=loss_dtype(x.dtype))
    return x.new_empty(x.shape), norms


@torch.library.register_fake("fdsm_ext::langevin_step_")
def _(x, score, alpha, seed, clamp_min, clamp_max, return_norms):
    return x.new_empty((3, x.shape[0] if return_norms else 0), dtype=loss_dtype(x.dtype))


# --------------------------------------------------------------------------- autograd
def _setup(names, saved=()):
    """A setup_context saving the inputs named in ``saved`` for backward, keeping the others as
    attributes of ctx and dropping those whose name is None."""

    def setup_context(ctx, inputs, output):
        for name, value in zip(names, inputs):
            if name is not None and name not in saved:
                setattr(ctx, name, value)
        ctx.save_for_backward(*(value for name, value in zip(names, inputs) if name in saved))

    return setup_context


def _perturb_setup(ctx, inputs, output):
    x, _, _, n_slices, _, include_center = inputs
    ctx.blocks = int(include_center) + 2 * n_slices


def _perturb_backward(ctx, grad):
    # d(x +- v)/dx = I: the gradient is the sum over the stacked blocks; v is not needed.
    return grad.reshape(ctx.blocks, -1, grad.shape[-1]).sum(0), None, None, None, None, None


torch.library.register_autograd("fdsm_ext::perturb", _perturb_backward, setup_context=_perturb_setup)


def _quotient_backward(ctx, grad):
    f0, fp, fm = ctx.saved_tensors
    g0, gp, gm = _ops.fd_ssm_quotient_backward.default(grad, f0, fp, fm, ctx.eps, ctx.dim_scale)
    return g0, gp, gm, None, None


torch.library.register_autograd(
    "fdsm_ext::fd_ssm_quotient", _quotient_backward,
    setup_context=_setup(("f0", "fp", "fm", "eps", "dim_scale"), saved=("f0", "fp", "fm")),
)


def _vr_backward(ctx, grad):
    sp, sm, seed = ctx.saved_tensors
    gp, gm = _ops.fd_ssm_vr_backward.default(grad, sp, sm, seed, ctx.eps, ctx.kind, ctx.dim_scale)
    return gp, gm, None, None, None, None


torch.library.register_autograd(
    "fdsm_ext::fd_ssm_vr", _vr_backward,
    setup_context=_setup(("sp", "sm", "seed", "eps", "kind", "dim_scale"), saved=("sp", "sm", "seed")),
)


def _dsm_backward(ctx, grad):
    fp, fm, noise, sigma, seed = ctx.saved_tensors
    args = (grad, fp, fm, noise, sigma, seed, ctx.eps, ctx.kind, ctx.dim_scale)
    gp, gm = _ops.fd_dsm_quotient_backward.default(*args)
    gnoise = _ops.fd_dsm_noise_backward.default(*args) if ctx.needs_input_grad[2] else None
    return gp, gm, gnoise, None, None, None, None, None


torch.library.register_autograd(
    "fdsm_ext::fd_dsm_quotient", _dsm_backward,
    setup_context=_setup(
        ("fp", "fm", "noise", "sigma", "seed", "eps", "kind", "dim_scale"), saved=("fp", "fm", "noise", "sigma", "seed")
    ),
)


def _stencil_perturb_backward(ctx, grad):
    gx, gv = _ops.stencil_perturb_backward.default(grad, ctx.eps, ctx.order)
    return gx, gv, None, None


torch.library.register_autograd(
    "fdsm_ext::stencil_perturb", _stencil_perturb_backward,
    setup_context=_setup((None, None, "eps", "order")),
)


def _stencil_combine_backward(ctx, grad):
    (f,) = ctx.saved_tensors
    return _ops.stencil_combine_backward.default(grad, f, ctx.eps, ctx.order), None, None


torch.library.register_autograd(
    "fdsm_ext::stencil_combine", _stencil_combine_backward,
    setup_context=_setup(("f", "eps", "order"), saved=("f",)),
)

