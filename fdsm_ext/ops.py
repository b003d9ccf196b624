"""Typed wrappers of the fused ops, and the registry (:data:`OPS`) of their fake kernels and autograd formulas.

The schemas (the ``FDSM_OPS`` list) and argument checks live in csrc/fd_common.h; the device kernels in
csrc/<device>/ and fdsm_ext/triton/; the hot forward ops' autograd formulas in csrc/fd_autograd.cpp (for
both namespaces). :func:`register` installs each op's fake kernel, and the other ops' autograd (the
backward ops', and a forward op's :attr:`OpDef.backward`), for a namespace (``fdsm_ext`` here,
``fdsm_ext_triton`` by :mod:`fdsm_ext.triton`): one definition for every backend. The backward ops are
differentiable too (double backward, e.g. a gradient penalty through an FD loss), through the reference
formulas. Everything here works on flattened ``(batch, features)`` tensors; the losses in
:mod:`fdsm_ext.losses` do the reshaping. The pure-PyTorch oracle of each op is in :mod:`fdsm_ext.reference`.

Random directions are never stored: ``seed`` is a CPU int64 tensor ``(seed, offset)`` from which the
kernels regenerate the same Philox stream (see ``csrc/fd_math.h``) in the forward and the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import _ext  # noqa: F401  (registers torch.ops.fdsm_ext)
from . import reference

_ops = torch.ops.fdsm_ext

#: Direction kinds accepted by the ops, by name.
DIRECTION_KINDS = {"sphere": 0, "rademacher": 1, "gaussian": 2}


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a per-sample loss computed from inputs of ``dtype`` (half/bf16 accumulate in fp32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def perturb(x: Tensor, seed: Tensor, eps: float, n_slices: int, kind: int, include_center: bool) -> Tensor:
    """``[x; x+v_1; ..; x+v_n; x-v_1; ..; x-v_n]`` for ``x`` of shape ``(B, d)``.

    Returns ``((include_center + 2 n) B, d)`` in ``x``'s dtype; ``v`` (norm ``eps`` for the sphere
    kind) is drawn in-kernel from ``seed``, row ``k*B + i`` of block k for sample i.
    """
    return _ops.perturb.default(x, seed, eps, n_slices, kind, include_center)


def dsm_perturb(x: Tensor, sigma: Tensor, seed: Tensor, eps: float, n_slices: int, kind: int) -> tuple[Tensor, Tensor]:
    """FD-DSM's noisy stacked batch and noise projections, with the noise and directions drawn in-kernel.

    For ``x`` ``(B, d)`` and ``sigma`` ``(B,)``: ``x~ = x + sigma z`` with ``z_i`` the unscaled gaussian stream
    row ``n_slices * B + i``; returns ``[x~ + v_1..x~ + v_n; x~ - v_1..x~ - v_n]`` ``(2 n B, d)`` in ``x``'s
    dtype (``v`` as :func:`perturb`'s) and ``proj[k, i] = v_ki^T z_i / sigma_i`` ``(n, B)`` in the loss dtype,
    the ``v^T (x~ - x) / sigma^2`` of the FD-DSM residual. Differentiable in ``x`` only.
    """
    return _ops.dsm_perturb.default(x, sigma, seed, eps, n_slices, kind)


def fd_ssm_quotient(f0: Tensor, fp: Tensor, fm: Tensor, eps: float, dim_scale: float) -> Tensor:
    """Per-sample FD-SSM loss ``c/n sum_k [(f+_k - f-_k)^2/8 + f+_k + f-_k - 2 f0]``, ``c = dim_scale/eps^2``.

    ``f0`` is ``(B,)``, ``fp`` and ``fm`` are ``(n, B)``; the result is ``(B,)`` (fp32 for half inputs).
    """
    return _ops.fd_ssm_quotient.default(f0, fp, fm, eps, dim_scale)


def fd_ssm_vr(sp: Tensor, sm: Tensor, seed: Tensor, eps: float, kind: int, dim_scale: float) -> Tensor:
    """Per-sample FD-SSM-VR loss ``1/n sum_k ||s+ + s-||^2/8 + dim_scale/(2 eps^2) v_k^T (s+ - s-)``.

    ``sp = s(x+v)`` and ``sm = s(x-v)`` are ``(n, B, d)``; ``v`` is regenerated from ``seed``.
    """
    return _ops.fd_ssm_vr.default(sp, sm, seed, eps, kind, dim_scale)


def fd_dsm_quotient(fp: Tensor, fm: Tensor, noise: Tensor, sigma: Tensor, seed: Tensor, eps: float, kind: int,
                    dim_scale: float) -> Tensor:
    """Per-sample FD-DSM loss ``1/n sum_k c/2 [(f+ - f-)/2 + v_k^T noise / sigma^2]^2``.

    ``fp``, ``fm`` are ``(n, B)`` evaluations at ``x~ +- v``; ``noise = x~ - x`` is ``(B, d)``;
    ``sigma`` is ``(B,)`` and is not differentiated.
    """
    return _ops.fd_dsm_quotient.default(fp, fm, noise, sigma, seed, eps, kind, dim_scale)


def stencil_perturb(x: Tensor, v: Tensor, eps: float, order: int) -> Tensor:
    """Rows ``t*B + i`` hold ``x_i + (T - 2t) eps v_i`` for ``t = 0..T``: ``((T+1) B, d)``."""
    return _ops.stencil_perturb.default(x, v, eps, order)


def stencil_combine(f: Tensor, eps: float, order: int) -> Tensor:
    """``(2 eps)^-T sum_t (-1)^t C(T, t) f[t]`` for ``f`` of shape ``(T+1, B)``: ``(B,)``."""
    return _ops.stencil_combine.default(f, eps, order)


def fd_divergence(sp: Tensor, sm: Tensor, seed: Tensor, eps: float, kind: int) -> Tensor:
    """FD divergence ``div[k, i] = d / (2 eps^2) v_ki^T (s+_ki - s-_ki)`` per slice and sample: ``(n, B)``.

    ``sp = s(x + v)`` and ``sm = s(x - v)`` are ``(n, B, d)``, the two blocks of
    ``perturb(x, seed, eps, n, kind, False)`` evaluated; ``v`` (``E[v v^T] = eps^2 I / d`` for every kind)
    is regenerated from ``seed``. Estimates ``tr(ds/dx)`` at ``x_i`` (Hutchinson's ``u^T J u`` with
    ``u = sqrt(d) v / eps``) to ``O(eps^2)``; each product is summed in float64 on the C++/CUDA kernels.
    Returned in the loss dtype (fp32 for half inputs).
    """
    return _ops.fd_divergence.default(sp, sm, seed, eps, kind)


def _step_size_tensor(value, x: Tensor, name: str = "alpha", what: str = "the Langevin step size") -> Tensor:
    """``value`` as the kernels take it: a tensor as given (its values are not checked: reading them would
    sync a GPU), a float as a 1-element tensor in :func:`loss_dtype` on ``x``'s device, after checking it."""
    if isinstance(value, Tensor):
        return value
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` ({what}) must be finite and >= 0, got {value!r}")
    return torch.full((1,), value, dtype=loss_dtype(x.dtype), device=x.device)


def _noise_scale_tensor(noise_scale, x: Tensor) -> Tensor | None:
    if noise_scale is None:
        return None
    return _step_size_tensor(noise_scale, x, "noise_scale", "the noise's coefficient")


def langevin_step(x: Tensor, score: Tensor, alpha: float | Tensor, seed: Tensor, clamp_min: float | None = None,
                  clamp_max: float | None = None, return_norms: bool = False,
                  noise_scale: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One Langevin step ``x_new = clamp(x + alpha_i s + b_i z, clamp_min, clamp_max)``, with
    ``b = noise_scale``, or ``b = sqrt(2 alpha_i)`` (Langevin dynamics) when ``noise_scale`` is None.

    ``x`` and ``score`` are ``(B, *event)`` of one floating dtype (half/bf16 are computed in fp32);
    ``alpha`` and ``noise_scale`` are each a float or a floating tensor of one element or shape ``(B,)``
    (one value per sample) on ``x``'s device, not checked for sign when a tensor, and rounded to the
    accumulation dtype (fp32, fp64 for fp64 ``x``); ``sqrt(2 alpha)`` is computed in fp64 from the rounded
    ``alpha``. With ``alpha = delta`` and ``noise_scale = sqrt(delta)`` this is the VE SDE's
    reverse-diffusion predictor ``x + delta s + sqrt(delta) z`` (:func:`fdsm_ext.pc_sampler`). The
    element is ``(x + alpha s) + b z``, two roundings, no fma. ``z ~ N(0, I)`` is drawn in-kernel from
    the Philox stream of ``seed`` (an int64 ``(seed, offset)`` tensor on the CPU or on ``x``'s device),
    element ``j`` of sample ``i`` being ``reference.philox_raw_directions(seed, B, d, "gaussian")[i, j]``.
    NaN passes through the clamp. Returns ``(x_new, norms)``: ``x_new`` contiguous in ``x``'s dtype
    and ``norms`` ``(3, B)`` = per-sample ``(||s||, ||z||, ||x_new||)`` in :func:`loss_dtype` when
    ``return_norms``, else ``(3, 0)``. Not differentiable: its Autograd kernel
    (csrc/langevin_autograd.cpp) raises when an input requires grad.
    """
    return _ops.langevin_step.default(x, score, _step_size_tensor(alpha, x), seed, clamp_min, clamp_max, return_norms,
                                      _noise_scale_tensor(noise_scale, x))


def langevin_step_(x: Tensor, score: Tensor, alpha: float | Tensor, seed: Tensor, clamp_min: float | None = None,
                   clamp_max: float | None = None, return_norms: bool = False,
                   noise_scale: float | Tensor | None = None) -> Tensor:
    """In-place :func:`langevin_step`: writes ``x_new`` into ``x`` (any strides) and returns ``norms``;
    ``x`` must not overlap ``score``, ``alpha``, ``seed`` or ``noise_scale`` in memory."""
    return _ops.langevin_step_.default(x, score, _step_size_tensor(alpha, x), seed, clamp_min, clamp_max,
                                       return_norms, _noise_scale_tensor(noise_scale, x))


def set_poison_outputs(enable: bool) -> bool:
    """Fill every new kernel output with NaN before it is written (a test aid); returns the old value."""
    return _ops._set_poison_outputs(enable)


def set_vector_stream(enable: bool) -> bool:
    """Whether the CPU kernels draw directions 8 Philox blocks per instruction (the default) or with the
    scalar code (a test aid: both must give bitwise the same values); returns the old value."""
    return _ops._set_vector_stream(enable)


# --------------------------------------------------------------------------- the op registry
# Every op is declared once, in csrc/fd_common.h's FDSM_OPS. Its fake kernel, autograd formula and example
# call are declared once, here, and registered for each namespace that implements it: torch.ops.fdsm_ext
# (the C++/CUDA kernels) and torch.ops.fdsm_ext_triton (fdsm_ext/triton/, whose ops take their schemas
# from these).
@dataclass(frozen=True)
class OpDef:
    """One op's Python-side definition.

    ``fake``: the fake (meta) kernel, returning what the real kernels return (contiguous outputs).
    ``backward``: for a differentiable forward op, ``(ns, ctx, *grads) -> input grads``, where ``ns`` is
    the namespace's op table (its backward ops are called through it); ``saved`` names the inputs it
    needs as ``ctx.saved``. ``of``: for a backward op, ``(forward op, args -> forward args, indices of
    the forward inputs it differentiates)``; its own autograd (double backward) is derived from the
    forward op's pure-PyTorch reference (see :func:`_backward_op_vjp`).

    ``example``: for a forward op, its good call ``(make, B, d, **overrides) -> {argument: value}`` in
    schema order, on small shapes (``B`` samples of ``d`` features; ``overrides`` set its scalar
    arguments, e.g. ``kind``, or ``n`` slices), from which the tests, the bad-input suite, the
    self-check and the benchmarks derive their cases (see :func:`example`; a backward op's example is
    derived from its forward op's). Checked against :func:`_reference`. ``error_scale``: the factor by
    which the op amplifies its inputs' rounding, from the example's arguments (tolerances scale with it);
    None: 1.
    """

    fake: Callable
    backward: Callable | None = None
    saved: tuple[int, ...] = ()
    of: tuple[str, Callable, tuple[int, ...]] | None = None
    example: Callable[..., dict] | None = None
    error_scale: Callable[[dict], float] | None = None


OPS: dict[str, OpDef] = {}

#: The forward ops: those users call (losses.py's backends, benchmarks and tests derive their lists from it).
FUSED_OPS = ("perturb", "dsm_perturb", "fd_ssm_quotient", "fd_ssm_vr", "fd_dsm_quotient", "stencil_perturb",
             "stencil_combine", "fd_divergence")
#: The Langevin steps: not differentiable (their Autograd kernels refuse inputs that require grad).
LANGEVIN_OPS = ("langevin_step", "langevin_step_")


def schema(name: str) -> str:
    """The schema of op ``name`` without its namespace, as csrc/fd_common.h (FDSM_OPS) declares it."""
    return str(getattr(_ops, name).default._schema).split("::", 1)[1]


def _op(name, fake, **kw):
    OPS[name] = OpDef(fake, **kw)


def _contiguous_like(t: Tensor, dtype=None) -> Tensor:
    return t.new_empty(t.shape, dtype=dtype)


# Fakes: shapes and dtypes of the kernels' (contiguous) outputs.
_op("perturb", lambda x, seed, eps, n_slices, kind, include_center: x.new_empty(
    ((int(include_center) + 2 * n_slices) * x.shape[0], x.shape[1])))
_op("dsm_perturb", lambda x, sigma, seed, eps, n_slices, kind: (
    x.new_empty((2 * n_slices * x.shape[0], x.shape[1])),
    x.new_empty((n_slices, x.shape[0]), dtype=loss_dtype(x.dtype))))
_op("fd_ssm_quotient", lambda f0, fp, fm, eps, dim_scale: _contiguous_like(f0, loss_dtype(f0.dtype)))
_op("fd_ssm_quotient_backward", lambda grad, f0, fp, fm, eps, dim_scale: tuple(map(_contiguous_like, (f0, fp, fm))),
    of=("fd_ssm_quotient", lambda a: a[1:], (0, 1, 2)))
_op("fd_ssm_vr", lambda sp, sm, seed, eps, kind, dim_scale: sp.new_empty((sp.shape[1],), dtype=loss_dtype(sp.dtype)))
_op("fd_ssm_vr_backward", lambda grad, sp, sm, seed, eps, kind, dim_scale: (_contiguous_like(sp), _contiguous_like(sm)),
    of=("fd_ssm_vr", lambda a: a[1:], (0, 1)))
_op("fd_dsm_quotient", lambda fp, fm, noise, sigma, seed, eps, kind, dim_scale: fp.new_empty(
    (fp.shape[1],), dtype=loss_dtype(fp.dtype)))
_op("fd_dsm_quotient_backward", lambda grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale: (
    _contiguous_like(fp), _contiguous_like(fm)), of=("fd_dsm_quotient", lambda a: a[1:], (0, 1)))
_op("fd_dsm_noise_backward", lambda grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale: _contiguous_like(noise),
    of=("fd_dsm_quotient", lambda a: a[1:], (2,)))
_op("stencil_perturb", lambda x, v, eps, order: x.new_empty(((order + 1) * x.shape[0], x.shape[1])))
# The stencil is linear in (x, v): its backward needs their shape only, taken from grad.
_op("stencil_perturb_backward", lambda grad, eps, order: (
    grad.new_empty((grad.shape[0] // (order + 1), grad.shape[1])),
    grad.new_empty((grad.shape[0] // (order + 1), grad.shape[1]))),
    of=("stencil_perturb", lambda a: (*(a[0].new_zeros((a[0].shape[0] // (a[2] + 1), a[0].shape[1])),) * 2, a[1], a[2]),
        (0, 1)))
_op("stencil_combine", lambda f, eps, order: f.new_empty((f.shape[1],), dtype=loss_dtype(f.dtype)))
_op("stencil_combine_backward", lambda grad, f, eps, order: _contiguous_like(f),
    of=("stencil_combine", lambda a: a[1:], (0,)))
_op("fd_divergence", lambda sp, sm, seed, eps, kind: sp.new_empty(sp.shape[:2], dtype=loss_dtype(sp.dtype)))
_op("fd_divergence_backward", lambda grad, sp, sm, seed, eps, kind: (_contiguous_like(sp), _contiguous_like(sm)),
    of=("fd_divergence", lambda a: a[1:], (0, 1)))


def _langevin_fake(x, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale=None):
    return x.new_empty(x.shape), x.new_empty((3, x.shape[0] if return_norms else 0), dtype=loss_dtype(x.dtype))


_op("langevin_step", _langevin_fake)
_op("langevin_step_", lambda *args: _langevin_fake(*args)[1])


# First-order autograd formulas of the forward ops: csrc/fd_autograd.cpp for the loss ops, for both namespaces
# (each calls the namespace's backward ops). C++ rather than OpDef.backward: a Python autograd kernel costs
# more per call than the ops on small models. An op off the losses' hot path (fd_divergence, whose callers
# rarely differentiate it) keeps its formula here, as OpDef.backward: one file less to touch.
def _fd_divergence_backward(ns, ctx, grad):
    sp, sm, seed = ctx.saved
    _, _, _, eps, kind = ctx.args
    return (*ns.fd_divergence_backward.default(grad, sp, sm, seed, eps, kind), None, None, None)


OPS["fd_divergence"] = replace(OPS["fd_divergence"], backward=_fd_divergence_backward, saved=(0, 1, 2))


# The reference (docs/math.md formulas in pure PyTorch) of each differentiable forward op, from the op's
# own arguments: directions are the kernels' own, regenerated from seed by the namespace's perturb.
def _directions(ns, seed, n, B, d, kind, eps, like: Tensor):
    zeros = torch.zeros(B, d, dtype=reference.acc_dtype(like.dtype), device=like.device)
    return ns.perturb.default(zeros, seed, eps, n, kind, False)[: n * B].reshape(n, B, d)


def _reference(ns, name, args):
    if name == "dsm_perturb":
        x, sigma, seed, eps, n, kind = args
        B, d = x.shape
        v = _directions(ns, seed, n, B, d, kind, eps, x)
        # the noise: the raw gaussian stream rows n B + i, as perturb's gaussian directions scaled by
        # eps / sqrt(d) = 1 exactly (in double), so the namespace's own bits
        zeros = torch.zeros(B, d, dtype=torch.float32, device=x.device)
        z = ns.perturb.default(zeros, seed, math.sqrt(d) if d else 1.0, n + 1, DIRECTION_KINDS["gaussian"], False)
        return reference.dsm_perturb(x, sigma, z[n * B:(n + 1) * B], v)
    if name == "fd_ssm_quotient":
        return reference.fd_ssm_quotient(*args)
    if name == "fd_ssm_vr":
        sp, sm, seed, eps, kind, dim_scale = args
        n, B, d = sp.shape
        v = _directions(ns, seed, n, B, d, kind, eps, sp)
        return reference.fd_ssm_vr(sp, sm, v, eps, dim_scale)
    if name == "fd_dsm_quotient":
        fp, fm, noise, sigma, seed, eps, kind, dim_scale = args
        n, B = fp.shape
        v = _directions(ns, seed, n, B, noise.shape[1], kind, eps, fp)
        return reference.fd_dsm_quotient(fp, fm, noise, sigma, v, eps, dim_scale)
    if name == "stencil_perturb":
        return reference.stencil_perturb(*args)
    if name == "stencil_combine":
        return reference.stencil_combine(*args)
    if name == "perturb":
        x, seed, eps, n, kind, include_center = args
        return reference.perturb(x, _directions(ns, seed, n, x.shape[0], x.shape[1], kind, eps, x), include_center)
    if name in LANGEVIN_OPS:  # (x_new, norms); the in-place step writes x_new into x
        x, score, alpha, seed, clamp_min, clamp_max, return_norms, *noise_scale = args
        # the namespace's own noise z: a step from x = s = 0 with alpha = 1/2 is sqrt(1) z, exactly
        zeros = torch.zeros(x.shape, dtype=reference.acc_dtype(x.dtype), device=x.device)
        half = torch.full((1,), 0.5, dtype=zeros.dtype, device=x.device)
        z = ns.langevin_step.default(zeros, zeros, half, seed, None, None, False, None)[0]
        out, norms = reference.langevin_step(x, score, alpha, z, clamp_min, clamp_max, *noise_scale)
        return out, norms if return_norms else norms[:, :0]
    if name == "fd_divergence":
        sp, sm, seed, eps, kind = args
        n, B, d = sp.shape
        return reference.fd_divergence(sp, sm, _directions(ns, seed, n, B, d, kind, eps, sp), eps)
    raise AssertionError(name)


def _backward_op_vjp(ns, name, ctx, *gouts):
    """Autograd of a backward op (the double backward of its forward op): the VJP, with ``gouts``, of the
    reference's own VJP. The backward op computes ``J^T grad`` of the forward op; this differentiates that
    expression, built from the reference formula with autograd, w.r.t. ``grad`` and the forward inputs.
    Runs the reference composite (slower than the kernels), only when a graph needs a second derivative."""
    fwd, fwd_args_of, wrt = OPS[name].of
    args = list(ctx.args)
    for i, t in zip(ctx.tensor_positions, ctx.saved):
        args[i] = t
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        leaf = lambda t: t if t.requires_grad else t.detach().requires_grad_()  # noqa: E731
        grad = leaf(args[0])
        fargs = list(fwd_args_of(args))
        diff = [i for i in FORWARD_DIFFERENTIABLE[fwd]]
        for i in diff:
            fargs[i] = leaf(fargs[i])
        out = _reference(ns, fwd, fargs)
        firsts = torch.autograd.grad(out, [fargs[i] for i in wrt], grad.to(out.dtype), create_graph=True,
                                     allow_unused=True)
        pairs = [(f, g) for f, g in zip(firsts, gouts) if f is not None and g is not None]
        inputs = [grad] + [fargs[i] for i in diff]
        if not pairs:
            return (None,) * len(args)
        got = torch.autograd.grad([f for f, _ in pairs], inputs, [g.to(f.dtype) for f, g in pairs],
                                  create_graph=create, allow_unused=True)
    result = [None] * len(args)
    result[0] = got[0]
    if name != "stencil_perturb_backward":  # its forward inputs are not its arguments (only their shape is)
        for i, g in zip(diff, got[1:]):
            result[1 + i] = g
    return tuple(None if g is None else g.to(a.dtype) if isinstance(a, Tensor) else None
                 for g, a in zip(result, args))


#: Forward inputs each forward op differentiates (sigma and seed never are).
FORWARD_DIFFERENTIABLE = {"perturb": (0,), "dsm_perturb": (0,), "fd_ssm_quotient": (0, 1, 2), "fd_ssm_vr": (0, 1),
                          "fd_dsm_quotient": (0, 1, 2), "stencil_perturb": (0, 1), "stencil_combine": (0,),
                          "fd_divergence": (0, 1)}


# --------------------------------------------------------------------------- examples
class _Make:
    """The tensors of an example: float64 draws from ``generator`` (torch's default one when None), cast
    to ``dtype`` on ``device``; the direction seed on the CPU."""

    def __init__(self, dtype: torch.dtype, device, generator: torch.Generator | None):
        self.dtype, self.device, self.generator = dtype, torch.device(device), generator

    def randn(self, *shape, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(*shape, generator=self.generator, dtype=torch.float64)).to(self.device, self.dtype)

    def uniform(self, *shape, low: float, high: float) -> Tensor:
        u = torch.rand(*shape, generator=self.generator, dtype=torch.float64)
        return (low + (high - low) * u).to(self.device, self.dtype)

    def seed(self, seed: int = 20240601, offset: int = 7) -> Tensor:
        return torch.tensor([seed, offset], dtype=torch.int64)


def _set_example(name: str, fn: Callable[..., dict], error_scale: Callable[[dict], float] | None = None) -> None:
    OPS[name] = replace(OPS[name], example=fn, error_scale=error_scale)


def _perturb_example(m, B, d, n_slices=2, kind=0, include_center=True, eps=0.25):
    return dict(x=m.randn(B, d), seed=m.seed(), eps=eps, n_slices=n_slices, kind=kind, include_center=include_center)


def _dsm_perturb_example(m, B, d, n_slices=2, kind=0, eps=0.25):
    return dict(x=m.randn(B, d), sigma=m.uniform(B, low=0.5, high=1.5), seed=m.seed(), eps=eps, n_slices=n_slices,
                kind=kind)


def _fd_ssm_quotient_example(m, B, d, n=2, eps=0.5, dim_scale=3.0):
    return dict(f0=m.randn(B), fp=m.randn(n, B), fm=m.randn(n, B), eps=eps, dim_scale=dim_scale)


def _fd_ssm_vr_example(m, B, d, n=2, kind=0, eps=0.2):
    return dict(sp=m.randn(n, B, d), sm=m.randn(n, B, d), seed=m.seed(), eps=eps, kind=kind, dim_scale=float(d))


def _fd_dsm_quotient_example(m, B, d, n=2, kind=0, eps=0.1):
    return dict(fp=m.randn(n, B), fm=m.randn(n, B), noise=m.randn(B, d, scale=0.3),
                sigma=m.uniform(B, low=0.5, high=1.5), seed=m.seed(), eps=eps, kind=kind, dim_scale=float(d))


def _stencil_perturb_example(m, B, d, order=3, eps=0.1):
    return dict(x=m.randn(B, d), v=m.randn(B, d), eps=eps, order=order)


def _stencil_combine_example(m, B, d, order=3, eps=0.1):
    return dict(f=m.randn(order + 1, B), eps=eps, order=order)


def _langevin_example(m, B, d, clamp_min=-1.0, clamp_max=1.0, return_norms=True, noise_scale=True,
                      per_sample=True):
    """x in the clamp's range; alpha and b per sample (one element each when not ``per_sample``);
    ``noise_scale=False``: b = sqrt(2 alpha)."""
    k = B if per_sample else 1
    return dict(x=m.uniform(B, d, low=-0.9, high=0.9), score=m.randn(B, d), alpha=m.uniform(k, low=0.01, high=0.1),
                seed=m.seed(), clamp_min=clamp_min, clamp_max=clamp_max, return_norms=return_norms,
                noise_scale=m.uniform(k, low=0.1, high=0.3) if noise_scale else None)


_set_example("perturb", _perturb_example)
_set_example("dsm_perturb", _dsm_perturb_example)
_set_example("fd_ssm_quotient", _fd_ssm_quotient_example)
_set_example("fd_ssm_vr", _fd_ssm_vr_example)
_set_example("fd_dsm_quotient", _fd_dsm_quotient_example)
_set_example("stencil_perturb", _stencil_perturb_example)
# the weights (2 eps)^-T amplify the rounding of f
_set_example("stencil_combine", _stencil_combine_example, lambda a: (2 * a["eps"]) ** -a["order"])
def _fd_divergence_example(m, B, d, n=2, kind=0, eps=0.2):
    return dict(sp=m.randn(n, B, d), sm=m.randn(n, B, d), seed=m.seed(), eps=eps, kind=kind)


_set_example("fd_divergence", _fd_divergence_example)
_set_example("langevin_step", _langevin_example)
_set_example("langevin_step_", _langevin_example)


def forward_ops() -> tuple[str, ...]:
    """Every op of :data:`OPS` that is not a backward op (the ops with examples of their own)."""
    return tuple(name for name, op in OPS.items() if op.of is None)


def arg_names(name: str) -> list[str]:
    """Argument names of op ``name``, in schema order."""
    return [a.name for a in getattr(_ops, name).default._schema.arguments]


def example(name: str, B: int = 3, d: int = 5, *, dtype: torch.dtype = torch.float32, device="cpu",
            generator: torch.Generator | None = None, **overrides) -> dict:
    """A good call of op ``name`` as ``{argument: value}`` in schema order (``op(*example(...).values())``).

    ``B`` samples of ``d`` features, floating tensors of ``dtype`` on ``device`` (the seed on the CPU),
    drawn from ``generator``; ``overrides`` go to the op's example (e.g. ``kind=2``, ``n=3``). A backward
    op's example is its forward op's, with ``grad`` a random cotangent of the forward's output.
    """
    op = OPS[name]
    if op.example is None:
        if op.of is None:
            raise LookupError(f"op {name!r} has no example: give its OPS entry one (docs/adding_an_op.md)")
        forward = example(op.of[0], B, d, dtype=dtype, device=device, generator=generator, **overrides)
        out = OPS[op.of[0]].fake(*forward.values())
        grad = _Make(out.dtype, device, generator).randn(*out.shape)
        return {a: grad if a == "grad" else forward[a] for a in arg_names(name)}
    args = op.example(_Make(dtype, device, generator), B, d, **overrides)
    if list(args) != arg_names(name):
        raise AssertionError(f"the example of {name!r} names {list(args)}, its schema {arg_names(name)}")
    return args


def _setup_context(saved):
    def setup_context(ctx, inputs, output):
        ctx.args = tuple(None if isinstance(a, Tensor) else a for a in inputs)
        ctx.tensor_positions = tuple(i for i, a in enumerate(inputs) if isinstance(a, Tensor)) if saved is None else saved
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))

    return setup_context


def _same_device_fake(name: str, fake: Callable) -> Callable:
    """The fake kernel, after the tensor rules of the real kernels' checks (every tensor given, all but
    seed on one device, seed on the CPU or, for the Langevin step, on that device), so that a call the
    dispatcher sends to the fake (a meta tensor among others) fails as the real kernels would."""
    arguments = getattr(_ops, name).default._schema.arguments
    names = [a.name for a in arguments]
    tensors = [a.name for a in arguments if a.type.isSubtypeOf(torch._C.TensorType.get())]
    # Tensor? arguments (the Langevin step's noise_scale): None is allowed, a tensor follows the device rule
    optional = [a.name for a in arguments if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor())
                and a.name not in tensors]

    def checked(*args):
        first = None
        for arg_name, a in zip(names, args):
            if arg_name not in tensors and (arg_name not in optional or a is None):
                continue
            if a is None:
                raise RuntimeError(f"fdsm_ext.{name}: `{arg_name}` is None; expected a tensor")
            if arg_name == "seed":
                continue
            if first is None:
                first = (arg_name, a.device)
            elif a.device != first[1]:
                raise RuntimeError(f"fdsm_ext.{name}: `{arg_name}` is on {a.device} but `{first[0]}` is on "
                                   f"{first[1]}; every tensor argument but `seed` must be on one device")
        seed = args[names.index("seed")] if "seed" in names else None
        if seed is not None and seed.device.type != "cpu" and not (name in LANGEVIN_OPS and seed.device == first[1]):
            raise RuntimeError(f"fdsm_ext.{name}: `seed` must be on the CPU"
                               f"{' or on `x`s device' if name in LANGEVIN_OPS else ''}, got {seed.device}")
        return fake(*args)

    return checked


def register(namespace: str) -> None:
    """Registers every op's fake kernel and autograd formula for the ops of ``namespace`` (``fdsm_ext`` or
    ``fdsm_ext_triton``), the backward ops' own autograd included (so double backward is right)."""
    ns = getattr(torch.ops, namespace)
    for name, op in OPS.items():
        qualname = f"{namespace}::{name}"
        torch.library.register_fake(qualname, _same_device_fake(name, op.fake))
        if op.backward is not None:  # (the forward ops' formulas are in csrc/fd_autograd.cpp)
            def backward(ctx, *grads, _bw=op.backward, _saved=op.saved):
                ctx.saved = ctx.saved_tensors
                if torch.is_grad_enabled():  # create_graph: the backward ops' own autograd records them
                    return _bw(ns, ctx, *grads)
                # first order only (training): skip the backward ops' Python autograd kernels (~15 us a call)
                with torch._C._AutoDispatchBelowAutograd():
                    return _bw(ns, ctx, *grads)

            torch.library.register_autograd(qualname, backward, setup_context=_setup_context(op.saved))
        elif op.of is not None:
            def backward(ctx, *grads, _name=name):
                ctx.saved = ctx.saved_tensors
                return _backward_op_vjp(ns, _name, ctx, *grads)

            torch.library.register_autograd(qualname, backward, setup_context=_setup_context(None))


register("fdsm_ext")
