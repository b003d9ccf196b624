"""``fd_dsm_quotient`` and its backwards: the per-sample FD-DSM loss (docs/math.md, "FD-DSM").

Per sample ``i`` and slice ``k``, with ``v`` regenerated from ``seed``:
``r_ki = (f+_ki - f-_ki)/2 + v_ki^T noise_i / sigma_i^2`` and ``l_i = 1/n sum_k c/2 r_ki^2``,
``c = dim_scale / eps^2``. ``fp``/``fm`` ``(n, B)``, ``noise = x~ - x`` ``(B, d)``, ``sigma`` ``(B,)``
(any strides and float dtypes for noise/sigma; converted to the accumulation dtype of ``fp``).
Backward: ``d/df+ = -d/df- = g_i/n c r_ki / 2``; ``d/dnoise_i = sum_k g_i/n c r_ki / sigma_i^2 v_ki``.

One row kernel serves the three ops (``MODE``, with a named output each), one program per block of samples
looping over slices, each slice's residual from one helper (``_slice_residual``); the noise gradient first
stores each row's coefficient and direction scale, then a second kernel tiled over (samples, columns) sums
``coef * v`` over slices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .fd_math import fd_dsm_residual
from .philox import directions_setup, directions_tile, raw_directions, stream_key

_LOSS = tl.constexpr(0)
_GRAD_F = tl.constexpr(1)
_NOISE_COEF = tl.constexpr(2)


@triton.jit
def _slice_residual(fp_ptr, fm_ptr, noise_ptr, i, imask, sl, B, d, spk, spb, smk, smb, swb, swd, sig2, key, eps,
                    fixed, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    ONE_TILE: tl.constexpr):
    """``(r, scale)`` of slice ``sl`` for the samples ``i``: the FD-DSM residual and the direction rows' scale."""
    rows = (sl * B + i).to(tl.uint32)
    raw0, scale = directions_setup(rows, d, key, eps, fixed, KIND, BLOCK_D, ONE_TILE)
    scale = scale.to(ACC)
    proj = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for col0 in range(0, d, BLOCK_D):
        cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = imask[:, None] & (cols[None, :] < d)
        v = directions_tile(raw0, rows, col0, key, KIND, BLOCK_D, ONE_TILE).to(ACC) * scale[:, None]
        w = tl.load(noise_ptr + i[:, None] * swb + cols[None, :] * swd, mask=mask).to(ACC)
        proj += v * w
    p = tl.load(fp_ptr + sl * spk + i * spb, mask=imask).to(ACC)
    m = tl.load(fm_ptr + sl * smk + i * smb, mask=imask).to(ACC)
    return fd_dsm_residual(p, m, tl.sum(proj, axis=1), sig2), scale


@triton.jit(do_not_specialize=C.WORD_ARGS + ["c_lo", "c_hi"])
def _dsm_rows_kernel(fp_ptr, fm_ptr, noise_ptr, sigma_ptr, g_ptr, loss_ptr, gp_ptr, gm_ptr, coef_ptr, scale_ptr, n, B,
                     d, spk, spb, smk, smb, swb, swd, ssig, sg, seed_lo: tl.uint32, seed_hi: tl.uint32,
                     off_lo: tl.uint32, off_hi: tl.uint32, eps_lo: tl.uint32, eps_hi: tl.uint32, fixed_lo: tl.uint32,
                     fixed_hi: tl.uint32, c_lo: tl.uint32, c_hi: tl.uint32, KIND: tl.constexpr, ACC: tl.constexpr,
                     MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    # One pass over the slices of a block of samples; MODE picks what it writes (the other pointers are
    # unused): _LOSS the loss (B,); _GRAD_F d/df+ and d/df- (n, B); _NOISE_COEF, per (slice, sample), the noise
    # gradient's coefficient g_i/n c r / sigma^2 and the direction's scale, for _dsm_noise_kernel.
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    imask = i < B
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    eps = C.f64(eps_lo, eps_hi)
    fixed = C.f64(fixed_lo, fixed_hi)
    c = C.f64(c_lo, c_hi).to(ACC)
    sigma = tl.load(sigma_ptr + i * ssig, mask=imask, other=1.0).to(ACC)
    sig2 = sigma * sigma
    n_acc = tl.zeros([BLOCK_R], dtype=ACC) + n
    if MODE != _LOSS:
        gi = C.div(tl.load(g_ptr + i * sg, mask=imask).to(ACC), n_acc)
    total = tl.zeros([BLOCK_R], dtype=ACC)
    for sl in range(n):
        res, scale = _slice_residual(fp_ptr, fm_ptr, noise_ptr, i, imask, sl, B, d, spk, spb, smk, smb, swb, swd, sig2,
                                     key, eps, fixed, KIND, ACC, BLOCK_R, BLOCK_D, ONE_TILE)
        if MODE == _LOSS:
            total += c * res * res
        elif MODE == _GRAD_F:
            dr = gi * c * res * 0.5
            tl.store(gp_ptr + sl * B + i, dr.to(gp_ptr.dtype.element_ty), mask=imask)
            tl.store(gm_ptr + sl * B + i, (-dr).to(gm_ptr.dtype.element_ty), mask=imask)
        else:
            tl.store(coef_ptr + sl * B + i, C.div(gi * c * res, sig2), mask=imask)
            tl.store(scale_ptr + sl * B + i, scale, mask=imask)
    if MODE == _LOSS:
        tl.store(loss_ptr + i, C.div(total, n_acc), mask=imask)


@triton.jit(do_not_specialize=C.WORD_ARGS[:4])
def _dsm_noise_kernel(coef_ptr, scale_ptr, out_ptr, n, B, d, seed_lo: tl.uint32, seed_hi: tl.uint32,
                      off_lo: tl.uint32, off_hi: tl.uint32, KIND: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    imask = i < B
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    col0 = tl.program_id(1) * BLOCK_D
    cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for sl in range(n):
        coef = tl.load(coef_ptr + sl * B + i, mask=imask, other=0.0)
        scale = tl.load(scale_ptr + sl * B + i, mask=imask, other=0.0)
        raw = raw_directions((sl * B + i).to(tl.uint32), col0, key, KIND, BLOCK_D)
        acc += coef[:, None] * (raw.to(ACC) * scale[:, None])
    mask = imask[:, None] & (cols[None, :] < d)
    tl.store(out_ptr + i[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rows(mode, grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale, loss=None, gp=None, gm=None, coef=None,
                 scale=None):
    """One pass of _dsm_rows_kernel; the outputs ``mode`` does not write are None."""
    mode = mode.value  # the kernels' constexpr, as a plain int on the host
    n, B = fp.shape
    d = noise.shape[1]
    block_r, block_d = C.row_tiles(B, d)
    g = grad if grad is not None else fp  # an unused pointer for the loss
    c = (0.5 if mode == _LOSS.value else 1.0) * dim_scale / (eps * eps)
    with C.device_guard(fp):
        _dsm_rows_kernel[(triton.cdiv(B, block_r),)](
            fp, fm, noise, sigma, g, loss, gp, gm, coef, scale, n, B, d, *fp.stride(), *fm.stride(), *noise.stride(),
            sigma.stride(0), g.stride(0) if grad is not None else 0, *C.read_seed(seed), *C.f64_words(eps),
            *C.f64_words(C.fixed_scale(kind, eps, d)), *C.f64_words(c), KIND=kind, ACC=C.acc_tl(fp.dtype),
            MODE=mode, BLOCK_R=block_r, BLOCK_D=block_d, ONE_TILE=d <= block_d, **C.LAUNCH_OPTIONS)


@C.kernel("fd_dsm_quotient")
def fd_dsm_quotient(fp: Tensor, fm: Tensor, noise: Tensor, sigma: Tensor, seed: Tensor, eps: float, kind: int,
                    dim_scale: float) -> Tensor:
    """Per-sample FD-DSM loss ``1/n sum_k dim_scale/(2 eps^2) [(f+ - f-)/2 + v_k^T noise / sigma^2]^2``: ``(B,)``.

    ``fp``, ``fm`` ``(n, B)`` at ``x~ +- v``; ``noise = x~ - x`` ``(B, d)``; ``sigma`` ``(B,)``, not differentiated.
    """
    out = C.new_output((fp.shape[1],), C.loss_dtype(fp.dtype), fp.device)
    if out.numel():
        _launch_rows(_LOSS, None, fp, fm, noise, sigma, seed, eps, kind, dim_scale, loss=out)
    return out


@C.kernel("fd_dsm_quotient_backward")
def fd_dsm_quotient_backward(grad: Tensor, fp: Tensor, fm: Tensor, noise: Tensor, sigma: Tensor, seed: Tensor,
                             eps: float, kind: int, dim_scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`fd_dsm_quotient` w.r.t. ``(fp, fm)``, each ``(n, B)``, given ``grad`` ``(B,)``."""
    gp, gm = C.new_output(fp.shape, fp.dtype, fp.device), C.new_output(fm.shape, fm.dtype, fm.device)
    if gp.numel():
        _launch_rows(_GRAD_F, grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale, gp=gp, gm=gm)
    return gp, gm


@C.kernel("fd_dsm_noise_backward")
def fd_dsm_noise_backward(grad: Tensor, fp: Tensor, fm: Tensor, noise: Tensor, sigma: Tensor, seed: Tensor,
                          eps: float, kind: int, dim_scale: float) -> Tensor:
    """Gradient of :func:`fd_dsm_quotient` w.r.t. ``noise`` ``(B, d)`` (in noise's dtype), given ``grad`` ``(B,)``."""
    n, B = fp.shape
    d = noise.shape[1]
    out = C.new_output(noise.shape, noise.dtype, noise.device)
    if out.numel() == 0:
        return out
    acc = C.acc_dtype(fp.dtype)
    coef, scale = torch.empty((n, B), dtype=acc, device=fp.device), torch.empty((n, B), dtype=acc, device=fp.device)
    _launch_rows(_NOISE_COEF, grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale, coef=coef, scale=scale)
    block_r, block_d = C.row_tiles(B, d)
    with C.device_guard(fp):
        _dsm_noise_kernel[(triton.cdiv(B, block_r), C.column_grid(d, block_d))](
            coef, scale, out, n, B, d, *C.read_seed(seed), KIND=kind, ACC=C.TL_DTYPE[acc], BLOCK_R=block_r,
            BLOCK_D=block_d, **C.LAUNCH_OPTIONS)
    return out
