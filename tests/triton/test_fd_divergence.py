"""fdsm_ext/triton/fd_divergence.py against the reference and the C++ kernel, opcheck and gradcheck.

Error model: as tests/test_ops_fd_divergence.py (the products are the same in every backend; the sums differ
in order and precision): ``|kernel - reference| <= d / (2 eps^2) (d + 2) u sum_j |v_j (s+_j - s-_j)|``.
"""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
from torch.testing._internal.optests import opcheck  # noqa: E402

from fdsm_ext import numerics, ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, DTYPES, KINDS, cpp_directions, make_seed, on_device, strided  # noqa: E402

B, D = 5, 13


def _bound(sp, sm, v, eps):
    acc = R.acc_dtype(sp.dtype)
    u, d = numerics.unit_roundoff(acc), sp.shape[-1]
    return d / (2 * eps * eps) * (d + 2) * u * (v.to(acc) * (sp.to(acc) - sm.to(acc))).abs().sum(-1).double()


def _assert_within(got, want, bound):
    err = (got.cpu().double() - want.double()).abs()
    assert bool((err <= bound).all()), (err.max().item(), bound.min().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_fd_divergence_matches_reference_and_cpp(dtype, kind):
    n, seed, k, eps = 3, make_seed(5, 3), ops.DIRECTION_KINDS[kind], 0.2
    sp, sm = torch.randn(n, B, D, dtype=dtype), torch.randn(n, B, D, dtype=dtype)
    v = cpp_directions(seed, n, kind, eps, dtype, B, D)
    ref, bound = R.fd_divergence(sp, sm, v, eps), _bound(sp, sm, v, eps)
    out = T.fd_divergence(*on_device(sp, sm), seed, eps, k)
    assert out.dtype == R.loss_dtype(dtype) and out.shape == (n, B)
    _assert_within(out, ref, bound)
    _assert_within(T.fd_divergence(strided(on_device(sp)), on_device(sm), seed, eps, k), ref, bound)
    # the C++ kernel is within the same bound of the reference: the twins are within twice it of each other
    _assert_within(out, ops.fd_divergence(sp, sm, seed, eps, k), 2 * bound)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("kind", ["sphere", "gaussian"])
def test_fd_divergence_multi_tile_rows(kind):
    # 8-column tiles: D = 13 takes two tiles per row, and the sphere's norm the two-pass path.
    n, seed, k, eps = 2, make_seed(7), ops.DIRECTION_KINDS[kind], 0.2
    sp, sm = torch.randn(n, B, D, dtype=torch.float64), torch.randn(n, B, D, dtype=torch.float64)
    v = cpp_directions(seed, n, kind, eps, torch.float64, B, D)
    _assert_within(T.fd_divergence(*on_device(sp, sm), seed, eps, k), R.fd_divergence(sp, sm, v, eps),
                   _bound(sp, sm, v, eps))
    g = torch.randn(n, B, dtype=torch.float64)
    got = T.fd_divergence_backward(*on_device(g, sp, sm), seed, eps, k)
    want = ops._ops.fd_divergence_backward(g, sp, sm, seed, eps, k)
    for a, b in zip(got, want):  # (g c) v: the same two roundings in both twins
        torch.testing.assert_close(a.cpu(), b, rtol=4 * numerics.unit_roundoff(torch.float64), atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fd_divergence_backward_matches_cpp(dtype):
    n, seed, eps = 2, make_seed(3), 0.2
    sp, sm = torch.randn(n, B, D, dtype=dtype), torch.randn(n, B, D, dtype=dtype)
    g = torch.randn(n, B, dtype=R.loss_dtype(dtype))
    got = T.fd_divergence_backward(*on_device(g, sp, sm), seed, eps, 1)
    want = ops._ops.fd_divergence_backward(g, sp, sm, seed, eps, 1)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        # g c: the same float64 product rounded once to the accumulation dtype, times the same v: bitwise the
        # C++ kernel's in the accumulation dtype. Triton's interpreter casts float32 to bfloat16 by its own
        # rounding (measured: one bfloat16 ulp off torch's round-to-nearest), so there one output ulp.
        if dtype == torch.bfloat16 and DEVICE == "cpu":
            torch.testing.assert_close(a.cpu(), b, rtol=2.0**-7, atol=0)
        else:
            assert torch.equal(a.cpu(), b)


def test_gradcheck_fp64():
    inputs = [torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda p, m: T.fd_divergence(p, m, make_seed(21), 0.3, 2), inputs,
                                    fast_mode=True)


def test_opcheck():
    seed = make_seed(8, 1)
    t = lambda *s, rg=False: torch.randn(*s, device=DEVICE, requires_grad=rg)  # noqa: E731
    opcheck(T.fd_divergence.default, (t(2, 4, 7, rg=True), t(2, 4, 7, rg=True), seed, 0.1, 1))
    opcheck(T.fd_divergence_backward.default, (t(2, 4), t(2, 4, 7), t(2, 4, 7), seed, 0.1, 1))


def test_empty_rows_and_bad_arguments():
    z = lambda *s: torch.zeros(*s, device=DEVICE)  # noqa: E731
    assert torch.equal(T.fd_divergence(z(2, 3, 0), z(2, 3, 0), make_seed(), 0.1, 1).cpu(), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="`sm`"):
        T.fd_divergence(z(1, 2, 3), z(1, 2, 4), make_seed(), 0.1, 0)
    with pytest.raises(RuntimeError, match="`sp`"):
        T.fd_divergence(z(2, 3), z(2, 3), make_seed(), 0.1, 0)
    with pytest.raises(RuntimeError, match="`grad`"):
        T.fd_divergence_backward(z(3), z(1, 2, 3), z(1, 2, 3), make_seed(), 0.1, 0)
