"""fdsm_ext/triton/fd_ssm_quotient.py against the reference, the C++ kernel, opcheck and gradcheck."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
from torch.testing._internal.optests import opcheck  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, DTYPES, assert_close, assert_grads_close, grads, on_device  # noqa: E402

B = 5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4])
def test_fd_ssm_quotient_matches_reference(dtype, n):
    f0, fp, fm = torch.randn(B, dtype=dtype), torch.randn(n, B, dtype=dtype), torch.randn(n, B, dtype=dtype)
    ref = R.fd_ssm_quotient(f0, fp, fm, 0.5, 3.0)
    out = T.fd_ssm_quotient(*on_device(f0, fp, fm), 0.5, 3.0)
    assert out.dtype == R.loss_dtype(dtype)
    assert_close(out.cpu(), ref, dtype)
    fp_t = on_device(fp).T.contiguous().T  # (n, B) with column-major strides
    assert_close(T.fd_ssm_quotient(on_device(f0), fp_t, on_device(fm), 0.5, 3.0).cpu(), ref, dtype)
    if dtype in (torch.float32, torch.float64):  # same operations in the same order as the C++ kernel
        assert torch.equal(out.cpu(), ops.fd_ssm_quotient(f0, fp, fm, 0.5, 3.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fd_ssm_quotient_backward_matches_reference(dtype):
    n = 2
    inputs = [torch.randn(*s, dtype=dtype).requires_grad_() for s in ((B,), (n, B), (n, B))]
    want = grads(lambda a, p, m: R.fd_ssm_quotient(a, p, m, 0.2, 4.0), inputs)
    dev = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    got = grads(lambda a, p, m: T.fd_ssm_quotient(a, p, m, 0.2, 4.0), dev)
    assert_grads_close(got, want, dtype)


def test_gradcheck_fp64():
    inputs = [torch.randn(*s, dtype=torch.float64, device=DEVICE, requires_grad=True) for s in ((3,), (2, 3), (2, 3))]
    assert torch.autograd.gradcheck(lambda a, p, m: T.fd_ssm_quotient(a, p, m, 0.3, 6.0), inputs, fast_mode=True)


def test_opcheck():
    t = lambda *s, rg=False: torch.randn(*s, device=DEVICE, requires_grad=rg)  # noqa: E731
    opcheck(T.fd_ssm_quotient.default, (t(4, rg=True), t(2, 4, rg=True), t(2, 4, rg=True), 0.1, 7.0))
    opcheck(T.fd_ssm_quotient_backward.default, (t(4), t(4), t(2, 4), t(2, 4), 0.1, 7.0))


def test_empty_batch():
    z = torch.zeros(1, 0, device=DEVICE)
    assert T.fd_ssm_quotient(torch.zeros(0, device=DEVICE), z, z, 0.1, 1.0).shape == (0,)


@pytest.mark.parametrize("shapes, match", [
    (((3,), (1, 4), (1, 4)), "fp"),
    (((3,), (1, 3), (2, 3)), "fm"),
    (((3, 1), (1, 3), (1, 3)), "f0"),
])
def test_bad_arguments_raise(shapes, match):
    f0, fp, fm = (torch.zeros(s, device=DEVICE) for s in shapes)
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        T.fd_ssm_quotient(f0, fp, fm, 0.1, 1.0)
    with pytest.raises(RuntimeError, match="`fp`"):
        T.fd_ssm_quotient(torch.zeros(3, device=DEVICE), torch.zeros(1, 3, dtype=torch.float64, device=DEVICE),
                          torch.zeros(1, 3, device=DEVICE), 0.1, 1.0)


def test_no_slices_is_refused_as_by_the_cpp_op():
    # a mean over no slices would be NaN: both backends refuse it, naming the argument
    f0, empty = torch.randn(3), torch.zeros(0, 3)
    with pytest.raises(RuntimeError, match="`fp` must hold at least one slice"):
        ops.fd_ssm_quotient(f0, empty, empty, 0.1, 1.0)
    with pytest.raises(RuntimeError, match="`fp` must hold at least one slice"):
        T.fd_ssm_quotient(*on_device(f0, empty, empty), 0.1, 1.0)
