"""``perturb``: the stacked batch ``[x; x + v_1..x + v_n; x - v_1..x - v_n]`` with in-kernel directions.

Schema and semantics of ``fdsm_ext::perturb`` (csrc/fd_ops.cpp): ``x`` ``(B, d)`` (any strides, any
float dtype), output ``((include_center + 2 n) B, d)`` in ``x``'s dtype, row ``k*B + i`` of the +- blocks
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


def _check(x: Tensor, eps: float, n: int, kind: int) -> None:
    C.check_float(x, "x")
    if x.dim() != 2:
        C._fail(f"fdsm_ext.perturb: `x` must be 2-D (batch, features), got {list(x.shape)}")
    C.check_eps(eps)
    C.check_kind(kind)
    if n < 1:
        C._fail(f"fdsm_ext.perturb: `n_slices` must be >= 1, got {n}")
    C.check_stream_rows(n * x.shape[0], x.shape[1])


@torch.library.custom_op("fdsm_ext_triton::perturb", mutates_args=())
def perturb(x: Tensor, seed: Tensor, eps: float, n_slices: int, kind: int, include_center: bool) -> Tensor:
    """``[x; x + v_1; ..; x + v_n; x - v_1; ..; x - v_n]`` for ``x`` ``(B, d)``: ``((include_center + 2n) B, d)``.

    ``v`` (norm ``eps`` for kind 0, the sphere; ``eps raw / sqrt(d)`` for 1, rademacher, and 2, gaussian)
    is drawn in-kernel from ``seed`` (CPU int64 ``(seed, offset)``); the Triton twin of
    ``fdsm_ext.ops.perturb``, with bitwise the same float32 directions.
    """
    _check(x, eps, n_slices, kind)
    C.check_device(x, "x")
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


@perturb.register_fake
def _(x, seed, eps, n_slices, kind, include_center):
    return x.new_empty(((int(include_center) + 2 * n_slices) * x.shape[0], x.shape[1]))


def _setup(ctx, inputs, output):
    ctx.blocks = int(inputs[5]) + 2 * inputs[3]


def _backward(ctx, grad):
    # d(x +- v)/dx = I: the gradient is the sum over the stacked blocks (as fdsm_ext.ops); v is not needed.
    return grad.reshape(ctx.blocks, -1, grad.shape[-1]).sum(0), None, None, None, None, None


perturb.register_autograd(_backward, setup_context=_setup)
