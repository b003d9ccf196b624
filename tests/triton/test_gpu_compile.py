"""Every Triton kernel compiles for sm_90 with the launch options the ops use, without a GPU.

CI has no GPU and runs the kernels in the interpreter, which accepts code the compiler may reject; this
compiles each kernel to PTX and a cubin (Triton ships ptxas) through the ops' own launch paths
(tests/triton/aot_compile.py, in a subprocess without TRITON_INTERPRET). It also checks the PTX for
what the bitwise direction stream relies on: no fused multiply-add (enable_fp_fusion=False) and no
approximate division or square root.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

pytestmark = pytest.mark.slow

KERNELS = {
    "_perturb_kernel", "_quotient_kernel", "_quotient_backward_kernel", "_vr_kernel", "_vr_backward_kernel",
    "_dsm_rows_kernel", "_dsm_noise_kernel", "_stencil_perturb_kernel", "_stencil_perturb_backward_kernel",
    "_stencil_combine_kernel", "_stencil_combine_backward_kernel", "_philox_kernel", "_langevin_kernel",
    "_langevin_norms_kernel", "_divergence_kernel", "_divergence_backward_kernel",
}


def _has_nvidia_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton build has no NVIDIA backend")
def test_every_kernel_compiles_for_sm90_without_fma_or_approximations():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = pathlib.Path(__file__).with_name("aot_compile.py")
    proc = subprocess.run([sys.executable, str(script), "90"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        assert r["arch"] == 90 and r["cubin_bytes"] > 0
        assert r["fma"] == 0 and r["approx"] == 0, r
