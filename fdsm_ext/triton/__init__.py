"""Triton kernels of every fdsm_ext op, registered as ``torch.ops.fdsm_ext_triton.<op>``.

Each op is ``fdsm_ext::<op>`` with Triton kernels: the same schema (csrc/fd_common.h's FDSM_OPS),
argument checks (``fdsm_ext::_check_<op>``, so the same messages), fake kernel and autograd formula
(csrc/fd_autograd.cpp for the loss ops, :data:`fdsm_ext.ops.OPS` for the rest, registered here for this
namespace), dtype rules and direction stream. A
separate namespace rather than a third device kernel of the fdsm_ext ops, because the C++ and Triton
kernels both run CPU tensors (the latter in Triton's interpreter), and ``backend=`` chooses between them.
They work under ``torch.library.opcheck`` and ``torch.compile`` (where they are opaque custom ops).

Every module of this package is imported when it is (:func:`_import_kernel_modules`), so a module that
registers an op's kernels (``@C.kernel("<op>")``) needs no line here. Modules:

- :mod:`.philox`: the random direction stream of csrc/fd_math.h;
- :mod:`.fd_math`: the formulas of csrc/fd_math.h that several ops share, one ``@triton.jit`` helper
  each (a formula only one op uses may live in that op's module instead);
- one module per op family, named after its forward op (:mod:`.perturb`, :mod:`.dsm_perturb`,
  :mod:`.fd_ssm_quotient`, :mod:`.fd_ssm_vr`, :mod:`.fd_dsm_quotient`, :mod:`.stencil`, :mod:`.langevin`),
  holding the kernels of the forward op and of its backward ops;
- :mod:`._common`: host helpers (registration, device rules, float64 scalars, poisoned outputs, tiles).

The tests are generic (tests/triton/test_ops_generic.py: every op of :data:`fdsm_ext.ops.OPS` from its
example call), plus one file per module for the op-specific properties.

Where they run: CUDA tensors; CPU tensors only under Triton's interpreter, i.e. with
``TRITON_INTERPRET=1`` set before triton is first imported (how the tests run without a GPU).
Random directions: bitwise the C++ kernels' float32 stream for every kind (see :mod:`.philox`).
Triton version: pinned in requirements-triton.txt; tests/triton/test_gpu_compile.py compiles every
kernel for sm_90 without a GPU, and ``python tests/triton/aot_compile.py --full 80 90`` every variant.
"""

import importlib
import pkgutil

import torch

from .. import ops as _fd_ops
from ._common import INTERPRET, set_poison_outputs, unavailable_reason


def _import_kernel_modules() -> None:
    """Imports every public module of this package: importing one registers its ops' kernels."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_kernel_modules()
_fd_ops.register("fdsm_ext_triton")

ops = torch.ops.fdsm_ext_triton

__all__ = ["INTERPRET", "ops", "set_poison_outputs", "unavailable_reason"]
