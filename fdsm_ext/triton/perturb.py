"""``perturb``: the stacked batch ``[x; x + v_1..x + v_n; x - v_1..x - v_n]`` with in-kernel directions.

Schema and semantics of ``fdsm_ext::perturb`` (csrc/fd_common.h, ``FDSM_OPS``): ``x`` ``(B, d)`` (any
strides, any float dtype), output ``((include_center + 2 n) B, d)`` in ``x``'s dtype, row ``k*B + i`` of the +- blocks
uses direction row ``k*B + i`` of the Philox stream (:mod:`.philox`). ``v = raw * scale`` and ``x +- v``
are computed in the accumulation dtype (float32 for half/bfloat16/float32, float64 for float64).

One program per block of ``BLOCK_R`` direction rows; it writes the + row, the - row and (for the first
B rows) the centre copy, so ``x`` is read once per slice and the output written once. The sphere's
norm needs the whole row first: rows longer than one tile run Philox twice (sum of squares, then values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .philox import directions_setup, directions_tile, stream_key


@triton.jit(do_not_specialize=C.WORD_ARGS)
def _perturb_kernel(x_ptr, out_ptr, B, d, nb, sxb, sxd, seed_lo: tl.uint32, seed_hi: tl.uint32, off_lo: tl.uint32,
                    off_hi: tl.uint32, eps_lo: tl.uint32, eps_hi: tl.uint32, fixed_lo: tl.uint32, fixed_hi: tl.uint32,
                    KIND: tl.constexpr, CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # direction (stream) rows
    rmask = r < nb
    i = r % B
    rows = r.to(tl.uint32)
    key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    raw0, scale = directions_setup(rows, d, key, C.f64(eps_lo, eps_hi), C.f64(fixed_lo, fixed_hi), KIND, BLOCK_D,
                                   ONE_TILE)
    scale = scale.to(ACC)
    first = CENTER * B  # rows before the + block
    plus = (first + r) * d
    minus = (first + nb + r) * d
    for col0 in range(0, d, BLOCK_D):
        cols = col0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols[None, :] < d)
        v = directions_tile(raw0, rows, col0, key, KIND, BLOCK_D, ONE_TILE).to(ACC) * scale[:, None]
        xr = tl.load(x_ptr + i[:, None] * sxb + cols[None, :].to(tl.int64) * sxd, mask=mask)
        xv = xr.to(ACC)
        tl.store(out_ptr + plus[:, None] + cols[None, :], (xv + v).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + minus[:, None] + cols[None, :], (xv - v).to(out_ptr.dtype.element_ty), mask=mask)
        if CENTER:
            tl.store(out_ptr + r[:, None] * d + cols[None, :], xr, mask=mask & (r < B)[:, None])


@C.kernel("perturb", bitwise=(torch.float32, torch.float64))
def perturb(x: Tensor, seed: Tensor, eps: float, n_slices: int, kind: int, include_center: bool) -> Tensor:
    """``[x; x + v_1; ..; x + v_n; x - v_1; ..; x - v_n]`` for ``x`` ``(B, d)``: ``((include_center + 2n) B, d)``.

    ``v`` (norm ``eps`` for kind 0, the sphere; ``eps raw / sqrt(d)`` for 1, rademacher, and 2, gaussian)
    is drawn in-kernel from ``seed`` (CPU int64 ``(seed, offset)``); the Triton twin of
    ``fdsm_ext.ops.perturb``, with bitwise the same float32 directions.
    """
    B, d = x.shape
    nb = n_slices * B
    out = C.new_output(((int(include_center) + 2 * n_slices) * B, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    block_r, block_d = C.row_tiles(nb, d)
    with C.device_guard(x):
        _perturb_kernel[(triton.cdiv(nb, block_r),)](
            x, out, B, d, nb, x.stride(0), x.stride(1), *C.read_seed(seed), *C.f64_words(eps),
            *C.f64_words(C.fixed_scale(kind, eps, d)),
            KIND=kind, CENTER=bool(include_center), ACC=C.acc_tl(x.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
            ONE_TILE=d <= block_d, **C.LAUNCH_OPTIONS)
    return out
