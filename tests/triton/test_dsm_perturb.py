"""fdsm_ext/triton/dsm_perturb.py: the stacked batch bitwise the C++ kernel's over one and many tiles and
programs, proj within the rounding of its float64 sum (the generic checks: test_ops_generic.py)."""

import math

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, KINDS, cpp_directions, make_seed, on_device  # noqa: E402

B, D = 5, 13  # D not a multiple of 4: the last Philox group of each row is partly used


@pytest.fixture
def many_programs(monkeypatch):
    """8-column tiles of 2 rows: D = 13 takes two tiles per row and B = 5 three programs, the last one partial."""
    from fdsm_ext.triton import _common

    monkeypatch.setattr(_common, "MAX_BLOCK_D", 8)
    monkeypatch.setattr(_common, "TILE", 16)


def _noise(seed, n, dtype, b, d):
    """The C++ kernels' noise draws z ``(b, d)``: the gaussian stream rows n b + i, unscaled (a gaussian row's
    scale eps / sqrt(d) is exactly 1 for eps = sqrt(d))."""
    return cpp_directions(seed, n + 1, "gaussian", math.sqrt(d), dtype, b, d)[n]


def _assert_proj_within_sum_rounding(got, want, x, sigma, seed, eps, n, kind):
    # Same products (in the accumulation dtype) as the C++ kernel, summed in float64 in another order: the sums
    # differ by at most d 2^-53 sum |v z|; rounding to the accumulation dtype and dividing by sigma add an ulp
    # each.
    B, d = x.shape
    acc = want.dtype
    v = cpp_directions(seed, n, kind, eps, x.dtype, B, d)
    z = _noise(seed, n, x.dtype, B, d)
    sig = sigma.to(acc)
    bound = (d * 2.0**-53 * (v * z).abs().sum(-1).double() / sig.abs().double()
             + 2 * torch.finfo(acc).eps * want.abs().double())
    assert ((got.double() - want.double()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tiles", ["one", "many"])
def test_stacked_is_bitwise_the_cpp_kernel(kind, tiles, dtype, request):
    # x~ = x + sigma z and x~ +- v: the C++ kernel's operations in its order, on bitwise the same stream values
    if tiles == "many":
        request.getfixturevalue("many_programs")
    k, seed, n, eps = ops.DIRECTION_KINDS[kind], make_seed(3, 9), 3, 0.1
    x, sigma = torch.randn(B, D, dtype=dtype), torch.rand(B, dtype=dtype) + 0.5
    got = T.dsm_perturb(*on_device(x, sigma), seed, eps, n, k)
    want = ops.dsm_perturb(x, sigma, seed, eps, n, k)
    assert torch.equal(got[0].cpu(), want[0])
    _assert_proj_within_sum_rounding(got[1].cpu(), want[1], x, sigma, seed, eps, n, kind)


@pytest.mark.usefixtures("many_programs")
def test_one_slice_over_many_programs():
    # n = 1, FD-DSM's usual slice count; three programs of two samples, the last with one
    seed, x, sigma = make_seed(5), torch.randn(B, D), torch.rand(B) + 0.5
    got = T.dsm_perturb(*on_device(x, sigma), seed, 0.2, 1, 2)
    want = ops.dsm_perturb(x, sigma, seed, 0.2, 1, 2)
    assert torch.equal(got[0].cpu(), want[0])
    _assert_proj_within_sum_rounding(got[1].cpu(), want[1], x, sigma, seed, 0.2, 1, "gaussian")


def test_layouts_and_sigma_dtype_as_the_cpp_kernel():
    # transposed x, strided sigma of another dtype (rounded to the accumulation dtype first, as the C++ op)
    seed = make_seed(7)
    x = torch.randn(D, B).T
    sigma = (torch.rand(2 * B, dtype=torch.float64) + 0.5)[::2]
    got = T.dsm_perturb(*on_device(x, sigma), seed, 0.3, 2, 0)
    want = ops.dsm_perturb(x.contiguous(), sigma.contiguous(), seed, 0.3, 2, 0)
    assert got[1].dtype == torch.float32
    assert torch.equal(got[0].cpu(), want[0])
    _assert_proj_within_sum_rounding(got[1].cpu(), want[1], x, sigma, seed, 0.3, 2, "sphere")


def test_noise_is_the_gaussian_stream_after_the_directions():
    # x = 0 and sigma = 1: x~ = z, so the mean of the + and - rows is the raw gaussian stream row n B + i
    seed, n = make_seed(11), 2
    stacked, _ = T.dsm_perturb(*on_device(torch.zeros(B, D, dtype=torch.float64), torch.ones(B, dtype=torch.float64)),
                               seed, 0.25, n, 1)
    stacked = stacked.cpu().reshape(2, n, B, D)
    torch.testing.assert_close((stacked[0] + stacked[1]) / 2, _noise(seed, n, torch.float64, B, D).expand(n, B, D),
                               rtol=0, atol=1e-14)


def test_empty_rows_project_to_zero():
    stacked, proj = T.dsm_perturb(*on_device(torch.zeros(3, 0), torch.ones(3)), make_seed(), 0.1, 2, 0)
    assert stacked.shape == (12, 0) and torch.equal(proj.cpu(), torch.zeros(2, 3))


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), torch.ones(3), make_seed(), 0.1, 1, 0), "sigma"),
    ((torch.zeros(2, 3), torch.ones(2, dtype=torch.int64), make_seed(), 0.1, 1, 0), "sigma"),
    ((torch.zeros(2, 3, 4), torch.ones(2), make_seed(), 0.1, 1, 0), "x"),
    ((torch.zeros(2, 3), torch.ones(2), make_seed(), 0.1, 0, 0), "n_slices"),
    ((torch.zeros(2, 3), torch.ones(2), make_seed(), 0.1, 1, 7), "kind"),
])
def test_bad_arguments_raise_as_the_cpp_op(args, match):
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        T.dsm_perturb(*on_device(*args[:2]), *args[2:])
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        ops._ops.dsm_perturb(*args)
