"""fdsm_ext/triton/stencil.py: the low orders, bad input (the generic checks: test_ops_generic.py)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE  # noqa: E402

B, D = 5, 13


def test_low_order_stencils_are_the_fd_quotients():
    f = torch.randn(3, B, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(T.stencil_combine(f[[0, 2]], 0.1, 1), (f[0] - f[2]) / 0.2)
    torch.testing.assert_close(T.stencil_combine(f, 0.1, 2), (f[0] + f[2] - 2 * f[1]) / 0.2**2)


@pytest.mark.parametrize("call, match", [
    (lambda z: T.stencil_perturb(z(2, 3), z(2, 4), 0.1, 2), "v"),
    (lambda z: T.stencil_perturb(z(2, 3), z(2, 3), 0.1, 0), "order"),
    (lambda z: T.stencil_combine(z(2, 3), 0.1, 2), "f"),
    (lambda z: T.stencil_perturb_backward(z(5, 3), 0.1, 2), "grad"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        call(lambda *s: torch.zeros(*s, device=DEVICE))
