"""Score-matching losses: finite-difference (fused) and gradient-based baselines, one calling convention.

Every loss takes the model first and the data batch ``x`` of shape ``(B, *event_shape)`` second,
flattens the event to ``d = prod(event_shape)`` features for the directions, calls the model once on
a stacked batch, and returns the mean over the batch (``reduction="mean"``), the sum (``"sum"``) or
the per-sample values (``"none"``, shape ``(B,)``). Formulas: docs/math.md, as implemented in
:mod:`fdsm_ext.reference`.

Models: a *log-density* maps ``(N, *event_shape)`` to ``(N,)`` (or ``(N, 1)``) unnormalized
log-densities (an energy model passes ``lambda x: -energy(x)``); a *score* maps ``(N, *event_shape)``
to a tensor of the same shape (noise-conditional scores take ``(x, sigma)`` with ``sigma`` ``(N,)``).

Backends of the FD losses: ``"cpp"`` (compiled kernels, directions from an in-kernel Philox stream
seeded by torch's generator), ``"triton"`` (the Triton kernels of :mod:`fdsm_ext.triton`: the same ops
and the same Philox stream; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"``
(the pure-PyTorch composite, directions from ``torch.randn``), or ``"auto"`` (CPU: ``"cpp"``; CUDA:
``"cpp"`` when the CUDA kernels are built, else ``"triton"`` when triton imports, else ``"torch"``).
A requested backend that cannot run on ``x``'s device raises a RuntimeError saying why. ``"cpp"`` and
``"triton"`` draw the same directions from the same seed (bitwise in float32); ``"torch"`` draws
different ones from the same distribution; the same backend with the same seed is bitwise
reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _checks, numerics, ops, reference
from ._checks import (
    BACKENDS,
    MODEL_OUTPUTS,
    NONFINITE_POLICIES,
    REDUCTIONS,
    check_batch as _check_batch,
    check_choice as _check_choice,
    check_int as _check_int,
    draw_seed as _draw_seed,
    eager as _eager,
)

#: The public losses (re-exported by the package: a new loss is listed here, not in fdsm_ext/__init__.py).
__all__ = [
    "annealed_dsm_loss",
    "annealed_fd_ssm_vr_loss",
    "annealed_ssm_vr_loss",
    "dsm_loss",
    "exact_sm_loss",
    "fd_directional_derivative",
    "fd_dsm_loss",
    "fd_ssm_loss",
    "fd_ssm_vr_loss",
    "ssm_loss",
    "ssm_vr_loss",
]


# --------------------------------------------------------------------------- argument checks
def _resolve_backend(backend: str, x: Tensor) -> str:
    return _checks.resolve_backend_for(backend, x.device.type)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_model_output(out, name: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"`{name}` must return a tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"`{name}` must return a real floating-point tensor, got dtype {out.dtype}")
    return out


def _log_density_values(name: str) -> Callable:
    """``validate(fn, inputs, *extra)``: ``fn``'s values as ``(N,)``, refused by ``name`` otherwise."""

    def validate(fn: Callable, inputs: Tensor, *extra) -> Tensor:
        out = _check_model_output(fn(inputs, *extra), name)
        rows = inputs.shape[0]
        if out.dim() == 2 and out.shape[1] == 1:
            out = out.squeeze(1)
        if out.shape != (rows,):
            raise ValueError(f"`{name}` must map a batch of shape {tuple(inputs.shape)} to shape ({rows},) "
                             f"(one value per sample), got shape {tuple(out.shape)}")
        return out

    return validate


def _score_values(name: str) -> Callable:
    """``validate(fn, inputs, *extra)``: ``fn``'s score of ``inputs``' shape, refused by ``name`` otherwise."""

    def validate(fn: Callable, inputs: Tensor, *extra) -> Tensor:
        out = _check_model_output(fn(inputs, *extra), name)
        if out.shape != inputs.shape:
            raise ValueError(f"`{name}` must return a tensor of its input's shape {tuple(inputs.shape)}, "
                             f"got shape {tuple(out.shape)}")
        return out

    return validate


# the validators of the models' outputs in the FD losses' hot path, built once rather than per call
_LOG_DENSITY = _log_density_values("log_density")
_SCORE = _score_values("score")


def _sigma_per_sample(sigma, batch: int, like: Tensor, name: str = "sigma") -> Tensor:
    """``sigma`` (a float or a ``(B,)``/scalar tensor) as a ``(B,)`` tensor in ``like``'s dtype and device,
    each level finite and >= :func:`fdsm_ext._checks.min_sigma` of the dtype (values read on the host
    for a tensor: free on the CPU, one sync on other devices)."""
    if isinstance(sigma, Tensor):
        if sigma.is_complex() or sigma.dtype == torch.bool:
            raise TypeError(f"`{name}` must be a float or a real tensor of shape ({batch},), got dtype {sigma.dtype}")
        if sigma.dim() == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"`{name}` must be a float or a tensor of shape ({batch},), "
                             f"got shape {tuple(sigma.shape)}")
        if sigma.device.type == "meta":
            raise ValueError(f"`{name}` is on the meta device (no values); pass a CPU or CUDA tensor")
        if _eager():
            _checks.check_sigma_values(_checks.host_values(sigma), name, like.dtype)
        return sigma.to(device=like.device, dtype=like.dtype)
    value = _checks.check_positive(sigma, name)
    _checks.check_sigma_values(value, name, like.dtype)
    return torch.full((batch,), value, dtype=like.dtype, device=like.device)


def _ladder_values(sigmas, like: Tensor) -> Tensor:
    """The noise ladder ``sigmas`` as a 1-D tensor in ``like``'s dtype and device, checked by name."""
    if isinstance(sigmas, Tensor):
        if not (sigmas.is_floating_point() or (not sigmas.is_complex() and sigmas.dtype != torch.bool)):
            raise TypeError(f"`sigmas` must be a 1-D sequence or real tensor of noise levels, got dtype {sigmas.dtype}")
        if sigmas.device.type == "meta":
            raise ValueError("`sigmas` is on the meta device (no values); pass a CPU or CUDA tensor")
        shape, values = tuple(sigmas.shape), None
        if _eager() and sigmas.dim() == 1 and sigmas.shape[0] > 0:
            _checks.check_once(sigmas, lambda: _checks.check_sigma_values(_checks.host_values(sigmas), "sigmas",
                                                                           like.dtype), tag=like.dtype)
    else:
        if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__"):
            raise TypeError(f"`sigmas` must be a 1-D sequence or tensor of noise levels, got {type(sigmas).__name__}")
        items = [float(v) if isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point() else v
                 for v in sigmas]
        if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in items):
            bad = next(v for v in items if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)))
            raise TypeError(f"`sigmas` must be a 1-D sequence of real numbers (noise levels), got an element {bad!r}")
        shape, values = (len(items),), [float(v) for v in items]
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"`sigmas` must be a non-empty 1-D sequence of noise levels, got shape {shape}")
    if values is not None:
        _checks.check_sigma_values(values, "sigmas", like.dtype)
    ladder = sigmas if isinstance(sigmas, Tensor) else torch.tensor(values, dtype=torch.float64)
    return ladder.to(device=like.device, dtype=like.dtype)


def _noise_levels(sigmas, labels, batch: int, generator, like: Tensor) -> Tensor:
    """sigma per sample from the ladder ``sigmas``: ``sigmas[labels]``, labels uniform if not given."""
    ladder = _ladder_values(sigmas, like)
    levels = ladder.shape[0]
    if labels is None:
        gen_device = generator.device if generator is not None else like.device
        labels = torch.randint(0, levels, (batch,), generator=generator, device=gen_device).to(like.device)
        return ladder[labels]
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        got = f"dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"`labels` must be an integer tensor of shape ({batch},) indexing `sigmas` "
                        f"(values in [0, {levels})), got {got}")
    if labels.shape != (batch,):
        raise ValueError(f"`labels` must have shape ({batch},) (one level per sample), got {tuple(labels.shape)}")
    if labels.device.type == "meta":
        raise ValueError("`labels` is on the meta device (no values); pass a CPU or CUDA tensor")
    if _eager():
        values = _checks.host_values(labels).astype(np.int64)
        bad = (values < 0) | (values >= levels)
        if bad.any():
            k = int(np.argmax(bad))
            raise ValueError(f"`labels` must index `sigmas`: values in [0, {levels}), got {int(values[k])} at "
                             f"index {k}")
    # uint8 labels would index as a mask: index with int64
    return ladder[labels.to(device=ladder.device, dtype=torch.int64)]


def _randn(like: Tensor, generator) -> Tensor:
    """Standard normal noise of ``like``'s shape, dtype and device (contiguous), from ``generator``."""
    if generator is None:  # (randn_like draws what randn(shape) draws, without the shape and device arguments)
        return torch.randn_like(like, memory_format=torch.contiguous_format)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def _guard(loss_name: str, outputs: Tensor, blocks, per: Tensor | None, policy: str, hint=None) -> bool:
    """The non-finite contract of every loss (:func:`fdsm_ext.numerics.guard_nonfinite`)."""
    return numerics.guard_nonfinite(loss_name, outputs, blocks, per, policy, hint)


# --------------------------------------------------------------------------- backends
#: Whether the fused backends' losses use the eager heads outside torch.compile (a switch for the tests,
#: which check that both ways give bitwise the same loss and gradients).
EAGER_HEADS = True
_REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}


def _use_heads(be) -> bool:
    """Whether to call ``be``'s eager heads: one op and one autograd node from the model's outputs to the
    reduced loss (csrc/fd_autograd.cpp "eager heads") instead of the blocks' views, the quotient op and
    the reduction, each an op call and a node; not under torch.compile, which traces the ops."""
    return be.heads and EAGER_HEADS and _eager()


class _Fused:
    """Compiled kernels (torch.ops.fdsm_ext): directions regenerated in-kernel from a seed ``token``."""

    _ns = torch.ops.fdsm_ext
    _heads = torch.ops.fdsm_ext_eager
    _head_ns = 0  # which namespace's ops the heads call (csrc/fd_autograd.cpp: 0 fdsm_ext, 1 fdsm_ext_triton)
    heads = True

    # The ops' overloads (.default), not their packets: calling a packet resolves the overload on every call.
    @classmethod
    def perturb(cls, x, n_slices, directions, eps, generator, include_center):
        seed = _draw_seed(generator)
        return cls._ns.perturb.default(x, seed, eps, n_slices, ops.DIRECTION_KINDS[directions], include_center), seed

    @classmethod
    def dsm_perturb(cls, x, sigma, n_slices, directions, eps, generator):
        seed = _draw_seed(generator)
        return cls._ns.dsm_perturb.default(x, sigma.detach(), seed, eps, n_slices, ops.DIRECTION_KINDS[directions])

    @classmethod
    def fd_ssm_quotient(cls, f0, fp, fm, eps, dim_scale):
        return cls._ns.fd_ssm_quotient.default(f0, fp, fm, eps, dim_scale)

    @classmethod
    def fd_ssm_vr(cls, sp, sm, token, eps, directions, dim_scale):
        return cls._ns.fd_ssm_vr.default(sp, sm, token, eps, ops.DIRECTION_KINDS[directions], dim_scale)

    @classmethod
    def fd_ssm_head(cls, f, batch, eps, dim_scale, reduction):
        return cls._heads.fd_ssm_head.default(f, batch, eps, dim_scale, _REDUCTION_CODES[reduction], cls._head_ns)

    @classmethod
    def fd_ssm_vr_head(cls, s, token, n_slices, eps, directions, dim_scale, reduction):
        return cls._heads.fd_ssm_vr_head.default(s, token, n_slices, eps, ops.DIRECTION_KINDS[directions], dim_scale,
                                                 _REDUCTION_CODES[reduction], cls._head_ns)

    @classmethod
    def fd_dsm_head(cls, f, proj, eps, dim_scale, reduction):
        return cls._heads.fd_dsm_head.default(f, proj, eps, dim_scale, _REDUCTION_CODES[reduction])

    @classmethod
    def stencil_perturb(cls, x, v, eps, order):
        return cls._ns.stencil_perturb.default(x, v, eps, order)

    @classmethod
    def stencil_combine(cls, f, eps, order):
        return cls._ns.stencil_combine.default(f, eps, order)


class _Triton(_Fused):
    """Triton kernels (torch.ops.fdsm_ext_triton, registered by importing fdsm_ext.triton, which
    _triton_unavailable does): the same ops, seed token and direction stream as _Fused."""

    _ns = torch.ops.fdsm_ext_triton
    _head_ns = 1


class _Composite:
    """Pure PyTorch, as the authors' code does it: ``v`` drawn with torch's RNG and kept as the token."""

    heads = False

    @staticmethod
    def _directions(x, n_slices, directions, eps, generator):
        B, d = x.shape
        v = reference.sample_directions(n_slices, B, d, directions, generator=generator,
                                        dtype=reference.acc_dtype(x.dtype), device=x.device)
        return v * (eps / math.sqrt(d))

    @classmethod
    def perturb(cls, x, n_slices, directions, eps, generator, include_center):
        v = cls._directions(x, n_slices, directions, eps, generator)
        return reference.perturb(x, v, include_center), v

    @classmethod
    def dsm_perturb(cls, x, sigma, n_slices, directions, eps, generator):
        z = _randn(x, generator)
        return reference.dsm_perturb(x, sigma.detach(), z, cls._directions(x, n_slices, directions, eps, generator))

    fd_ssm_quotient = staticmethod(reference.fd_ssm_quotient)

    @staticmethod
    def fd_ssm_vr(sp, sm, token, eps, directions, dim_scale):
        return reference.fd_ssm_vr(sp, sm, token, eps, dim_scale)

    stencil_perturb = staticmethod(reference.stencil_perturb)
    stencil_combine = staticmethod(reference.stencil_combine)


_BACKEND_IMPLS = {"cpp": _Fused, "triton": _Triton, "torch": _Composite}


def _backend_impl(backend: str, x: Tensor):
    return _BACKEND_IMPLS[_resolve_backend(backend, x)]


@dataclass(frozen=True)
class _FDOptions:
    """The checked arguments every FD loss shares (one object instead of a dozen positional ones)."""

    loss_name: str
    eps: float | None  # None: "auto", resolved per call from the batch (see _fd_setup)
    n_slices: int
    directions: str
    reduction: str
    backend: str
    dim_scale: float | None
    chunk_size: int | None
    fp32_eval: bool
    on_nonfinite: str

    def scale(self, d: int) -> float:
        """The factor in front of the quotient: ``dim_scale``, or ``d`` when it is None."""
        return float(d if self.dim_scale is None else self.dim_scale)

    def hint(self, quotient: str, x: Tensor, model, output_dtype: torch.dtype) -> Callable[[], str]:
        """Why finite model outputs can give a non-finite loss: the quotient and the usable eps range.
        Built lazily: the evaluation and loss dtypes are looked up only when a failure is described (and the
        model's outputs are not kept: a deferred check must not keep their graph alive)."""

        def describe() -> str:
            eval_dtype = torch.float32 if self.fp32_eval and x.dtype in (torch.float16, torch.bfloat16) else \
                numerics.evaluation_dtype(x, model)
            return numerics.quotient_hint(quotient, self.eps, eval_dtype, reference.loss_dtype(output_dtype))()

        return describe


def _check_fd_options(loss_name: str, eps, *, n_slices, directions, reduction, backend, dim_scale, chunk_size,
                      fp32_eval, on_nonfinite) -> _FDOptions:
    """Checks the scalar arguments every FD loss shares, by name (``eps="auto"`` kept as None)."""
    _check_int(n_slices, "n_slices", 1)
    _check_choice(directions, "directions", tuple(ops.DIRECTION_KINDS))
    _check_choice(reduction, "reduction", REDUCTIONS)
    _check_choice(backend, "backend", BACKENDS)
    if dim_scale is not None:
        dim_scale = _checks.check_positive(dim_scale, "dim_scale")
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", 1)
    fp32_eval = _checks.check_bool(fp32_eval, "fp32_eval")
    _check_choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
    if isinstance(eps, str):
        if eps != "auto":
            raise ValueError(f"`eps` must be a positive float or 'auto', got {eps!r}")
        eps = None
    else:
        eps = _checks.check_eps(eps)
    return _FDOptions(loss_name, eps, n_slices, directions, reduction, backend, dim_scale, chunk_size, fp32_eval,
                      on_nonfinite)


#: Checked options by their arguments (with the arguments' types: True == 1 but n_slices=True is refused).
#: A training loop passes the same arguments every step, so each step checks them once, by a lookup.
_OPTIONS_CACHE: dict[tuple, _FDOptions] = {}
_PLAIN = (int, float, str, bool, type(None))


def _fd_setup(loss_name: str, model, model_name: str, x: Tensor, xf: Tensor, eps, *, n_slices, directions,
              generator, reduction, backend, dim_scale, chunk_size, fp32_eval, on_nonfinite,
              rows_per_slice: int, center: bool) -> _FDOptions:
    """Checks the arguments every FD loss shares, by name, and returns them (``eps="auto"`` resolved)."""
    _checks.check_callable(model, model_name, f"{model_name}(x)")
    key = (loss_name, eps, n_slices, directions, reduction, backend, dim_scale, chunk_size, fp32_eval, on_nonfinite,
           type(eps), type(n_slices), type(dim_scale), type(chunk_size), type(fp32_eval))
    try:
        opts = _OPTIONS_CACHE.get(key)
    except TypeError:  # an unhashable argument: refused below
        opts, key = None, None
    if opts is None:
        _check_int(n_slices, "n_slices", 1)  # (before the stack size, which needs it an int)
        _checks.check_stack_size(rows_per_slice * n_slices + int(center), xf, "n_slices", n_slices)
        opts = _check_fd_options(loss_name, eps, n_slices=n_slices, directions=directions, reduction=reduction,
                                 backend=backend, dim_scale=dim_scale, chunk_size=chunk_size, fp32_eval=fp32_eval,
                                 on_nonfinite=on_nonfinite)
        if key is not None and all(isinstance(v, _PLAIN) for v in key[1:10]):
            if len(_OPTIONS_CACHE) > 256:
                _OPTIONS_CACHE.clear()
            _OPTIONS_CACHE[key] = opts
    else:
        _checks.check_stack_size(rows_per_slice * n_slices + int(center), xf, "n_slices", n_slices)
    _checks.check_generator(generator)
    if opts.eps is None:
        if not _eager():
            raise ValueError("eps='auto' reads the batch to find its scale and cannot be traced; compute it "
                             "outside the compiled region with fdsm_ext.numerics.auto_eps(x) and pass the float")
        return dataclasses.replace(opts, eps=numerics.auto_eps(x, model=model))
    if _eager():
        numerics._warn_if_unresolvable(opts.eps, x, model)
    return opts


def _call_model(fn: Callable, inputs: Tensor, validate: Callable, chunk_size: int | None, fp32_eval: bool,
                *extra) -> Tensor:
    """``validate(fn, inputs, *extra)``, in float32 without autocast if ``fp32_eval``, and in chunks of
    ``chunk_size`` rows under activation checkpointing if asked (each chunk's activations are
    recomputed in the backward instead of kept: peak memory follows the chunk, not the stacked batch)."""
    if fp32_eval:
        if inputs.dtype in (torch.float16, torch.bfloat16):
            inputs = inputs.float()
        with torch.autocast(inputs.device.type, enabled=False):
            return _call_model(fn, inputs, validate, chunk_size, False, *extra)
    if chunk_size is None or chunk_size >= inputs.shape[0]:
        return validate(fn, inputs, *extra)
    pieces = [inputs.split(chunk_size)] + [e.split(chunk_size) for e in extra]
    return torch.cat([checkpoint(validate, fn, *args, use_reentrant=False) for args in zip(*pieces)])


def _skipped(batch: int, reduction: str, like: Tensor) -> Tensor:
    shape = (batch,) if reduction == "none" else ()
    return torch.zeros(shape, dtype=reference.loss_dtype(like.dtype), device=like.device, requires_grad=True)


def _checked_loss(opts: _FDOptions, outputs: Tensor, blocks, compute: Callable[[], Tensor], hint) -> Tensor | None:
    """``compute()`` (the loss, reduced by ``opts.reduction``) under the non-finite contract of
    ``opts.on_nonfinite``; None when the batch is skipped. The reduced loss is what is checked: a finite
    mean or sum has only finite terms, and reading one value costs less than reading ``B``."""
    policy = opts.on_nonfinite
    if policy == "skip" and _guard(opts.loss_name, outputs, blocks, None, "skip"):
        return None
    loss = compute()
    _guard(opts.loss_name, outputs, blocks, loss, "ignore" if policy == "ignore" else "raise", hint)
    return loss


# --------------------------------------------------------------------------- FD losses
def _events(stacked: Tensor, event_shape) -> Tensor:
    """The ``(N, d)`` stacked batch as ``(N, *event_shape)``: itself for a flat event (no view op)."""
    return stacked if len(event_shape) == 1 else stacked.reshape(-1, *event_shape)

def _blocks(outputs: Tensor, shape: tuple[int, ...], center: int = 0) -> tuple[Tensor, ...]:
    """The model's outputs on a stacked batch ``[x (center rows, if any); x+v; x-v]`` as ``[f0,] f+, f-``,
    the last two of ``shape`` ``(n, B, ...)``. One reshape and one unbind (after one split off of the
    center rows): two or three autograd nodes, the fewest that give the ops their shapes (a slice or
    select per block would each zero-fill a gradient of the whole stacked batch, for autograd to sum)."""
    if center:
        f0, rest = outputs.split_with_sizes((center, outputs.shape[0] - center))
        return (f0, *rest.reshape(2, *shape).unbind(0))
    return outputs.reshape(2, *shape).unbind(0)




def fd_ssm_loss(log_density: Callable[[Tensor], Tensor], x: Tensor, eps: float | str = 0.1, *, n_slices: int = 1,
                directions: str = "sphere", generator: torch.Generator | None = None, reduction: str = "mean",
                backend: str = "auto", dim_scale: float | None = None, chunk_size: int | None = None,
                fp32_eval: bool = False, on_nonfinite: str = "raise") -> Tensor:
    """Finite-difference sliced score matching of a log-density model (Pang et al. 2020, Sec. 4).

    One call of ``log_density`` on the ``(1 + 2 n_slices) B`` stacked batch ``[x; x + v; x - v]``
    gives ``f0, f+, f-``; per sample and direction
    ``l = dim_scale/eps^2 * [(f+ - f-)^2/8 + (f+ + f- - 2 f0)]``, averaged over the slices, whose
    expectation over ``v`` is the exact score-matching objective ``tr hess f + 1/2 ||grad f||^2``
    up to O(eps^2).

    Args:
        log_density: ``(N, *event_shape) -> (N,)`` unnormalized log-density; its parameters get gradients.
        x: data batch ``(B, *event_shape)``, any floating dtype; gradients flow to it too.
        eps: the norm of each direction ``v`` (sphere) or its root-mean-square norm (other kinds), a
            finite float > 0; ``"auto"`` picks it from the dtype the model evaluates in
            (:func:`fdsm_ext.numerics.auto_eps`).
        n_slices: directions per sample, an int >= 1.
        directions: ``"sphere"`` (uniform on the sphere of radius eps), ``"rademacher"`` or ``"gaussian"``.
        generator: torch.Generator for the directions; ``torch.manual_seed`` fixes them if None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample ``(B,)``).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"torch"`` (``fdsm_ext.BACKENDS``).
        dim_scale: the factor in front of the quotient, a finite float > 0, ``d`` (the paper's form) if
            None; ``1.0`` gives the authors' deep-EBM script's form (a constant rescale).
        chunk_size: evaluate the stacked batch in chunks of this many rows under activation
            checkpointing: the same loss and gradients, a peak memory that falls with the chunk size,
            one extra forward per chunk in the backward.
        fp32_eval: evaluate the model on the stacked batch in float32 with autocast disabled.
        on_nonfinite: ``"raise"`` (default) if the model returns a non-finite value, naming which of
            the evaluations produced it, or if its outputs are finite but the loss is not (naming the
            quotient and the usable eps range); ``"skip"`` returns a zero loss without gradient for a
            batch with non-finite outputs, warns, and counts it in ``fdsm_ext.numerics.nonfinite_skips``
            (one host sync per call); ``"ignore"`` makes no check. ``"raise"`` never synchronises: on the
            CPU the call itself raises; on a GPU the error is raised by the next loss call that finds
            the device done with this one, or at the latest by :func:`fdsm_ext.check_finite`.
            Under torch.compile no check is made.

    Returns:
        The loss in float32 for half/bfloat16 models, in the model's dtype otherwise; the quotient and
        its backward are computed in float32 (float64 for float64 models) whatever the model's dtype.
    """
    xf = _check_batch(x)
    opts = _fd_setup("fd_ssm_loss", log_density, "log_density", x, xf, eps, n_slices=n_slices,
                     directions=directions, generator=generator, reduction=reduction, backend=backend,
                     dim_scale=dim_scale, chunk_size=chunk_size, fp32_eval=fp32_eval, on_nonfinite=on_nonfinite,
                     rows_per_slice=2, center=True)
    be = _backend_impl(backend, x)
    B, d = xf.shape
    nb = n_slices * B
    stacked, _ = be.perturb(xf, n_slices, opts.directions, opts.eps, generator, True)
    f = _call_model(log_density, _events(stacked, x.shape[1:]), _LOG_DENSITY,
                    chunk_size, opts.fp32_eval)

    def compute() -> Tensor:
        if _use_heads(be):
            return be.fd_ssm_head(f, B, opts.eps, opts.scale(d), reduction)
        return _reduce(be.fd_ssm_quotient(*_blocks(f, (n_slices, B), center=B), opts.eps, opts.scale(d)), reduction)

    loss = _checked_loss(
        opts, f, [("x", B), ("x+v", nb), ("x-v", nb)], compute,
        opts.hint("dim_scale/eps^2 * [(f+ - f-)^2/8 + f+ + f- - 2 f0]", x, log_density, f.dtype))
    return _skipped(B, reduction, f) if loss is None else loss


_FD_SSM_VR_QUOTIENT = "||s+ + s-||^2/8 + dim_scale/(2 eps^2) v^T (s+ - s-)"


def _fd_ssm_vr_reduced(score, xf: Tensor, event_shape, opts: _FDOptions, generator, *extra,
                          weight: Tensor | None = None) -> Tensor | None:
    """FD-SSM-VR of ``score(x, *extra)`` (extra: per-row tensors for 2 n B rows), per sample times
    ``weight`` (B,) if given, reduced by ``opts.reduction``; None to skip the batch."""
    be = _backend_impl(opts.backend, xf)
    B, d = xf.shape
    nb = opts.n_slices * B
    stacked, token = be.perturb(xf, opts.n_slices, opts.directions, opts.eps, generator, False)
    s = _call_model(score, _events(stacked, event_shape), _SCORE, opts.chunk_size,
                    opts.fp32_eval, *extra)
    reduction = opts.reduction if weight is None else "none"

    def compute() -> Tensor:
        if _use_heads(be):
            loss = be.fd_ssm_vr_head(s, token, opts.n_slices, opts.eps, opts.directions, opts.scale(d), reduction)
        else:
            loss = _reduce(be.fd_ssm_vr(*_blocks(s, (opts.n_slices, B, d)), token, opts.eps, opts.directions,
                                        opts.scale(d)), reduction)
        return loss if weight is None else _reduce(loss * weight.to(loss.dtype), opts.reduction)

    return _checked_loss(opts, s, [("x+v", nb), ("x-v", nb)], compute,
                         opts.hint(_FD_SSM_VR_QUOTIENT, xf, score, s.dtype))


def fd_ssm_vr_loss(score: Callable[[Tensor], Tensor], x: Tensor, eps: float | str = 0.1, *, n_slices: int = 1,
                   directions: str = "sphere", generator: torch.Generator | None = None, reduction: str = "mean",
                   backend: str = "auto", dim_scale: float | None = None, chunk_size: int | None = None,
                   fp32_eval: bool = False, on_nonfinite: str = "raise") -> Tensor:
    """Finite-difference SSM with variance reduction, for score networks (Pang et al. 2020).

    One call of ``score`` on the ``2 n_slices B`` stacked batch ``[x + v; x - v]``; per sample
    ``l = ||s+ + s-||^2/8 + dim_scale/(2 eps^2) v^T (s+ - s-)``, averaged over the slices, whose
    expectation is ``tr grad s + 1/2 ||s||^2`` up to O(eps^2). ``v`` is not stored: the fused
    backward regenerates it. Arguments as in :func:`fd_ssm_loss`; ``score`` maps
    ``(N, *event_shape)`` to the same shape.
    """
    xf = _check_batch(x)
    opts = _fd_setup("fd_ssm_vr_loss", score, "score", x, xf, eps, n_slices=n_slices, directions=directions,
                     generator=generator, reduction=reduction, backend=backend, dim_scale=dim_scale,
                     chunk_size=chunk_size, fp32_eval=fp32_eval, on_nonfinite=on_nonfinite, rows_per_slice=2,
                     center=False)
    loss = _fd_ssm_vr_reduced(score, xf, x.shape[1:], opts, generator)
    return _skipped(xf.shape[0], reduction, x) if loss is None else loss


def fd_dsm_loss(log_density: Callable[[Tensor], Tensor], x: Tensor, sigma, eps: float | str = 0.1, *,
                n_slices: int = 1, directions: str = "sphere", generator: torch.Generator | None = None,
                reduction: str = "mean", backend: str = "auto", dim_scale: float | None = None,
                sigma_power: float = 0.0, chunk_size: int | None = None, fp32_eval: bool = False,
                on_nonfinite: str = "raise") -> Tensor:
    """Finite-difference denoising score matching of a log-density model (Pang et al. 2020).

    ``x~ = x + sigma z``; one call of ``log_density`` on ``[x~ + v; x~ - v]``; per sample
    ``l = dim_scale/(2 eps^2) [(f(x~+v) - f(x~-v))/2 + v^T (x~ - x)/sigma^2]^2``, averaged over the
    slices, times ``sigma^sigma_power`` (0: plain DSM; -2: the authors' multi-scale deep-EBM script).
    Its expectation over ``v`` is the DSM objective ``1/2 ||grad f(x~) + (x~ - x)/sigma^2||^2``.

    Args:
        sigma: a float, or a ``(B,)`` tensor of per-sample noise levels (not differentiated); finite
            and at least ``tiny^(1/4)`` of the loss dtype (3.3e-10 for float32, 1.2e-77 for float64).
        sigma_power: a finite float.
        Others as in :func:`fd_ssm_loss`.
    """
    xf = _check_batch(x)
    opts = _fd_setup("fd_dsm_loss", log_density, "log_density", x, xf, eps, n_slices=n_slices,
                     directions=directions, generator=generator, reduction=reduction, backend=backend,
                     dim_scale=dim_scale, chunk_size=chunk_size, fp32_eval=fp32_eval, on_nonfinite=on_nonfinite,
                     rows_per_slice=2, center=False)
    sigma_power = _checks.check_real(sigma_power, "sigma_power")
    be = _backend_impl(backend, x)
    B, d = xf.shape
    nb = n_slices * B
    sig = _sigma_per_sample(sigma, B, xf)
    # [x~ + v; x~ - v] with x~ = x + sigma z, and proj = v^T (x~ - x) / sigma^2 per (slice, sample): the
    # quotient needs neither the noise nor the directions again
    stacked, proj = be.dsm_perturb(xf, sig, n_slices, opts.directions, opts.eps, generator)
    f = _call_model(log_density, _events(stacked, x.shape[1:]), _LOG_DENSITY,
                    chunk_size, opts.fp32_eval)
    quotient_reduction = reduction if sigma_power == 0.0 else "none"  # (the weight comes before the reduction)

    def compute() -> Tensor:
        if _use_heads(be):
            loss = be.fd_dsm_head(f, proj, opts.eps, opts.scale(d), quotient_reduction)
        else:
            loss = _reduce(reference.fd_dsm_residual_loss(*_blocks(f, (n_slices, B)), proj, opts.eps, opts.scale(d)),
                           quotient_reduction)
        return loss if sigma_power == 0.0 else _reduce(loss * sig.to(loss.dtype) ** sigma_power, reduction)

    loss = _checked_loss(opts, f, [("x~+v", nb), ("x~-v", nb)], compute,
                        opts.hint("dim_scale/(2 eps^2) [(f+ - f-)/2 + v^T (x~ - x)/sigma^2]^2 sigma^sigma_power", x,
                                  log_density, f.dtype))
    return _skipped(B, reduction, f) if loss is None else loss


def annealed_fd_ssm_vr_loss(score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, eps: float | str = 0.1, *,
                            labels: Tensor | None = None, n_slices: int = 1, directions: str = "sphere",
                            generator: torch.Generator | None = None, reduction: str = "mean",
                            backend: str = "auto", dim_scale: float | None = None, chunk_size: int | None = None,
                            fp32_eval: bool = False, on_nonfinite: str = "raise") -> Tensor:
    """Noise-conditional FD-SSM-VR for NCSN training, weighted by ``lambda(sigma) = sigma^2``.

    Per sample, ``sigma = sigmas[label]`` (label uniform unless ``labels`` is given),
    ``x~ = x + sigma z``, and the loss is ``sigma^2`` times FD-SSM-VR of ``s(., sigma)`` at ``x~``.
    ``score(x, sigma)`` receives ``sigma`` of shape ``(N,)`` for a batch of N rows. ``sigmas``: a
    non-empty 1-D sequence or tensor of finite levels (each as ``sigma`` of :func:`fd_dsm_loss`);
    ``labels``: an integer tensor ``(B,)`` with values in ``[0, len(sigmas))``.
    """
    xf = _check_batch(x)
    opts = _fd_setup("annealed_fd_ssm_vr_loss", score, "score", x, xf, eps, n_slices=n_slices,
                     directions=directions, generator=generator, reduction=reduction, backend=backend,
                     dim_scale=dim_scale, chunk_size=chunk_size, fp32_eval=fp32_eval, on_nonfinite=on_nonfinite,
                     rows_per_slice=2, center=False)
    B = xf.shape[0]
    sig = _noise_levels(sigmas, labels, B, generator, xf)
    x_noisy = xf + sig.unsqueeze(1) * _randn(xf, generator)
    weight = sig.to(reference.loss_dtype(xf.dtype)).square()
    loss = _fd_ssm_vr_reduced(score, x_noisy, x.shape[1:], opts, generator, sig.repeat(2 * n_slices),
                              weight=weight)
    return _skipped(B, reduction, x) if loss is None else loss


def fd_directional_derivative(f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, order: int = 1,
                              eps: float = 1e-2, *, backend: str = "auto", chunk_size: int | None = None) -> Tensor:
    """Order-T directional derivative of ``f`` along ``v`` by one batched central stencil.

    ``D_v^T f(x) ~ (2 eps)^-T sum_t (-1)^t C(T, t) f(x + (T - 2t) eps v)`` with error O(eps^2)
    (paper Appendix C.1, Algorithm 1); ``v`` is used as given (not normalised), so the result is the
    T-th derivative of ``t -> f(x + t v)`` at 0. All ``T + 1`` evaluations are one call of ``f`` on a
    ``((T+1) B, *event_shape)`` batch (or chunks of ``chunk_size`` rows). Returns ``(B,)``;
    differentiable w.r.t. ``x``, ``v`` and ``f``'s parameters. ``order`` is an int in [1, 16], ``eps``
    a finite float > 0. Non-finite values of ``f`` (or a non-finite result from finite values) raise
    a FloatingPointError, as ``on_nonfinite="raise"`` of the losses does.
    """
    _checks.check_callable(f, "f", "f(x)")
    xf = _check_batch(x)
    vf = _check_batch(v, "v")
    if v.shape != x.shape:
        raise ValueError(f"`v` must have the shape of `x` {tuple(x.shape)}, got {tuple(v.shape)}")
    if v.dtype != x.dtype or v.device != x.device:
        raise ValueError(f"`v` must match `x`'s dtype and device ({x.dtype}, {x.device}), got ({v.dtype}, {v.device})")
    order = _check_int(order, "order", 1, 16)
    eps = _checks.check_eps(eps)
    _check_choice(backend, "backend", BACKENDS)
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", 1)
    be = _backend_impl(backend, x)
    B = xf.shape[0]
    stacked = be.stencil_perturb(xf, vf, eps, order)
    vals = _call_model(f, _events(stacked, x.shape[1:]), _log_density_values("f"), chunk_size, False)
    out = be.stencil_combine(vals.reshape(order + 1, B), eps, order)
    shifts = [f"x{order - 2 * t:+d}*eps*v" for t in range(order + 1)]
    _guard("fd_directional_derivative", vals, [(name, B) for name in shifts], out, "raise",
           numerics.quotient_hint("(2 eps)^-T sum_t (-1)^t C(T, t) f(x + (T - 2t) eps v)", eps, x.dtype,
                                  out.dtype))
    return out


# --------------------------------------------------------------------------- gradient-based baselines
def _leaf(x: Tensor) -> Tensor:
    return x.detach().requires_grad_(True)


def _fd_hint(loss_name: str, detail: str) -> RuntimeError:
    return RuntimeError(
        f"{loss_name} needs the model's score to be differentiable w.r.t. x (a double backward for "
        f"log-density models), which {detail}. fd_ssm_loss, fd_ssm_vr_loss and fd_dsm_loss need only forward "
        "evaluations and work for such models."
    )


def _check_differentiable_again(t: Tensor, loss_name: str) -> Tensor:
    """Raise if ``t``'s graph holds an ``Error`` node: a once-differentiable layer (a custom Function
    marked ``once_differentiable``) leaves one where its own backward is, and autograd then silently
    drops that layer's second-order terms from grad-of-grad instead of failing."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name().endswith("Error"):
            raise _fd_hint(loss_name, "a layer marked once_differentiable does not allow")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return t


def _grad_for_sm(outputs: Tensor, x_leaf: Tensor, loss_name: str) -> Tensor:
    """Autograd with create_graph that the gradient-based losses need, with an actionable error."""
    try:
        (g,) = torch.autograd.grad(outputs, x_leaf, create_graph=True)
    except RuntimeError as exc:
        raise _fd_hint(loss_name, f"failed: {exc}") from exc
    return _check_differentiable_again(g, loss_name)


def _score_by_autograd(model: Callable, x_leaf: Tensor, model_output: str, loss_name: str, *extra,
                       model_name: str = "model") -> Tensor:
    """Score at ``x_leaf`` (a leaf requiring grad), differentiable w.r.t. the model's parameters."""
    if model_output == "score":
        return _score_values(model_name)(model, x_leaf, *extra)
    return _grad_for_sm(_log_density_values(model_name)(model, x_leaf, *extra).sum(), x_leaf, loss_name)


def _objective_hint(formula: str, dtype: torch.dtype) -> Callable[[], str]:
    return lambda: (f"the objective {formula} overflowed {dtype} (max {torch.finfo(dtype).max:.3g}): the model's "
                    "score or its derivatives are too large for this dtype")


def _gradient_setup(model, model_name: str, reduction, on_nonfinite, generator=None, model_output="score") -> None:
    _checks.check_callable(model, model_name, f"{model_name}(x)")
    _check_choice(reduction, "reduction", REDUCTIONS)
    _check_choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
    _checks.check_generator(generator)
    _check_choice(model_output, "model_output", MODEL_OUTPUTS)


def _gradient_loss(loss_name: str, s: Tensor, blocks, compute: Callable[[], Tensor], formula: str,
                   on_nonfinite: str, batch: int, reduction: str) -> Tensor:
    """``compute()`` (the per-sample objective from the score ``s``) under the non-finite contract."""
    if on_nonfinite == "skip" and _guard(loss_name, s, blocks, None, "skip"):
        return _skipped(batch, reduction, s)
    per = compute()
    _guard(loss_name, s, blocks, per, "ignore" if on_nonfinite == "ignore" else "raise",
           _objective_hint(formula, per.dtype))
    return _reduce(per, reduction)





def exact_sm_loss(model: Callable, x: Tensor, *, model_output: str = "log_density",
                  reduction: str = "mean", on_nonfinite: str = "raise") -> Tensor:
    """Exact score matching ``tr grad s(x) + 1/2 ||s(x)||^2`` (d backward passes; a baseline and oracle).

    ``model`` is a log-density (``model_output="log_density"``, score by autograd) or a score network
    (``"score"``).
    ``on_nonfinite``: ``"raise"``, ``"skip"`` or ``"ignore"``, the contract of the FD losses
    (:func:`fd_ssm_loss`): a non-finite score names the evaluation (``x`` or ``x~``) it came from."""
    xf = _check_batch(x)
    _gradient_setup(model, "model", reduction, on_nonfinite, model_output=model_output)
    x_leaf = _leaf(x)
    s = _score_by_autograd(model, x_leaf, model_output, "exact_sm_loss").reshape(xf.shape)

    def compute() -> Tensor:
        trace = torch.zeros(xf.shape[0], dtype=s.dtype, device=s.device)
        for j in range(xf.shape[1]):
            g = _grad_for_sm(s[:, j].sum(), x_leaf, "exact_sm_loss").reshape(xf.shape)
            trace = trace + g[:, j]
        return reference.exact_sm_objective(trace, s)

    return _gradient_loss("exact_sm_loss", s, [("x", xf.shape[0])], compute, "tr grad s + 1/2 ||s||^2",
                          on_nonfinite, xf.shape[0], reduction)


def _sliced(model, x, n_slices, directions, generator, model_output, variance_reduced, loss_name, on_nonfinite,
            reduction, weight: Tensor | None = None, x_name: str = "x", model_name: str = "model"):
    xf = _check_batch(x)
    _check_int(n_slices, "n_slices", 1)
    _checks.check_stack_size(n_slices, xf, "n_slices", n_slices)
    _check_choice(directions, "directions", tuple(ops.DIRECTION_KINDS))
    B, d = xf.shape
    x_rep = _leaf(x.repeat(n_slices, *([1] * (x.dim() - 1))))
    v = reference.sample_directions(n_slices, B, d, directions, generator=generator, dtype=x.dtype,
                                    device=x.device).reshape(n_slices * B, d)
    s = _score_by_autograd(model, x_rep, model_output, loss_name, model_name=model_name).reshape(n_slices * B, d)

    def compute() -> Tensor:
        sv = (s * v).sum(-1)
        vjv = (_grad_for_sm(sv.sum(), x_rep, loss_name).reshape(n_slices * B, d) * v).sum(-1)
        per = reference.ssm_vr_objective(vjv, s) if variance_reduced else reference.ssm_objective(vjv, sv)
        per = per.reshape(n_slices, B).mean(0)
        return per if weight is None else per * weight

    formula = "v^T grad(v^T s) + 1/2 " + ("||s||^2" if variance_reduced else "(v^T s)^2")
    return _gradient_loss(loss_name, s, [(x_name, n_slices * B)], compute, formula, on_nonfinite, B, reduction)


def ssm_loss(model: Callable, x: Tensor, *, n_slices: int = 1, directions: str = "rademacher",
             generator: torch.Generator | None = None, reduction: str = "mean",
             model_output: str = "log_density", on_nonfinite: str = "raise") -> Tensor:
    """Sliced score matching (Song et al. 2019): ``v^T grad(v^T s) + 1/2 (v^T s)^2`` with ``E[v v^T] = I``.

    ``directions``: ``"rademacher"`` (default), ``"gaussian"``, or ``"sphere"`` (radius sqrt(d)).
    Needs a double backward for log-density models.
    ``on_nonfinite``: ``"raise"``, ``"skip"`` or ``"ignore"``, the contract of the FD losses
    (:func:`fd_ssm_loss`): a non-finite score names the evaluation (``x`` or ``x~``) it came from."""
    _check_batch(x)
    _gradient_setup(model, "model", reduction, on_nonfinite, generator, model_output)
    return _sliced(model, x, n_slices, directions, generator, model_output, False, "ssm_loss", on_nonfinite,
                   reduction)


def ssm_vr_loss(model: Callable, x: Tensor, *, n_slices: int = 1, directions: str = "rademacher",
                generator: torch.Generator | None = None, reduction: str = "mean",
                model_output: str = "log_density", on_nonfinite: str = "raise") -> Tensor:
    """SSM with variance reduction: ``v^T grad(v^T s) + 1/2 ||s||^2``. Arguments as :func:`ssm_loss`."""
    _check_batch(x)
    _gradient_setup(model, "model", reduction, on_nonfinite, generator, model_output)
    return _sliced(model, x, n_slices, directions, generator, model_output, True, "ssm_vr_loss", on_nonfinite,
                   reduction)


def dsm_loss(model: Callable, x: Tensor, sigma, *, generator: torch.Generator | None = None,
             reduction: str = "mean", model_output: str = "log_density", on_nonfinite: str = "raise") -> Tensor:
    """Denoising score matching ``1/2 ||s(x~) + (x~ - x)/sigma^2||^2``, ``x~ = x + sigma z``.

    ``sigma``: a float or a ``(B,)`` tensor, as in :func:`fd_dsm_loss`. ``model``: a log-density (score by
    autograd, one backward with create_graph) or a score network (``model_output="score"``).
    ``on_nonfinite``: ``"raise"``, ``"skip"`` or ``"ignore"``, the contract of the FD losses
    (:func:`fd_ssm_loss`): a non-finite score names the evaluation (``x`` or ``x~``) it came from."""
    xf = _check_batch(x)
    _gradient_setup(model, "model", reduction, on_nonfinite, generator, model_output)
    sig = _sigma_per_sample(sigma, xf.shape[0], xf)
    noise = sig.unsqueeze(1) * _randn(xf, generator)
    x_noisy = _leaf((xf + noise).reshape(x.shape))
    s = _score_by_autograd(model, x_noisy, model_output, "dsm_loss").reshape(xf.shape)
    return _gradient_loss("dsm_loss", s, [("x~", xf.shape[0])], lambda: reference.dsm_objective(s, noise, sig),
                          "1/2 ||s(x~) + (x~ - x)/sigma^2||^2", on_nonfinite, xf.shape[0], reduction)


def annealed_dsm_loss(score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, *,
                      labels: Tensor | None = None, generator: torch.Generator | None = None,
                      reduction: str = "mean", on_nonfinite: str = "raise") -> Tensor:
    """Multi-scale DSM of NCSN with ``lambda(sigma) = sigma^2``: ``1/2 ||sigma s(x~, sigma) + z||^2``.

    ``sigma = sigmas[label]`` per sample (uniform labels unless given); ``score(x, sigma)`` with
    ``sigma`` of shape ``(N,)``. ``sigmas`` and ``labels`` as in :func:`annealed_fd_ssm_vr_loss`.
    ``on_nonfinite``: ``"raise"``, ``"skip"`` or ``"ignore"``, the contract of the FD losses
    (:func:`fd_ssm_loss`): a non-finite score names the evaluation (``x`` or ``x~``) it came from."""
    xf = _check_batch(x)
    _gradient_setup(score, "score", reduction, on_nonfinite, generator)
    sig = _noise_levels(sigmas, labels, xf.shape[0], generator, xf)
    noise = sig.unsqueeze(1) * _randn(xf, generator)
    x_noisy = (xf + noise).reshape(x.shape)
    s = _score_values("score")(score, x_noisy, sig).reshape(xf.shape)
    return _gradient_loss("annealed_dsm_loss", s, [("x~", xf.shape[0])],
                          lambda: reference.dsm_objective(s, noise, sig) * sig.square(),
                          "sigma^2/2 ||s(x~, sigma) + (x~ - x)/sigma^2||^2", on_nonfinite, xf.shape[0], reduction)


def annealed_ssm_vr_loss(score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, *,
                         labels: Tensor | None = None, n_slices: int = 1, directions: str = "rademacher",
                         generator: torch.Generator | None = None, reduction: str = "mean",
                         on_nonfinite: str = "raise") -> Tensor:
    """Noise-conditional SSM-VR with ``lambda(sigma) = sigma^2`` (the gradient-based twin of
    :func:`annealed_fd_ssm_vr_loss`).
    ``on_nonfinite``: ``"raise"``, ``"skip"`` or ``"ignore"``, the contract of the FD losses
    (:func:`fd_ssm_loss`): a non-finite score names the evaluation (``x`` or ``x~``) it came from."""
    xf = _check_batch(x)
    _gradient_setup(score, "score", reduction, on_nonfinite, generator)
    _check_int(n_slices, "n_slices", 1)
    _checks.check_stack_size(n_slices, xf, "n_slices", n_slices)
    sig = _noise_levels(sigmas, labels, xf.shape[0], generator, xf)
    x_noisy = (xf + sig.unsqueeze(1) * _randn(xf, generator)).reshape(x.shape)
    sig_rows = sig.repeat(n_slices)
    return _sliced(lambda inp: score(inp, sig_rows), x_noisy, n_slices, directions, generator, "score", True,
                   "annealed_ssm_vr_loss", on_nonfinite, reduction, weight=sig.square(), x_name="x~",
                   model_name="score")
