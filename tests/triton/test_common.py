"""fdsm_ext/triton/_common.py: the host helpers the ops share."""

import math

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fdsm_ext.triton import _common as C  # noqa: E402

from conftest import DEVICE  # noqa: E402


@triton.jit
def _decode_kernel(words_ptr, out_ptr, N: tl.constexpr):
    for k in tl.static_range(N):
        lo = tl.load(words_ptr + 2 * k).to(tl.uint32)
        hi = tl.load(words_ptr + 2 * k + 1).to(tl.uint32)
        tl.store(out_ptr + k, C.f64(lo, hi))


def test_float64_scalars_reach_kernels_exactly():
    # Through int64 words in a tensor here; as uint32 scalar arguments in the op kernels.
    values = [0.1, -2.5e-300, 5e-324, 1.0 / 3.0, 0.0, -0.0, 1e308, float(2**53 + 1), math.pi]
    words = torch.tensor([w for v in values for w in C.f64_words(v)], dtype=torch.int64, device=DEVICE)
    out = torch.empty(len(values), dtype=torch.float64, device=DEVICE)
    _decode_kernel[(1,)](words, out, N=len(values))
    assert [float(v) for v in out.cpu()] == values
    assert math.copysign(1.0, out[5].item()) == -1.0


def test_words_are_twos_complement():
    assert C.words(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert C.words(2**32 + 5) == (5, 1)
    assert C.read_seed(torch.tensor([-2, 2**40 + 7])) == (0xFFFFFFFE, 0xFFFFFFFF, 7, 2**8)


@pytest.mark.parametrize("seed", [torch.zeros(3, dtype=torch.int64), torch.zeros(2), torch.zeros(2, dtype=torch.int32)])
def test_bad_seed_raises(seed):
    with pytest.raises(RuntimeError, match="`seed`"):
        C.read_seed(seed)


def test_where_the_kernels_run(monkeypatch):
    assert C.unavailable_reason("cuda") is None
    assert "CUDA" in C.unavailable_reason("meta")
    monkeypatch.setattr(C, "INTERPRET", True)
    assert C.unavailable_reason("cpu") is None
    monkeypatch.setattr(C, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in C.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        C.check_device(torch.zeros(1), "x")


@pytest.mark.parametrize("rows, d", [(1, 1), (5, 13), (3, 4096), (100000, 3), (7, 1000)])
def test_row_tiles(rows, d):
    block_r, block_d = C.row_tiles(rows, d)
    for b in (block_r, block_d):
        assert b & (b - 1) == 0  # powers of two, as tl.arange needs
    assert 4 <= block_d <= C.MAX_BLOCK_D and block_r * block_d <= max(C.TILE, block_d)
    assert block_d >= min(d, C.MAX_BLOCK_D)


def test_poisoned_outputs():
    old = C.set_poison_outputs(True)
    try:
        assert C.new_output((3,), torch.float32, DEVICE).isnan().all()
        assert C.set_poison_outputs(False) is True
        assert C.new_output((3,), torch.float32, DEVICE).shape == (3,)
    finally:
        C.set_poison_outputs(old)


def test_rows_too_long_for_the_grid_raise():
    assert C.column_grid(65535 * C.MAX_BLOCK_D, C.MAX_BLOCK_D) == 65535
    with pytest.raises(RuntimeError, match="too long"):
        C.column_grid(65535 * C.MAX_BLOCK_D + 1, C.MAX_BLOCK_D)
