"""Exact likelihoods of VE score models by the probability-flow ODE, with finite-difference divergences.

The variance-exploding (VE) SDE of score_sde (Song et al. 2021) perturbs data with Gaussian noise of
standard deviation ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``t`` in ``[0, 1]``. Its
probability-flow ODE

    dx/dt = f(x, t) = -1/2 d[sigma^2]/dt s(x, sigma(t)) = -sigma(t)^2 ln(sigma_max / sigma_min) s(x, sigma(t))

moves samples of the perturbed density ``p_t`` along ``t`` with the same marginals as the SDE, so by the
instantaneous change of variables ``log p_0(x(0)) = log p_1(x(1)) + int_0^1 div f(x(t), t) dt``. The
divergence ``div f = -sigma^2 ln(sigma_max / sigma_min) tr(ds/dx)`` is estimated by one of three
functions of this module, each written once here:

- :func:`fd_divergence`: ``v^T (s(x + eps v) - s(x - eps v)) / (2 eps)`` for fixed probes ``v`` with
  ``E[v v^T] = I``: a central difference of the directional derivative, ``O(eps^2)`` from the
  Hutchinson value, from forward evaluations only (no backward pass: it runs under ``torch.no_grad``
  and for score networks without a double backward), both sides in one stacked call of ``2 B`` rows per
  probe, whose mean also gives the drift to ``O(eps^2)``; :func:`fused_fd_divergence` is the same
  estimator on the fused kernels: the stacked batch from ``perturb`` and the reduction
  ``v^T (s+ - s-)`` from the ``fd_divergence`` op, both regenerating ``v`` from a seed, so no probe
  tensor is stored;
- :func:`hutchinson_divergence`: ``v^T (ds/dx) v`` by a vector-Jacobian product (score_sde's
  estimator);
- :func:`exact_divergence`: the trace of ``ds/dx`` by ``d`` vector-Jacobian products (small ``d``).

:func:`ode_likelihood` integrates ``x`` and the divergence integral with torchdiffeq and returns the
per-sample negative log-likelihood in nats and bits per dimension. Derivations and conventions:
docs/likelihood.md, section "Likelihood by the probability-flow ODE".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks, numerics, ops, reference

__all__ = [
    "LikelihoodResult",
    "auto_divergence_eps",
    "exact_divergence",
    "fd_divergence",
    "fused_fd_divergence",
    "hutchinson_divergence",
    "stream_probes",
    "ode_likelihood",
]

_DIVERGENCES = ("fd", "hutchinson", "exact")
_PROBES = ("rademacher", "gaussian")
_DEQUANTIZE = (None, "uniform")
#: torchdiffeq's adaptive-step solvers (a fixed-step method would need a step size this API does not take).
_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: Levels of the image data that ``dequantize="uniform"`` assumes (8-bit images).
_LEVELS = 256
#: eps = AUTO_DIV_EPS_KAPPA (u X sigma^2)^(1/3): kappa = 1 is within 3x of the best step at every point of the
#: float32 calibration in docs/likelihood.md ("The FD step"); tests/test_likelihood.py checks the error it gives.
AUTO_DIV_EPS_KAPPA = 1.0


class LikelihoodResult(NamedTuple):
    """What :func:`ode_likelihood` returns; every tensor is per sample, ``(B,)``, except ``z``.

    Attributes:
        nll: negative log-likelihood in nats (the mean over probes).
        bpd: bits per dimension, ``nll / (d ln 2)``.
        nll_se: standard error of ``nll`` over the probes (std / sqrt(n_probes)); None for one probe
            (no spread to measure) and zeros for ``divergence="exact"``.
        bpd_se: the same for ``bpd``.
        z: ``x(1)``, the end of the ODE path ``(B, *event_shape)`` (the prior latent).
        nfe: number of evaluations of the ODE right-hand side (each is one stacked score call for
            ``"fd"``).
    """

    nll: Tensor
    bpd: Tensor
    nll_se: Tensor | None
    bpd_se: Tensor | None
    z: Tensor
    nfe: int


# --------------------------------------------------------------------------- divergence estimators
def fd_divergence(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """Central finite-difference Hutchinson estimate of ``tr(dfn/dx)``, from forward evaluations only.

    ``fn`` maps ``(N, d)`` to ``(N, d)`` row by row; ``x`` is ``(B, d)``; ``v`` is ``(n, B, d)``
    (``n`` probes per sample, ``E[v v^T] = I``); ``eps`` is a float or a ``(B,)`` tensor, the step
    along ``v`` (each coordinate of a Rademacher probe moves by exactly ``eps``). Evaluates ``fn``
    once, on the stacked ``(2 n B, d)`` batch ``[x + eps v_1..n; x - eps v_1..n]``, and returns
    ``(f0, div)`` in ``x``'s dtype:

    - ``div[k, i] = v_ki^T (fn(x_i + eps v_ki) - fn(x_i - eps v_ki)) / (2 eps)``, ``(n, B)``: Hutchinson's
      ``v^T J v`` plus ``eps^2/6 v . d^3 fn[v, v, v] + O(eps^4)`` and round-off ``~ u |fn| |v| / eps``;
    - ``f0 = mean_k (fn(x + eps v_k) + fn(x - eps v_k)) / 2``, ``(B, d)``: ``fn(x)`` plus
      ``eps^2/2 mean_k d^2 fn[v_k, v_k] + O(eps^4)``, the same order, so the value at ``x`` costs no
      third evaluation.
    """
    n, B, d = v.shape
    step = eps.reshape(B, 1) if isinstance(eps, Tensor) else eps
    ev = v * step
    out = fn(torch.cat([(x + ev).reshape(n * B, d), (x - ev).reshape(n * B, d)]))
    fp, fm = out[:n * B].reshape(n, B, d), out[n * B:].reshape(n, B, d)
    # v^T(f+ - f-) then one division: the difference of the sides is where the cancellation happens.
    div = torch.einsum("kbd,kbd->kb", v, fp - fm) / (2 * (step.reshape(B) if isinstance(step, Tensor) else step))
    return (fp + fm).mean(0) * 0.5, div


def _op_namespace(backend: str):
    """The op table of a fused backend: ``torch.ops.fdsm_ext`` (``"cpp"``) or ``torch.ops.fdsm_ext_triton``."""
    if backend == "triton":
        import fdsm_ext.triton  # noqa: F401  (registers torch.ops.fdsm_ext_triton)

        return torch.ops.fdsm_ext_triton
    return torch.ops.fdsm_ext


def stream_probes(seed: Tensor, n: int, B: int, d: int, probes: str = "rademacher", *, backend: str = "cpp",
                  dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The probes :func:`fused_fd_divergence` uses, ``(n, B, d)`` with ``E[v v^T] = I``: the kernels' Philox
    stream of ``seed`` (``+-1`` or standard normals; ``reference.philox_raw_directions``), exactly.

    They are the ``+`` block of ``perturb`` at ``x = 0`` with step ``sqrt(d)``, whose row scale
    ``sqrt(d) / sqrt(d)`` is exactly 1 (``dtype`` float32 or float64; the values are float32 numbers).
    Used for ``divergence="hutchinson"`` on a fused backend, so that FD and Hutchinson see the same probes.
    """
    _checks.check_choice(probes, "probes", _PROBES)
    _checks.check_choice(backend, "backend", ("cpp", "triton"))
    zeros = torch.zeros(B, d, dtype=reference.acc_dtype(dtype), device=device)
    ns = _op_namespace(backend)
    return ns.perturb(zeros, seed, math.sqrt(d), n, ops.DIRECTION_KINDS[probes], False)[: n * B].reshape(n, B, d)


def fused_fd_divergence(fn: Callable[[Tensor], Tensor], x: Tensor, seed: Tensor, eps: float, n_probes: int = 1,
                        probes: str = "rademacher", backend: str = "cpp") -> tuple[Tensor, Tensor]:
    """:func:`fd_divergence` on the fused kernels, for the probes ``v = stream_probes(seed, n_probes, ...)``.

    ``fn`` maps ``(N, d)`` to ``(N, d)`` row by row; ``x`` is ``(B, d)`` (float32/float64 here: the
    likelihood's state); ``eps`` a float, the step along ``v`` (each coordinate of a Rademacher probe
    moves by exactly ``eps``); ``backend`` ``"cpp"`` or ``"triton"``. One stacked call of ``fn`` on
    ``perturb(x, seed, h, n, kind, False)`` = ``[x + eps v_1..n; x - eps v_1..n]`` (``2 n B`` rows), with
    ``h = eps sqrt(d)``, perturb's step for directions of ``E[u u^T] = I/d``; then the ``fd_divergence`` op
    regenerates the same ``v`` from ``seed`` and returns ``d/(2 h^2) (h v/sqrt(d))^T (s+ - s-) =
    v^T (s+ - s-) / (2 eps)`` per probe, summed in float64 (C++/CUDA kernels). Returns ``(f0, div)``
    as :func:`fd_divergence`: ``f0 = mean_k (s+ + s-)/2`` ``(B, d)`` and ``div`` ``(n, B)``, equal to
    :func:`fd_divergence` with ``v = stream_probes(...)`` up to rounding (tests/test_likelihood.py).
    ``f0`` stays one torch expression rather than a second output of the op: it costs one pass over the
    ``2 n B d`` outputs of ``fn``, against ``2 n B`` evaluations of the network that produced them.
    """
    _checks.check_choice(probes, "probes", _PROBES)
    _checks.check_choice(backend, "backend", ("cpp", "triton"))
    B, d = x.shape
    ns = _op_namespace(backend)
    kind = ops.DIRECTION_KINDS[probes]
    step = eps * math.sqrt(d)
    out = fn(ns.perturb(x, seed, step, n_probes, kind, False))
    sp, sm = out[: n_probes * B].view(n_probes, B, d), out[n_probes * B:].view(n_probes, B, d)
    div = ns.fd_divergence(sp, sm, seed, step, kind)
    return (sp + sm).mean(0) * 0.5, div


def hutchinson_divergence(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate ``v^T (dfn/dx) v`` by a vector-Jacobian product.

    Same shapes as :func:`fd_divergence`: ``x`` ``(B, d)``, ``v`` ``(n, B, d)``; returns the detached
    ``(fn(x), div)`` with ``div`` ``(n, B)``. ``fn`` runs once on ``x`` repeated ``n`` times
    (``(n B, d)`` rows, the layout of the FD call without its center) and one backward pass gives
    every probe's product, since rows are independent (``d fn(x)_i / d x_j = 0`` for ``i != j``).
    Grad mode is turned on inside; ``fn`` must be differentiable in its input.
    """
    n, B, d = v.shape
    with torch.enable_grad():
        xg = x.detach().repeat(n, 1).requires_grad_(True)
        out = fn(xg)
        (vjp,) = torch.autograd.grad(out, xg, v.reshape(n * B, d))
    return out[:B].detach(), (vjp.reshape(n, B, d) * v).sum(-1)


def exact_divergence(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``tr(dfn/dx)`` per row by ``d`` vector-Jacobian products (``d`` backward passes; small ``d`` only).

    ``x`` is ``(B, d)``; returns the detached ``(fn(x), div)`` with ``div`` ``(1, B)`` (the shape of
    one probe of the estimators), rows of ``fn`` being independent.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = fn(xg)
        d = x.shape[1]
        trace = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
        for j in range(d):
            (g,) = torch.autograd.grad(out[:, j].sum(), xg, retain_graph=j + 1 < d)
            trace = trace + g[:, j]
    return out.detach(), trace[None]


def auto_divergence_eps(dtype: torch.dtype, sigma: float, x_scale: float) -> float:
    """The FD divergence step for a score at noise level ``sigma`` evaluated in ``dtype``.

    A central difference has truncation error ``~ (eps / L)^2`` (relative) for a score varying on a
    length scale ``L`` and round-off ``~ u X / eps`` from rounding ``x +- eps v`` to ``dtype`` (unit
    round-off ``u``, coordinates of size ``X``; the score's own rounding adds ``~ u L / eps``). With
    ``L = sigma`` (a Gaussian-smoothed density varies on no shorter scale than its smoothing) and
    ``X = max(sigma, x_scale)`` they balance at ``eps = kappa (u X sigma^2)^(1/3)``: float32 at
    ``sigma = X = 1`` gives about 4e-3, float64 about 5e-6.
    """
    u = numerics.unit_roundoff(dtype)
    return AUTO_DIV_EPS_KAPPA * (u * max(sigma, x_scale) * sigma * sigma) ** (1.0 / 3.0)


# --------------------------------------------------------------------------- argument checks
_positive = _checks.check_positive


def _choice(value, name: str, choices) -> None:
    """:func:`_checks.check_choice`, where ``None`` may be one of the ``choices``."""
    if value is None and None in choices:
        return
    _checks.check_choice(value, name, tuple(c for c in choices if c is not None))


# --------------------------------------------------------------------------- the likelihood
@torch.no_grad()
def ode_likelihood(score_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma_min: float, sigma_max: float, *,
                   divergence: str = "fd", n_probes: int = 1, eps: float | str = "auto", rtol: float = 1e-5,
                   atol: float = 1e-5, dequantize: str | None = None, data_range: tuple[float, float] = (0.0, 1.0),
                   generator: torch.Generator | None = None, probes: str = "rademacher",
                   method: str = "dopri5", backend: str = "auto") -> LikelihoodResult:
    """Per-sample negative log-likelihood of ``x`` under a VE score model, by the probability-flow ODE.

    Integrates ``dx/dt = -sigma(t)^2 ln(sigma_max/sigma_min) s(x, sigma(t))``, ``sigma(t) = sigma_min
    (sigma_max/sigma_min)^t``, together with ``d delta/dt = div f``, from ``t = 0`` to ``t = 1`` with
    torchdiffeq (``method``, ``rtol``, ``atol``; one adaptive step size for the whole batch, as
    score_sde), and returns ``nll = -(log N(x(1); 0, sigma_max^2 I) + delta(1))``.

    Conventions (those of score_sde's ``likelihood.py`` for the VE SDE): the density evaluated is the
    model's ``p_0``, the data density smoothed by ``N(0, sigma_min^2 I)``, with no decoder term;
    score_sde starts at ``t = 1e-5``, i.e. at ``sigma_min (sigma_max/sigma_min)^1e-5`` (pass that as
    ``sigma_min`` to reproduce its numbers exactly). The prior at ``t = 1`` is ``N(0, sigma_max^2 I)``,
    which neglects the data's own spread against ``sigma_max`` (exact for ``sigma_max >>`` the data's
    diameter, NCSNv2's choice of sigma_1).

    Args:
        score_fn: ``score_fn(x, sigma)`` with ``x`` ``(N, *event_shape)`` and ``sigma`` an ``(N,)``
            tensor in ``x``'s dtype, returning the score of the same shape (the convention of
            :func:`fdsm_ext.annealed_langevin`). For ``divergence="fd"`` it is called under
            ``torch.no_grad`` on ``2 n_probes B`` rows at a time, and the drift is the mean of the two
            sides (:func:`fused_fd_divergence`, or :func:`fd_divergence` for ``backend="torch"``).
        x: data ``(B, *event_shape)``, floating (half dtypes are integrated in float32).
        sigma_min, sigma_max: the VE noise range, ``0 < sigma_min < sigma_max``.
        divergence: ``"fd"`` (:func:`fused_fd_divergence`, or :func:`fd_divergence` for
            ``backend="torch"``; no backward pass), ``"hutchinson"`` (:func:`hutchinson_divergence`) or
            ``"exact"`` (:func:`exact_divergence`, ``d`` backward passes per evaluation).
        n_probes: probes per sample for ``"fd"``/``"hutchinson"``, drawn once per solve from
            ``generator`` and fixed along the path (Hutchinson-Skilling); with ``n > 1`` the result
            carries the standard error over probes. Must be 1 for ``"exact"``.
        eps: ``"fd"``'s step along the probes: ``"auto"`` (:func:`auto_divergence_eps` at ``sigma(t)``
            for the coarser of ``x``'s dtype and the evaluation dtype (autocast's, or the model's
            parameters'), ``X`` the RMS of the data; it follows ``t``) or a fixed float, the same at every ``t``.
            Only ``"auto"`` is accepted for the other divergences.
        rtol, atol: the solver's tolerances (score_sde uses 1e-5).
        dequantize: None (``x`` is continuous data in the model's space) or ``"uniform"``: ``x`` holds
            8-bit images scaled to ``[0, 1]`` (``k / 255``); the model sees ``y = lo + (hi - lo)
            (255 x + u) / 256``, ``u ~ U[0, 1)^d`` from ``generator`` (drawn before the probes), and
            ``nll = -log p(y) + d ln 256 - d ln(hi - lo)``: the dequantization bound on ``-ln P(k)``,
            so ``bpd`` is the bits/dim score_sde reports (its offset ``7 - inverse_scaler(-1)`` is
            ``8 - log2(hi - lo)``).
        data_range: ``(lo, hi)``, the model's range of ``[0, 1]`` images; ``(0, 1)`` (NCSNv2,
            fdsm_train) or ``(-1, 1)`` (score_sde's centered data). Used only with ``dequantize``.
        generator: ``torch.Generator`` for the dequantization noise and the probes.
        probes: ``"rademacher"`` (lower variance) or ``"gaussian"``.
        method: a torchdiffeq adaptive solver: ``"dopri5"`` (default), ``"dopri8"``, ``"bosh3"``,
            ``"fehlberg2"``, ``"adaptive_heun"``.
        backend: where the probes and the FD divergence come from, as the losses' ``backend=``
            (``"auto"``: the compiled kernels where built, else Triton on CUDA, else ``"torch"``).
            ``"cpp"``/``"triton"``: probes are the kernels' Philox stream of a ``(seed, offset)`` drawn
            from ``generator`` (:func:`stream_probes`), and ``"fd"`` is :func:`fused_fd_divergence`
            (``perturb`` + the ``fd_divergence`` op: no probe tensor, no ``torch.cat``); ``"torch"``:
            probes from ``torch``'s RNG (``reference.sample_directions``) and :func:`fd_divergence`.
            Either way ``"fd"`` and ``"hutchinson"`` with one ``generator`` state see the same probes;
            the two kinds of backend give the same estimator for different draws. Ignored by ``"exact"``.

    Returns:
        A :class:`LikelihoodResult` ``(nll, bpd, nll_se, bpd_se, z, nfe)``, detached.
    """
    try:
        import torchdiffeq
    except ImportError as exc:
        raise ImportError(f"ode_likelihood needs torchdiffeq ({exc}): pip install torchdiffeq==0.2.5") from None

    _checks.check_callable(score_fn, "score_fn", "score_fn(x, sigma)")
    _checks.check_batch(x)
    sigma_min, sigma_max = _positive(sigma_min, "sigma_min"), _positive(sigma_max, "sigma_max")
    if sigma_min >= sigma_max:
        raise ValueError(f"need `sigma_min` < `sigma_max`, got {sigma_min!r} and {sigma_max!r}")
    _choice(divergence, "divergence", _DIVERGENCES)
    _checks.check_int(n_probes, "n_probes", 1)
    if divergence == "exact" and n_probes != 1:
        raise ValueError(f"`n_probes` must be 1 for divergence='exact' (it uses no probes), got {n_probes}")
    if not (isinstance(eps, str) and eps == "auto"):
        if divergence != "fd":
            raise ValueError(f"`eps` applies only to divergence='fd'; leave it 'auto' for {divergence!r}, got {eps!r}")
        if isinstance(eps, str):
            raise ValueError(f"`eps` must be 'auto' or a positive float, got {eps!r}")
        eps = _positive(eps, "eps")
    rtol, atol = _positive(rtol, "rtol"), _positive(atol, "atol")
    _choice(dequantize, "dequantize", _DEQUANTIZE)
    if (not isinstance(data_range, (tuple, list)) or len(data_range) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in data_range)
            or not data_range[0] < data_range[1]):
        raise ValueError(f"`data_range` must be a finite (lo, hi) pair with lo < hi, got {data_range!r}")
    _checks.check_generator(generator)
    _choice(probes, "probes", _PROBES)
    _choice(method, "method", _METHODS)
    _checks.check_choice(backend, "backend", _checks.BACKENDS)
    backend = _checks.resolve_backend_for(backend, x.device.type)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("`x` contains NaN or inf")

    B, event_shape = x.shape[0], x.shape[1:]
    d = math.prod(event_shape)
    dtype = reference.loss_dtype(x.dtype)  # the ODE state's dtype (half data integrated in float32)
    data = x.detach().reshape(B, d).to(dtype)
    # d ln|dy/dv| of the map from the 256-level scale v = k + u to the model's y: -ln p(v) = -ln p(y) - log_det
    log_det = 0.0
    if dequantize == "uniform":
        levels = data.double() * (_LEVELS - 1)
        if bool((data < 0).any() | (data > 1).any()) or float((levels - levels.round()).abs().max()) > 1e-3:
            raise ValueError("`x` must hold 8-bit images scaled to [0, 1] (values k / 255) for dequantize='uniform'")
        lo, hi = float(data_range[0]), float(data_range[1])
        gen_device = generator.device if generator is not None else x.device
        u = torch.rand((B, d), generator=generator, dtype=dtype, device=gen_device).to(x.device)
        data = lo + (hi - lo) * (levels.round().to(dtype) + u) / _LEVELS
        log_det = d * math.log(hi - lo) - d * math.log(_LEVELS)

    n = 1 if divergence == "exact" else n_probes
    # the probes, fixed along the path: the kernels' stream of one seed, or torch's RNG (backend="torch")
    seed = v = None
    if divergence != "exact" and backend != "torch":
        seed = _checks.draw_seed(generator)
        if divergence == "hutchinson":
            v = stream_probes(seed, n, B, d, probes, backend=backend, dtype=dtype, device=x.device)
    elif divergence != "exact":
        v = reference.sample_directions(n, B, d, probes, generator=generator, dtype=dtype,
                                        device=generator.device if generator is not None else x.device).to(x.device)
    # x +- eps v reaches the model rounded to x's dtype and is evaluated in the model's: the coarser rules
    eval_dtype = max((x.dtype, numerics.evaluation_dtype(x, score_fn)), key=numerics.unit_roundoff)
    x_scale = float(data.double().square().mean().sqrt())
    log_ratio = math.log(sigma_max / sigma_min)
    nfe = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        xt = state[0]
        sigma = sigma_min * math.exp(float(t) * log_ratio)

        def score(rows: Tensor) -> Tensor:
            sig = torch.full((rows.shape[0],), sigma, dtype=x.dtype, device=rows.device)
            s = score_fn(rows.reshape(rows.shape[0], *event_shape).to(x.dtype), sig)
            if not isinstance(s, Tensor) or s.shape != (rows.shape[0], *event_shape):
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"`score_fn` must return a tensor of its input's shape "
                                 f"{(rows.shape[0], *event_shape)}, got {got}")
            return s.reshape(rows.shape[0], d).to(dtype)

        if divergence == "fd":
            step = eps if eps != "auto" else auto_divergence_eps(eval_dtype, sigma, x_scale)
            if seed is not None:
                s, div = fused_fd_divergence(score, xt, seed, step, n, probes, backend)
            else:
                s, div = fd_divergence(score, xt, v, step)
        else:
            try:
                if divergence == "hutchinson":
                    s, div = hutchinson_divergence(score, xt, v)
                else:
                    s, div = exact_divergence(score, xt)
            except RuntimeError as exc:
                if "does not require grad" not in str(exc) and "backward" not in str(exc):
                    raise
                raise RuntimeError(f"divergence={divergence!r} differentiates `score_fn` with respect to x, which "
                                   f"failed ({exc}); divergence='fd' needs no backward pass") from exc
        if not bool(torch.isfinite(s).all() & torch.isfinite(div).all()):
            raise FloatingPointError(f"ode_likelihood: the score or its divergence is NaN or inf at t={float(t):.6g} "
                                     f"(sigma={sigma:.6g})")
        coef = -sigma * sigma * log_ratio  # f = coef * s, div f = coef * div s
        return coef * s, coef * div

    t = torch.tensor([0.0, 1.0], dtype=dtype, device=x.device)
    state0 = (data, torch.zeros((n, B), dtype=dtype, device=x.device))
    xs, deltas = torchdiffeq.odeint(rhs, state0, t, rtol=rtol, atol=atol, method=method)
    z, delta = xs[-1], deltas[-1]
    prior_logp = -0.5 * d * math.log(2 * math.pi * sigma_max**2) - z.double().square().sum(-1) / (2 * sigma_max**2)
    nll_probes = -(prior_logp + delta.double()) - log_det  # (n, B)
    nll = nll_probes.mean(0)
    per_bit = d * math.log(2.0)
    if divergence == "exact":
        nll_se = torch.zeros_like(nll)
    elif n > 1:
        nll_se = nll_probes.std(0) / math.sqrt(n)
    else:
        nll_se = None
    out = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    bpd_se = None if nll_se is None else nll_se / per_bit
    return LikelihoodResult(out(nll), out(nll / per_bit), out(nll_se), out(bpd_se),
                            z.reshape(x.shape).to(x.dtype), nfe)
