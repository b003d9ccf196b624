"""fdsm_ext/triton/stencil.py against the reference, the C++ kernels, opcheck and gradcheck."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
from torch.testing._internal.optests import opcheck  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, DTYPES, assert_close, assert_grads_close, grads, on_device, strided  # noqa: E402

B, D = 5, 13


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [1, 2, 6])
def test_stencil_matches_reference(dtype, order):
    x, v = torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype)
    ref = R.stencil_perturb(x, v, 0.1, order)
    out = T.stencil_perturb(*on_device(x, v), 0.1, order)
    assert out.dtype == dtype and out.shape == ((order + 1) * B, D)
    assert_close(out.cpu(), ref)
    assert_close(T.stencil_perturb(strided(on_device(x)), strided(on_device(v)), 0.1, order).cpu(), ref)
    f = torch.randn(order + 1, B, dtype=dtype)
    out = T.stencil_combine(on_device(f), 0.1, order)
    assert out.dtype == R.loss_dtype(dtype)
    assert_close(out.cpu(), R.stencil_combine(f, 0.1, order), dtype, scale=0.2 ** -order)
    if dtype in (torch.float32, torch.float64):  # shifts and weights are bitwise the C++ float64 ones
        assert torch.equal(T.stencil_perturb(*on_device(x, v), 0.1, order).cpu(), ops.stencil_perturb(x, v, 0.1, order))
        g = torch.randn(B, dtype=dtype)
        want = ops._ops.stencil_combine_backward(g, f, 0.1, order)
        assert torch.equal(T.stencil_combine_backward(*on_device(g, f), 0.1, order).cpu(), want)


def test_low_order_stencils_are_the_fd_quotients():
    f = torch.randn(3, B, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(T.stencil_combine(f[[0, 2]], 0.1, 1), (f[0] - f[2]) / 0.2)
    torch.testing.assert_close(T.stencil_combine(f, 0.1, 2), (f[0] + f[2] - 2 * f[1]) / 0.2**2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(dtype):
    inputs = [torch.randn(B, D, dtype=dtype).requires_grad_() for _ in range(2)]
    want = grads(lambda x, v: R.stencil_perturb(x, v, 0.1, 3), inputs)
    dev = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    assert_grads_close(grads(lambda x, v: T.stencil_perturb(x, v, 0.1, 3), dev), want, dtype)
    f = torch.randn(3, B, dtype=dtype).requires_grad_()
    want = grads(lambda t: R.stencil_combine(t, 0.1, 2), [f])
    assert_grads_close(grads(lambda t: T.stencil_combine(t, 0.1, 2), [f.detach().to(DEVICE).requires_grad_()]), want,
                       dtype)


def test_gradcheck_fp64():
    rg = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE, requires_grad=True)  # noqa: E731
    assert torch.autograd.gradcheck(lambda x, v: T.stencil_perturb(x, v, 0.1, 4), (rg(3, 6), rg(3, 6)), fast_mode=True)
    assert torch.autograd.gradcheck(lambda f: T.stencil_combine(f, 0.5, 3), (rg(4, 3),), fast_mode=True)


def test_opcheck():
    t = lambda *s, rg=False: torch.randn(*s, device=DEVICE, requires_grad=rg)  # noqa: E731
    opcheck(T.stencil_perturb.default, (t(4, 7, rg=True), t(4, 7, rg=True), 0.1, 3))
    opcheck(T.stencil_combine.default, (t(4, 4, rg=True), 0.1, 3))
    opcheck(T.stencil_perturb_backward.default, (t(12, 7), 0.1, 2))
    opcheck(T.stencil_combine_backward.default, (t(4), t(3, 4), 0.1, 2))


@pytest.mark.parametrize("call, match", [
    (lambda z: T.stencil_perturb(z(2, 3), z(2, 4), 0.1, 2), "v"),
    (lambda z: T.stencil_perturb(z(2, 3), z(2, 3), 0.1, 0), "order"),
    (lambda z: T.stencil_combine(z(2, 3), 0.1, 2), "f"),
    (lambda z: T.stencil_perturb_backward(z(5, 3), 0.1, 2), "grad"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        call(lambda *s: torch.zeros(*s, device=DEVICE))
