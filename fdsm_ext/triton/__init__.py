"""Triton kernels of every fdsm_ext op, registered as ``torch.ops.fdsm_ext_triton.<op>`` custom ops.

Each op has the schema, semantics, dtype rules and argument checks of its ``torch.ops.fdsm_ext``
namesake (csrc/fd_ops.cpp), a fake (meta) kernel and, for the forward ops, an autograd formula whose
backward is again a Triton op (the Langevin step instead refuses inputs that require grad, as the C++
op does), so they work under ``torch.library.opcheck`` and ``torch.compile`` (where they are opaque
custom ops). Modules, mirrored one-to-one by ``tests/triton/``:

- :mod:`.philox`: the random direction stream of csrc/fd_math.h, transcribed to Triton;
- :mod:`.perturb`: ``perturb``;
- :mod:`.fd_ssm_quotient`: ``fd_ssm_quotient``, ``fd_ssm_quotient_backward``;
- :mod:`.fd_ssm_vr`: ``fd_ssm_vr``, ``fd_ssm_vr_backward``;
- :mod:`.fd_dsm_quotient`: ``fd_dsm_quotient``, ``fd_dsm_quotient_backward``, ``fd_dsm_noise_backward``;
- :mod:`.stencil`: ``stencil_perturb``, ``stencil_combine`` and their backwards;
- :mod:`.langevin`: ``langevin_step``, ``langevin_step_`` (not differentiable; its tests: test_langevin_step.py);
- :mod:`._common`: host helpers (device rules, argument checks, float64 scalars, poisoned outputs, tiles).

Where they run: CUDA tensors; CPU tensors only under Triton's interpreter, i.e. with
``TRITON_INTERPRET=1`` set before triton is first imported (how the tests run in CI).

Random directions: bitwise the C++ kernels' float32 stream for every kind; float64 sphere rows can
differ from the C++ ones in the last bit (see :mod:`.philox`).

Tested with Triton 3.7.1 (pinned in requirements-triton.txt) under the interpreter on CPU, with
torch 2.13 and numpy 2.4; the tests pass with Triton 3.8.0 as well. Triton 3.6's interpreter cannot
run these kernels with numpy >= 2.4 (it converts 1-element arrays with ``int()``, which numpy 2.4
rejects). The tests also compile every kernel for sm_90 without a GPU
(tests/triton/test_gpu_compile.py); with 3.7.1, ``python tests/triton/aot_compile.py --full 80 90``
compiles every dtype, kind and tiling variant for sm_80 and sm_90, and the tests' subset also
compiles with Triton 3.6.0 (the GPU machine's) and 3.8.0 (the CUDA torch 2.14.1 wheel's). No kernel
has run on a GPU yet.
"""

import torch

from . import fd_dsm_quotient, fd_ssm_quotient, fd_ssm_vr, langevin, perturb, philox, stencil  # noqa: F401  (registers)
from ._common import INTERPRET, set_poison_outputs, unavailable_reason

ops = torch.ops.fdsm_ext_triton

__all__ = ["INTERPRET", "ops", "set_poison_outputs", "unavailable_reason"]
