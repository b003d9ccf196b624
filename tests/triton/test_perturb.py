"""fdsm_ext/triton/perturb.py: bitwise the C++ kernel over many tiles, layouts, bad input (the generic checks:
test_ops_generic.py)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, KINDS, make_seed  # noqa: E402

B, D = 5, 13  # D not a multiple of 4: the last Philox group of each row is partly used


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
