"""fdsm_ext/triton/fd_dsm_quotient.py against the reference, opcheck and gradcheck."""

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


def _inputs(n, dtype):
    fp, fm = torch.randn(n, B, dtype=dtype), torch.randn(n, B, dtype=dtype)
    return fp, fm, torch.randn(B, D, dtype=dtype) * 0.3, torch.rand(B, dtype=dtype) + 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_fd_dsm_quotient_matches_reference(dtype, kind):
    n, seed, k = 2, make_seed(9), ops.DIRECTION_KINDS[kind]
    fp, fm, noise, sigma = _inputs(n, dtype)
    ref = R.fd_dsm_quotient(fp, fm, noise, sigma, cpp_directions(seed, n, kind, 0.1, dtype, B, D), 0.1, float(D))
    out = T.fd_dsm_quotient(*on_device(fp, fm, noise, sigma), seed, 0.1, k, float(D))
    assert out.dtype == R.loss_dtype(dtype)
    assert_close(out.cpu(), ref, dtype)
    noise_s = strided(on_device(noise))
    assert_close(T.fd_dsm_quotient(*on_device(fp, fm), noise_s, on_device(sigma), seed, 0.1, k, float(D)).cpu(), ref,
                 dtype)


@pytest.mark.parametrize("dtype, tiles", [(dtype, "one") for dtype in DTYPES] + [(torch.float32, "many")])
def test_fd_dsm_backward_matches_reference(dtype, tiles, request):
    if tiles == "many":
        request.getfixturevalue("small_tiles")
    n, seed = 2, make_seed(3)
    fp, fm, noise, sigma = _inputs(n, dtype)
    v = cpp_directions(seed, n, "sphere", 0.2, dtype, B, D)
    inputs = [t.requires_grad_() for t in (fp, fm, noise)]
    want = grads(lambda p, m, w: R.fd_dsm_quotient(p, m, w, sigma, v, 0.2, float(D)), inputs)
    dev = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    got = grads(lambda p, m, w: T.fd_dsm_quotient(p, m, w, on_device(sigma), seed, 0.2, 0, float(D)), dev)
    assert_grads_close(got, want, dtype)


def test_noise_of_another_dtype():
    # noise and sigma are converted to the accumulation dtype of fp, as the C++ op does
    n, seed = 1, make_seed(4)
    fp, fm, noise, sigma = _inputs(n, torch.float32)
    args = (fp, fm, noise.double(), sigma.half(), seed, 0.1, 2, float(D))
    assert_close(T.fd_dsm_quotient(*on_device(*args[:4]), *args[4:]).cpu(), ops.fd_dsm_quotient(*args))
    g = torch.randn(B)
    got = T.fd_dsm_noise_backward(*on_device(g, *args[:4]), *args[4:])
    assert got.dtype == torch.float64
    assert_close(got.cpu(), ops._ops.fd_dsm_noise_backward(g, *args), torch.float32)


def test_gradcheck_fp64():
    # rademacher: the cheapest directions in the interpreter (the gradient's form does not depend on the kind)
    sigma = torch.rand(3, dtype=torch.float64, device=DEVICE) + 0.5
    inputs = [torch.randn(*s, dtype=torch.float64, device=DEVICE, requires_grad=True) for s in ((2, 3), (2, 3), (3, 6))]
    fn = lambda p, m, w: T.fd_dsm_quotient(p, m, w, sigma, make_seed(21), 0.3, 1, 6.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_opcheck():
    # rademacher directions: the cheapest in the interpreter, and registration does not depend on the kind
    seed = make_seed(4)
    t = lambda *s, rg=False: torch.randn(*s, device=DEVICE, requires_grad=rg)  # noqa: E731
    sigma = torch.rand(4, device=DEVICE) + 0.5
    opcheck(T.fd_dsm_quotient.default, (t(1, 4, rg=True), t(1, 4, rg=True), t(4, 7, rg=True), sigma, seed, 0.1, 1, 7.0))
    args = (t(4), t(1, 4), t(1, 4), t(4, 7), sigma, seed, 0.1, 1, 7.0)
    opcheck(T.fd_dsm_quotient_backward.default, args)
    opcheck(T.fd_dsm_noise_backward.default, args)


@pytest.mark.parametrize("shapes, match", [
    (((1, 2), (1, 2), (3, 4), (2,)), "noise"),
    (((1, 2), (1, 2), (2, 4), (3,)), "sigma"),
    (((1, 2), (2, 2), (2, 4), (2,)), "fm"),
])
def test_bad_arguments_raise(shapes, match):
    fp, fm, noise, sigma = (torch.ones(s, device=DEVICE) for s in shapes)
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        T.fd_dsm_quotient(fp, fm, noise, sigma, make_seed(), 0.1, 0, 4.0)
