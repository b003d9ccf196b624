"""fdsm_ext/triton/perturb.py against the reference, the C++ kernel, opcheck and gradcheck."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
from torch.testing._internal.optests import opcheck  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, DTYPES, KINDS, assert_close, cpp_directions, make_seed, strided  # noqa: E402

B, D = 5, 13  # D not a multiple of 4: the last Philox group of each row is partly used


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_perturb_matches_reference(dtype, kind):
    n, seed, k = 2, make_seed(11), ops.DIRECTION_KINDS[kind]
    x = torch.randn(B, D, dtype=dtype)
    for center in (True, False):
        out = T.perturb(x.to(DEVICE), seed, 0.25, n, k, center)
        ref = R.perturb(x, cpp_directions(seed, n, kind, 0.25, dtype, B, D), center)
        assert out.dtype == dtype and out.shape == ((int(center) + 2 * n) * B, D) and out.is_contiguous()
        assert_close(out.cpu(), ref)
    assert_close(T.perturb(strided(x.to(DEVICE)), seed, 0.25, n, k, False).cpu(), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tiles", ["one", "many"])
def test_perturb_is_bitwise_the_cpp_kernel_in_float32(kind, tiles, request):
    # Same directions (test_philox.py) and the same float32 x +- v: the stacked batch is identical.
    if tiles == "many":
        request.getfixturevalue("small_tiles")
    x, seed, k = torch.randn(6, 21), make_seed(3, 9), ops.DIRECTION_KINDS[kind]
    got = T.perturb(x.to(DEVICE), seed, 0.1, 3, k, True).cpu()
    assert torch.equal(got, ops.perturb(x, seed, 0.1, 3, k, True))


def test_perturb_transposed_input():
    x = torch.randn(D, B).T  # column-major (B, D)
    seed = make_seed(2)
    want = ops.perturb(x.contiguous(), seed, 0.3, 1, 1, True)
    assert torch.equal(T.perturb(x.to(DEVICE), seed, 0.3, 1, 1, True).cpu(), want)


def test_gradcheck_fp64():
    x = torch.randn(3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: T.perturb(t, make_seed(21), 0.3, 2, 0, True), (x,), fast_mode=True)


def test_opcheck():
    x = torch.randn(4, 7, device=DEVICE, requires_grad=True)
    opcheck(T.perturb.default, (x, make_seed(8, 1), 0.1, 2, 0, True))


def test_empty_batch():
    assert T.perturb(torch.zeros(0, 5, device=DEVICE), make_seed(), 0.1, 2, 0, True).shape == (0, 5)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), make_seed(), 0.0, 1, 0, True), "eps"),
    ((torch.zeros(2, 3), make_seed(), 0.1, 0, 0, True), "n_slices"),
    ((torch.zeros(2, 3), make_seed(), 0.1, 1, 7, True), "kind"),
    ((torch.zeros(2, 3, 4), make_seed(), 0.1, 1, 0, True), "x"),
    ((torch.zeros(2, 3, dtype=torch.int64), make_seed(), 0.1, 1, 0, True), "x"),
    ((torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), 0.1, 1, 0, True), "seed"),
])
def test_bad_arguments_raise_as_the_cpp_op(args, match):
    args = (args[0].to(DEVICE),) + args[1:]
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        T.perturb(*args)
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        ops._ops.perturb(args[0].cpu(), *args[1:])
