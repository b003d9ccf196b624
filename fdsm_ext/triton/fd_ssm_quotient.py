"""``fd_ssm_quotient`` and its backward: the per-sample FD-SSM loss of a log-density (docs/math.md, FD-SSM).

Forward: ``l_i = c sum_k [(f+_ki - f-_ki)^2 / 8 + (f+_ki + f-_ki - 2 f0_i)]`` with
``c = dim_scale / eps^2 / n``; ``f0`` ``(B,)``, ``fp``/``fm`` ``(n, B)`` (any strides, one float dtype),
result ``(B,)`` in the loss dtype (float32 for half/bfloat16). Backward: with ``gc = grad_i c``,
``d/df0 = -2 n gc``, ``d/df+ = gc ((f+ - f-)/4 + 1)``, ``d/df- = gc ((f- - f+)/4 + 1)``, in the inputs' dtype.
Accumulated in float32 (float64 for float64), slices summed in order as the C++ kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .fd_math import fd_ssm_dfm, fd_ssm_dfp, fd_ssm_term


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
        total += fd_ssm_term(f0, p, m)
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
        tl.store(gp_ptr + k * B + i, (gc * fd_ssm_dfp(p, m)).to(gp_ptr.dtype.element_ty), mask=mask)
        tl.store(gm_ptr + k * B + i, (gc * fd_ssm_dfm(p, m)).to(gm_ptr.dtype.element_ty), mask=mask)


def _scale(eps: float, dim_scale: float, n: int) -> tuple[int, int]:
    return C.f64_words(dim_scale / (eps * eps) / n)


@C.kernel("fd_ssm_quotient", bitwise=(torch.float32, torch.float64))
def fd_ssm_quotient(f0: Tensor, fp: Tensor, fm: Tensor, eps: float, dim_scale: float) -> Tensor:
    """Per-sample FD-SSM loss ``dim_scale/eps^2 * mean_k [(f+ - f-)^2/8 + f+ + f- - 2 f0]``: ``(B,)``.

    ``f0`` ``(B,)``, ``fp`` and ``fm`` ``(n, B)``; float32 result for half/bfloat16 inputs.
    """
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


@C.kernel("fd_ssm_quotient_backward")
def fd_ssm_quotient_backward(grad: Tensor, f0: Tensor, fp: Tensor, fm: Tensor, eps: float,
                             dim_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`fd_ssm_quotient` w.r.t. ``(f0, fp, fm)`` given ``grad`` ``(B,)`` of its output."""
    n, B = fp.shape
    g0, gp, gm = (C.new_output(t.shape, t.dtype, t.device) for t in (f0, fp, fm))
    if B == 0:
        return g0, gp, gm
    block = C.vector_block(B)
    with C.device_guard(f0):
        _quotient_backward_kernel[(triton.cdiv(B, block),)](
            grad, fp, fm, g0, gp, gm, n, B, grad.stride(0), fp.stride(0), fp.stride(1), fm.stride(0), fm.stride(1),
            *_scale(eps, dim_scale, n), ACC=C.acc_tl(f0.dtype), BLOCK=block, **C.LAUNCH_OPTIONS)
    return g0, gp, gm
