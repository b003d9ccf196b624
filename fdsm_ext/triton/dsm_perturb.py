"""``dsm_perturb``: FD-DSM's noisy stacked batch ``[x~ + v_1..x~ + v_n; x~ - v_1..x~ - v_n]`` and ``v^T z / sigma``.

Schema and semantics of ``fdsm_ext::dsm_perturb`` (csrc/fd_common.h, ``FDSM_OPS``; docs/math.md, "FD-DSM"):
``x`` ``(B, d)`` (any strides, any float dtype), ``sigma`` ``(B,)`` (any float dtype, rounded to the
accumulation dtype: float32 for half/bfloat16/float32, float64 for float64). The noise ``z_i`` is the
unscaled gaussian stream row ``n B + i`` (:mod:`.philox`, after the ``n B`` direction rows), so
``x~_i = x_i + sigma_i z_i``; ``v_ki = raw * scale`` is :mod:`.perturb`'s direction row ``k B + i``. Outputs:
the stacked batch ``(2 n B, d)`` in ``x``'s dtype, and ``proj[k, i] = v_ki^T z_i / sigma_i`` ``(n, B)`` in
the accumulation (loss) dtype.

One program per block of ``BLOCK_R`` samples, looping over the slices: it writes the + and - rows of every
slice and stores each ``proj`` once, so no program shares an output. When a row fits one tile (``ONE_TILE``),
``z`` and ``x~`` are computed once per sample and kept for every slice, as the C++ kernel does; longer rows
recompute them per slice and tile (the same values: Philox is counter-based), which costs nothing extra at
``n = 1``, FD-DSM's usual slice count.

Bitwise: ``x~`` and ``x~ +- v`` are the C++ kernel's operations in its order (a multiply, then an add,
unfused), so the stacked batch is bitwise the C++ kernels' in float32 and float64. ``proj`` is not: its
products (in the accumulation dtype) are summed in float64 here as there, but as a tile-wise tree rather
than the CPU's eight interleaved partial sums, so it agrees to rounding of the float64 sum, i.e. almost
always bitwise in float32 but not by promise. ``@C.kernel``'s ``bitwise`` covers every output, so it names no
dtype; tests/triton/test_dsm_perturb.py holds the stacked batch to bitwise on its own.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .fd_math import div
from .philox import GAUSSIAN, directions_setup, directions_tile, raw_directions, stream_key


@triton.jit
def _noisy_tile(x_ptr, i, cols, mask, sxb, sxd, sigma, zrows, col0, key, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(x~, z)`` of one tile, in the accumulation dtype: ``z`` the raw gaussian stream values of ``zrows``,
    ``x~ = x + sigma z`` (the C++ kernel's multiply, then add)."""
    z = raw_directions(zrows, col0, key, GAUSSIAN, BLOCK_D).to(ACC)
    xv = tl.load(x_ptr + i[:, None] * sxb + cols[None, :] * sxd, mask=mask).to(ACC)
    return xv + sigma[:, None] * z, z


@triton.jit(do_not_specialize=C.WORD_ARGS)
def _dsm_perturb_kernel(x_ptr, sigma_ptr, out_ptr, proj_ptr, n, B, d, nb, sxb, sxd, ssig, seed_lo: tl.uint32,
                        seed_hi: tl.uint32, off_lo: tl.uint32, off_hi: tl.uint32, eps_lo: tl.uint32,
                        eps_hi: tl.uint32, fixed_lo: tl.uint32, fixed_hi: tl.uint32, KIND: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # samples
    imask = i < B
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    eps = C.f64(eps_lo, eps_hi)
    fixed = C.f64(fixed_lo, fixed_hi)
    sigma = tl.load(sigma_ptr + i * ssig, mask=imask, other=1.0).to(ACC)
    zrows = (nb + i).to(tl.uint32)  # the noise rows, after the n B direction rows
    cols0 = tl.arange(0, BLOCK_D).to(tl.int64)
    mask0 = imask[:, None] & (cols0[None, :] < d)
    if ONE_TILE:  # the whole row in one tile: z and x~ once for every slice
        xt0, z0 = _noisy_tile(x_ptr, i, cols0, mask0, sxb, sxd, sigma, zrows, 0, key, ACC, BLOCK_D)
    else:
        xt0 = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        z0 = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    r = i  # direction (stream) row k B + i of slice k; int64, so the output offsets cannot overflow
    for _ in range(n):
        rows = r.to(tl.uint32)
        raw0, scale = directions_setup(rows, d, key, eps, fixed, KIND, BLOCK_D, ONE_TILE)
        scale = scale.to(ACC)
        dot = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64)
        for col0 in range(0, d, BLOCK_D):
            cols = col0 + cols0
            mask = imask[:, None] & (cols[None, :] < d)
            if ONE_TILE:
                xt = xt0
                z = z0
            else:
                xt, z = _noisy_tile(x_ptr, i, cols, mask, sxb, sxd, sigma, zrows, col0, key, ACC, BLOCK_D)
            v = directions_tile(raw0, rows, col0, key, KIND, BLOCK_D, ONE_TILE).to(ACC) * scale[:, None]
            tl.store(out_ptr + r[:, None] * d + cols[None, :], (xt + v).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptr + (nb + r)[:, None] * d + cols[None, :], (xt - v).to(out_ptr.dtype.element_ty),
                     mask=mask)
            # each product in the accumulation dtype, summed in float64 (as the C++ kernel's row_sum); the
            # stream values past the row's end are real numbers, so masked out here
            dot += tl.where(mask, (v * z).to(tl.float64), 0.0)
        tl.store(proj_ptr + r, div(tl.sum(dot, axis=1).to(ACC), sigma), mask=imask)
        r += B


@C.kernel("dsm_perturb")
def dsm_perturb(x: Tensor, sigma: Tensor, seed: Tensor, eps: float, n_slices: int, kind: int) -> tuple[Tensor, Tensor]:
    """FD-DSM's stacked batch ``[x~ + v_1..x~ + v_n; x~ - v_1..x~ - v_n]`` ``(2 n B, d)`` in ``x``'s dtype, with
    ``x~ = x + sigma z``, and ``proj[k, i] = v_ki^T z_i / sigma_i`` ``(n, B)`` in the loss dtype.

    ``x`` ``(B, d)``, ``sigma`` ``(B,)``; ``z_i`` (the raw gaussian stream row ``n B + i``) and ``v`` (as
    :func:`.perturb.perturb`'s) are drawn in-kernel from ``seed`` (CPU int64 ``(seed, offset)``); the Triton
    twin of ``fdsm_ext.ops.dsm_perturb``, with bitwise the same stacked batch in float32 and float64.
    """
    B, d = x.shape
    nb = n_slices * B
    out = C.new_output((2 * nb, d), x.dtype, x.device)
    proj = C.new_output((n_slices, B), C.loss_dtype(x.dtype), x.device)
    if nb == 0:
        return out, proj
    if d == 0:  # v^T z of empty rows
        return out, proj.zero_()
    block_r, block_d = C.row_tiles(B, d)
    with C.device_guard(x):
        _dsm_perturb_kernel[(triton.cdiv(B, block_r),)](
            x, sigma, out, proj, n_slices, B, d, nb, x.stride(0), x.stride(1), sigma.stride(0), *C.read_seed(seed),
            *C.f64_words(eps), *C.f64_words(C.fixed_scale(kind, eps, d)), KIND=kind, ACC=C.acc_tl(x.dtype),
            BLOCK_R=block_r, BLOCK_D=block_d, ONE_TILE=d <= block_d, **C.LAUNCH_OPTIONS)
    return out, proj
