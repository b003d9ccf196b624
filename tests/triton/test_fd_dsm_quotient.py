"""fdsm_ext/triton/fd_dsm_quotient.py: what only FD-DSM has (the generic checks: test_ops_generic.py)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import (DEVICE, assert_close, assert_grads_close, cpp_directions, grads, make_seed,  # noqa: E402
                      on_device)

B, D = 5, 13


def _inputs(n, dtype):
    fp, fm = torch.randn(n, B, dtype=dtype), torch.randn(n, B, dtype=dtype)
    return fp, fm, torch.randn(B, D, dtype=dtype) * 0.3, torch.rand(B, dtype=dtype) + 0.5


@pytest.mark.usefixtures("small_tiles")
def test_fd_dsm_backward_over_many_tiles_matches_reference():
    # 8-column tiles: D = 13 takes two per row (one tile: tests/triton/test_ops_generic.py)
    n, seed, dtype = 2, make_seed(3), torch.float32
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


@pytest.mark.parametrize("shapes, match", [
    (((1, 2), (1, 2), (3, 4), (2,)), "noise"),
    (((1, 2), (1, 2), (2, 4), (3,)), "sigma"),
    (((1, 2), (2, 2), (2, 4), (2,)), "fm"),
])
def test_bad_arguments_raise(shapes, match):
    fp, fm, noise, sigma = (torch.ones(s, device=DEVICE) for s in shapes)
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        T.fd_dsm_quotient(fp, fm, noise, sigma, make_seed(), 0.1, 0, 4.0)
