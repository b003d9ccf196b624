"""Each fused op against its pure-PyTorch reference: values, gradients, opcheck, strides, bad input."""

import math

import pytest
import torch
from torch.testing._internal.optests import opcheck

from fdsm_ext import ops
from fdsm_ext import reference as R

from conftest import DTYPES, KINDS, TOL, assert_close, make_seed, strided

B, D = 5, 13  # D not a multiple of 4: the last Philox block of each row is partly used


def _dirs(seed, n, kind, eps, dtype, b=B, d=D):
    """The kernels' directions, exactly: the + block of perturb(0) in the accumulation dtype.

    The stream itself is checked against the pure-PyTorch Philox in the tests below; the formula
    tests use the kernel's own v so that their tolerances bound only the formula's arithmetic.
    """
    zeros = torch.zeros(b, d, dtype=R.acc_dtype(dtype))
    return ops.perturb(zeros, seed, eps, n, ops.DIRECTION_KINDS[kind], False)[: n * b].reshape(n, b, d)


# --------------------------------------------------------------------------- Philox stream
def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 (Random123 kat_vectors).
    def run(ctr, key):
        c = tuple(torch.tensor([v], dtype=torch.int64) for v in ctr)
        return [int(w) for w in R.philox4x32_10(c, key)]

    assert run((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ff = 0xFFFFFFFF
    assert run((ff, ff, ff, ff), (ff, ff)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_directions_match_reference_stream(kind):
    # x = 0 makes the + block exactly v (fp32), so the kernel's stream is visible.
    seed = make_seed(987654321987, 42)
    v = ops.perturb(torch.zeros(64, 37), seed, 0.3, 3, ops.DIRECTION_KINDS[kind], False)[: 3 * 64]
    ref = R.philox_directions(seed, 3 * 64, 37, kind, 0.3, torch.float32)
    if kind == "rademacher":
        assert torch.equal(v, ref)
    else:  # polynomial ln/sin/cos in the kernel vs exact ones here: a few float32 ulps
        torch.testing.assert_close(v, ref, rtol=2e-6, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_direction_statistics(kind):
    # E[v] = 0 and E[v v^T] = eps^2 I / d for every kind; sphere rows have norm eps exactly;
    # Gaussian coordinates have kurtosis 3 (checks the Box-Muller polynomials end to end).
    d, rows, eps = 8, 40000, 0.5
    v = ops.perturb(torch.zeros(rows, d, dtype=torch.float64), make_seed(7), eps, 1, ops.DIRECTION_KINDS[kind],
                    False)[:rows]
    cov = v.T @ v / rows
    se = eps**2 / d * math.sqrt(2.0 / rows) * 3  # generous standard error of a covariance entry
    torch.testing.assert_close(cov, torch.eye(d, dtype=v.dtype) * eps**2 / d, rtol=0, atol=6 * se)
    assert v.mean(0).abs().max() < 6 * eps / math.sqrt(d * rows)
    if kind == "sphere":
        torch.testing.assert_close(v.norm(dim=1), torch.full((rows,), eps, dtype=v.dtype))
    if kind == "gaussian":
        z = v.flatten() * math.sqrt(d) / eps
        kurt = (z**4).mean() / (z**2).mean() ** 2
        assert abs(kurt - 3.0) < 0.1, kurt
        # tails: the fraction beyond 2 sigma is 4.55 %
        assert abs((z.abs() > 2).double().mean() - 0.0455) < 0.004


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 31, 32, 37, 259])
def test_vector_and_scalar_direction_code_agree_bitwise(kind, d):
    # The CPU kernels draw whole vectors of Philox blocks (csrc/cpu/directions_cpu.cpp) and the row's
    # tail with the scalar code of fd_math.h; the vector code must be a bitwise transcription of it.
    seed = make_seed(0x123456789ABC, 0xFEDCBA98765)
    x = torch.zeros(5, d)

    def draw():
        return (ops.perturb(x, seed, 0.3, 2, ops.DIRECTION_KINDS[kind], False),
                ops.langevin_step(torch.zeros(3, 4096 + d), torch.zeros(3, 4096 + d), 0.5, seed)[0])

    vector = draw()
    old = ops.set_vector_stream(False)
    try:
        scalar = draw()
    finally:
        ops.set_vector_stream(old)
    for a, b in zip(vector, scalar):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def _cuda_butterfly_sum(values, lanes=32):
    """A row sum as the CUDA kernels' row group does it (csrc/cuda/cuda_rows.cuh): lane L adds the 4 values
    of groups L, L + 32, ... in order, then a warp's xor butterfly (o = 16, 8, 4, 2, 1); lane 0's total."""
    acc = [type(values[0])(0)] * lanes
    for g in range((len(values) + 3) // 4):
        for v in values[4 * g:4 * g + 4]:
            acc[g % lanes] += v
    o = lanes // 2
    while o:
        acc = [acc[i] + acc[i ^ o] for i in range(lanes)]
        o //= 2
    return acc[0]


SPHERE_KAT = dict(seed=(31337, 5), eps=0.70000002197243705, d=64)


def sphere_known_answer(perturb):
    """``(raw, got)`` of the sphere known-answer case (issue 15): the raw values of row 1 (the gaussian
    kind with eps = sqrt(d) is exactly raw) and the sphere directions of ``perturb`` (an op of either
    namespace), whose scale must not depend on how the backend orders the row's sum of squares."""
    seed, eps, d = make_seed(*SPHERE_KAT["seed"]), SPHERE_KAT["eps"], SPHERE_KAT["d"]
    raw = perturb(torch.zeros(2, d), seed, math.sqrt(d), 1, 2, False)[:2]
    got = perturb(torch.zeros(2, d), seed, eps, 1, 0, False)[:2]
    return raw, got


def test_sphere_scale_does_not_depend_on_the_reduction_order():
    # Known answer of issue 15: row 1's float64 sum of squares is 48.910981886736209 summed sequentially
    # (the CPU's order) and 48.910981886736224 in the CUDA butterfly, whose float32 scales differ by an ulp.
    # The kernels sum the squares as exact fixed-point integers, one value in every order.
    raw, got = sphere_known_answer(ops.perturb)
    sq = [float(v) ** 2 for v in raw[1].double()]
    seq = 0.0
    for v in sq:
        seq += v
    assert seq == 48.910981886736209 and _cuda_butterfly_sum(sq) == 48.910981886736224
    eps = SPHERE_KAT["eps"]
    assert torch.tensor(eps / math.sqrt(seq)).float() != torch.tensor(eps / math.sqrt(48.910981886736224)).float()
    unit = math.ldexp(1.0, 57 - SPHERE_KAT["d"].bit_length())
    fixed = [int(v * unit) for v in sq]
    assert sum(fixed) == _cuda_butterfly_sum(fixed)  # integers: every order agrees
    total = R.sphere_sum_sq(raw)[1].item()
    assert total == float(sum(fixed)) / unit
    scale = torch.tensor(eps / math.sqrt(total), dtype=torch.float64).float()
    assert torch.equal(got[1], raw[1] * scale)
    torch.testing.assert_close(got.double().norm(dim=1), torch.full((2,), eps, dtype=torch.float64), rtol=1e-7, atol=0)


def test_seed_and_offset_change_the_stream():
    x = torch.zeros(4, 16)
    a = ops.perturb(x, make_seed(1, 0), 0.1, 1, 0, False)
    assert torch.equal(a, ops.perturb(x, make_seed(1, 0), 0.1, 1, 0, False))
    assert not torch.equal(a, ops.perturb(x, make_seed(2, 0), 0.1, 1, 0, False))
    assert not torch.equal(a, ops.perturb(x, make_seed(1, 1), 0.1, 1, 0, False))


# --------------------------------------------------------------------------- values vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, center", [(1, True), (3, True), (2, False)])
def test_perturb(dtype, kind, n, center):
    x = torch.randn(B, D, dtype=dtype)
    seed = make_seed(11)
    out = ops.perturb(x, seed, 0.25, n, ops.DIRECTION_KINDS[kind], center)
    ref = R.perturb(x, _dirs(seed, n, kind, 0.25, dtype), center)
    assert out.dtype == dtype and out.shape == ((int(center) + 2 * n) * B, D)
    assert_close(out, ref)
    assert_close(ops.perturb(strided(x), seed, 0.25, n, ops.DIRECTION_KINDS[kind], center), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4])
def test_fd_ssm_quotient(dtype, n):
    f0, fp, fm = torch.randn(B, dtype=dtype), torch.randn(n, B, dtype=dtype), torch.randn(n, B, dtype=dtype)
    out = ops.fd_ssm_quotient(f0, fp, fm, 0.5, 3.0)
    ref = R.fd_ssm_quotient(f0, fp, fm, 0.5, 3.0)
    assert out.dtype == R.loss_dtype(dtype)
    assert_close(out, ref, dtype)
    fp_t = fp.T.contiguous().T  # (n, B) with column-major strides
    assert_close(ops.fd_ssm_quotient(f0, fp_t, fm, 0.5, 3.0), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
def test_fd_ssm_vr(dtype, kind, n):
    sp, sm = torch.randn(n, B, D, dtype=dtype), torch.randn(n, B, D, dtype=dtype)
    seed = make_seed(5, 3)
    out = ops.fd_ssm_vr(sp, sm, seed, 0.2, ops.DIRECTION_KINDS[kind], float(D))
    ref = R.fd_ssm_vr(sp, sm, _dirs(seed, n, kind, 0.2, dtype), 0.2, float(D))
    assert out.dtype == R.loss_dtype(dtype)
    assert_close(out, ref, dtype)
    assert_close(ops.fd_ssm_vr(strided(sp), sm, seed, 0.2, ops.DIRECTION_KINDS[kind], float(D)), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2])
def test_fd_dsm_quotient(dtype, n):
    fp, fm = torch.randn(n, B, dtype=dtype), torch.randn(n, B, dtype=dtype)
    noise, sigma = torch.randn(B, D, dtype=dtype) * 0.3, torch.rand(B, dtype=dtype) + 0.5
    seed = make_seed(9)
    out = ops.fd_dsm_quotient(fp, fm, noise, sigma, seed, 0.1, 0, float(D))
    ref = R.fd_dsm_quotient(fp, fm, noise, sigma, _dirs(seed, n, "sphere", 0.1, dtype), 0.1, float(D))
    assert_close(out, ref, dtype)
    assert_close(ops.fd_dsm_quotient(fp, fm, strided(noise), sigma, seed, 0.1, 0, float(D)), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_stencil(dtype, order):
    x, v = torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype)
    out = ops.stencil_perturb(x, v, 0.1, order)
    assert_close(out, R.stencil_perturb(x, v, 0.1, order))
    assert_close(ops.stencil_perturb(strided(x), strided(v), 0.1, order), R.stencil_perturb(x, v, 0.1, order))
    f = torch.randn(order + 1, B, dtype=dtype)
    ref = R.stencil_combine(f, 0.1, order)
    assert_close(ops.stencil_combine(f, 0.1, order), ref, dtype, scale=(0.2) ** -order)


def test_low_order_stencils_are_the_fd_quotients():
    # T = 1 is the central difference (f+ - f-)/(2 eps) with f+- at x +- eps v; T = 2 puts its
    # outer points at x +- 2 eps v: the second difference (f+ + f- - 2 f0)/h^2 of step h = 2 eps.
    f = torch.randn(3, B, dtype=torch.float64)
    torch.testing.assert_close(ops.stencil_combine(f[[0, 2]], 0.1, 1), (f[0] - f[2]) / 0.2)
    torch.testing.assert_close(ops.stencil_combine(f, 0.1, 2), (f[0] + f[2] - 2 * f[1]) / 0.2**2)


# --------------------------------------------------------------------------- gradients
def _grads(fn, inputs):
    out = fn(*inputs)
    g = torch.randn_like(out)
    return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(dtype):
    seed, n = make_seed(3), 2
    rg = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_()  # noqa: E731
    v = _dirs(seed, n, "sphere", 0.2, dtype)
    cases = [
        (lambda x: ops.perturb(x, seed, 0.2, n, 0, True), lambda x: R.perturb(x, v, True), (rg(B, D),)),
        (lambda a, p, m: ops.fd_ssm_quotient(a, p, m, 0.2, 4.0), lambda a, p, m: R.fd_ssm_quotient(a, p, m, 0.2, 4.0),
         (rg(B), rg(n, B), rg(n, B))),
        (lambda p, m: ops.fd_ssm_vr(p, m, seed, 0.2, 0, float(D)), lambda p, m: R.fd_ssm_vr(p, m, v, 0.2, float(D)),
         (rg(n, B, D), rg(n, B, D))),
        (lambda p, m, w: ops.fd_dsm_quotient(p, m, w, torch.full((B,), 0.5, dtype=dtype), seed, 0.2, 0, float(D)),
         lambda p, m, w: R.fd_dsm_quotient(p, m, w, torch.full((B,), 0.5, dtype=dtype), v, 0.2, float(D)),
         (rg(n, B), rg(n, B), rg(B, D))),
        (lambda x, w: ops.stencil_perturb(x, w, 0.1, 3), lambda x, w: R.stencil_perturb(x, w, 0.1, 3),
         (rg(B, D), rg(B, D))),
        (lambda f: ops.stencil_combine(f, 0.1, 2), lambda f: R.stencil_combine(f, 0.1, 2), (rg(3, B),)),
    ]
    for fused, ref, inputs in cases:
        torch.manual_seed(1)
        got = _grads(fused, inputs)
        torch.manual_seed(1)
        want = _grads(ref, inputs)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype == dtype
            # gradients carry the 1/eps^2 factors of the quotients: compare relative to their size
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


def test_gradcheck_fp64():
    seed = make_seed(21)
    rg = lambda *s: torch.randn(*s, dtype=torch.float64).requires_grad_()  # noqa: E731
    sigma = torch.rand(3, dtype=torch.float64) + 0.5
    checks = [
        (lambda x: ops.perturb(x, seed, 0.3, 2, 0, True), (rg(3, 6),)),
        (lambda x: ops.perturb(x, seed, 0.3, 1, 1, False), (rg(3, 6),)),
        (lambda a, p, m: ops.fd_ssm_quotient(a, p, m, 0.3, 6.0), (rg(3), rg(2, 3), rg(2, 3))),
        (lambda p, m: ops.fd_ssm_vr(p, m, seed, 0.3, 2, 6.0), (rg(2, 3, 6), rg(2, 3, 6))),
        (lambda p, m, w: ops.fd_dsm_quotient(p, m, w, sigma, seed, 0.3, 0, 6.0), (rg(2, 3), rg(2, 3), rg(3, 6))),
        (lambda x, v: ops.stencil_perturb(x, v, 0.1, 4), (rg(3, 6), rg(3, 6))),
        (lambda f: ops.stencil_combine(f, 0.5, 3), (rg(4, 3),)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)


def _double_backward_cases(ns, kind=0):
    """(name, fn, inputs) of every differentiable op of namespace ``ns``, float64, small shapes; the seed is
    fixed (the directions are regenerated from it, so gradcheck's perturbed calls see the same v)."""
    seed = make_seed(21)
    rg = lambda *s: torch.randn(*s, dtype=torch.float64).requires_grad_()  # noqa: E731
    sigma = torch.rand(3, dtype=torch.float64) + 0.5
    return [
        ("perturb", lambda x: ns.perturb(x, seed, 0.3, 2, kind, True), (rg(3, 6),)),
        ("fd_ssm_quotient", lambda a, p, m: ns.fd_ssm_quotient(a, p, m, 0.3, 6.0), (rg(3), rg(2, 3), rg(2, 3))),
        ("fd_ssm_vr", lambda p, m: ns.fd_ssm_vr(p, m, seed, 0.3, kind, 6.0), (rg(2, 3, 6), rg(2, 3, 6))),
        ("fd_dsm_quotient", lambda p, m, w: ns.fd_dsm_quotient(p, m, w, sigma, seed, 0.3, kind, 6.0),
         (rg(2, 3), rg(2, 3), rg(3, 6))),
        ("stencil_perturb", lambda x, v: ns.stencil_perturb(x, v, 0.1, 4), (rg(3, 6), rg(3, 6))),
        ("stencil_combine", lambda f: ns.stencil_combine(f, 0.5, 3), (rg(4, 3),)),
        ("fd_divergence", lambda p, m: ns.fd_divergence(p, m, seed, 0.3, kind), (rg(2, 3, 6), rg(2, 3, 6))),
    ]


@pytest.mark.parametrize("case", range(len(ops.FUSED_OPS)), ids=list(ops.FUSED_OPS))
def test_gradgradcheck_fp64(case):
    # Double backward (a gradient penalty through a fused loss): the backward ops are differentiable.
    name, fn, inputs = _double_backward_cases(ops._ops)[case]
    assert name == ops.FUSED_OPS[case]
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradient_penalty_matches_the_reference_on_the_kernels_directions():
    # The case: the penalty ||d loss / d x||^2 through fd_ssm_quotient, differentiated w.r.t. the
    # weights, equals the same composite built from the reference formula on the kernel's directions.
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    seed, n, eps = make_seed(9), 2, 0.1
    v = _dirs(seed, n, "sphere", eps, torch.float64, 5, 4)

    def penalty(fused):
        stacked = ops.perturb(x, seed, eps, n, 0, True) if fused else R.perturb(x, v, True)
        f = net(stacked).squeeze(-1)
        q = (ops.fd_ssm_quotient if fused else R.fd_ssm_quotient)(f[:5], f[5:15].reshape(n, 5),
                                                                 f[15:].reshape(n, 5), eps, 4.0)
        (gx,) = torch.autograd.grad(q.sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), list(net.parameters()))

    for a, b in zip(penalty(True), penalty(False)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["fd_ssm_quotient", "fd_dsm_quotient"])
def test_compiled_backward_with_transposed_f_matches_eager(op):
    # The fakes return contiguous gradients, as the kernels do: a transposed (n, B) input must not make the
    # compiled graph assert on strides.
    n, b = 3, 4
    fp = torch.randn(b, n, dtype=torch.float64).T.requires_grad_()
    fm = torch.randn(b, n, dtype=torch.float64).T.requires_grad_()
    assert not fp.is_contiguous()
    f0 = torch.randn(b, dtype=torch.float64, requires_grad=True)
    noise, sigma, seed = torch.randn(b, 5, dtype=torch.float64), torch.rand(b, dtype=torch.float64) + 0.5, make_seed()

    def loss(fp, fm):
        if op == "fd_ssm_quotient":
            return ops.fd_ssm_quotient(f0, fp, fm, 0.1, 2.0).sum()
        return ops.fd_dsm_quotient(fp, fm, noise, sigma, seed, 0.1, 0, 2.0).sum()

    def step(fp, fm):
        return torch.autograd.grad(loss(fp, fm), (fp, fm))

    want = step(fp, fm)
    torch._dynamo.reset()
    got = torch.compile(step, backend="aot_eager", fullgraph=False)(fp, fm)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
    opcheck(getattr(ops._ops, f"{op}_backward").default,
            (torch.ones(b, dtype=torch.float64), f0.detach(), fp.detach(), fm.detach(), 0.1, 2.0)
            if op == "fd_ssm_quotient" else
            (torch.ones(b, dtype=torch.float64), fp.detach(), fm.detach(), noise, sigma, seed, 0.1, 0, 2.0))


# --------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    seed = make_seed(8, 1)
    for dtype in (torch.float32, torch.float64):
        for rg in (False, True):
            t = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=rg)  # noqa: E731
            yield ops._ops.perturb.default, (t(4, 7), seed, 0.1, 2, 0, True)
            yield ops._ops.perturb.default, (t(4, 7), seed, 0.1, 1, 1, False)
            yield ops._ops.fd_ssm_quotient.default, (t(4), t(2, 4), t(2, 4), 0.1, 7.0)
            yield ops._ops.fd_ssm_vr.default, (t(2, 4, 7), t(2, 4, 7), seed, 0.1, 0, 7.0)
            yield ops._ops.fd_dsm_quotient.default, (t(2, 4), t(2, 4), t(4, 7), torch.rand(4, dtype=dtype) + 0.5,
                                                     seed, 0.1, 2, 7.0)
            yield ops._ops.stencil_perturb.default, (t(4, 7), t(4, 7), 0.1, 3)
            yield ops._ops.stencil_combine.default, (t(4, 4), 0.1, 3)


@pytest.mark.parametrize("case", list(_opcheck_cases()), ids=lambda c: str(c[0]) if callable(c) else "")
def test_opcheck(case):
    op, args = case
    opcheck(op, args)


def test_backward_ops_opcheck():
    seed = make_seed(4)
    t = lambda *s: torch.randn(*s)  # noqa: E731
    opcheck(ops._ops.fd_ssm_quotient_backward.default, (t(4), t(4), t(2, 4), t(2, 4), 0.1, 7.0))
    opcheck(ops._ops.fd_ssm_vr_backward.default, (t(4), t(2, 4, 7), t(2, 4, 7), seed, 0.1, 0, 7.0))
    args = (t(4), t(2, 4), t(2, 4), t(4, 7), torch.rand(4) + 0.5, seed, 0.1, 0, 7.0)
    opcheck(ops._ops.fd_dsm_quotient_backward.default, args)
    opcheck(ops._ops.fd_dsm_noise_backward.default, args)
    opcheck(ops._ops.stencil_perturb_backward.default, (t(12, 7), 0.1, 2))
    opcheck(ops._ops.stencil_combine_backward.default, (t(4), t(3, 4), 0.1, 2))


# --------------------------------------------------------------------------- edge cases and bad input
def test_poisoning_is_active():
    # The autouse fixture is on; a kernel that skipped an element would leave a NaN behind.
    assert ops.set_poison_outputs(True) is True


def test_empty_batch_is_a_valid_op_call():
    out = ops.perturb(torch.zeros(0, 5), make_seed(), 0.1, 2, 0, True)
    assert out.shape == (0, 5)
    assert ops.fd_ssm_quotient(torch.zeros(0), torch.zeros(1, 0), torch.zeros(1, 0), 0.1, 1.0).shape == (0,)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.perturb(torch.zeros(2, 3), make_seed(), 0.0, 1, 0, True), "eps"),
    (lambda: ops.perturb(torch.zeros(2, 3), make_seed(), float("nan"), 1, 0, True), "eps"),
    (lambda: ops.perturb(torch.zeros(2, 3), make_seed(), 0.1, 0, 0, True), "n_slices"),
    (lambda: ops.perturb(torch.zeros(2, 3), make_seed(), 0.1, 1, 7, True), "kind"),
    (lambda: ops.perturb(torch.zeros(2, 3, 4), make_seed(), 0.1, 1, 0, True), "x"),
    (lambda: ops.perturb(torch.zeros(2, 3, dtype=torch.int64), make_seed(), 0.1, 1, 0, True), "x"),
    (lambda: ops.perturb(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), 0.1, 1, 0, True), "seed"),
    (lambda: ops.perturb(torch.zeros(2, 3), torch.zeros(2), 0.1, 1, 0, True), "seed"),
    (lambda: ops.fd_ssm_quotient(torch.zeros(3), torch.zeros(1, 4), torch.zeros(1, 4), 0.1, 1.0), "fp"),
    (lambda: ops.fd_ssm_quotient(torch.zeros(3), torch.zeros(1, 3), torch.zeros(2, 3), 0.1, 1.0), "fm"),
    (lambda: ops.fd_ssm_quotient(torch.zeros(3), torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3),
                                 0.1, 1.0), "fp"),
    (lambda: ops.fd_ssm_vr(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), make_seed(), 0.1, 0, 3.0), "sm"),
    (lambda: ops.fd_dsm_quotient(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(3, 4), torch.ones(2),
                                 make_seed(), 0.1, 0, 4.0), "noise"),
    (lambda: ops.fd_dsm_quotient(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2, 4), torch.ones(3),
                                 make_seed(), 0.1, 0, 4.0), "sigma"),
    (lambda: ops.stencil_perturb(torch.zeros(2, 3), torch.zeros(2, 4), 0.1, 2), "v"),
    (lambda: ops.stencil_perturb(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, 0), "order"),
    (lambda: ops.stencil_combine(torch.zeros(2, 3), 0.1, 2), "f"),
])
def test_bad_op_arguments_raise(call, match):
    with pytest.raises(RuntimeError, match=f"`?{match}`?"):
        call()
