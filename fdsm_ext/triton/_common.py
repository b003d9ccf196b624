"""Host-side helpers shared by the Triton ops.

- where the kernels may run: CUDA tensors, or CPU tensors when Triton's interpreter is on
  (``TRITON_INTERPRET=1`` in the environment *before* this package is imported: ``triton.jit``
  decides at decoration time whether a kernel is compiled or interpreted);
- op registration (:func:`kernel`): fdsm_ext's schema, checks, fake and autograd, Triton kernels;
- float64 scalars passed to kernels as their IEEE bits in an int64 (Triton passes Python floats as
  float32, and the interpreter passes them as Python floats): the kernels then hold exactly the
  doubles the C++ kernels compute with;
- NaN-poisoned outputs on request (a test aid: an element a kernel forgets to write stays NaN);
- tile sizes.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from .. import ops as fd_ops
from ..reference import acc_dtype, loss_dtype  # noqa: F401  (loss_dtype: re-exported to the ops)
from .fd_math import div  # noqa: F401  (the kernels' correctly rounded division, as C.div)

#: Launch options of every kernel: no a*b+c -> fma contraction, as the C++ build (fd_math.h).
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "num_warps": 4}

#: Largest column tile. A module attribute so that tests can shrink it to reach the multi-tile paths
#: with small shapes.
MAX_BLOCK_D = 1024
#: Elements per program tile (rows x columns) of the row kernels.
TILE = 2048

TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _probe():
    pass


#: Whether the kernels of this package run in Triton's interpreter (on the CPU, with numpy).
INTERPRET = not isinstance(_probe, triton.runtime.JITFunction)
if INTERPRET and isinstance(tl.zeros, triton.runtime.JITFunction):
    # triton.language's own functions were compiled-mode: the kernels would fail at their first launch.
    raise ImportError("fdsm_ext.triton: TRITON_INTERPRET=1 was set after triton was imported; set it before "
                      "anything imports triton (torch.compile and torch.testing's opcheck do)")


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else why not (one line)."""
    dev = torch.device(device).type
    if dev == "cuda":
        return None
    if dev == "cpu":
        if INTERPRET:
            return None
        return ("Triton kernels run on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before fdsm_ext.triton is first imported")
    return f"Triton kernels need CUDA tensors, got {dev} tensors"


def check_device(t: torch.Tensor, name: str) -> None:
    reason = unavailable_reason(t.device)
    if reason is not None:
        raise RuntimeError(f"fdsm_ext.triton: `{name}`: {reason}")


# --------------------------------------------------------------------------- scalars
# 64-bit values reach the kernels as two uint32 words (arguments annotated tl.uint32): Triton passes
# Python floats as float32, the interpreter keeps them as Python floats, and it stores an int in
# [2^31, 2^32) as a uint32 array typed int64, whose `>> 32` is not 0: 32-bit words avoid all three.
#: The word arguments of the direction kernels, never specialised (a value of 1 would become a constexpr).
WORD_ARGS = ["seed_lo", "seed_hi", "off_lo", "off_hi", "eps_lo", "eps_hi", "fixed_lo", "fixed_hi"]


def words(v: int) -> tuple[int, int]:
    """``(lo, hi)`` uint32 words of the 64-bit two's-complement integer ``v``."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v & 0xFFFFFFFF, v >> 32


def f64_words(x: float) -> tuple[int, int]:
    """``(lo, hi)`` words of the IEEE-754 bits of the double ``x`` (decoded in-kernel by :func:`f64`)."""
    return words(struct.unpack("<Q", struct.pack("<d", float(x)))[0])


@triton.jit
def f64(lo, hi):
    """The float64 whose bits are the uint32 words ``(lo, hi)``."""
    bits = (hi.to(tl.uint32).to(tl.uint64) << 32) | lo.to(tl.uint32).to(tl.uint64)
    return bits.to(tl.float64, bitcast=True)


def read_seed(seed: torch.Tensor) -> tuple[int, int, int, int]:
    """``(seed_lo, seed_hi, offset_lo, offset_hi)`` uint32 words of the CPU int64 ``(seed, offset)`` pair."""
    if not (seed.dtype == torch.int64 and seed.numel() == 2 and seed.device.type == "cpu"):
        raise RuntimeError(f"fdsm_ext: `seed` must be a CPU int64 tensor holding (seed, offset), got "
                           f"{seed.dtype} of {seed.numel()} element(s) on {seed.device}")
    s, off = seed.reshape(2).tolist()
    return (*words(s), *words(off))


def fixed_scale(kind: int, eps: float, d: int) -> float:
    """The float64 the direction kernels take as ``fixed``: ``eps / sqrt(d)``, the scale of the
    rademacher/gaussian rows (row_scale in fd_math.h); for the sphere, the unit 2^F of the fixed-point sum
    of squares, F = 57 - bit_length(d) (fd_math.h ``sphere_fraction_bits``)."""
    if kind == 0:
        return math.ldexp(1.0, 57 - max(d, 1).bit_length())
    return eps / math.sqrt(float(d)) if d > 0 else 0.0


# --------------------------------------------------------------------------- outputs
_POISON = False


def set_poison_outputs(enable: bool) -> bool:
    """Fill every new Triton kernel output with NaN before it is written; returns the old setting."""
    global _POISON
    old, _POISON = _POISON, bool(enable)
    return old


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def acc_tl(dtype: torch.dtype):
    """Triton accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return TL_DTYPE[acc_dtype(dtype)]


# --------------------------------------------------------------------------- tiles
def row_tiles(rows: int, d: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)`` of a row kernel: columns up to MAX_BLOCK_D (a power of two >= 4, so that
    a tile holds whole Philox groups), rows filling a TILE-element tile."""
    block_d = max(4, min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK_D))
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), TILE // block_d))
    return block_r, block_d


def column_grid(d: int, block_d: int) -> int:
    """Column tiles of a 2-D grid (its second axis, at most 65535 programs on CUDA)."""
    tiles = triton.cdiv(d, block_d)
    if tiles > 65535:
        _fail(f"fdsm_ext.triton: rows of {d} elements are too long for this kernel's grid "
              f"(at most {65535 * MAX_BLOCK_D}); use backend='cpp' or 'torch'")
    return tiles


def vector_block(n: int) -> int:
    """Block of a 1-D (per-sample) kernel."""
    return max(16, min(triton.next_power_of_2(max(n, 1)), 1024))


# --------------------------------------------------------------------------- op registration
#: The library of the fdsm_ext_triton ops: fdsm_ext's schemas, with the Triton kernels as implementations.
LIBRARY = torch.library.Library("fdsm_ext_triton", "DEF")


def _fail(msg: str):
    raise RuntimeError(msg)


#: op -> the input dtypes in which its Triton kernels promise bitwise the C++ kernels' outputs (same
#: operations in the same order; tests/triton/test_ops_generic.py holds them to it, and to a tolerance
#: elsewhere).
BITWISE: dict[str, frozenset[torch.dtype]] = {}


def kernel(name: str, bitwise: tuple[torch.dtype, ...] = ()):
    """Registers the decorated function as the Triton implementation of ``fdsm_ext_triton::<name>``.

    Everything else about the op is fdsm_ext's, defined once: the schema (csrc/fd_common.h's FDSM_OPS),
    the argument checks (``fdsm_ext::_check_<name>``, run before the function on every call, so the
    messages are the C++ kernels' own), the fake kernel and the autograd formula (csrc/fd_autograd.cpp
    for the loss ops, :data:`fdsm_ext.ops.OPS` for the rest, registered for this namespace by
    :mod:`fdsm_ext.triton`). The function
    only launches kernels, after :func:`check_device` on the first tensor argument (all share its device
    once checked). ``bitwise``: the input dtypes in which the outputs are bitwise the C++ kernels'
    (:data:`BITWISE`).
    """
    BITWISE[name] = frozenset(bitwise)

    def register(fn):
        LIBRARY.define(fd_ops.schema(name))
        check = getattr(torch.ops.fdsm_ext, f"_check_{name}").default
        arg_names = [a.name for a in check._schema.arguments]

        def impl(*args):
            check(*args)
            first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            check_device(args[first], arg_names[first])
            return fn(*args)

        impl.__name__ = impl.__qualname__ = name
        impl.__doc__ = fn.__doc__
        for key in ("CPU", "CUDA"):
            LIBRARY.impl(name, impl, key)
        return fn

    return register


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
