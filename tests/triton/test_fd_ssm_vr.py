"""fdsm_ext/triton/fd_ssm_vr.py: rows over many tiles, bad input (the generic checks: test_ops_generic.py)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext import reference as R  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import (DEVICE, assert_close, assert_grads_close, cpp_directions, make_seed,  # noqa: E402
                      on_device)

B, D = 5, 13


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_ssm_vr_multi_tile_rows(dtype):
    # 8-column tiles: D = 13 takes two tiles per row, and the sphere's norm the two-pass path.
    n, seed = 2, make_seed(7)
    sp, sm = torch.randn(n, B, D, dtype=dtype), torch.randn(n, B, D, dtype=dtype)
    ref = R.fd_ssm_vr(sp, sm, cpp_directions(seed, n, "sphere", 0.2, dtype, B, D), 0.2, float(D))
    assert_close(T.fd_ssm_vr(*on_device(sp, sm), seed, 0.2, 0, float(D)).cpu(), ref, dtype)
    g = torch.randn(B, dtype=dtype)
    got = T.fd_ssm_vr_backward(*on_device(g, sp, sm), seed, 0.2, 0, float(D))
    assert_grads_close(got, ops._ops.fd_ssm_vr_backward(g, sp, sm, seed, 0.2, 0, float(D)), dtype)


def test_bad_arguments_raise():
    z = lambda *s: torch.zeros(*s, device=DEVICE)  # noqa: E731
    with pytest.raises(RuntimeError, match="`sm`"):
        T.fd_ssm_vr(z(1, 2, 3), z(1, 2, 4), make_seed(), 0.1, 0, 3.0)
    with pytest.raises(RuntimeError, match="`sp`"):
        T.fd_ssm_vr(z(2, 3), z(2, 3), make_seed(), 0.1, 0, 3.0)
    with pytest.raises(RuntimeError, match="`grad`"):
        T.fd_ssm_vr_backward(z(3), z(1, 2, 3), z(1, 2, 3), make_seed(), 0.1, 0, 3.0)
