"""The fused Langevin step against its reference, and the annealed sampler and NCSNv2 recipe helpers."""

import math

import pytest
import torch
from torch.testing._internal.optests import opcheck

from fdsm_ext import ops
from fdsm_ext import reference as R

from conftest import DTYPES, assert_close, make_seed, strided


def _kernel_noise(seed, shape, dtype):
    """The kernel's own z: with x = s = 0 and alpha = 1/2, x_new = sqrt(1) z exactly."""
    zeros = torch.zeros(shape, dtype=R.acc_dtype(dtype))
    return ops.langevin_step(zeros, zeros, 0.5, seed)[0]


# --------------------------------------------------------------------------- the noise stream
@pytest.mark.parametrize("shape", [(6, 37), (3, 2, 5, 3)])
def test_noise_is_the_gaussian_direction_stream(shape):
    seed = make_seed(2024, 9)
    z = _kernel_noise(seed, shape, torch.float32)
    # polynomial ln/sin/cos in the kernel vs exact ones in the reference: a few float32 ulps
    torch.testing.assert_close(z, R.langevin_noise(seed, z), rtol=2e-6, atol=1e-6)


def test_noise_of_a_sample_does_not_depend_on_the_batch():
    # row = sample index: the first rows of a bigger batch are the smaller batch's noise
    seed = make_seed(5)
    assert torch.equal(_kernel_noise(seed, (3, 10), torch.float32), _kernel_noise(seed, (8, 10), torch.float32)[:3])
    assert not torch.equal(_kernel_noise(seed, (3, 10), torch.float32), _kernel_noise(make_seed(5, 1), (3, 10),
                                                                                        torch.float32))


def test_noise_statistics():
    z = _kernel_noise(make_seed(11, 3), (500, 200), torch.float64).flatten()
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean() / (z**2).mean() ** 2 - 3) < 0.1


# --------------------------------------------------------------------------- values vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 13), (4, 3, 5, 2)])
@pytest.mark.parametrize("alpha_kind", ["float", "per_sample"])
@pytest.mark.parametrize("clamp", [(None, None), (-1.0, 1.5), (None, 0.5)])
def test_langevin_step_matches_reference(dtype, shape, alpha_kind, clamp):
    x, s = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) * 3
    alpha = 0.07 if alpha_kind == "float" else torch.rand(shape[0]) * 0.2
    seed = make_seed(77, 5)
    z = _kernel_noise(seed, shape, dtype)
    ref, ref_norms = R.langevin_step(x, s, alpha, z, *clamp)
    out, norms = ops.langevin_step(x, s, alpha, seed, *clamp, return_norms=True)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    assert norms.dtype == R.loss_dtype(dtype) and norms.shape == (3, shape[0])
    assert_close(out, ref)
    assert_close(norms, ref_norms, dtype)
    # strided inputs give the same values
    out_s, norms_s = ops.langevin_step(strided(x), strided(s), alpha, seed, *clamp, return_norms=True)
    assert torch.equal(out_s, out) and torch.equal(norms_s, norms)
    # without norms: the same x_new and an empty (3, 0) norms tensor
    out_n, none = ops.langevin_step(x, s, alpha, seed, *clamp)
    assert torch.equal(out_n, out) and none.shape == (3, 0)


def test_samples_longer_than_a_tile():
    # The CPU kernel splits a sample into tiles of 4096 elements: the norms sum over every tile.
    shape = (2, 3 * 4096 + 5)
    x, s, seed = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64), make_seed(3)
    out, norms = ops.langevin_step(x, s, 0.01, seed, return_norms=True)
    ref, ref_norms = R.langevin_step(x, s, 0.01, _kernel_noise(seed, shape, torch.float64))
    assert_close(out, ref)
    assert_close(norms, ref_norms)


def test_norms_do_not_depend_on_the_thread_count():
    x, s, seed = torch.randn(3, 20000), torch.randn(3, 20000), make_seed(8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.langevin_step(x, s, 0.1, seed, return_norms=True)
        torch.set_num_threads(max(2, old))
        many = ops.langevin_step(x, s, 0.1, seed, return_norms=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_nan_passes_through_the_clamp_and_zero_step_keeps_x():
    x, s = torch.randn(2, 9), torch.randn(2, 9)
    s[1, 4] = float("nan")
    out, norms = ops.langevin_step(x, s, 0.1, make_seed(), -1.0, 1.0, return_norms=True)
    assert out[1, 4].isnan() and out[0].isfinite().all() and out[1].isnan().sum() == 1
    assert norms[0, 1].isnan() and norms[0, 0].isfinite() and norms[1].isfinite().all()
    assert out[torch.isfinite(out)].abs().max() <= 1.0
    assert torch.equal(ops.langevin_step(x, s, 0.0, make_seed())[0][0], x[0])


# --------------------------------------------------------------------------- in place
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_writes_x_new_into_x(dtype):
    x, s, seed = torch.randn(4, 11, dtype=dtype), torch.randn(4, 11, dtype=dtype), make_seed(6)
    want, want_norms = ops.langevin_step(x, s, 0.3, seed, None, 2.0, return_norms=True)
    y = x.clone()
    ptr, version = y.data_ptr(), y._version
    norms = ops.langevin_step_(y, s, 0.3, seed, None, 2.0, return_norms=True)
    assert y.data_ptr() == ptr and torch.equal(y, want) and torch.equal(norms, want_norms)
    assert y._version > version  # a backward that saved y would now fail instead of using new values
    # a strided x is updated through its view; the buffer's other columns are untouched
    buf = torch.zeros(4, 22, dtype=dtype)
    view = buf[:, ::2]
    view.copy_(x)
    ops.langevin_step_(view, s, 0.3, seed, None, 2.0)
    assert torch.equal(view, want) and torch.equal(buf[:, 1::2], torch.zeros(4, 11, dtype=dtype))


def test_not_differentiable():
    x, s, seed = torch.randn(2, 3), torch.randn(2, 3, requires_grad=True), make_seed()
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.langevin_step(x, s, 0.1, seed)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.langevin_step_(x, s, 0.1, seed)
    with torch.no_grad():
        out, _ = ops.langevin_step(x, s, 0.1, seed)
    assert not out.requires_grad


# --------------------------------------------------------------------------- opcheck, compile
def _opcheck_cases():
    seed = make_seed(8, 1)
    for dtype in (torch.float32, torch.float64):
        t = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
        for norms in (False, True):
            yield ops._ops.langevin_step.default, (t(4, 7), t(4, 7), torch.rand(4), seed, -1.0, 1.0, norms)
            yield ops._ops.langevin_step.default, (t(3, 2, 5), t(3, 2, 5), torch.rand(1), seed, None, None, norms)
            yield ops._ops.langevin_step_.default, (t(4, 7), t(4, 7), torch.rand(1, dtype=dtype), seed, None, 0.5, norms)
            yield ops._ops.langevin_step_.default, (strided(t(4, 7)), t(4, 7), torch.rand(4), seed, None, None, norms)


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = case
    opcheck(op, args)


def test_compiled_in_place_step_matches_eager():
    seed = make_seed(12)

    def step(x, s):
        return ops.langevin_step_(x, s, 0.2, seed, -2.0, 2.0, return_norms=True)

    x, s = torch.randn(4, 9), torch.randn(4, 9)
    y = x.clone()
    norms = torch.compile(step, fullgraph=True, backend="aot_eager")(x, s)
    assert torch.equal(norms, step(y, s)) and torch.equal(x, y)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 4), 0.1, make_seed()), RuntimeError, "score"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), 0.1, make_seed()),
     RuntimeError, "score"),
    (lambda: ops.langevin_step(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32), 0.1,
                               make_seed()), RuntimeError, "x"),
    (lambda: ops.langevin_step(torch.zeros(()), torch.zeros(()), 0.1, make_seed()), RuntimeError, "x"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), make_seed()), RuntimeError,
     "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, dtype=torch.int64), make_seed()),
     RuntimeError, "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), -0.1, make_seed()), ValueError, "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), float("nan"), make_seed()), ValueError, "alpha"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, torch.zeros(3, dtype=torch.int64)),
     RuntimeError, "seed"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, torch.zeros(2)), RuntimeError, "seed"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), 1.0, 0.0), RuntimeError,
     "clamp_min"),
    (lambda: ops.langevin_step(torch.zeros(2, 3), torch.zeros(2, 3), 0.1, make_seed(), float("nan")), RuntimeError,
     "clamp_min"),
])
def test_bad_op_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=f"`{match}`"):
        call()


def test_empty_batch_is_a_valid_op_call():
    out, norms = ops.langevin_step(torch.zeros(0, 5), torch.zeros(0, 5), 0.1, make_seed(), return_norms=True)
    assert out.shape == (0, 5) and norms.shape == (3, 0)
    out, norms = ops.langevin_step(torch.zeros(2, 0), torch.zeros(2, 0), 0.1, make_seed(), return_norms=True)
    assert out.shape == (2, 0) and torch.equal(norms, torch.zeros(3, 2))
