"""``fd_ssm_quotient`` and its backward: the per-sample FD-SSM loss of a log-density (MATH.md, FD-SSM).

Forward: ``l_i = c sum_k [(f+_ki - f-_ki)^2 / 8 + (f+_ki + f-_ki - 2 f0_i)]`` with
``c = dim_scale / eps^2 / n``; ``f0`` ``(B,)``, ``fp``/``fm`` ``(n, B)`` (any strides, one float dtype),
result ``(B,)`` in the loss dtype (float32 for half/bfloat16). Backward: with ``gc = grad_i c``,
``d/df0 = -2 n gc``, ``d/df+ = gc ((f+ - f-)/4 + 1)``, ``d/df- = gc ((f- - f+)/4 + 1)``, in the inputs' dtype.
Accumulated in float32 (float64 for float64), slices summed in order as the C++ kernel does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C


@triton.jit(do_not_specialize=["c_lo", "c_hi"])
def _quotient_kernel(f0_ptr, fp_ptr, fm_ptr, out_ptr, n, B, s0, spk, spb, smk, smb, c_lo: tl.uint32,
                     c_hi: tl.uint32, ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    f0 = tl.load(f0_ptr + i * s0, mask=mask).to(ACC)
    total = tl.zeros([BLOCK], dtype=ACC)
    for k in range(n):
        p = tl.load(fp_ptr + k * spk + i * spb, mask=mask).to(ACC)
        m = tl.load(fm_ptr + k * smk + i * smb, mask=mask).to(ACC)
        diff = p - m
        total += diff * diff * 0.125 + ((p + m) - 2.0 * f0)
    tl.store(out_ptr + i, C.f64(c_lo, c_hi).to(ACC) * total, mask=mask)


@triton.jit(do_not_specialize=["c_lo", "c_hi"])
def _quotient_backward_kernel(g_ptr, fp_ptr, fm_ptr, g0_ptr, gp_ptr, gm_ptr, n, B, sg, spk, spb, smk, smb,
                              c_lo: tl.uint32, c_hi: tl.uint32, ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    gc = tl.load(g_ptr + i * sg, mask=mask).to(ACC) * C.f64(c_lo, c_hi).to(ACC)
    n_acc = tl.zeros([BLOCK], dtype=ACC) + n  # (an int argument may arrive as the constexpr 1)
    tl.store(g0_ptr + i, (gc * -2.0 * n_acc).to(g0_ptr.dtype.element_ty), mask=mask)
    for k in range(n):
        p = tl.load(fp_ptr + k * spk + i * spb, mask=mask).to(ACC)
        m = tl.load(fm_ptr + k * smk + i * smb, mask=mask).to(ACC)
        tl.store(gp_ptr + k * B + i, (gc * ((p - m) * 0.25 + 1.0)).to(gp_ptr.dtype.element_ty), mask=mask)
        tl.store(gm_ptr + k * B + i, (gc * ((m - p) * 0.25 + 1.0)).to(gm_ptr.dtype.element_ty), mask=mask)


def _check(f0: Tensor, fp: Tensor, fm: Tensor, eps: float) -> None:
    C.check_float(f0, "f0")
    C.check_eps(eps)
    if f0.dim() != 1:
        C._fail(f"fdsm_ext.fd_ssm_quotient: `f0` must be 1-D (batch,), got {list(f0.shape)}")
    if fp.dim() != 2 or fp.shape[1] != f0.shape[0]:
        C._fail(f"fdsm_ext.fd_ssm_quotient: `fp` must be (n_slices, batch) = (n, {f0.shape[0]}), got {list(fp.shape)}")
    C.check_shape(fm, "fm", fp.shape)
    C.check_same(f0, "f0", fp, "fp")
    C.check_same(f0, "f0", fm, "fm")
    C.check_device(f0, "f0")


def _scale(eps: float, dim_scale: float, n: int) -> tuple[int, int]:
    # n = 0 (no slices): the C++ kernel's double division gives inf, and its results NaN; so do these
    return C.f64_words(dim_scale / (eps * eps) / n if n else math.inf)


@torch.library.custom_op("fdsm_ext_triton::fd_ssm_quotient", mutates_args=())
def fd_ssm_quotient(f0: Tensor, fp: Tensor, fm: Tensor, eps: float, dim_scale: float) -> Tensor:
    """Per-sample FD-SSM loss ``dim_scale/eps^2 * mean_k [(f+ - f-)^2/8 + f+ + f- - 2 f0]``: ``(B,)``.

    ``f0`` ``(B,)``, ``fp`` and ``fm`` ``(n, B)``; float32 result for half/bfloat16 inputs.
    """
    _check(f0, fp, fm, eps)
    n, B = fp.shape
    out = C.new_output((B,), C.loss_dtype(f0.dtype), f0.device)
    if B == 0:
        return out
    block = C.vector_block(B)
    with C.device_guard(f0):
        _quotient_kernel[(triton.cdiv(B, block),)](
            f0, fp, fm, out, n, B, f0.stride(0), fp.stride(0), fp.stride(1), fm.stride(0), fm.stride(1),
            *_scale(eps, dim_scale, n), ACC=C.acc_tl(f0.dtype), BLOCK=block, **C.LAUNCH_OPTIONS)
    return out


@fd_ssm_quotient.register_fake
def _(f0, fp, fm, eps, dim_scale):
    return f0.new_empty(f0.shape, dtype=C.loss_dtype(f0.dtype))


@torch.library.custom_op("fdsm_ext_triton::fd_ssm_quotient_backward", mutates_args=())
def fd_ssm_quotient_backward(grad: Tensor, f0: Tensor, fp: Tensor, fm: Tensor, eps: float,
                             dim_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`fd_ssm_quotient` w.r.t. ``(f0, fp, fm)`` given ``grad`` ``(B,)`` of its output."""
    _check(f0, fp, fm, eps)
    n, B = fp.shape
    C.check_shape(grad, "grad", (B,))
    C.check_same_device(grad, "grad", f0, "f0")
    g0, gp, gm = (C.new_output(t.shape, t.dtype, t.device) for t in (f0, fp, fm))
    if B == 0:
        return g0, gp, gm
    block = C.vector_block(B)
    with C.device_guard(f0):
        _quotient_backward_kernel[(triton.cdiv(B, block),)](
            grad, fp, fm, g0, gp, gm, n, B, grad.stride(0), fp.stride(0), fp.stride(1), fm.stride(0), fm.stride(1),
            *_scale(eps, dim_scale, n), ACC=C.acc_tl(f0.dtype), BLOCK=block, **C.LAUNCH_OPTIONS)
    return g0, gp, gm


@fd_ssm_quotient_backward.register_fake
def _(grad, f0, fp, fm, eps, dim_scale):
    return f0.new_empty(f0.shape), fp.new_empty(fp.shape), fm.new_empty(fm.shape)


def _setup(ctx, inputs, output):
    f0, fp, fm, ctx.eps, ctx.dim_scale = inputs
    ctx.save_for_backward(f0, fp, fm)


def _backward(ctx, grad):
    f0, fp, fm = ctx.saved_tensors
    g0, gp, gm = fd_ssm_quotient_backward(grad, f0, fp, fm, ctx.eps, ctx.dim_scale)
    return g0, gp, gm, None, None


fd_ssm_quotient.register_autograd(_backward, setup_context=_setup)
