"""Property-based checks over random shapes and parameters (hypothesis), and the import error."""

import math
import os
import shutil
import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fdsm_ext import ops
from fdsm_ext import reference as R

from conftest import KINDS, make_seed

shapes = st.tuples(st.integers(1, 9), st.integers(1, 70), st.integers(1, 4))  # (B, d, n_slices)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, kind=st.sampled_from(KINDS), eps=st.floats(1e-3, 10.0), seed=st.integers(0, 2**62),
       offset=st.integers(0, 2**62), center=st.booleans())
def test_perturb_is_x_plus_minus_the_reference_stream(shape, kind, eps, seed, offset, center):
    B, d, n = shape
    x = torch.randn(B, d, dtype=torch.float64)
    s = make_seed(seed, offset)
    out = ops.perturb(x, s, eps, n, ops.DIRECTION_KINDS[kind], center)
    v = R.philox_directions(s, n * B, d, kind, eps, torch.float64).reshape(n, B, d)
    torch.testing.assert_close(out, R.perturb(x, v, center), rtol=0, atol=4e-6 * eps)
    if kind == "sphere":
        plus = out[int(center) * B:][: n * B]
        norms = (plus - x.repeat(n, 1)).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, eps))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, kind=st.sampled_from(KINDS), eps=st.floats(1e-2, 1.0), dim_scale=st.floats(0.5, 100.0))
def test_vr_and_its_backward_match_the_reference(shape, kind, eps, dim_scale):
    B, d, n = shape
    sp = torch.randn(n, B, d, dtype=torch.float64, requires_grad=True)
    sm = torch.randn(n, B, d, dtype=torch.float64, requires_grad=True)
    s = make_seed(3, 1)
    v = ops.perturb(torch.zeros(B, d, dtype=torch.float64), s, eps, n, ops.DIRECTION_KINDS[kind], False)[: n * B]
    got = ops.fd_ssm_vr(sp, sm, s, eps, ops.DIRECTION_KINDS[kind], dim_scale)
    want = R.fd_ssm_vr(sp, sm, v.reshape(n, B, d), eps, dim_scale)
    torch.testing.assert_close(got, want)
    g = torch.randn(B, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (sp, sm), g), torch.autograd.grad(want, (sp, sm), g)):
        torch.testing.assert_close(a, b)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 6), d=st.integers(1, 20), order=st.integers(1, 8), eps=st.floats(1e-2, 1.0),
       seed=st.integers(0, 2**31))
def test_stencil_of_a_polynomial_is_exact(B, d, order, eps, seed):
    # f(y) = (a^T y)^T is a degree-T polynomial along any line, so the central stencil's error terms
    # (derivatives of order T+2 and up) vanish: the result is T! (a^T v)^T up to round-off, which the
    # stencil amplifies by at most sum_t |w_t| = (2 / (2 eps))^T.
    g = torch.Generator().manual_seed(seed)
    x, v, a = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((B, d), (B, d), (d,)))
    stacked = ops.stencil_perturb(x, v, eps, order)
    vals = (stacked @ a) ** order
    got = ops.stencil_combine(vals.reshape(order + 1, B), eps, order)
    want = math.factorial(order) * (v @ a) ** order
    roundoff = 64 * 2.2e-16 * (1 / eps) ** order * vals.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=roundoff + 1e-12)


def test_import_without_the_built_extension_says_how_to_build(tmp_path):
    # A copy of the package without its compiled module, under another name so that the installed
    # fdsm_ext (an editable install's import hook included) cannot be picked up instead.
    src = os.path.dirname(ops.__file__)
    shutil.copytree(src, tmp_path / "fdsm_ext_unbuilt", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import fdsm_ext_unbuilt"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and "pip install ." in last, proc.stderr
