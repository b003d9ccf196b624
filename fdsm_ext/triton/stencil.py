"""The order-T central stencil (paper Appendix C.1, Algorithm 1): ``stencil_perturb``, ``stencil_combine``
and their backwards.

``D_v^T f(x) ~ sum_t w_t f(x + s_t v)`` with shifts ``s_t = (T - 2t) eps`` and weights
``w_t = (-1)^t C(T, t) / (2 eps)^T``, ``t = 0..T``, both computed in float64 in-kernel by the
operations of fd_math.h (``stencil_shift``, ``stencil_weight``), so they are bitwise the C++ values.

- ``stencil_perturb(x, v)``: rows ``t*B + i`` of the ``((T+1) B, d)`` result hold ``x_i + s_t v_i``
  (accumulation dtype, stored in x's dtype); backward ``gx = sum_t g_t``, ``gv = sum_t s_t g_t``.
- ``stencil_combine(f)``: ``f`` ``(T+1, B)`` -> ``sum_t w_t f[t]`` ``(B,)`` summed in float64, stored in the
  loss dtype; backward ``g_f[t, i] = w_t g_i``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .fd_math import stencil_shift, stencil_weight


@triton.jit(do_not_specialize=["eps_lo", "eps_hi"])
def _stencil_perturb_kernel(x_ptr, v_ptr, out_ptr, order, B, d, sxb, sxd, svb, svd, eps_lo: tl.uint32,
                            eps_hi: tl.uint32, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = (i < B)[:, None] & (cols < d)[None, :]
    x = tl.load(x_ptr + i[:, None] * sxb + cols[None, :] * sxd, mask=mask).to(ACC)
    v = tl.load(v_ptr + i[:, None] * svb + cols[None, :] * svd, mask=mask).to(ACC)
    eps = C.f64(eps_lo, eps_hi)
    for t in range(order + 1):
        shift = stencil_shift(order, t, eps).to(ACC)
        tl.store(out_ptr + (t * B + i)[:, None] * d + cols[None, :], (x + shift * v).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=["eps_lo", "eps_hi"])
def _stencil_perturb_backward_kernel(g_ptr, gx_ptr, gv_ptr, order, B, d, sgr, sgd, eps_lo: tl.uint32,
                                     eps_hi: tl.uint32, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                                     BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = (i < B)[:, None] & (cols < d)[None, :]
    eps = C.f64(eps_lo, eps_hi)
    sx = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    sv = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for t in range(order + 1):
        g = tl.load(g_ptr + (t * B + i)[:, None] * sgr + cols[None, :] * sgd, mask=mask).to(ACC)
        sx += g
        sv += stencil_shift(order, t, eps).to(ACC) * g
    out = i[:, None] * d + cols[None, :]
    tl.store(gx_ptr + out, sx.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gv_ptr + out, sv.to(gv_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["eps_lo", "eps_hi"])
def _stencil_combine_kernel(f_ptr, out_ptr, order, B, sft, sfb, eps_lo: tl.uint32, eps_hi: tl.uint32,
                            ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    eps = C.f64(eps_lo, eps_hi)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for t in range(order + 1):
        f = tl.load(f_ptr + t * sft + i * sfb, mask=mask).to(ACC).to(tl.float64)
        total += stencil_weight(order, t, eps) * f
    tl.store(out_ptr + i, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["eps_lo", "eps_hi"])
def _stencil_combine_backward_kernel(g_ptr, out_ptr, order, B, sg, eps_lo: tl.uint32, eps_hi: tl.uint32,
                                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    eps = C.f64(eps_lo, eps_hi)
    g = tl.load(g_ptr + i * sg, mask=mask).to(tl.float64)
    for t in range(order + 1):
        # float64 -> accumulation dtype -> f's dtype, as the C++ kernel's static_cast does for half types
        tl.store(out_ptr + t * B + i, (stencil_weight(order, t, eps) * g).to(ACC).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _grid2(rows: int, d: int):
    block_r, block_d = C.row_tiles(rows, d)
    return (triton.cdiv(rows, block_r), C.column_grid(d, block_d)), block_r, block_d


@C.kernel("stencil_perturb", bitwise=(torch.float32, torch.float64))
def stencil_perturb(x: Tensor, v: Tensor, eps: float, order: int) -> Tensor:
    """Rows ``t*B + i`` hold ``x_i + (T - 2t) eps v_i`` for ``t = 0..T``: ``((T+1) B, d)`` in x's dtype."""
    B, d = x.shape
    out = C.new_output(((order + 1) * B, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    grid, block_r, block_d = _grid2(B, d)
    with C.device_guard(x):
        _stencil_perturb_kernel[grid](x, v, out, order, B, d, *x.stride(), *v.stride(), *C.f64_words(eps),
                                      ACC=C.acc_tl(x.dtype), BLOCK_R=block_r, BLOCK_D=block_d, **C.LAUNCH_OPTIONS)
    return out


@C.kernel("stencil_perturb_backward")
def stencil_perturb_backward(grad: Tensor, eps: float, order: int) -> tuple[Tensor, Tensor]:
    """``(gx, gv)``, each ``(B, d)``: ``sum_t g_t`` and ``sum_t (T - 2t) eps g_t`` for ``grad`` ``((T+1) B, d)``."""
    B, d = grad.shape[0] // (order + 1), grad.shape[1]
    gx, gv = C.new_output((B, d), grad.dtype, grad.device), C.new_output((B, d), grad.dtype, grad.device)
    if gx.numel() == 0:
        return gx, gv
    grid, block_r, block_d = _grid2(B, d)
    with C.device_guard(grad):
        _stencil_perturb_backward_kernel[grid](grad, gx, gv, order, B, d, *grad.stride(), *C.f64_words(eps),
                                               ACC=C.acc_tl(grad.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
                                               **C.LAUNCH_OPTIONS)
    return gx, gv


@C.kernel("stencil_combine")
def stencil_combine(f: Tensor, eps: float, order: int) -> Tensor:
    """``(2 eps)^-T sum_t (-1)^t C(T, t) f[t]`` for ``f`` ``(T+1, B)``: ``(B,)`` in the loss dtype."""
    B = f.shape[1]
    out = C.new_output((B,), C.loss_dtype(f.dtype), f.device)
    if B == 0:
        return out
    block = C.vector_block(B)
    with C.device_guard(f):
        _stencil_combine_kernel[(triton.cdiv(B, block),)](f, out, order, B, *f.stride(), *C.f64_words(eps),
                                                         ACC=C.acc_tl(f.dtype), BLOCK=block, **C.LAUNCH_OPTIONS)
    return out


@C.kernel("stencil_combine_backward", bitwise=(torch.float32, torch.float64))
def stencil_combine_backward(grad: Tensor, f: Tensor, eps: float, order: int) -> Tensor:
    """``g_f[t, i] = w_t grad_i``: ``(T+1, B)`` in f's dtype."""
    B = f.shape[1]
    out = C.new_output(f.shape, f.dtype, f.device)
    if B == 0:
        return out
    block = C.vector_block(B)
    with C.device_guard(f):
        _stencil_combine_backward_kernel[(triton.cdiv(B, block),)](grad, out, order, B, grad.stride(0),
                                                                  *C.f64_words(eps), ACC=C.acc_tl(f.dtype), BLOCK=block,
                                                                  **C.LAUNCH_OPTIONS)
    return out
