"""``fd_divergence`` and its backward: the FD estimate of ``tr(ds/dx)`` per direction (docs/math.md, FD divergence).

Forward: ``div[k, i] = c sum_j v_kij (s+_kij - s-_kij)`` with ``c = d / (2 eps^2)``; ``sp = s(x + v)``,
``sm = s(x - v)`` ``(n, B, d)`` (any strides), ``v`` regenerated from ``seed``; result ``(n, B)`` in the
loss dtype. Backward: ``d/ds+ = g c v``, ``d/ds- = -g c v``, in the inputs' dtype (linear in ``sp``, ``sm``:
only their shape and dtype are used).

One program per block of direction rows ``k B + i`` in both. The forward sums the row's products in
float32 (float64 for float64 inputs) over tiles, then scales by ``c`` in float64; the C++ kernels sum in
float64 throughout, so float32 results agree to rounding, not bitwise (as :mod:`.fd_ssm_vr`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .philox import directions_setup, directions_tile, stream_key


@triton.jit
def fd_divergence_elem(sp, sm, v):
    """FD divergence per element (docs/math.md "FD divergence"), the twin of fd_math.h's: ``v (s+ - s-)``;
    the row's sum times ``d / (2 eps^2)`` is the divergence. Here, not in fd_math.py: no other op uses it."""
    return v * (sp - sm)


@triton.jit(do_not_specialize=C.WORD_ARGS + ["c_lo", "c_hi"])
def _divergence_kernel(sp_ptr, sm_ptr, out_ptr, n, B, d, spk, spb, spd, smk, smb, smd, seed_lo: tl.uint32,
                       seed_hi: tl.uint32, off_lo: tl.uint32, off_hi: tl.uint32, eps_lo: tl.uint32, eps_hi: tl.uint32,
                       fixed_lo: tl.uint32, fixed_hi: tl.uint32, c_lo: tl.uint32, c_hi: tl.uint32,
                       KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       ONE_TILE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # direction rows sl * B + i
    rmask = r < n * B
    sl = r // B
    i = r % B
    rows = r.to(tl.uint32)
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    raw0, scale = directions_setup(rows, d, key, C.f64(eps_lo, eps_hi), C.f64(fixed_lo, fixed_hi), KIND, BLOCK_D,
                                   ONE_TILE)
    scale = scale.to(ACC)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for col0 in range(0, d, BLOCK_D):
        cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = rmask[:, None] & (cols[None, :] < d)
        v = directions_tile(raw0, rows, col0, key, KIND, BLOCK_D, ONE_TILE).to(ACC) * scale[:, None]
        p = tl.load(sp_ptr + sl[:, None] * spk + i[:, None] * spb + cols[None, :] * spd, mask=mask).to(ACC)
        m = tl.load(sm_ptr + sl[:, None] * smk + i[:, None] * smb + cols[None, :] * smd, mask=mask).to(ACC)
        acc += fd_divergence_elem(p, m, v)  # masked elements add 0: p = m = 0 there
    total = tl.sum(acc, axis=1).to(tl.float64) * C.f64(c_lo, c_hi)
    tl.store(out_ptr + r, total.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=C.WORD_ARGS + ["c_lo", "c_hi"])
def _divergence_backward_kernel(g_ptr, gp_ptr, gm_ptr, n, B, d, sgk, sgb, seed_lo: tl.uint32, seed_hi: tl.uint32,
                                off_lo: tl.uint32, off_hi: tl.uint32, eps_lo: tl.uint32, eps_hi: tl.uint32,
                                fixed_lo: tl.uint32, fixed_hi: tl.uint32, c_lo: tl.uint32, c_hi: tl.uint32,
                                KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                                ONE_TILE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n * B
    rows = r.to(tl.uint32)
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    # g rounded to the loss dtype first, then g c in float64, rounded once: as the C++ kernels
    g = tl.load(g_ptr + (r // B) * sgk + (r % B) * sgb, mask=rmask).to(ACC).to(tl.float64)
    gc = (g * C.f64(c_lo, c_hi)).to(ACC)
    raw0, scale = directions_setup(rows, d, key, C.f64(eps_lo, eps_hi), C.f64(fixed_lo, fixed_hi), KIND, BLOCK_D,
                                   ONE_TILE)
    scale = scale.to(ACC)
    for col0 in range(0, d, BLOCK_D):
        cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = rmask[:, None] & (cols[None, :] < d)
        v = directions_tile(raw0, rows, col0, key, KIND, BLOCK_D, ONE_TILE).to(ACC) * scale[:, None]
        dp = gc[:, None] * v
        out = r[:, None] * d + cols[None, :]
        tl.store(gp_ptr + out, dp.to(gp_ptr.dtype.element_ty), mask=mask)
        tl.store(gm_ptr + out, (-dp).to(gm_ptr.dtype.element_ty), mask=mask)


def _args(d: int, seed: Tensor, eps: float, kind: int):
    """The kernels' shared scalar arguments, after the size arguments and strides."""
    return (*C.read_seed(seed), *C.f64_words(eps), *C.f64_words(C.fixed_scale(kind, eps, d)),
            *C.f64_words(d / (2.0 * eps * eps)))


@C.kernel("fd_divergence")
def fd_divergence(sp: Tensor, sm: Tensor, seed: Tensor, eps: float, kind: int) -> Tensor:
    """FD divergence ``d/(2 eps^2) v_k^T (s+ - s-)`` per slice and sample: ``(n, B)``.

    ``sp = s(x+v)``, ``sm = s(x-v)`` ``(n, B, d)``; ``v`` is regenerated from ``seed`` (as perturb drew it).
    """
    n, B, d = sp.shape
    out = C.new_output((n, B), C.loss_dtype(sp.dtype), sp.device)
    if out.numel() == 0:
        return out
    if d == 0:  # empty samples: a sum over no elements
        return out.zero_()
    block_r, block_d = C.row_tiles(n * B, d)
    with C.device_guard(sp):
        _divergence_kernel[(triton.cdiv(n * B, block_r),)](
            sp, sm, out, n, B, d, *sp.stride(), *sm.stride(), *_args(d, seed, eps, kind), KIND=kind,
            ACC=C.acc_tl(sp.dtype), BLOCK_R=block_r, BLOCK_D=block_d, ONE_TILE=d <= block_d, **C.LAUNCH_OPTIONS)
    return out


@C.kernel("fd_divergence_backward", bitwise=(torch.float32, torch.float64))
def fd_divergence_backward(grad: Tensor, sp: Tensor, sm: Tensor, seed: Tensor, eps: float,
                           kind: int) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`fd_divergence` w.r.t. ``(sp, sm)``, each ``(n, B, d)``, given ``grad`` ``(n, B)``."""
    n, B, d = sp.shape
    gp, gm = C.new_output(sp.shape, sp.dtype, sp.device), C.new_output(sm.shape, sm.dtype, sm.device)
    if gp.numel() == 0:
        return gp, gm
    block_r, block_d = C.row_tiles(n * B, d)
    with C.device_guard(sp):
        _divergence_backward_kernel[(triton.cdiv(n * B, block_r),)](
            grad, gp, gm, n, B, d, *grad.stride(), *_args(d, seed, eps, kind), KIND=kind, ACC=C.acc_tl(sp.dtype),
            BLOCK_R=block_r, BLOCK_D=block_d, ONE_TILE=d <= block_d, **C.LAUNCH_OPTIONS)
    return gp, gm
