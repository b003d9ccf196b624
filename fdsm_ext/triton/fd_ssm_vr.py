"""``fd_ssm_vr`` and its backward: the per-sample FD-SSM-VR loss of a score network (docs/math.md, FD-SSM-VR).

Forward: ``l_i = 1/n sum_k sum_j [(s+ + s-)^2 / 8 + k v_kij (s+ - s-)]`` with ``k = dim_scale / (2 eps^2)``;
``sp = s(x + v)``, ``sm = s(x - v)`` ``(n, B, d)`` (any strides), ``v`` regenerated from ``seed``; result
``(B,)`` in the loss dtype. Backward: ``d/ds+ = g_i/n ((s+ + s-)/4 + k v)``,
``d/ds- = g_i/n ((s+ + s-)/4 - k v)``, in the inputs' dtype.

Forward: one program per block of samples, looping over the slices and the row's column tiles with a
tile-shaped accumulator reduced once at the end. Backward: one program per block of direction rows.
Accumulation in float32 (float64 for float64 inputs); the C++ kernel sums in float64 throughout, so
float32 results agree to rounding, not bitwise.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .fd_math import fd_ssm_vr_dsm, fd_ssm_vr_dsp, fd_ssm_vr_elem
from .philox import directions_setup, directions_tile, stream_key


@triton.jit(do_not_specialize=C.WORD_ARGS + ["k_lo", "k_hi"])
def _vr_kernel(sp_ptr, sm_ptr, out_ptr, n, B, d, spk, spb, spd, smk, smb, smd, seed_lo: tl.uint32, seed_hi: tl.uint32,
               off_lo: tl.uint32, off_hi: tl.uint32, eps_lo: tl.uint32, eps_hi: tl.uint32, fixed_lo: tl.uint32,
               fixed_hi: tl.uint32, k_lo: tl.uint32, k_hi: tl.uint32, KIND: tl.constexpr, ACC: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    imask = i < B
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    k = C.f64(k_lo, k_hi).to(ACC)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for sl in range(n):
        rows = (sl * B + i).to(tl.uint32)
        raw0, scale = directions_setup(rows, d, key, C.f64(eps_lo, eps_hi), C.f64(fixed_lo, fixed_hi), KIND, BLOCK_D,
                                       ONE_TILE)
        scale = scale.to(ACC)
        for col0 in range(0, d, BLOCK_D):
            cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            mask = imask[:, None] & (cols[None, :] < d)
            v = directions_tile(raw0, rows, col0, key, KIND, BLOCK_D, ONE_TILE).to(ACC) * scale[:, None]
            p = tl.load(sp_ptr + sl * spk + i[:, None] * spb + cols[None, :] * spd, mask=mask).to(ACC)
            m = tl.load(sm_ptr + sl * smk + i[:, None] * smb + cols[None, :] * smd, mask=mask).to(ACC)
            acc += fd_ssm_vr_elem(p, m, v, k)  # masked elements add 0: p = m = 0 there
    n_acc = tl.zeros([BLOCK_R], dtype=ACC) + n
    tl.store(out_ptr + i, C.div(tl.sum(acc, axis=1), n_acc), mask=imask)


@triton.jit(do_not_specialize=C.WORD_ARGS + ["k_lo", "k_hi"])
def _vr_backward_kernel(g_ptr, sp_ptr, sm_ptr, gp_ptr, gm_ptr, n, B, d, sg, spk, spb, spd, smk, smb, smd,
                        seed_lo: tl.uint32, seed_hi: tl.uint32, off_lo: tl.uint32, off_hi: tl.uint32, eps_lo: tl.uint32,
                        eps_hi: tl.uint32, fixed_lo: tl.uint32, fixed_hi: tl.uint32, k_lo: tl.uint32, k_hi: tl.uint32,
                        KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        ONE_TILE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # direction rows sl * B + i
    rmask = r < n * B
    sl = r // B
    i = r % B
    rows = r.to(tl.uint32)
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    k = C.f64(k_lo, k_hi).to(ACC)
    gi = C.div(tl.load(g_ptr + i * sg, mask=rmask).to(ACC), tl.zeros([BLOCK_R], dtype=ACC) + n)
    raw0, scale = directions_setup(rows, d, key, C.f64(eps_lo, eps_hi), C.f64(fixed_lo, fixed_hi), KIND, BLOCK_D,
                                   ONE_TILE)
    scale = scale.to(ACC)
    for col0 in range(0, d, BLOCK_D):
        cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = rmask[:, None] & (cols[None, :] < d)
        v = directions_tile(raw0, rows, col0, key, KIND, BLOCK_D, ONE_TILE).to(ACC) * scale[:, None]
        p = tl.load(sp_ptr + sl[:, None] * spk + i[:, None] * spb + cols[None, :] * spd, mask=mask).to(ACC)
        m = tl.load(sm_ptr + sl[:, None] * smk + i[:, None] * smb + cols[None, :] * smd, mask=mask).to(ACC)
        out = r[:, None] * d + cols[None, :]
        tl.store(gp_ptr + out, (gi[:, None] * fd_ssm_vr_dsp(p, m, v, k)).to(gp_ptr.dtype.element_ty), mask=mask)
        tl.store(gm_ptr + out, (gi[:, None] * fd_ssm_vr_dsm(p, m, v, k)).to(gm_ptr.dtype.element_ty), mask=mask)


def _args(sp: Tensor, sm: Tensor, seed: Tensor, eps: float, kind: int, dim_scale: float):
    """The kernels' shared scalar arguments, after the size arguments and strides."""
    d = sp.shape[2]
    return (*C.read_seed(seed), *C.f64_words(eps), *C.f64_words(C.fixed_scale(kind, eps, d)),
            *C.f64_words(dim_scale / (2.0 * eps * eps)))


@C.kernel("fd_ssm_vr")
def fd_ssm_vr(sp: Tensor, sm: Tensor, seed: Tensor, eps: float, kind: int, dim_scale: float) -> Tensor:
    """Per-sample FD-SSM-VR loss ``1/n sum_k ||s+ + s-||^2/8 + dim_scale/(2 eps^2) v_k^T (s+ - s-)``: ``(B,)``.

    ``sp = s(x+v)``, ``sm = s(x-v)`` ``(n, B, d)``; ``v`` is regenerated from ``seed`` (as perturb drew it).
    """
    n, B, d = sp.shape
    out = C.new_output((B,), C.loss_dtype(sp.dtype), sp.device)
    if B == 0:
        return out
    if d == 0:  # empty samples: a sum over no elements
        return out.zero_()
    block_r, block_d = C.row_tiles(B, d)
    with C.device_guard(sp):
        _vr_kernel[(triton.cdiv(B, block_r),)](
            sp, sm, out, n, B, d, *sp.stride(), *sm.stride(), *_args(sp, sm, seed, eps, kind, dim_scale),
            KIND=kind, ACC=C.acc_tl(sp.dtype), BLOCK_R=block_r, BLOCK_D=block_d, ONE_TILE=d <= block_d,
            **C.LAUNCH_OPTIONS)
    return out


@C.kernel("fd_ssm_vr_backward")
def fd_ssm_vr_backward(grad: Tensor, sp: Tensor, sm: Tensor, seed: Tensor, eps: float, kind: int,
                       dim_scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`fd_ssm_vr` w.r.t. ``(sp, sm)``, each ``(n, B, d)``, given ``grad`` ``(B,)``."""
    n, B, d = sp.shape
    gp, gm = C.new_output(sp.shape, sp.dtype, sp.device), C.new_output(sm.shape, sm.dtype, sm.device)
    if gp.numel() == 0:
        return gp, gm
    block_r, block_d = C.row_tiles(n * B, d)
    with C.device_guard(sp):
        _vr_backward_kernel[(triton.cdiv(n * B, block_r),)](
            grad, sp, sm, gp, gm, n, B, d, grad.stride(0), *sp.stride(), *sm.stride(),
            *_args(sp, sm, seed, eps, kind, dim_scale), KIND=kind, ACC=C.acc_tl(sp.dtype), BLOCK_R=block_r,
            BLOCK_D=block_d, ONE_TILE=d <= block_d, **C.LAUNCH_OPTIONS)
    return gp, gm
