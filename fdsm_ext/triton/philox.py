"""The direction stream of csrc/fd_math.h, in Triton: Philox4x32-10, the polynomial Box-Muller, scales.

Element ``j`` of direction row ``r`` (``r = slice * B + sample``) is lane ``j & 3`` of
``Philox4x32-10(counter = (j >> 2, r, offset_lo, offset_hi), key = (seed_lo, seed_hi))``:

- ``rademacher``: ``+1`` if the word's top bit is set, else ``-1``;
- ``gaussian`` / ``sphere``: lanes (0, 1) and (2, 3) are Box-Muller pairs,
  ``sqrt(-2 ln u) (cos, sin)(2 pi b / 2^32)`` with ``u = open_unit(b)`` and ln/cos/sin evaluated by the
  fixed polynomials of fd_math.h (``portable_log``, ``portable_sincos_turn``).

Each function below is a line-by-line transcription of its C++ namesake: same constants (written as
the exact float32 values the C++ literals round to), same operation order, correctly rounded
``div_rn``/``sqrt_rn``, and kernels launched with ``enable_fp_fusion=False`` (the ``--fmad=false`` /
``-ffp-contract=off`` of the C++ build), so the raw float32 values are bitwise those of the C++
kernels (tests/triton/test_philox.py checks them against the CPU kernel, tests/test_cuda.py the CUDA
kernel against the CPU one; tests/triton/test_gpu_compile.py checks the compiled PTX has no fma and
no approximate division or square root).

Row scales (``row_scale`` in fd_math.h) are float64 as there: ``eps / sqrt(d)`` computed on the host,
and for the sphere ``eps / sqrt(sum_sq)`` with the row's sum of squares accumulated as exact uint64
fixed-point integers (``sphere_sq_fixed``): integer addition is associative, so this tile-wise tree
gives the same sum as the C++ kernels' sequential (CPU) and butterfly (CUDA) orders, and the float32
and float64 directions are bitwise the C++ kernels' for every kind.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, check_device

# Philox4x32-10 constants (Salmon et al., SC'11).
_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)

# The float32 values of fd_math.h's literals, exactly (hex floats, so no double rounding can creep in).
_TWO_M24 = tl.constexpr(float.fromhex("0x1p-24"))           # 5.9604644775390625e-08f
_SQRT2 = tl.constexpr(float.fromhex("0x1.6a09e6p+0"))       # 1.41421356f
_LOG_C11 = tl.constexpr(float.fromhex("0x1.745d18p-4"))     # 0.0909090909f = 1/11
_LOG_C9 = tl.constexpr(float.fromhex("0x1.c71c72p-4"))      # 0.111111111f  = 1/9
_LOG_C7 = tl.constexpr(float.fromhex("0x1.24924ap-3"))      # 0.142857143f  = 1/7
_LOG_C5 = tl.constexpr(float.fromhex("0x1.99999ap-3"))      # 0.2f          = 1/5
_LOG_C3 = tl.constexpr(float.fromhex("0x1.555556p-2"))      # 0.333333333f  = 1/3
_LN2 = tl.constexpr(float.fromhex("0x1.62e430p-1"))         # 0.693147181f
_TWO_M30 = tl.constexpr(float.fromhex("0x1p-30"))           # 9.31322574615478515625e-10f
_HALF_PI = tl.constexpr(float.fromhex("0x1.921fb6p+0"))     # 1.57079632679f
_SIN_C9 = tl.constexpr(float.fromhex("0x1.71de3ap-19"))     # 2.75573192e-06f = 1/9!
_SIN_C7 = tl.constexpr(float.fromhex("0x1.a01a02p-13"))     # 1.98412698e-04f = 1/7!
_SIN_C5 = tl.constexpr(float.fromhex("0x1.111112p-7"))      # 8.33333333e-03f = 1/5!
_SIN_C3 = tl.constexpr(float.fromhex("0x1.555556p-3"))      # 1.66666667e-01f = 1/3!
_COS_C10 = tl.constexpr(float.fromhex("0x1.27e4fcp-22"))    # 2.75573192e-07f = 1/10!
_COS_C8 = tl.constexpr(float.fromhex("0x1.a01a02p-16"))     # 2.48015873e-05f = 1/8!
_COS_C6 = tl.constexpr(float.fromhex("0x1.6c16c2p-10"))     # 1.38888889e-03f = 1/6!
_COS_C4 = tl.constexpr(float.fromhex("0x1.555556p-5"))      # 4.16666667e-02f = 1/4!
_SQRT_HALF = tl.constexpr(float.fromhex("0x1.6a09e6p-1"))   # 0.707106781f

#: Direction kinds, as in fd_math.h's DirectionKind (and fdsm_ext.ops.DIRECTION_KINDS).
SPHERE = tl.constexpr(0)
RADEMACHER = tl.constexpr(1)
GAUSSIAN = tl.constexpr(2)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors ``c0..c3`` with uint32 key ``(k0, k1)``; returns 4 uint32 words."""
    for rnd in tl.static_range(10):
        if rnd > 0:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def open_unit(b):
    """``(2 (b >> 9) + 1) / 2^24`` in float32: exact, in (0, 1)."""
    return (((b >> 9) << 1) | 1).to(tl.float32) * _TWO_M24


@triton.jit
def portable_log(u):
    """ln(u) for float32 u in (0, 1]: ``e ln2 + 2 atanh(s)``, the odd series of fd_math.h to s^11."""
    b = u.to(tl.uint32, bitcast=True)
    e = ((b >> 23) & 0xFF).to(tl.int32) - 127
    m = ((b & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = _LOG_C11 * s2 + _LOG_C9
    p = p * s2 + _LOG_C7
    p = p * s2 + _LOG_C5
    p = p * s2 + _LOG_C3
    p = p * s2 + 1.0
    return e.to(tl.float32) * _LN2 + (2.0 * s) * p


@triton.jit
def portable_sincos_turn(b):
    """(cos, sin) of ``2 pi b / 2^32`` for uint32 b: exact quadrant from the top two bits, Taylor
    polynomials to phi^9/phi^10 about the quadrant's midpoint (fd_math.h)."""
    q = b >> 30
    frac = (b & 0x3FFFFFFF).to(tl.float32) * _TWO_M30
    phi = (frac - 0.5) * _HALF_PI
    p2 = phi * phi
    sn = _SIN_C9 * p2 - _SIN_C7
    sn = sn * p2 + _SIN_C5
    sn = sn * p2 - _SIN_C3
    sn = (sn * p2) * phi + phi
    cs = -_COS_C10 * p2 + _COS_C8
    cs = cs * p2 - _COS_C6
    cs = cs * p2 + _COS_C4
    cs = cs * p2 - 0.5
    cs = cs * p2 + 1.0
    c45 = (cs - sn) * _SQRT_HALF
    s45 = (cs + sn) * _SQRT_HALF
    c = tl.where(q == 0, c45, tl.where(q == 1, -s45, tl.where(q == 2, -c45, s45)))
    s = tl.where(q == 0, s45, tl.where(q == 1, c45, tl.where(q == 2, -s45, -c45)))
    return c, s


@triton.jit
def _box_muller_radius(b):
    return tl.sqrt_rn(-2.0 * portable_log(open_unit(b)))


@triton.jit
def raw_directions(rows, col0, key, KIND: tl.constexpr, BLOCK_D: tl.constexpr):
    """Unscaled direction values, float32 ``[len(rows), BLOCK_D]``, of columns ``col0 .. col0 + BLOCK_D``.

    ``rows``: uint32 stream rows; ``col0``: a multiple of 4; ``key``: the uint32 words
    ``(seed_lo, seed_hi, offset_lo, offset_hi)`` (:func:`stream_key`). Standard normals for
    sphere/gaussian, +-1 for rademacher; columns past the row's end are computed too (callers mask them).
    """
    G: tl.constexpr = BLOCK_D // 4
    zero = tl.zeros([rows.shape[0], G], dtype=tl.uint32)
    g = (col0 // 4 + tl.arange(0, G)).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(zero + g[None, :], zero + rows[:, None], zero + key[2], zero + key[3], key[0],
                                   key[1])
    if KIND == RADEMACHER:
        v0 = tl.where((w0 >> 31) != 0, 1.0, -1.0)
        v1 = tl.where((w1 >> 31) != 0, 1.0, -1.0)
        v2 = tl.where((w2 >> 31) != 0, 1.0, -1.0)
        v3 = tl.where((w3 >> 31) != 0, 1.0, -1.0)
    else:
        r0 = _box_muller_radius(w0)
        c0, s0 = portable_sincos_turn(w1)
        r1 = _box_muller_radius(w2)
        c1, s1 = portable_sincos_turn(w3)
        v0 = r0 * c0
        v1 = r0 * s0
        v2 = r1 * c1
        v3 = r1 * s1
    # Interleave the four lanes: element 4 g + l is lane l of group g.
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (rows.shape[0], BLOCK_D))


@triton.jit
def stream_key(seed_lo, seed_hi, offset_lo, offset_hi):
    """The stream's key and counter words as uint32 scalars, from the kernel arguments
    (:func:`fdsm_ext.triton._common.read_seed`)."""
    return (seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), offset_lo.to(tl.uint32), offset_hi.to(tl.uint32))


@triton.jit
def sphere_sq_fixed(raw, valid, unit):
    """Squares of the raw values as fixed-point integers (fd_math.h ``sphere_sq_fixed``): ``raw^2 * unit``
    truncated to uint64, 0 where not ``valid``; ``unit`` is the float64 2^F of :func:`..._common.fixed_scale`."""
    r64 = raw.to(tl.float64)
    return tl.where(valid, (r64 * r64 * unit).to(tl.uint64), 0)


@triton.jit
def sphere_sum_sq(rows, d, key, unit, BLOCK_D: tl.constexpr):
    """Per-row sum of squares of the raw Gaussian values of ``rows`` (all d columns), as float64: an exact
    uint64 fixed-point sum, so it does not depend on the order of the sum (fd_math.h ``sphere_sum_sq``)."""
    total = tl.zeros([rows.shape[0]], dtype=tl.uint64)
    for col0 in range(0, d, BLOCK_D):
        raw = raw_directions(rows, col0, key, SPHERE, BLOCK_D)
        cols = col0 + tl.arange(0, BLOCK_D)
        total += tl.sum(sphere_sq_fixed(raw, cols[None, :] < d, unit), axis=1)
    return total.to(tl.float64) / unit


@triton.jit
def row_scale(sum_sq, eps, fixed_scale, KIND: tl.constexpr):
    """float64 scale with ``v = raw * scale``: ``eps / sqrt(sum_sq)`` for the sphere, else
    ``fixed_scale`` (``eps / sqrt(d)``, computed on the host in float64 as in fd_math.h)."""
    if KIND == SPHERE:
        scale = eps / tl.sqrt(sum_sq)
    else:
        scale = tl.zeros_like(sum_sq) + fixed_scale
    return scale


@triton.jit
def directions_setup(rows, d, key, eps, fixed_scale, KIND: tl.constexpr, BLOCK_D: tl.constexpr,
                     ONE_TILE: tl.constexpr):
    """``(raw0, scale)`` for the direction rows ``rows``: the float64 row scales, and, when the whole row
    fits one tile (``ONE_TILE``), its raw values (reused by :func:`directions_tile` instead of running
    Philox twice for the sphere's norm). ``fixed_scale``: ``eps / sqrt(d)``, or for the sphere the
    fixed-point unit 2^F of its sum of squares (:func:`fdsm_ext.triton._common.fixed_scale`)."""
    if ONE_TILE:
        raw0 = raw_directions(rows, 0, key, KIND, BLOCK_D)
        if KIND == SPHERE:
            cols = tl.arange(0, BLOCK_D)
            fixed = tl.sum(sphere_sq_fixed(raw0, cols[None, :] < d, fixed_scale), axis=1)
            sum_sq = fixed.to(tl.float64) / fixed_scale
        else:
            sum_sq = tl.zeros([rows.shape[0]], dtype=tl.float64)
    else:
        raw0 = tl.zeros([rows.shape[0], BLOCK_D], dtype=tl.float32)
        if KIND == SPHERE:
            sum_sq = sphere_sum_sq(rows, d, key, fixed_scale, BLOCK_D)
        else:
            sum_sq = tl.zeros([rows.shape[0]], dtype=tl.float64)
    return raw0, row_scale(sum_sq, eps, fixed_scale, KIND)


@triton.jit
def directions_tile(raw0, rows, col0, key, KIND: tl.constexpr, BLOCK_D: tl.constexpr,
                    ONE_TILE: tl.constexpr):
    """The raw values of the tile at column ``col0`` (``raw0`` itself when ``ONE_TILE``)."""
    if ONE_TILE:
        raw = raw0
    else:
        raw = raw_directions(rows, col0, key, KIND, BLOCK_D)
    return raw


# --------------------------------------------------------------------------- test hooks
@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_kernel(ctr_ptr, out_ptr, n, k0: tl.uint32, k1: tl.uint32, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    c0 = tl.load(ctr_ptr + 4 * i + 0, mask=mask).to(tl.uint32)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=mask).to(tl.uint32)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=mask).to(tl.uint32)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=mask).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + 4 * i + 0, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=mask)


def philox(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of ``counters`` (int64 ``(N, 4)`` holding uint32 words) under ``key``: ``(N, 4)`` int64.

    A test hook for the known-answer vectors; the kernels use :func:`philox4x32_10` inline.
    """
    check_device(counters, "counters")
    counters = counters.contiguous()
    out = torch.empty_like(counters)
    n = counters.shape[0]
    if n:
        _philox_kernel[(1,)](counters, out, n, key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF,
                             BLOCK=triton.next_power_of_2(n), **LAUNCH_OPTIONS)
    return out


