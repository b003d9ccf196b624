"""The generic op harness: every op's test cases, derived from its example call (:func:`fdsm_ext.ops.example`).

tests/test_ops.py (the C++ kernels) and tests/triton/test_ops_generic.py (the Triton kernels) run the same
checks on every op of :data:`fdsm_ext.ops.OPS` through these helpers, so that a new op gets values against
its reference in every dtype and direction kind, non-contiguous inputs, NaN-poisoned outputs (the
conftest fixtures), gradients, gradcheck, gradgradcheck and opcheck without a test edit. What only one
op has (its stream, its special cases) stays in that op's own tests.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fdsm_ext import ops

#: Forward ops (each with an example of its own), the differentiable ones, and the backward ops.
FORWARD = ops.forward_ops()
# (by FORWARD_DIFFERENTIABLE, not by OpDef.backward: the loss ops' autograd is in C++, csrc/fd_autograd.cpp)
DIFFERENTIABLE = tuple(n for n in FORWARD if n in ops.FORWARD_DIFFERENTIABLE)
BACKWARD = tuple(n for n, op in ops.OPS.items() if op.of is not None)


def kinds(name: str) -> list[str | None]:
    """The direction kinds to run op ``name`` with: all of them when it takes ``kind``, else [None]."""
    return list(ops.DIRECTION_KINDS) if "kind" in ops.arg_names(name) else [None]


def with_kinds(names) -> list:
    """pytest params ``(name, kind)`` of ``names`` times their direction kinds."""
    return [pytest.param(n, k, id=n if k is None else f"{n}-{k}") for n in names for k in kinds(n)]


def example(name: str, kind: str | None = None, B: int = 3, d: int = 5, **kw) -> dict:
    """The op's example with direction ``kind`` (a name; None: the example's own)."""
    if kind is not None:
        kw["kind"] = ops.DIRECTION_KINDS[kind]
    return ops.example(name, B, d, **kw)


def written(name: str) -> list[str]:
    """The arguments op ``name`` writes (``Tensor(a!)``)."""
    return [a.name for a in getattr(ops._ops, name).default._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write]


def fresh(t: Tensor) -> Tensor:
    """A copy of ``t`` in new memory with ``t``'s strides (a strided view stays one)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def outputs(ns, name: str, args: dict) -> tuple[Tensor, ...]:
    """Op ``name`` of namespace ``ns`` on ``args`` (unchanged: a written argument is copied first): the
    arguments it writes, after the call, then what it returns (the order of :func:`reference`)."""
    args = {k: fresh(v) if k in written(name) else v for k, v in args.items()}
    out = getattr(ns, name)(*args.values())
    return tuple(args[w] for w in written(name)) + (out if isinstance(out, tuple) else (out,))


def reference(name: str, args: dict) -> tuple[Tensor, ...]:
    """The op's pure-PyTorch reference on ``args``, given the C++ kernels' directions (so that the
    tolerances bound only the formula's arithmetic; the stream has tests of its own)."""
    out = ops._reference(ops._ops, name, list(args.values()))
    return out if isinstance(out, tuple) else (out,)


def error_scale(name: str, args: dict) -> float:
    scale = ops.OPS[name].error_scale
    return 1.0 if scale is None else scale(args)


def float_dtype(args: dict) -> torch.dtype:
    """The example's floating dtype (that of its first floating tensor)."""
    return next(v.dtype for v in args.values() if isinstance(v, Tensor) and v.is_floating_point())


def tensor_args(args: dict) -> list[str]:
    """The floating tensor arguments (not the seed)."""
    return [k for k, v in args.items() if isinstance(v, Tensor) and v.is_floating_point()]


def grad_args(name: str) -> list[str]:
    """The inputs a differentiable forward op differentiates."""
    names = ops.arg_names(name)
    return [names[i] for i in ops.FORWARD_DIFFERENTIABLE[name]]


def requiring_grad(name: str, args: dict) -> dict:
    """``args`` with the differentiated inputs as fresh leaves that require grad."""
    return {k: v.detach().clone().requires_grad_() if k in grad_args(name) else v for k, v in args.items()}


def layouts(t: Tensor):
    """``(label, tensor)``: ``t``'s values in non-contiguous layouts: every other element of the last
    dimension of a wider buffer (poisoned with NaN between), and column-major (the last two dims swapped)."""
    if t.dim() == 0 or t.shape[-1] == 0:
        return
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    yield "strided", buf[..., ::2]
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        yield "transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)


def assert_outputs_close(got, want, tol, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Each output has the reference's shape and dtype, and its values within ``tol[dtype]`` times ``scale``."""
    assert len(got) == len(want)
    rtol, atol = tol[dtype]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=rtol * scale, atol=atol * scale)


def assert_grads_close(got, want, tol, dtype: torch.dtype) -> None:
    """Gradients carry the 1/eps^2 factors of the quotients: compared relative to their size."""
    rtol, atol = tol[dtype]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=rtol, atol=atol * max(1.0, w.abs().max().item()))


def grads(fn, args: dict, names: list[str], seed: int = 1):
    """Gradients of ``fn(args)`` (one tensor) w.r.t. ``args[names]`` under a fixed random cotangent."""
    out = fn(args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, [args[n] for n in names], g.to(out.device, out.dtype))
