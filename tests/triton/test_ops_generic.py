"""Every op of fdsm_ext.ops.OPS in the Triton namespace, from its example call (tests/op_examples.py).

Values against the reference (C++ directions) in every dtype and direction kind, and bitwise the C++
kernels in the dtypes the op's Triton module promises (``@C.kernel(name, bitwise=...)``), to a tolerance
elsewhere; backward ops against the C++ ones; non-contiguous inputs; empty batches; gradients against the
reference; gradcheck, gradgradcheck and opcheck. The per-op files hold what only that op has.
"""

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-test.txt)")

import torch  # noqa: E402
from torch.testing._internal.optests import opcheck  # noqa: E402

import op_examples as E  # noqa: E402
from fdsm_ext import ops  # noqa: E402
from fdsm_ext.triton import _common as C  # noqa: E402
from fdsm_ext.triton import ops as T  # noqa: E402

from conftest import DEVICE, DTYPES, TOL  # noqa: E402

B, D = 5, 13  # D not a multiple of 4: the last Philox group of each row is partly used


def _on_device(args: dict) -> dict:
    """The example's tensors on the Triton tests' device (the seed stays on the CPU)."""
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and k != "seed" else v for k, v in args.items()}


def _against_cpp(name, args, dtype, got=None):
    """The Triton op's outputs against the C++ op's: bitwise where promised, else to the tolerance."""
    got = E.outputs(T, name, _on_device(args)) if got is None else got
    want = E.outputs(ops._ops, name, args)
    bitwise = dtype in C.BITWISE.get(name, ())
    rtol, atol = TOL[dtype]
    for g, w in zip(got, want, strict=True):
        if bitwise:
            assert torch.equal(g.cpu(), w), name
        else:  # outputs carrying 1/eps^2 factors (gradients): compared relative to their size
            scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
            torch.testing.assert_close(g.cpu(), w, rtol=rtol * E.error_scale(name, args), atol=atol * scale)


def _check(name, kind, dtype, **overrides):
    args = E.example(name, kind, B, D, dtype=dtype, **overrides)
    got = E.outputs(T, name, _on_device(args))
    E.assert_outputs_close(got, E.reference(name, args), TOL, dtype, E.error_scale(name, args))
    fake = ops.OPS[name].fake(*args.values())
    for g, f in zip(got[len(E.written(name)):], fake if isinstance(fake, tuple) else (fake,), strict=True):
        assert g.shape == f.shape and g.dtype == f.dtype and g.is_contiguous()
    _against_cpp(name, args, dtype, got)
    for backward in (n for n in E.BACKWARD if ops.OPS[n].of[0] == name):
        _against_cpp(backward, E.example(backward, kind, B, D, dtype=dtype, **overrides), dtype)


def test_every_op_has_triton_kernels_and_the_promises_name_real_ops():
    for name in ops.OPS:
        assert hasattr(T, name), f"op {name} has no Triton kernels (fdsm_ext/triton/<op>.py, @C.kernel)"
    assert set(C.BITWISE) == set(ops.OPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kind", E.with_kinds(E.FORWARD))
def test_values_match_the_reference_and_the_cpp_kernels(name, kind, dtype):
    _check(name, kind, dtype)


# Slice counts and stencil orders each op also runs with (the example has one of each).
VARIANTS = [("perturb", dict(include_center=False)), ("fd_ssm_quotient", dict(n=1)), ("fd_ssm_quotient", dict(n=4)),
            *((op, dict(order=t)) for op in ("stencil_perturb", "stencil_combine") for t in (1, 2, 6))]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # order 6 overflows float16
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, overrides", [
    pytest.param(n, o, id=f"{n}-" + "-".join(f"{a}={v}" for a, v in o.items())) for n, o in VARIANTS])
def test_variants_match_the_reference_and_the_cpp_kernels(name, overrides, dtype):
    _check(name, None, dtype, **overrides)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", E.FORWARD)
def test_noncontiguous_inputs(name, dtype):
    args = E.example(name, None, B, D, dtype=dtype)
    want = E.outputs(T, name, _on_device(args))
    for arg in E.tensor_args(args):
        for _, t in E.layouts(args[arg].to(DEVICE)):
            got = E.outputs(T, name, {**_on_device(args), arg: t})
            E.assert_outputs_close(got, want, TOL, dtype, E.error_scale(name, args))


@pytest.mark.parametrize("name", E.FORWARD)
def test_empty_batch_is_a_valid_op_call(name):
    args = E.example(name, None, 0, D)
    got = E.outputs(T, name, _on_device(args))
    want = E.outputs(ops._ops, name, args)
    assert [g.shape for g in got] == [w.shape for w in want]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kind", E.with_kinds(E.DIFFERENTIABLE))
def test_backward_matches_reference(name, kind, dtype):
    args = E.requiring_grad(name, E.example(name, kind, B, D, dtype=dtype))
    names = E.grad_args(name)
    want = E.grads(lambda a: E.reference(name, a)[0], args, names)
    dev = E.requiring_grad(name, _on_device(args))
    got = E.grads(lambda a: E.outputs(T, name, a)[0], dev, names)
    E.assert_grads_close(got, want, TOL, dtype)


def _fp64_call(name):
    """(fn, inputs) of a float64 example on the device; rademacher directions, the cheapest in the
    interpreter (the derivatives' form does not depend on the kind); the seed is fixed."""
    kind = "rademacher" if E.kinds(name) != [None] else None
    args = _on_device(E.example(name, kind, 2, 4, dtype=torch.float64))
    names = E.grad_args(name)

    def fn(*inputs):
        return getattr(T, name)(*{**args, **dict(zip(names, inputs))}.values())

    return fn, tuple(args[n].clone().requires_grad_() for n in names)


@pytest.mark.parametrize("name", E.DIFFERENTIABLE)
def test_gradcheck_fp64(name):
    fn, inputs = _fp64_call(name)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("name", E.DIFFERENTIABLE)
def test_gradgradcheck_fp64(name):
    fn, inputs = _fp64_call(name)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("name", list(ops.OPS))
def test_opcheck(name):
    kind = "rademacher" if E.kinds(name) != [None] else None
    args = _on_device(E.example(name, kind, 4, 7))
    if name in E.DIFFERENTIABLE:
        args = E.requiring_grad(name, args)
    opcheck(getattr(T, name).default, tuple(args.values()))
