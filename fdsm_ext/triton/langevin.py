"""``langevin_step`` and ``langevin_step_``: the fused Langevin step, ``x_new = clamp(x + a s + b z)``,
``b = sqrt(2 a)`` unless a ``noise_scale`` ``b`` is given.

Schema and semantics of ``fdsm_ext::langevin_step`` / ``langevin_step_`` (csrc/fd_ops.cpp, the CPU kernel
in csrc/cpu/langevin_cpu.cpp): ``x`` and ``score`` ``(B, *event)`` of one float dtype, flattened to
``(B, d)``; ``alpha`` one element or ``(B,)``, rounded to the accumulation dtype (float32 for
half/bfloat16/float32, float64 for float64); ``b`` is ``noise_scale`` (None, or one element or ``(B,)``,
rounded to the accumulation dtype) or else ``sqrt(2 alpha)`` computed in float64 from the rounded alpha and
rounded to the accumulation dtype; ``(x + alpha s) + b z`` in the accumulation dtype (two roundings,
no fma), clamped by a clamp that keeps NaN. ``z`` element ``j`` of sample ``i`` is the gaussian kind's
raw direction value of stream row ``i`` (:mod:`.philox`): float32 values, so bitwise those of the C++
kernels for every dtype, and ``x_new`` is bitwise the C++ kernels' too. ``norms`` ``(3, B)`` =
``(||s||, ||z||, ||x_new||)`` in the loss dtype, or ``(3, 0)`` when not requested.

One program per tile of ``BLOCK_R`` samples x ``BLOCK_D`` columns (a 2-D grid, so that one long sample is
spread over many programs). The norms are summed in float64 as in the C++ kernel, deterministically and
without atomics: each tile writes its rows' three sums of squares to a ``(3, B, tiles)`` float64 buffer,
which a second kernel sums in tile order; when a row fits one tile the first kernel writes the norms
itself. The sums run over tiles of other sizes than the C++ kernel's (a tree within a tile, in order
across tiles), so float64 norms agree with the C++ ones to an ulp or so, not bitwise.

The in-place step writes x while it reads score, alpha, noise_scale and seed: the shared checks refuse any of them
overlapping x in memory, and an x with internal overlap. The seed is read on the host when it is a CPU tensor and by the kernel when it is on ``x``'s device (as
the CUDA kernel does: a captured CUDA graph then sees updates to it). Not differentiable: as
csrc/langevin_autograd.cpp, the Autograd kernel refuses inputs that require grad under grad mode.

Tests: tests/triton/test_langevin_step.py (tests/test_langevin.py is the C++ op's, and pytest needs
unique test-module basenames).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from .fd_math import clamp_keep_nan, langevin_noise_scale, langevin_update
from .philox import GAUSSIAN, raw_directions, stream_key

_WORDS = ["seed_lo", "seed_hi", "off_lo", "off_hi", "lo_lo", "lo_hi", "hi_lo", "hi_hi"]


@triton.jit
def _seed_words(seed_ptr):
    """The (seed, offset) pair of an int64 tensor as the stream's four uint32 key words."""
    s = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    o = tl.load(seed_ptr + 1).to(tl.uint64, bitcast=True)
    return ((s & 0xFFFFFFFF).to(tl.uint32), (s >> 32).to(tl.uint32), (o & 0xFFFFFFFF).to(tl.uint32),
            (o >> 32).to(tl.uint32))


@triton.jit
def _round_to(v, TY: tl.constexpr):
    """float32/float64 ``v`` rounded to nearest-even ``TY``, as c10's conversions. bfloat16 by hand: Triton's
    interpreter truncates float32 -> bfloat16 (compiled, this is the cvt.rn.bf16.f32 the GPU does anyway;
    NaN becomes c10's 0x7FC0)."""
    if TY == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(TY)
    return out


@triton.jit(do_not_specialize=_WORDS)
def _langevin_kernel(x_ptr, s_ptr, out_ptr, alpha_ptr, ns_ptr, seed_ptr, norms_ptr, part_ptr, B, d, sxb, sxd, ssb, ssd,
                     sa, sns, tiles, seed_lo: tl.uint32, seed_hi: tl.uint32, off_lo: tl.uint32, off_hi: tl.uint32,
                     lo_lo: tl.uint32, lo_hi: tl.uint32, hi_lo: tl.uint32, hi_hi: tl.uint32, ACC: tl.constexpr,
                     SEED_PTR: tl.constexpr, HAS_NS: tl.constexpr, NORMS: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    # NORMS: 0 none, 1 this tile is the whole row (write the norms), 2 write the tile's partial sums.
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # samples = stream rows
    t = tl.program_id(1)
    col0 = t * BLOCK_D
    imask = i < B
    cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = imask[:, None] & (cols[None, :] < d)
    if SEED_PTR:
        key = _seed_words(seed_ptr)
    else:
        key = stream_key(seed_lo, seed_hi, off_lo, off_hi)
    a = tl.load(alpha_ptr + i * sa, mask=imask, other=0.0).to(ACC)
    if HAS_NS:  # step_noise_scale: the given b, rounded to ACC
        ns = tl.load(ns_ptr + i * sns, mask=imask, other=0.0).to(ACC)
    else:
        ns = langevin_noise_scale(a, ACC)
    lo = C.f64(lo_lo, lo_hi).to(ACC)
    hi = C.f64(hi_lo, hi_hi).to(ACC)
    z = raw_directions(i.to(tl.uint32), col0, key, GAUSSIAN, BLOCK_D).to(ACC)
    xv = tl.load(x_ptr + i[:, None] * sxb + cols[None, :] * sxd, mask=mask).to(ACC)
    sv = tl.load(s_ptr + i[:, None] * ssb + cols[None, :] * ssd, mask=mask).to(ACC)
    new = clamp_keep_nan(langevin_update(xv, sv, z, a[:, None], ns[:, None]), lo, hi)
    out = _round_to(new, out_ptr.dtype.element_ty)
    tl.store(out_ptr + i[:, None] * d + cols[None, :], out, mask=mask)
    if NORMS != 0:
        s64 = sv.to(tl.float64)
        z64 = z.to(tl.float64)
        x64 = out.to(ACC).to(tl.float64)
        ss = tl.sum(tl.where(mask, s64 * s64, 0.0), axis=1)
        zz = tl.sum(tl.where(mask, z64 * z64, 0.0), axis=1)
        xx = tl.sum(tl.where(mask, x64 * x64, 0.0), axis=1)
        if NORMS == 1:
            ty = norms_ptr.dtype.element_ty
            tl.store(norms_ptr + i, tl.sqrt(ss).to(ty), mask=imask)
            tl.store(norms_ptr + B + i, tl.sqrt(zz).to(ty), mask=imask)
            tl.store(norms_ptr + 2 * B + i, tl.sqrt(xx).to(ty), mask=imask)
        else:
            tl.store(part_ptr + i * tiles + t, ss, mask=imask)
            tl.store(part_ptr + (B + i) * tiles + t, zz, mask=imask)
            tl.store(part_ptr + (2 * B + i) * tiles + t, xx, mask=imask)


@triton.jit
def _langevin_norms_kernel(part_ptr, norms_ptr, n, tiles, BLOCK: tl.constexpr):
    """``norms[r] = sqrt(sum_t part[r, t])`` for the ``n = 3 B`` rows, summing the tiles in order."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = r < n
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for t in range(tiles):
        total += tl.load(part_ptr + r * tiles + t, mask=m, other=0.0)
    tl.store(norms_ptr + r, tl.sqrt(total).to(norms_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- host side
def _kernel_reads_seed(seed: Tensor) -> bool:
    """Whether the kernel loads (seed, offset) from the tensor itself (a seed on ``x``'s device) instead of
    taking host words; a function so that the interpreter tests can take the device path with CPU seeds."""
    return seed.device.type != "cpu"


def _step_into(x: Tensor, score: Tensor, alpha: Tensor, noise_scale: Tensor | None, seed: Tensor, B: int, d: int,
               lo: float, hi: float, return_norms: bool, out: Tensor) -> Tensor:
    """Writes x_new into ``out`` (contiguous, ``x``'s shape; may be ``x`` itself when ``x`` is contiguous)
    and returns the norms ``(3, B)``, or ``(3, 0)``."""
    norms = C.new_output((3, B if return_norms else 0), C.loss_dtype(x.dtype), x.device)
    if B == 0 or (d == 0 and not return_norms):
        return norms
    x2, s2 = x.reshape(B, d), score.reshape(B, d)  # views where the strides allow: no copies
    a = alpha.reshape(-1)
    sa = a.stride(0) if a.numel() > 1 else 0
    b = None if noise_scale is None else noise_scale.reshape(-1)
    sb = b.stride(0) if b is not None and b.numel() > 1 else 0
    block_r, block_d = C.row_tiles(B, d)
    tiles = max(1, C.column_grid(d, block_d))
    norms_mode = 0 if not return_norms else (1 if tiles == 1 else 2)
    part = C.new_output((3, B, tiles), torch.float64, x.device) if norms_mode == 2 else None
    if _kernel_reads_seed(seed):
        seed_ptr, words = seed.reshape(2).contiguous(), (0, 0, 0, 0)
    else:
        seed_ptr, words = None, C.read_seed(seed)
    with C.device_guard(x):
        _langevin_kernel[(triton.cdiv(B, block_r), tiles)](
            x2, s2, out, a, b, seed_ptr, norms if norms_mode == 1 else None, part, B, d, *x2.stride(), *s2.stride(),
            sa, sb, tiles, *words, *C.f64_words(lo), *C.f64_words(hi), ACC=C.acc_tl(x.dtype),
            SEED_PTR=seed_ptr is not None, HAS_NS=b is not None, NORMS=norms_mode, BLOCK_R=block_r, BLOCK_D=block_d,
            **C.LAUNCH_OPTIONS)
        if norms_mode == 2:
            block = C.vector_block(3 * B)
            _langevin_norms_kernel[(triton.cdiv(3 * B, block),)](part, norms, 3 * B, tiles, BLOCK=block,
                                                                  **C.LAUNCH_OPTIONS)
    return norms


def _bounds(clamp_min, clamp_max) -> tuple[float, float]:
    inf = float("inf")
    return -inf if clamp_min is None else float(clamp_min), inf if clamp_max is None else float(clamp_max)


def _sizes(x: Tensor) -> tuple[int, int]:
    return x.shape[0], math.prod(x.shape[1:])


@C.kernel("langevin_step")
def langevin_step(x: Tensor, score: Tensor, alpha: Tensor, seed: Tensor, clamp_min: float | None,
                  clamp_max: float | None, return_norms: bool,
                  noise_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(x_new, norms)``: ``x_new = clamp(x + alpha s + b z)`` (``b = noise_scale``, or ``sqrt(2 alpha)`` when
    None) contiguous in ``x``'s dtype, ``z`` drawn in-kernel from ``seed``; the Triton twin of
    ``fdsm_ext.ops.langevin_step`` (bitwise its ``x_new``)."""
    out = C.new_output(x.shape, x.dtype, x.device)
    norms = _step_into(x, score, alpha, noise_scale, seed, *_sizes(x), *_bounds(clamp_min, clamp_max), return_norms,
                       out)
    return out, norms


@C.kernel("langevin_step_")
def langevin_step_(x: Tensor, score: Tensor, alpha: Tensor, seed: Tensor, clamp_min: float | None,
                   clamp_max: float | None, return_norms: bool, noise_scale: Tensor | None = None) -> Tensor:
    """In-place :func:`langevin_step`: writes ``x_new`` into ``x`` (any strides) and returns ``norms``."""
    B, d = _sizes(x)
    lo, hi = _bounds(clamp_min, clamp_max)
    if x.is_contiguous():
        return _step_into(x, score, alpha, noise_scale, seed, B, d, lo, hi, return_norms, x)
    # A strided x (as the C++ kernel): step into a contiguous buffer, then write it back through the view.
    work = C.new_output(x.shape, x.dtype, x.device)
    norms = _step_into(x, score, alpha, noise_scale, seed, B, d, lo, hi, return_norms, work)
    x.copy_(work)
    return norms


# --------------------------------------------------------------------------- autograd: refuse
# The step is not differentiable: as csrc/langevin_autograd.cpp for the C++ op, the Autograd kernel
# refuses inputs that require grad under grad mode (before anything is written), then runs the kernel
# below autograd; the in-place form bumps x's version, as aten's in-place ops do.
def _autograd_kernel(name: str, in_place: bool):
    op = getattr(torch.ops.fdsm_ext_triton, name).default

    def kernel(keyset, x, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale=None):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, score, alpha, noise_scale)):
            raise RuntimeError(f"fdsm_ext.{name} is not differentiable, but `x`, `score`, `alpha` or `noise_scale` "
                               "requires grad: pass detached tensors or call it under torch.no_grad() (the "
                               "samplers do)")
        with torch._C._AutoDispatchBelowAutograd():
            result = op.redispatch(keyset & torch._C._after_autograd_keyset, x, score, alpha, seed, clamp_min,
                                   clamp_max, return_norms, noise_scale)
        if in_place:
            torch.autograd.graph.increment_version(x)
        return result

    return kernel


for _name in ("langevin_step", "langevin_step_"):
    C.LIBRARY.impl(_name, _autograd_kernel(_name, _name.endswith("_")), "Autograd", with_keyset=True)
