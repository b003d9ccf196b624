"""Score-matching losses: finite-difference (fused) and gradient-based baselines, one calling convention.

Every loss takes the model first and the data batch ``x`` of shape ``(B, *event_shape)`` second,
flattens the event to ``d = prod(event_shape)`` features for the directions, calls the model once on
a stacked batch, and returns the mean over the batch (``reduction="mean"``), the sum (``"sum"``) or
the per-sample values (``"none"``, shape ``(B,)``). Formulas: shared/MATH.md, as implemented in
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

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import numerics, ops, reference
from ._ext import has_cuda_kernels

_BACKENDS = ("auto", "cpp", "triton", "torch")
_REDUCTIONS = ("mean", "sum", "none")
_MODEL_OUTPUTS = ("log_density", "score")
_NONFINITE = ("raise", "skip", "ignore")


# --------------------------------------------------------------------------- argument checks
def _check_batch(x, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"`{name}` must have shape (batch, *event_shape) with at least one event dimension, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(x.shape)})")
    if x[0].numel() == 0:
        raise ValueError(f"`{name}` has an empty event shape {tuple(x.shape[1:])}")
    return x.reshape(x.shape[0], -1)


def _check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, Tensor):
        eps = float(eps)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"`{name}` must be a positive float, got {eps!r}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"`{name}` must be finite and > 0, got {eps!r}")
    return float(eps)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _eager() -> bool:
    """Whether data-dependent checks (which would read tensor values) may run."""
    return not torch.compiler.is_compiling()


def _triton_unavailable(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on ``device_type`` tensors, or None if they can.

    They need triton installed and CUDA tensors, or CPU tensors under Triton's interpreter
    (``TRITON_INTERPRET=1`` before fdsm_ext.triton is first imported; how the tests run on CPU).
    """
    try:
        from .triton import unavailable_reason  # registers torch.ops.fdsm_ext_triton
    except ImportError as exc:
        return f"triton cannot be imported ({exc}); install it with `pip install triton`"
    return unavailable_reason(device_type)


def _resolve_backend(backend: str, x: Tensor) -> str:
    _check_choice(backend, "backend", _BACKENDS)
    return _resolve_backend_for(backend, x.device.type)


def _resolve_backend_for(backend: str, dev: str) -> str:
    """``auto``: the compiled kernels where built (always for CPU), else Triton for CUDA tensors, else
    the torch composite; a requested backend that cannot run on ``dev`` tensors raises."""
    compiled = dev == "cpu" or (dev == "cuda" and has_cuda_kernels())
    if backend == "auto":
        if compiled:
            return "cpp"
        return "triton" if dev == "cuda" and _triton_unavailable(dev) is None else "torch"
    if backend == "cpp" and not compiled:
        raise RuntimeError(f"backend='cpp' has no kernels for {dev} tensors in this build of fdsm_ext "
                           "(CUDA kernels are built only with a CUDA build of torch and a CUDA toolkit); "
                           "use backend='torch' or 'auto'")
    if backend == "triton":
        reason = _triton_unavailable(dev)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run on {dev} tensors: {reason}; "
                               "use backend='auto', 'cpp' or 'torch'")
    return backend


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _draw_seed(generator) -> Tensor:
    """A fresh ``(seed, offset)`` pair from ``generator`` (torch's default CPU generator if None)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device=device).cpu()


def _log_density_values(log_density: Callable, inputs: Tensor, *extra) -> Tensor:
    out = log_density(inputs, *extra)
    rows = inputs.shape[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"`log_density` must return a tensor, got {type(out).__name__}")
    if out.dim() == 2 and out.shape[1] == 1:
        out = out.squeeze(1)
    if out.shape != (rows,):
        raise ValueError(f"`log_density` must map a batch of shape {tuple(inputs.shape)} to shape ({rows},) "
                         f"(one value per sample), got shape {tuple(out.shape)}")
    return out


def _score_values(score: Callable, inputs: Tensor, *extra) -> Tensor:
    out = score(inputs, *extra)
    if not isinstance(out, Tensor):
        raise TypeError(f"`score` must return a tensor, got {type(out).__name__}")
    if out.shape != inputs.shape:
        raise ValueError(f"`score` must return a tensor of its input's shape {tuple(inputs.shape)}, "
                         f"got shape {tuple(out.shape)}")
    return out


def _sigma_per_sample(sigma, batch: int, like: Tensor, name: str = "sigma") -> Tensor:
    if isinstance(sigma, Tensor):
        sig = sigma.to(device=like.device, dtype=like.dtype)
        if sig.dim() == 0:
            sig = sig.expand(batch)
        if sig.shape != (batch,):
            raise ValueError(f"`{name}` must be a float or a tensor of shape ({batch},), got shape {tuple(sig.shape)}")
        if _eager() and not bool((sig > 0).all() & torch.isfinite(sig).all()):
            raise ValueError(f"`{name}` must be finite and > 0 for every sample")
        return sig
    return torch.full((batch,), _check_eps(sigma, name), dtype=like.dtype, device=like.device)


def _noise_levels(sigmas, labels, batch: int, generator, like: Tensor) -> Tensor:
    """sigma per sample from the ladder ``sigmas``: ``sigmas[labels]``, labels uniform if not given."""
    ladder = torch.as_tensor(sigmas, dtype=like.dtype).to(like.device)
    if ladder.dim() != 1 or ladder.numel() == 0:
        raise ValueError(f"`sigmas` must be a non-empty 1-D sequence of noise levels, got shape {tuple(ladder.shape)}")
    if _eager() and not bool((ladder > 0).all() & torch.isfinite(ladder).all()):
        raise ValueError("`sigmas` must all be finite and > 0")
    if labels is None:
        gen_device = generator.device if generator is not None else like.device
        labels = torch.randint(0, ladder.numel(), (batch,), generator=generator, device=gen_device).to(like.device)
    elif not isinstance(labels, Tensor) or labels.shape != (batch,) or labels.is_floating_point():
        raise ValueError(f"`labels` must be an integer tensor of shape ({batch},) indexing `sigmas`")
    return ladder[labels]


def _randn(shape, generator, like: Tensor) -> Tensor:
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


# --------------------------------------------------------------------------- backends
class _Fused:
    """Compiled kernels (torch.ops.fdsm_ext): directions regenerated in-kernel from a seed ``token``."""

    _ns = torch.ops.fdsm_ext

    @classmethod
    def perturb(cls, x, n_slices, directions, eps, generator, include_center):
        seed = _draw_seed(generator)
        return cls._ns.perturb(x, seed, eps, n_slices, ops.DIRECTION_KINDS[directions], include_center), seed

    @classmethod
    def fd_ssm_quotient(cls, f0, fp, fm, eps, dim_scale):
        return cls._ns.fd_ssm_quotient(f0, fp, fm, eps, dim_scale)

    @classmethod
    def fd_ssm_vr(cls, sp, sm, token, eps, directions, dim_scale):
        return cls._ns.fd_ssm_vr(sp, sm, token, eps, ops.DIRECTION_KINDS[directions], dim_scale)

    @classmethod
    def fd_dsm_quotient(cls, fp, fm, noise, sigma, token, eps, directions, dim_scale):
        return cls._ns.fd_dsm_quotient(fp, fm, noise, sigma.detach(), token, eps, ops.DIRECTION_KINDS[directions],
                                       dim_scale)

    @classmethod
    def stencil_perturb(cls, x, v, eps, order):
        return cls._ns.stencil_perturb(x, v, eps, order)

    @classmethod
    def stencil_combine(cls, f, eps, order):
        return cls._ns.stencil_combine(f, eps, order)


class _Triton(_Fused):
    """Triton kernels (torch.ops.fdsm_ext_triton, registered by importing fdsm_ext.triton, which
    _triton_unavailable does): the same ops, seed token and direction stream as _Fused."""

    _ns = torch.ops.fdsm_ext_triton


class _Composite:
    """Pure PyTorch, as the authors' code does it: ``v`` drawn with torch's RNG and kept as the token."""

    @staticmethod
    def perturb(x, n_slices, directions, eps, generator, include_center):
        B, d = x.shape
        v = reference.sample_directions(n_slices, B, d, directions, generator=generator,
                                        dtype=reference.acc_dtype(x.dtype), device=x.device)
        v = v * (eps / math.sqrt(d))
        return reference.perturb(x, v, include_center), v

    fd_ssm_quotient = staticmethod(reference.fd_ssm_quotient)

    @staticmethod
    def fd_ssm_vr(sp, sm, token, eps, directions, dim_scale):
        return reference.fd_ssm_vr(sp, sm, token, eps, dim_scale)

    @staticmethod
    def fd_dsm_quotient(fp, fm, noise, sigma, token, eps, directions, dim_scale):
        return reference.fd_dsm_quotient(fp, fm, noise, sigma.detach(), token, eps, dim_scale)

    stencil_perturb = staticmethod(reference.stencil_perturb)
    stencil_combine = staticmethod(reference.stencil_combine)


_BACKEND_IMPLS = {"cpp": _Fused, "triton": _Triton, "torch": _Composite}


def _backend_impl(backend: str, x: Tensor):
    return _BACKEND_IMPLS[_resolve_backend(backend, x)]


def _fd_setup(eps, x: Tensor, model, n_slices, directions, reduction, chunk_size, on_nonfinite) -> float:
    """Checks the arguments every FD loss shares and returns eps as a float (resolving ``"auto"``)."""
    _check_int(n_slices, "n_slices", 1)
    _check_choice(directions, "directions", tuple(ops.DIRECTION_KINDS))
    _check_choice(reduction, "reduction", _REDUCTIONS)
    _check_choice(on_nonfinite, "on_nonfinite", _NONFINITE)
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", 1)
    if isinstance(eps, str):
        if eps != "auto":
            raise ValueError(f"`eps` must be a positive float or 'auto', got {eps!r}")
        if not _eager():
            raise ValueError("eps='auto' reads the batch to find its scale and cannot be traced; compute it "
                             "outside the compiled region with fdsm_ext.numerics.auto_eps(x) and pass the float")
        return numerics.auto_eps(x, model=model)
    eps = _check_eps(eps)
    if _eager():
        numerics.warn_if_unresolvable(eps, x, model)
    return eps


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


def _nonfinite_batch(values: Tensor, blocks, policy: str, loss_name: str) -> bool:
    """Whether to skip the batch because the model returned non-finite values (raises if ``policy`` is
    ``"raise"``). ``blocks`` names consecutive row blocks of ``values``: ``[("x+v", rows), ...]``.
    One device sync; skipped under torch.compile."""
    if policy == "ignore" or not _eager():
        return False
    finite = torch.isfinite(values.detach().reshape(values.shape[0], -1)).all(1)
    if bool(finite.all()):
        return False
    where, start = [], 0
    for name, rows in blocks:
        bad = (~finite[start:start + rows]).nonzero().flatten()
        if bad.numel():
            where.append(f"{name} ({bad.numel()} of {rows} rows, first at row {int(bad[0])})")
        start += rows
    msg = f"{loss_name}: the model returned non-finite values at " + ", ".join(where)
    if policy == "raise":
        raise FloatingPointError(msg + "; nothing was averaged. Pass on_nonfinite='skip' to skip such batches.")
    numerics.nonfinite_skips[loss_name] += 1
    warnings.warn(msg + "; batch skipped (zero loss, no gradient)", RuntimeWarning, stacklevel=3)
    return True


def _skipped(batch: int, reduction: str, like: Tensor) -> Tensor:
    shape = (batch,) if reduction == "none" else ()
    return torch.zeros(shape, dtype=reference.loss_dtype(like.dtype), device=like.device, requires_grad=True)


# --------------------------------------------------------------------------- FD losses
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
        eps: the norm of each direction ``v`` (sphere) or its root-mean-square norm (other kinds);
            ``"auto"`` picks it from the dtype the model evaluates in (:func:`fdsm_ext.numerics.auto_eps`).
        n_slices: directions per sample.
        directions: ``"sphere"`` (uniform on the sphere of radius eps), ``"rademacher"`` or ``"gaussian"``.
        generator: torch.Generator for the directions; ``torch.manual_seed`` fixes them if None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample ``(B,)``).
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"torch"``.
        dim_scale: the factor in front of the quotient, ``d`` (the paper's form) if None; ``1.0``
            gives the authors' deep-EBM script's form (a constant rescale).
        chunk_size: evaluate the stacked batch in chunks of this many rows under activation
            checkpointing: the same loss and gradients, a peak memory that falls with the chunk size,
            one extra forward per chunk in the backward.
        fp32_eval: evaluate the model on the stacked batch in float32 with autocast disabled.
        on_nonfinite: ``"raise"`` (default) if the model returns a non-finite value, naming which of
            ``x``, ``x+v``, ``x-v`` produced it; ``"skip"`` returns a zero loss without gradient, warns,
            and counts the batch in ``fdsm_ext.numerics.nonfinite_skips``; ``"ignore"`` skips the check
            (and its device sync). Under torch.compile the check is not made.

    Returns:
        The loss in float32 for half/bfloat16 models, in the model's dtype otherwise; the quotient and
        its backward are computed in float32 (float64 for float64 models) whatever the model's dtype.
    """
    xf = _check_batch(x)
    eps = _fd_setup(eps, x, log_density, n_slices, directions, reduction, chunk_size, on_nonfinite)
    be = _backend_impl(backend, x)
    B, d = xf.shape
    nb = n_slices * B
    stacked, _ = be.perturb(xf, n_slices, directions, eps, generator, True)
    f = _call_model(log_density, stacked.reshape(-1, *x.shape[1:]), _log_density_values, chunk_size, fp32_eval)
    if _nonfinite_batch(f, [("x", B), ("x+v", nb), ("x-v", nb)], on_nonfinite, "fd_ssm_loss"):
        return _skipped(B, reduction, f)
    per = be.fd_ssm_quotient(f[:B], f[B:B + nb].reshape(n_slices, B), f[B + nb:].reshape(n_slices, B), eps,
                             float(d if dim_scale is None else dim_scale))
    return _reduce(per, reduction)


def _fd_ssm_vr_per_sample(score, xf, event_shape, eps, n_slices, directions, generator, backend, dim_scale,
                          chunk_size, fp32_eval, on_nonfinite, loss_name, *extra):
    """Per-sample FD-SSM-VR of ``score(x, *extra)`` (extra: per-row tensors for 2 n B rows), or None to skip."""
    be = _backend_impl(backend, xf)
    B, d = xf.shape
    nb = n_slices * B
    stacked, token = be.perturb(xf, n_slices, directions, eps, generator, False)
    s = _call_model(score, stacked.reshape(-1, *event_shape), _score_values, chunk_size, fp32_eval, *extra)
    if _nonfinite_batch(s, [("x+v", nb), ("x-v", nb)], on_nonfinite, loss_name):
        return None
    s = s.reshape(2, n_slices, B, d)
    return be.fd_ssm_vr(s[0], s[1], token, eps, directions, float(d if dim_scale is None else dim_scale))


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
    eps = _fd_setup(eps, x, score, n_slices, directions, reduction, chunk_size, on_nonfinite)
    per = _fd_ssm_vr_per_sample(score, xf, x.shape[1:], eps, n_slices, directions, generator, backend, dim_scale,
                                chunk_size, fp32_eval, on_nonfinite, "fd_ssm_vr_loss")
    return _skipped(xf.shape[0], reduction, x) if per is None else _reduce(per, reduction)


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
        sigma: a float, or a ``(B,)`` tensor of per-sample noise levels (not differentiated).
        Others as in :func:`fd_ssm_loss`.
    """
    xf = _check_batch(x)
    eps = _fd_setup(eps, x, log_density, n_slices, directions, reduction, chunk_size, on_nonfinite)
    be = _backend_impl(backend, x)
    B, d = xf.shape
    nb = n_slices * B
    sig = _sigma_per_sample(sigma, B, xf)
    noise = sig[:, None] * _randn(xf.shape, generator, xf)
    stacked, token = be.perturb(xf + noise, n_slices, directions, eps, generator, False)
    f = _call_model(log_density, stacked.reshape(-1, *x.shape[1:]), _log_density_values, chunk_size, fp32_eval)
    if _nonfinite_batch(f, [("x~+v", nb), ("x~-v", nb)], on_nonfinite, "fd_dsm_loss"):
        return _skipped(B, reduction, f)
    f = f.reshape(2, n_slices, B)
    per = be.fd_dsm_quotient(f[0], f[1], noise, sig, token, eps, directions,
                             float(d if dim_scale is None else dim_scale))
    if sigma_power != 0.0:
        per = per * sig.to(per.dtype) ** sigma_power
    return _reduce(per, reduction)


def annealed_fd_ssm_vr_loss(score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, eps: float | str = 0.1, *,
                            labels: Tensor | None = None, n_slices: int = 1, directions: str = "sphere",
                            generator: torch.Generator | None = None, reduction: str = "mean",
                            backend: str = "auto", dim_scale: float | None = None, chunk_size: int | None = None,
                            fp32_eval: bool = False, on_nonfinite: str = "raise") -> Tensor:
    """Noise-conditional FD-SSM-VR for NCSN training, weighted by ``lambda(sigma) = sigma^2``.

    Per sample, ``sigma = sigmas[label]`` (label uniform unless ``labels`` is given),
    ``x~ = x + sigma z``, and the loss is ``sigma^2`` times FD-SSM-VR of ``s(., sigma)`` at ``x~``.
    ``score(x, sigma)`` receives ``sigma`` of shape ``(N,)`` for a batch of N rows.
    """
    xf = _check_batch(x)
    eps = _fd_setup(eps, x, score, n_slices, directions, reduction, chunk_size, on_nonfinite)
    B = xf.shape[0]
    sig = _noise_levels(sigmas, labels, B, generator, xf)
    x_noisy = xf + sig[:, None] * _randn(xf.shape, generator, xf)
    per = _fd_ssm_vr_per_sample(score, x_noisy, x.shape[1:], eps, n_slices, directions, generator, backend,
                                dim_scale, chunk_size, fp32_eval, on_nonfinite, "annealed_fd_ssm_vr_loss",
                                sig.repeat(2 * n_slices))
    if per is None:
        return _skipped(B, reduction, x)
    return _reduce(per * sig.to(per.dtype).square(), reduction)


def fd_directional_derivative(f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, order: int = 1,
                              eps: float = 1e-2, *, backend: str = "auto", chunk_size: int | None = None) -> Tensor:
    """Order-T directional derivative of ``f`` along ``v`` by one batched central stencil.

    ``D_v^T f(x) ~ (2 eps)^-T sum_t (-1)^t C(T, t) f(x + (T - 2t) eps v)`` with error O(eps^2)
    (paper Appendix C.1, Algorithm 1); ``v`` is used as given (not normalised), so the result is the
    T-th derivative of ``t -> f(x + t v)`` at 0. All ``T + 1`` evaluations are one call of ``f`` on a
    ``((T+1) B, *event_shape)`` batch (or chunks of ``chunk_size`` rows). Returns ``(B,)``;
    differentiable w.r.t. ``x``, ``v`` and ``f``'s parameters.
    """
    xf = _check_batch(x)
    vf = _check_batch(v, "v")
    if v.shape != x.shape:
        raise ValueError(f"`v` must have the shape of `x` {tuple(x.shape)}, got {tuple(v.shape)}")
    if v.dtype != x.dtype or v.device != x.device:
        raise ValueError(f"`v` must match `x`'s dtype and device ({x.dtype}, {x.device}), got ({v.dtype}, {v.device})")
    order = _check_int(order, "order", 1)
    if order > 16:
        raise ValueError(f"`order` must be <= 16, got {order}")
    eps = _check_eps(eps)
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", 1)
    be = _backend_impl(backend, x)
    B = xf.shape[0]
    stacked = be.stencil_perturb(xf, vf, eps, order)
    vals = _call_model(f, stacked.reshape(-1, *x.shape[1:]), _log_density_values, chunk_size, False)
    shifts = [f"x{order - 2 * t:+d}*eps*v" for t in range(order + 1)]
    _nonfinite_batch(vals, [(name, B) for name in shifts], "raise", "fd_directional_derivative")
    return be.stencil_combine(vals.reshape(order + 1, B), eps, order)


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


def _score_by_autograd(model: Callable, x_leaf: Tensor, model_output: str, loss_name: str, *extra) -> Tensor:
    """Score at ``x_leaf`` (a leaf requiring grad), differentiable w.r.t. the model's parameters."""
    _check_choice(model_output, "model_output", _MODEL_OUTPUTS)
    if model_output == "score":
        return _score_values(model, x_leaf, *extra)
    return _grad_for_sm(_log_density_values(model, x_leaf, *extra).sum(), x_leaf, loss_name)


def exact_sm_loss(model: Callable, x: Tensor, *, model_output: str = "log_density",
                  reduction: str = "mean") -> Tensor:
    """Exact score matching ``tr grad s(x) + 1/2 ||s(x)||^2`` (d backward passes; a baseline and oracle).

    ``model`` is a log-density (``model_output="log_density"``, score by autograd) or a score network
    (``"score"``).
    """
    xf = _check_batch(x)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    x_leaf = _leaf(x)
    s = _score_by_autograd(model, x_leaf, model_output, "exact_sm_loss").reshape(xf.shape)
    trace = torch.zeros(xf.shape[0], dtype=s.dtype, device=s.device)
    for j in range(xf.shape[1]):
        g = _grad_for_sm(s[:, j].sum(), x_leaf, "exact_sm_loss").reshape(xf.shape)
        trace = trace + g[:, j]
    return _reduce(reference.exact_sm_objective(trace, s), reduction)


def _sliced(model, x, n_slices, directions, generator, model_output, variance_reduced, loss_name):
    xf = _check_batch(x)
    _check_int(n_slices, "n_slices", 1)
    _check_choice(directions, "directions", tuple(ops.DIRECTION_KINDS))
    B, d = xf.shape
    x_rep = _leaf(x.repeat(n_slices, *([1] * (x.dim() - 1))))
    v = reference.sample_directions(n_slices, B, d, directions, generator=generator, dtype=x.dtype,
                                    device=x.device).reshape(n_slices * B, d)
    s = _score_by_autograd(model, x_rep, model_output, loss_name).reshape(n_slices * B, d)
    sv = (s * v).sum(-1)
    vjv = (_grad_for_sm(sv.sum(), x_rep, loss_name).reshape(n_slices * B, d) * v).sum(-1)
    per = reference.ssm_vr_objective(vjv, s) if variance_reduced else reference.ssm_objective(vjv, sv)
    return per.reshape(n_slices, B).mean(0)


def ssm_loss(model: Callable, x: Tensor, *, n_slices: int = 1, directions: str = "rademacher",
             generator: torch.Generator | None = None, reduction: str = "mean",
             model_output: str = "log_density") -> Tensor:
    """Sliced score matching (Song et al. 2019): ``v^T grad(v^T s) + 1/2 (v^T s)^2`` with ``E[v v^T] = I``.

    ``directions``: ``"rademacher"`` (default), ``"gaussian"``, or ``"sphere"`` (radius sqrt(d)).
    Needs a double backward for log-density models.
    """
    _check_choice(reduction, "reduction", _REDUCTIONS)
    return _reduce(_sliced(model, x, n_slices, directions, generator, model_output, False, "ssm_loss"), reduction)


def ssm_vr_loss(model: Callable, x: Tensor, *, n_slices: int = 1, directions: str = "rademacher",
                generator: torch.Generator | None = None, reduction: str = "mean",
                model_output: str = "log_density") -> Tensor:
    """SSM with variance reduction: ``v^T grad(v^T s) + 1/2 ||s||^2``. Arguments as :func:`ssm_loss`."""
    _check_choice(reduction, "reduction", _REDUCTIONS)
    return _reduce(_sliced(model, x, n_slices, directions, generator, model_output, True, "ssm_vr_loss"), reduction)


def dsm_loss(model: Callable, x: Tensor, sigma, *, generator: torch.Generator | None = None,
             reduction: str = "mean", model_output: str = "log_density") -> Tensor:
    """Denoising score matching ``1/2 ||s(x~) + (x~ - x)/sigma^2||^2``, ``x~ = x + sigma z``.

    ``sigma``: a float or a ``(B,)`` tensor. ``model``: a log-density (score by autograd, one backward
    with create_graph) or a score network (``model_output="score"``).
    """
    xf = _check_batch(x)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    sig = _sigma_per_sample(sigma, xf.shape[0], xf)
    noise = sig[:, None] * _randn(xf.shape, generator, xf)
    x_noisy = _leaf((xf + noise).reshape(x.shape))
    s = _score_by_autograd(model, x_noisy, model_output, "dsm_loss").reshape(xf.shape)
    return _reduce(reference.dsm_objective(s, noise, sig), reduction)


def annealed_dsm_loss(score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, *,
                      labels: Tensor | None = None, generator: torch.Generator | None = None,
                      reduction: str = "mean") -> Tensor:
    """Multi-scale DSM of NCSN with ``lambda(sigma) = sigma^2``: ``1/2 ||sigma s(x~, sigma) + z||^2``.

    ``sigma = sigmas[label]`` per sample (uniform labels unless given); ``score(x, sigma)`` with
    ``sigma`` of shape ``(N,)``.
    """
    xf = _check_batch(x)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    sig = _noise_levels(sigmas, labels, xf.shape[0], generator, xf)
    noise = sig[:, None] * _randn(xf.shape, generator, xf)
    x_noisy = (xf + noise).reshape(x.shape)
    s = _score_values(score, x_noisy, sig).reshape(xf.shape)
    return _reduce(reference.dsm_objective(s, noise, sig) * sig.square(), reduction)


def annealed_ssm_vr_loss(score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas, *,
                         labels: Tensor | None = None, n_slices: int = 1, directions: str = "rademacher",
                         generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
    """Noise-conditional SSM-VR with ``lambda(sigma) = sigma^2`` (the gradient-based twin of
    :func:`annealed_fd_ssm_vr_loss`)."""
    xf = _check_batch(x)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    sig = _noise_levels(sigmas, labels, xf.shape[0], generator, xf)
    x_noisy = (xf + sig[:, None] * _randn(xf.shape, generator, xf)).reshape(x.shape)
    sig_rows = sig.repeat(n_slices)
    per = _sliced(lambda inp: score(inp, sig_rows), x_noisy, n_slices, directions, generator, "score", True,
                  "annealed_ssm_vr_loss")
    return _reduce(per * sig.square(), reduction)
