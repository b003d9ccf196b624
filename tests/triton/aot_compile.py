"""Compiles every Triton kernel of fdsm_ext.triton for a GPU target without a GPU (run as a script).

Each op is called on small CPU tensors with ``JITFunction.run`` replaced by "specialise the arguments as
a launch would, compile for the target, do not launch", so the kernels are compiled with the very
specialisations (dtypes, constexprs, divisibility) the host code produces. Prints one JSON line per
compiled kernel: its name, the target, and the PTX instruction counts the tests check.

Usage: python aot_compile.py [--full] ARCH [ARCH ...]   (e.g. 90 80), with TRITON_INTERPRET unset.
Without --full, a representative subset: every kernel once, and each direction kind in perturb.
"""

import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs the interpreter off"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import fdsm_ext.triton as ft  # noqa: E402
from fdsm_ext.triton import _common  # noqa: E402

FULL = "--full" in sys.argv
TARGETS = [GPUTarget("cuda", int(a), 32) for a in sys.argv[1:] if a != "--full"] or [GPUTarget("cuda", 90, 32)]
_seen = set()


def _compile_only(self, *args, grid, warmup, **kwargs):
    for target in TARGETS:
        backend = make_backend(target)
        kw = dict(kwargs, debug=False)
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kw)
        options, signature, constexprs, attrs = self._pack_args(backend, kw, bound_args, specialization, options)
        key = (self.fn.__name__, target.arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())))
        if key in _seen:
            continue
        _seen.add(key)
        kernel = triton_compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptx = kernel.asm["ptx"]
        count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
        print(json.dumps({
            "kernel": self.fn.__name__, "arch": target.arch,
            "constexprs": {str(k): str(v) for k, v in constexprs.items()},
            "fma": count(r"\bfma\.rn\.f32\b"), "approx": count(r"\.approx\.f32\b") + count(r"\bdiv\.full\.f32\b"),
            "mul_f32": count(r"\bmul\.rn\.f32\b"), "cubin_bytes": len(kernel.asm["cubin"]),
        }), flush=True)


JITFunction.run = _compile_only
_common.unavailable_reason = lambda device: None  # CPU tensors stand in for CUDA ones: nothing is launched

T = ft.ops
SEED = torch.tensor([1, 2])


def call_every_op(dtype, kinds, tiles):
    """Calls every op once per direction kind and tiling (``"one"``: rows in one tile, ``"many"``: 8-wide)."""
    n, B, D = 2, 3, 13
    t = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    g = torch.randn(B, dtype=_common.loss_dtype(dtype))
    x, v, f0, fp, fm, sp, sm = t(B, D), t(B, D), t(B), t(n, B), t(n, B), t(n, B, D), t(n, B, D)
    noise, sigma = t(B, D), t(B).abs() + 1
    for kind in kinds:
        for tiling in tiles:
            _common.MAX_BLOCK_D = 1024 if tiling == "one" else 8
            T.perturb(x, SEED, 0.1, n, kind, True)
            T.fd_ssm_vr(sp, sm, SEED, 0.1, kind, 3.0)
            T.fd_ssm_vr_backward(g, sp, sm, SEED, 0.1, kind, 3.0)
            a = (fp, fm, noise, sigma, SEED, 0.1, kind, 3.0)
            T.fd_dsm_quotient(*a)
            T.fd_dsm_quotient_backward(g, *a)
            T.fd_dsm_noise_backward(g, *a)
            T.fd_divergence(sp, sm, SEED, 0.1, kind)
            T.fd_divergence_backward(torch.randn(n, B, dtype=g.dtype), sp, sm, SEED, 0.1, kind)
    for tiling in tiles:  # one tile: norms written by the step kernel; many: partial sums + _langevin_norms_kernel
        _common.MAX_BLOCK_D = 1024 if tiling == "one" else 8
        for norms in (False, True):
            T.langevin_step(x, v, g.abs(), SEED, -1.0, 1.0, norms)
    T.fd_ssm_quotient(f0, fp, fm, 0.1, 3.0)
    T.fd_ssm_quotient_backward(g, f0, fp, fm, 0.1, 3.0)
    T.stencil_perturb(x, v, 0.1, 3)
    T.stencil_perturb_backward(t(4 * B, D), 0.1, 3)
    T.stencil_combine(t(4, B), 0.1, 3)
    T.stencil_combine_backward(g, t(4, B), 0.1, 3)


if FULL:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        call_every_op(dtype, (0, 1, 2), ("one", "many"))
else:  # every kernel once (the sphere's two-pass path), the other direction kinds in perturb
    call_every_op(torch.float32, (0,), ("many",))
    for kind in (1, 2):
        T.perturb(torch.zeros(3, 13), SEED, 0.1, 2, kind, False)
    # the Langevin step's bfloat16 rounding by hand, and its seed read by the kernel (a seed on x's device)
    _common.MAX_BLOCK_D = 1024
    T.langevin_step(torch.zeros(3, 13, dtype=torch.bfloat16), torch.zeros(3, 13, dtype=torch.bfloat16),
                    torch.ones(1), SEED, None, None, True)
ft.langevin._kernel_reads_seed = lambda seed: True
T.langevin_step_(torch.zeros(3, 13), torch.zeros(3, 13), torch.ones(1), SEED, None, None, False)
ft.philox.philox(torch.zeros(3, 4, dtype=torch.int64), (1, 2))
