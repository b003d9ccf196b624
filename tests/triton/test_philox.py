"""The Triton direction stream (fdsm_ext/triton/philox.py) against Philox's known answers and, bit for
bit, against the C++ kernels' stream (csrc/fd_math.h)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402
from fdsm_ext.triton.philox import philox  # noqa: E402

from conftest import DEVICE, KINDS, make_seed  # noqa: E402

MASK32 = 0xFFFFFFFF


def test_philox_known_answers():
    # Random123's kat_vectors for Philox4x32-10, as in tests/test_ops.py.
    ff = MASK32
    cases = [
        ((0, 0, 0, 0), (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ((ff, ff, ff, ff), (ff, ff), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, want in cases:
        got = philox(torch.tensor([ctr], dtype=torch.int64, device=DEVICE), key)
        assert got.cpu().tolist() == [want]


def test_philox_matches_the_reference_on_random_counters():
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2**32, (37, 4), generator=g, dtype=torch.int64)
    key = (0x9E3779B9, 0x12345678)
    want = torch.stack(R.philox4x32_10(tuple(ctr.T), key), dim=1)
    assert torch.equal(philox(ctr.to(DEVICE), key).cpu(), want)


def _directions(op_ns, seed, rows, d, kind, dtype, eps=0.3):
    """The + block of perturb(0): the directions v, exactly, ``(rows, d)``."""
    x = torch.zeros(rows, d, dtype=dtype)
    if op_ns is T:
        x = x.to(DEVICE)
    return op_ns.perturb(x, seed, eps, 1, kind, False)[:rows].cpu()


SEEDS = [make_seed(987654321987, 42), make_seed(-1, 2**40 + 5), make_seed(2**62 + 12345, 2**32 - 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed, tiles", [(SEEDS[0], "one"), (SEEDS[1], "one"), (SEEDS[2], "one"), (SEEDS[2], "many")],
                         ids=["plain", "negative-seed", "high-words", "high-words-many-tiles"])
def test_float32_directions_are_bitwise_those_of_the_cpp_kernel(kind, seed, tiles, request):
    # x = 0 makes the + block exactly v. d = 37: a partial last Philox group; "many": 8-column tiles,
    # so the sphere's norm takes the two-pass path.
    if tiles == "many":
        request.getfixturevalue("small_tiles")
    k = ops.DIRECTION_KINDS[kind]
    got = _directions(T, seed, 40, 37, k, torch.float32)
    want = _directions(ops._ops, seed, 40, 37, k, torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_directions(kind):
    # bitwise for every kind: the sphere's sum of squares is an exact fixed-point sum, so the Triton tree
    # and the C++ sequential order give the same float64 scale
    k = ops.DIRECTION_KINDS[kind]
    got = _directions(T, SEEDS[0], 40, 37, k, torch.float64)
    want = _directions(ops._ops, SEEDS[0], 40, 37, k, torch.float64)
    assert torch.equal(got, want)


def test_rows_and_offsets_are_distinct_streams():
    a = _directions(T, make_seed(1, 0), 8, 16, 2, torch.float32)
    b = _directions(T, make_seed(1, 1), 8, 16, 2, torch.float32)
    assert not torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) == 8


@pytest.mark.parametrize("tiles", ["one", "many"])
def test_sphere_known_answer_is_the_cpp_kernels(tiles, request):
    # Issue 15's known answer (tests/test_ops.py::test_sphere_scale_does_not_depend_on_the_reduction_order):
    # perturb(zeros(2, 64), seed=(31337, 5), eps=0.70000002197243705, sphere). Row 1's float64 sum of squares
    # rounds differently summed sequentially or as a tree; the fixed-point sum makes the Triton tile tree give
    # the C++ kernel's scale bitwise, in one tile and over many.
    if tiles == "many":
        request.getfixturevalue("small_tiles")
    seed, eps = make_seed(31337, 5), 0.70000002197243705
    zeros = torch.zeros(2, 64)
    want = ops.perturb(zeros, seed, eps, 1, 0, False)[:2]
    got = T.perturb(zeros.to(DEVICE), seed, eps, 1, 0, False)[:2].cpu()
    assert torch.equal(got, want)
    raw = ops.perturb(zeros, seed, 8.0, 1, 2, False)[:2]  # gaussian with eps = sqrt(d): the raw values exactly
    scale = torch.tensor(eps / R.sphere_sum_sq(raw)[1].sqrt().item(), dtype=torch.float64).float()
    assert torch.equal(got[1], raw[1] * scale)
    want64 = ops.perturb(zeros.double(), seed, eps, 1, 0, False)[:2]  # float64 directions are bitwise too
    assert torch.equal(T.perturb(zeros.double().to(DEVICE), seed, eps, 1, 0, False)[:2].cpu(), want64)
