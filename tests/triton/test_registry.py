"""fdsm_ext_triton's ops are fdsm_ext's with Triton kernels: schemas and checks (fakes and autograd, double
backward included: test_ops_generic.py)."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402

from fdsm_ext import ops  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE  # noqa: E402


def test_every_op_has_the_cpp_schema():
    for name in ops.OPS:
        want = str(getattr(ops._ops, name).default._schema).replace("fdsm_ext::", "")
        assert str(getattr(T, name).default._schema).replace("fdsm_ext_triton::", "") == want


def test_bad_input_is_refused_with_the_cpp_message():
    x, seed = torch.zeros(2, 3, device=DEVICE), torch.tensor([1, 2])
    for call in (ops._ops.perturb, T.perturb):
        with pytest.raises(RuntimeError, match=r"`n_slices` \* batch must be < 2\^32"):
            call(x, seed, 0.1, 2**62, 0, True)
