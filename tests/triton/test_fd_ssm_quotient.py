"""fdsm_ext/triton/fd_ssm_quotient.py: what only the FD-SSM quotient has (the generic checks: test_ops_generic.py)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, on_device  # noqa: E402

B = 5


@pytest.mark.parametrize("shapes, match", [
    (((3,), (1, 4), (1, 4)), "fp"),
    (((3,), (1, 3), (2, 3)), "fm"),
    (((3, 1), (1, 3), (1, 3)), "f0"),
])
def test_bad_arguments_raise(shapes, match):
    f0, fp, fm = (torch.zeros(s, device=DEVICE) for s in shapes)
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        T.fd_ssm_quotient(f0, fp, fm, 0.1, 1.0)
    with pytest.raises(RuntimeError, match="`fp`"):
        T.fd_ssm_quotient(torch.zeros(3, device=DEVICE), torch.zeros(1, 3, dtype=torch.float64, device=DEVICE),
                          torch.zeros(1, 3, device=DEVICE), 0.1, 1.0)


def test_no_slices_is_refused_as_by_the_cpp_op():
    # a mean over no slices would be NaN: both backends refuse it, naming the argument
    f0, empty = torch.randn(3), torch.zeros(0, 3)
    with pytest.raises(RuntimeError, match="`fp` must hold at least one slice"):
        ops.fd_ssm_quotient(f0, empty, empty, 0.1, 1.0)
    with pytest.raises(RuntimeError, match="`fp` must hold at least one slice"):
        T.fd_ssm_quotient(*on_device(f0, empty, empty), 0.1, 1.0)
