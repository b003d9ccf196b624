"""fdsm_ext/triton/fd_ssm_vr.py against the reference, opcheck and gradcheck."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
from torch.testing._internal.optests import opcheck  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import (DEVICE, DTYPES, KINDS, assert_close, assert_grads_close, cpp_directions, grads,  # noqa: E402
                      make_seed, on_device, strided)

B, D = 5, 13


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_fd_ssm_vr_matches_reference(dtype, kind):
    n, seed, k = 3, make_seed(5, 3), ops.DIRECTION_KINDS[kind]
    sp, sm = torch.randn(n, B, D, dtype=dtype), torch.randn(n, B, D, dtype=dtype)
    ref = R.fd_ssm_vr(sp, sm, cpp_directions(seed, n, kind, 0.2, dtype, B, D), 0.2, float(D))
    out = T.fd_ssm_vr(*on_device(sp, sm), seed, 0.2, k, float(D))
    assert out.dtype == R.loss_dtype(dtype)
    assert_close(out.cpu(), ref, dtype)
    assert_close(T.fd_ssm_vr(strided(on_device(sp)), on_device(sm), seed, 0.2, k, float(D)).cpu(), ref, dtype)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_ssm_vr_multi_tile_rows(dtype):
    # 8-column tiles: D = 13 takes two tiles per row, and the sphere's norm the two-pass path.
    n, seed = 2, make_seed(7)
    sp, sm = torch.randn(n, B, D, dtype=dtype), torch.randn(n, B, D, dtype=dtype)
    ref = R.fd_ssm_vr(sp, sm, cpp_directions(seed, n, "sphere", 0.2, dtype, B, D), 0.2, float(D))
    assert_close(T.fd_ssm_vr(*on_device(sp, sm), seed, 0.2, 0, float(D)).cpu(), ref, dtype)
    g = torch.randn(B, dtype=dtype)
    got = T.fd_ssm_vr_backward(*on_device(g, sp, sm), seed, 0.2, 0, float(D))
    assert_grads_close(got, ops._ops.fd_ssm_vr_backward(g, sp, sm, seed, 0.2, 0, float(D)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sphere", "rademacher"])
def test_fd_ssm_vr_backward_matches_reference(dtype, kind):
    n, seed, k = 2, make_seed(3), ops.DIRECTION_KINDS[kind]
    v = cpp_directions(seed, n, kind, 0.2, dtype, B, D)
    inputs = [torch.randn(n, B, D, dtype=dtype).requires_grad_() for _ in range(2)]
    want = grads(lambda p, m: R.fd_ssm_vr(p, m, v, 0.2, float(D)), inputs)
    dev = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    got = grads(lambda p, m: T.fd_ssm_vr(p, m, seed, 0.2, k, float(D)), dev)
    assert_grads_close(got, want, dtype)


def test_gradcheck_fp64():
    inputs = [torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda p, m: T.fd_ssm_vr(p, m, make_seed(21), 0.3, 1, 6.0), inputs,
                                    fast_mode=True)


def test_opcheck():
    seed = make_seed(8, 1)
    t = lambda *s, rg=False: torch.randn(*s, device=DEVICE, requires_grad=rg)  # noqa: E731
    opcheck(T.fd_ssm_vr.default, (t(2, 4, 7, rg=True), t(2, 4, 7, rg=True), seed, 0.1, 1, 7.0))
    opcheck(T.fd_ssm_vr_backward.default, (t(4), t(2, 4, 7), t(2, 4, 7), seed, 0.1, 1, 7.0))


def test_bad_arguments_raise():
    z = lambda *s: torch.zeros(*s, device=DEVICE)  # noqa: E731
    with pytest.raises(RuntimeError, match="`sm`"):
        T.fd_ssm_vr(z(1, 2, 3), z(1, 2, 4), make_seed(), 0.1, 0, 3.0)
    with pytest.raises(RuntimeError, match="`sp`"):
        T.fd_ssm_vr(z(2, 3), z(2, 3), make_seed(), 0.1, 0, 3.0)
    with pytest.raises(RuntimeError, match="`grad`"):
        T.fd_ssm_vr_backward(z(3), z(1, 2, 3), z(1, 2, 3), make_seed(), 0.1, 0, 3.0)
