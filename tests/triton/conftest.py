"""Setup of the Triton tests: on the GPU when there is one, else on the CPU in Triton's interpreter.

``TRITON_INTERPRET=1`` must be in the environment before triton is first imported (``triton.jit``
decides at decoration time whether a function is compiled or interpreted, triton.language's own
functions included), and collecting the other tests imports triton: so tests/conftest.py sets it,
before it imports anything but torch, when no GPU is visible. With a GPU the kernels run compiled
(export TRITON_INTERPRET=1 to force the interpreter there too).
"""

import importlib.util
import os
import pathlib

import pytest
import torch

#: Where the Triton tests put their tensors: the interpreter runs on CPU tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _root_conftest():
    path = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_fdsm_ext_tests_root_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Test modules import their helpers with `from conftest import ...`, and which of tests/conftest.py and
# this file Python finds under that name depends on the order pytest loaded them: so this file offers
# the root's helpers too (one tolerance table, tests/conftest.py's).
_root = _root_conftest()
TOL, DTYPES, KINDS = _root.TOL, _root.DTYPES, _root.KINDS
assert_close, make_seed, strided = _root.assert_close, _root.make_seed, _root.strided


@pytest.fixture(autouse=True)
def poison_triton_outputs():
    """Every Triton kernel output is NaN-filled before the kernel runs (as the C++ ones, by tests/conftest.py)."""
    try:
        from fdsm_ext.triton import set_poison_outputs
    except ImportError:  # triton missing: the module is skipped anyway
        yield
        return
    old = set_poison_outputs(True)
    yield
    set_poison_outputs(old)


@pytest.fixture
def small_tiles(monkeypatch):
    """Column tiles of 8 elements, so that small rows take the multi-tile paths of the row kernels."""
    from fdsm_ext.triton import _common

    monkeypatch.setattr(_common, "MAX_BLOCK_D", 8)


def on_device(*tensors):
    out = tuple(t.to(DEVICE) for t in tensors)
    return out[0] if len(out) == 1 else out


def cpp_directions(seed, n, kind, eps, dtype, b, d):
    """The C++ kernels' directions ``(n, b, d)`` in the accumulation dtype (the + block of perturb(0)):
    the stream the Triton kernels must reproduce, so the formula tests see only formula differences."""
    from fdsm_ext import ops, reference

    zeros = torch.zeros(b, d, dtype=reference.acc_dtype(dtype))
    return ops.perturb(zeros, seed, eps, n, ops.DIRECTION_KINDS[kind], False)[: n * b].reshape(n, b, d)


def grads(fn, inputs, seed=1):
    """Gradients of ``fn(*inputs)`` w.r.t. the inputs that require grad, under a fixed random cotangent."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], g)


def assert_grads_close(got, want, dtype):
    """Gradients carry the 1/eps^2 factors of the quotients: compared relative to their size (as tests/test_ops.py)."""
    rtol, atol = TOL[dtype]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))
