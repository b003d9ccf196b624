"""Every op of fdsm_ext.ops.OPS against its pure-PyTorch reference, from its example call (op_examples.py):
values in every dtype and direction kind, non-contiguous inputs, empty batches, gradients, gradcheck,
gradgradcheck, opcheck, and the CUDA kernels against the CPU ones where there is a GPU; then what only
one op has: the direction stream, the stencils' low orders, the slice counts and orders each op is also
run with, a gradient penalty, compiled backwards, bad input."""

import math

import pytest
import torch
from torch.testing._internal.optests import opcheck

import fdsm_ext
from fdsm_ext import ops
from fdsm_ext import reference as R

import op_examples as E
from conftest import DTYPES, KINDS, TOL, make_seed

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
@pytest.mark.parametrize("d", [1, 2, 5, 31, 32, 37, 259])
def test_vector_and_scalar_direction_code_agree_bitwise(kind, d):
    # The CPU kernels draw whole vectors of Philox blocks (csrc/cpu/directions_cpu.cpp) and the row's
    # tail with the scalar code of fd_math.h; rows shorter than a vector step are drawn 8 rows at a time,
    # one per lane. The vector code must be a bitwise transcription of the scalar code: 19 rows per
    # block (not a multiple of 8), and dsm_perturb, which alternates between the noise and direction rows.
    seed = make_seed(0x123456789ABC, 0xFEDCBA98765)
    x = torch.zeros(19, d)

    def draw():
        return (ops.perturb(x, seed, 0.3, 2, ops.DIRECTION_KINDS[kind], False),
                *ops.dsm_perturb(x, torch.full((19,), 0.5), seed, 0.3, 2, ops.DIRECTION_KINDS[kind]),
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


# --------------------------------------------------------------------------- every op, from its example
def test_every_registered_op_has_an_example():
    # A new op fails here until its OPS entry has an example (forward op) or an `of` (backward op).
    registered = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("fdsm_ext::")}
    assert {n for n in registered if not n.startswith("_")} == set(ops.OPS)
    assert set(E.FORWARD) == set(ops.FUSED_OPS) | set(ops.LANGEVIN_OPS)
    for name in ops.OPS:
        args = ops.example(name)
        assert list(args) == ops.arg_names(name)
        getattr(ops._ops, name)(*args.values())


def _check_values(name, kind, dtype, **overrides):
    args = E.example(name, kind, B, D, dtype=dtype, **overrides)
    got, want = E.outputs(ops._ops, name, args), E.reference(name, args)
    E.assert_outputs_close(got, want, TOL, dtype, E.error_scale(name, args))
    # the real kernels return what the fake (torch.compile's view of them) says: contiguous, its shapes, dtypes
    fake = ops.OPS[name].fake(*args.values())
    returned = got[len(E.written(name)):]
    for g, f in zip(returned, fake if isinstance(fake, tuple) else (fake,)):
        assert g.shape == f.shape and g.dtype == f.dtype and g.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kind", E.with_kinds(E.FORWARD))
def test_values_match_the_reference(name, kind, dtype):
    _check_values(name, kind, dtype)


# Slice counts, stencil orders and options each op also runs with (the example has one of each).
VARIANTS = [("perturb", dict(n_slices=1)), ("perturb", dict(n_slices=3)), ("perturb", dict(include_center=False)),
            ("fd_ssm_quotient", dict(n=1)), ("fd_ssm_quotient", dict(n=4)), ("fd_ssm_vr", dict(n=1)),
            ("fd_ssm_vr", dict(n=3)), ("fd_dsm_quotient", dict(n=1)),
            *((op, dict(order=t)) for op in ("stencil_perturb", "stencil_combine") for t in (1, 2, 6)),
            *((op, dict(noise_scale=False)) for op in ops.LANGEVIN_OPS),
            *((op, dict(per_sample=False)) for op in ops.LANGEVIN_OPS),
            ("langevin_step", dict(return_norms=False)), ("langevin_step", dict(clamp_min=None, clamp_max=None))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kind, overrides", [
    pytest.param(n, k, o, id=f"{n}-{k}-" + "-".join(f"{a}={v}" for a, v in o.items()))
    for n, o in VARIANTS for k in E.kinds(n)])
def test_variants_match_the_reference(name, kind, overrides, dtype):
    _check_values(name, kind, dtype, **overrides)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", E.FORWARD)
def test_noncontiguous_inputs(name, dtype):
    # each tensor argument in turn strided or column-major: the same values as the contiguous call
    args = E.example(name, None, B, D, dtype=dtype)
    want = E.reference(name, args)
    for arg in E.tensor_args(args):
        for label, t in E.layouts(args[arg]):
            got = E.outputs(ops._ops, name, {**args, arg: t})
            E.assert_outputs_close(got, want, TOL, dtype, E.error_scale(name, args))


@pytest.mark.parametrize("name", E.FORWARD)
def test_empty_batch_is_a_valid_op_call(name):
    args = E.example(name, None, 0, D)
    fake = ops.OPS[name].fake(*args.values())
    got = E.outputs(ops._ops, name, args)[len(E.written(name)):]
    assert [g.shape for g in got] == [f.shape for f in (fake if isinstance(fake, tuple) else (fake,))]


def test_low_order_stencils_are_the_fd_quotients():
    # T = 1 is the central difference (f+ - f-)/(2 eps) with f+- at x +- eps v; T = 2 puts its
    # outer points at x +- 2 eps v: the second difference (f+ + f- - 2 f0)/h^2 of step h = 2 eps.
    f = torch.randn(3, B, dtype=torch.float64)
    torch.testing.assert_close(ops.stencil_combine(f[[0, 2]], 0.1, 1), (f[0] - f[2]) / 0.2)
    torch.testing.assert_close(ops.stencil_combine(f, 0.1, 2), (f[0] + f[2] - 2 * f[1]) / 0.2**2)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kind", E.with_kinds(E.DIFFERENTIABLE))
def test_backward_matches_reference(name, kind, dtype):
    args = E.requiring_grad(name, E.example(name, kind, B, D, dtype=dtype))
    names = E.grad_args(name)
    got = E.grads(lambda a: E.outputs(ops._ops, name, a)[0], args, names)
    want = E.grads(lambda a: E.reference(name, a)[0], args, names)
    E.assert_grads_close(got, want, TOL, dtype)


def _fp64_call(name, kind, B=3, d=6, **overrides):
    """(fn, inputs) of a float64 example: fn takes the differentiated inputs; the seed is fixed, so the
    directions are regenerated identically in gradcheck's perturbed calls."""
    args = E.example(name, kind, B, d, dtype=torch.float64, **overrides)
    names = E.grad_args(name)

    def fn(*inputs):
        return getattr(ops._ops, name)(*{**args, **dict(zip(names, inputs))}.values())

    return fn, tuple(args[n].clone().requires_grad_() for n in names)


@pytest.mark.parametrize("name, kind, overrides", [
    *((n, k, {}) for n in E.DIFFERENTIABLE for k in E.kinds(n)),
    ("perturb", "rademacher", dict(n_slices=1, include_center=False))])  # the stack without its x block
def test_gradcheck_fp64(name, kind, overrides):
    fn, inputs = _fp64_call(name, kind, **overrides)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", E.DIFFERENTIABLE)
def test_gradgradcheck_fp64(name):
    # Double backward (a gradient penalty through a fused loss): the backward ops are differentiable.
    fn, inputs = _fp64_call(name, "sphere" if E.kinds(name) != [None] else None)
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
    for name in ops.OPS:
        for kind in E.kinds(name):
            for dtype in (torch.float32, torch.float64):
                for rg in (False, True) if name in E.DIFFERENTIABLE else (False,):
                    tag = f"{name}-{kind}-{str(dtype)[6:]}-{'grad' if rg else 'nograd'}"
                    yield pytest.param(name, kind, dtype, rg, id=tag)


@pytest.mark.parametrize("name, kind, dtype, rg", list(_opcheck_cases()))
def test_opcheck(name, kind, dtype, rg):
    args = E.example(name, kind, 4, 7, dtype=dtype)
    if rg:
        args = E.requiring_grad(name, args)
    opcheck(getattr(ops._ops, name).default, tuple(args.values()))


# --------------------------------------------------------------------------- CUDA kernels vs the CPU ones
_needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fdsm_ext.has_cuda_kernels()),
                                 reason="needs a CUDA GPU and fdsm_ext built with CUDA kernels")


def _cuda(args: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) and k != "seed" else v for k, v in args.items()}


def _assert_cpu_close(got, want, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.is_cuda and g.dtype == w.dtype
        size = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g.cpu(), w, rtol=rtol * scale, atol=atol * scale * size)


@_needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kind", E.with_kinds(E.FORWARD))
def test_cuda_kernels_match_the_cpu_kernels(name, kind, dtype):
    # rows short enough for the warp-per-row kernels and long enough for the block-per-row ones
    for b, d in ((5, 13), (3, 64), (4, 1000)):
        args = E.example(name, kind, b, d, dtype=dtype)
        _assert_cpu_close(E.outputs(ops._ops, name, _cuda(args)), E.outputs(ops._ops, name, args), dtype,
                          E.error_scale(name, args))
        if name in E.DIFFERENTIABLE:
            names = E.grad_args(name)
            want = E.grads(lambda a: E.outputs(ops._ops, name, a)[0], E.requiring_grad(name, args), names)
            got = E.grads(lambda a: E.outputs(ops._ops, name, a)[0], E.requiring_grad(name, _cuda(args)), names)
            _assert_cpu_close(got, want, dtype)


@_needs_cuda
@pytest.mark.parametrize("name", list(ops.OPS))
def test_opcheck_on_cuda(name):
    args = _cuda(E.example(name, None, 4, 7))
    opcheck(getattr(ops._ops, name).default, tuple((E.requiring_grad(name, args) if name in E.DIFFERENTIABLE
                                                    else args).values()))


# --------------------------------------------------------------------------- edge cases and bad input
def test_poisoning_is_active():
    # The autouse fixture is on; a kernel that skipped an element would leave a NaN behind.
    assert ops.set_poison_outputs(True) is True


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
