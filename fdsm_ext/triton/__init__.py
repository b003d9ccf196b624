"""Triton kernels of every fdsm_ext op, registered as ``torch.ops.fdsm_ext_triton.<op>``.

Each op is ``fdsm_ext::<op>`` with Triton kernels: the same schema (csrc/fd_ops.cpp), argument checks
(``fdsm_ext::_check_<op>``, so the same messages), fake kernel and autograd formula
(:data:`fdsm_ext.ops.OPS`, registered here for this namespace), dtype rules and direction stream. A
separate namespace rather than a third device kernel of the fdsm_ext ops, because the C++ and Triton
kernels both run CPU tensors (the latter in Triton's interpreter), and ``backend=`` chooses between them.
They work under ``torch.library.opcheck`` and ``torch.compile`` (where they are opaque custom ops).
Modules, mirrored one-to-one by ``tests/triton/``:

- :mod:`.philox`: the random direction stream of csrc/fd_math.h;
- :mod:`.fd_math`: the other formulas of csrc/fd_math.h, one ``@triton.jit`` helper each;
- :mod:`.perturb`: ``perturb``;
- :mod:`.fd_ssm_quotient`: ``fd_ssm_quotient``, ``fd_ssm_quotient_backward``;
- :mod:`.fd_ssm_vr`: ``fd_ssm_vr``, ``fd_ssm_vr_backward``;
- :mod:`.fd_dsm_quotient`: ``fd_dsm_quotient``, ``fd_dsm_quotient_backward``, ``fd_dsm_noise_backward``;
- :mod:`.stencil`: ``stencil_perturb``, ``stencil_combine`` and their backwards;
- :mod:`.fd_divergence`: ``fd_divergence``, ``fd_divergence_backward``;
- :mod:`.langevin`: ``langevin_step``, ``langevin_step_`` (not differentiable; its tests: test_langevin_step.py);
- :mod:`._common`: host helpers (registration, device rules, float64 scalars, poisoned outputs, tiles).

Where they run: CUDA tensors; CPU tensors only under Triton's interpreter, i.e. with
``TRITON_INTERPRET=1`` set before triton is first imported (how the tests run without a GPU).
Random directions: bitwise the C++ kernels' float32 stream for every kind (see :mod:`.philox`).
Triton version: pinned in requirements-triton.txt; tests/triton/test_gpu_compile.py compiles every
kernel for sm_90 without a GPU, and ``python tests/triton/aot_compile.py --full 80 90`` every variant.
"""

import torch

from .. import ops as _fd_ops
from . import fd_dsm_quotient, fd_ssm_quotient, fd_ssm_vr, langevin, perturb, philox, stencil  # noqa: F401  (registers)
from . import fd_divergence  # noqa: F401  (registers)
from ._common import INTERPRET, set_poison_outputs, unavailable_reason

_fd_ops.register("fdsm_ext_triton")

ops = torch.ops.fdsm_ext_triton

__all__ = ["INTERPRET", "ops", "set_poison_outputs", "unavailable_reason"]
