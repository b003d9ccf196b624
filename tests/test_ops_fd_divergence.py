"""The fd_divergence op (C++ kernels) against its pure-PyTorch reference: values, gradients, opcheck, bad input.

Error model of the forward (docs/math.md, "FD divergence"): the kernels and the reference form the same
products ``v_j (s+_j - s-_j)`` in the accumulation dtype (u = its unit round-off) and differ only in the
sum (float64 in the kernels, the accumulation dtype in the reference: at most ``(d - 1) u`` of the sum
of the products' magnitudes) and in the final scaling by ``c = d / (2 eps^2)`` (one rounding each). So
``|kernel - reference| <= c (d + 2) u sum_j |v_j (s+_j - s-_j)|``, whatever the CPU's vector width.
"""

import math

import pytest
import torch
from torch.testing._internal.optests import opcheck

from fdsm_ext import numerics, ops
from fdsm_ext import reference as R

from conftest import DTYPES, KINDS, make_seed, strided

B, D = 5, 13  # D not a multiple of 4: the last Philox block of each row is partly used


def _dirs(seed, n, kind, eps, dtype, b=B, d=D):
    """The kernels' directions exactly: the + block of perturb(0) in the accumulation dtype."""
    zeros = torch.zeros(b, d, dtype=R.acc_dtype(dtype))
    return ops.perturb(zeros, seed, eps, n, ops.DIRECTION_KINDS[kind], False)[: n * b].reshape(n, b, d)


def forward_bound(sp, sm, v, eps):
    """The forward's error bound (module docstring), ``(n, B)``."""
    acc = R.acc_dtype(sp.dtype)
    u, d = numerics.unit_roundoff(acc), sp.shape[-1]
    mag = (v.to(acc) * (sp.to(acc) - sm.to(acc))).abs().sum(-1).double()
    return d / (2 * eps * eps) * (d + 2) * u * mag


def assert_within(got, want, bound):
    err = (got.double() - want.double()).abs()
    assert bool((err <= bound).all()), (err.max().item(), bound.min().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
def test_fd_divergence_matches_reference(dtype, kind, n):
    sp, sm = torch.randn(n, B, D, dtype=dtype), torch.randn(n, B, D, dtype=dtype)
    seed, eps = make_seed(5, 3), 0.2
    v = _dirs(seed, n, kind, eps, dtype)
    out = ops.fd_divergence(sp, sm, seed, eps, ops.DIRECTION_KINDS[kind])
    ref = R.fd_divergence(sp, sm, v, eps)
    assert out.dtype == R.loss_dtype(dtype) and out.shape == (n, B) and out.is_contiguous()
    bound = forward_bound(sp, sm, v, eps)
    assert_within(out, ref, bound)
    assert_within(ops.fd_divergence(strided(sp), sm, seed, eps, ops.DIRECTION_KINDS[kind]), ref, bound)
    assert_within(ops.fd_divergence(sp, sm.transpose(0, 1).contiguous().transpose(0, 1), seed, eps,
                                    ops.DIRECTION_KINDS[kind]), ref, bound)


@pytest.mark.parametrize("kind", KINDS)
def test_fd_divergence_is_the_vr_loss_term(kind):
    # fd_ssm_vr's second term is dim_scale / (2 eps^2) v^T (s+ - s-): with dim_scale = d and sp = -sm it is
    # all that is left (||s+ + s-||^2 = 0), averaged over slices: the two ops share the formula and the stream.
    n, seed, eps = 3, make_seed(17), 0.3
    sp = torch.randn(n, B, D, dtype=torch.float64)
    div = ops.fd_divergence(sp, -sp, seed, eps, ops.DIRECTION_KINDS[kind])
    vr = ops.fd_ssm_vr(sp, -sp, seed, eps, ops.DIRECTION_KINDS[kind], float(D))
    torch.testing.assert_close(div.mean(0), vr, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sphere"])
def test_fd_divergence_of_a_linear_field_estimates_the_trace(kind):
    # s(x) = A x: s+ - s- = 2 A v exactly, and d/(2 eps^2) v^T 2 A v = d u^T A u with E[u u^T] = I/d: its mean
    # over many probes is tr A (a z-test with the sample's own spread; deterministic seed).
    d, rows, eps = 6, 4000, 0.5
    A = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(rows, d, dtype=torch.float64)
    seed = make_seed(23)
    stacked = ops.perturb(x, seed, eps, 1, ops.DIRECTION_KINDS[kind], False)
    s = stacked @ A.T
    div = ops.fd_divergence(s[:rows][None], s[rows:][None], seed, eps, ops.DIRECTION_KINDS[kind])[0]
    z = (div.mean() - torch.trace(A)) / (div.std() / math.sqrt(rows))
    assert abs(float(z)) < 5.0, z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sphere", "gaussian"])
def test_fd_divergence_backward_matches_reference(dtype, kind):
    n, seed, eps = 2, make_seed(3), 0.2
    v = _dirs(seed, n, kind, eps, dtype)
    sp, sm = (torch.randn(n, B, D, dtype=dtype).requires_grad_() for _ in range(2))
    g = torch.randn(n, B, dtype=R.loss_dtype(dtype))
    got = torch.autograd.grad(ops.fd_divergence(sp, sm, seed, eps, ops.DIRECTION_KINDS[kind]), (sp, sm), g)
    want = torch.autograd.grad(R.fd_divergence(sp, sm, v, eps), (sp, sm), g.to(R.acc_dtype(dtype)))
    # d/ds+- = +-(g c) v: g c rounded once in the accumulation dtype (the reference: g * c, the same up to
    # the rounding of c), times v, rounded to the input dtype
    u_acc, u_out = numerics.unit_roundoff(R.acc_dtype(dtype)), numerics.unit_roundoff(dtype)
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.is_contiguous()
        b = b.to(dtype).double()
        assert bool(((a.double() - b).abs() <= (4 * u_acc + 2 * u_out) * b.abs()).all())
    torch.testing.assert_close(got[1], -got[0], rtol=0, atol=0)


def test_gradcheck_and_gradgradcheck_fp64():
    seed = make_seed(21)
    inputs = [torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for kind in (0, 1, 2):
        fn = lambda p, m, k=kind: ops.fd_divergence(p, m, seed, 0.3, k)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rg", [False, True])
def test_opcheck(dtype, rg):
    seed = make_seed(8, 1)
    t = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=rg)  # noqa: E731
    opcheck(ops._ops.fd_divergence.default, (t(2, 4, 7), t(2, 4, 7), seed, 0.1, 1))
    opcheck(ops._ops.fd_divergence.default, (t(1, 3, 5), t(1, 3, 5), seed, 0.1, 0))
    if not rg:
        opcheck(ops._ops.fd_divergence_backward.default, (t(2, 4), t(2, 4, 7), t(2, 4, 7), seed, 0.1, 2))


def test_poisoned_outputs_are_all_written():
    # the autouse fixture NaN-fills every output first: every element, empty rows included, is written
    assert ops.set_poison_outputs(True) is True
    out = ops.fd_divergence(torch.ones(2, 3, 0), torch.ones(2, 3, 0), make_seed(), 0.1, 1)
    assert torch.equal(out, torch.zeros(2, 3))
    assert ops.fd_divergence(torch.ones(2, 0, 4), torch.ones(2, 0, 4), make_seed(), 0.1, 1).shape == (2, 0)
    gp, gm = ops._ops.fd_divergence_backward(torch.ones(3, 4), torch.ones(3, 4, 9), torch.ones(3, 4, 9), make_seed(),
                                             0.1, 2)
    assert bool(torch.isfinite(gp).all() & torch.isfinite(gm).all())


@pytest.mark.parametrize("call, match", [
    (lambda: ops.fd_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), make_seed(), 0.1, 1), "sm"),
    (lambda: ops.fd_divergence(torch.zeros(2, 3), torch.zeros(2, 3), make_seed(), 0.1, 1), "sp"),
    (lambda: ops.fd_divergence(torch.zeros(0, 2, 3), torch.zeros(0, 2, 3), make_seed(), 0.1, 1), "sp"),
    (lambda: ops.fd_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.float64), make_seed(), 0.1, 1),
     "sm"),
    (lambda: ops.fd_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), make_seed(), 0.0, 1), "eps"),
    (lambda: ops.fd_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), make_seed(), 1e-200, 1), "eps"),
    (lambda: ops.fd_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), make_seed(), 0.1, 3), "kind"),
    (lambda: ops.fd_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(2), 0.1, 1), "seed"),
    (lambda: ops._ops.fd_divergence_backward(torch.zeros(2), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), make_seed(),
                                             0.1, 1), "grad"),
])
def test_bad_arguments_raise_naming_them(call, match):
    with pytest.raises(RuntimeError, match=f"`{match}`"):
        call()
