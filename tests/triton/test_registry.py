"""fdsm_ext_triton's ops are fdsm_ext's with Triton kernels: schemas, checks, fakes, autograd (incl. double backward)."""

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


def _cases():
    # rademacher directions: the cheapest in the interpreter (the double backward does not depend on the kind)
    seed = torch.tensor([21, 0])
    rg = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE).requires_grad_()  # noqa: E731
    sigma = torch.rand(3, dtype=torch.float64, device=DEVICE) + 0.5
    return {
        "perturb": (lambda x: T.perturb(x, seed, 0.3, 1, 1, True), (rg(2, 4),)),
        "fd_ssm_quotient": (lambda a, p, m: T.fd_ssm_quotient(a, p, m, 0.3, 6.0), (rg(3), rg(2, 3), rg(2, 3))),
        "fd_ssm_vr": (lambda p, m: T.fd_ssm_vr(p, m, seed, 0.3, 1, 6.0), (rg(1, 2, 4), rg(1, 2, 4))),
        "fd_dsm_quotient": (lambda p, m, w: T.fd_dsm_quotient(p, m, w, sigma[:2], seed, 0.3, 1, 6.0),
                            (rg(1, 2), rg(1, 2), rg(2, 4))),
        "stencil_perturb": (lambda x, v: T.stencil_perturb(x, v, 0.1, 2), (rg(2, 3), rg(2, 3))),
        "stencil_combine": (lambda f: T.stencil_combine(f, 0.5, 3), (rg(4, 3),)),
        "fd_divergence": (lambda p, m: T.fd_divergence(p, m, seed, 0.3, 1), (rg(1, 2, 4), rg(1, 2, 4))),
    }


@pytest.mark.parametrize("name", ops.FUSED_OPS)
def test_gradgradcheck_fp64(name):
    fn, inputs = _cases()[name]
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_bad_input_is_refused_with_the_cpp_message():
    x, seed = torch.zeros(2, 3, device=DEVICE), torch.tensor([1, 2])
    for call in (ops._ops.perturb, T.perturb):
        with pytest.raises(RuntimeError, match=r"`n_slices` \* batch must be < 2\^32"):
            call(x, seed, 0.1, 2**62, 0, True)
