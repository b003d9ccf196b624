"""Pure-PyTorch references: every formula of docs/math.md that fdsm_ext computes, in one place.

These functions are the test oracle of the fused ops (same argument order, same accumulation dtype)
and, together with :func:`sample_directions`, the ``backend="torch"`` composite that benchmarks
compare against (the way the authors' code computes the losses: draw ``v`` with ``torch.randn``,
concatenate, evaluate, combine).

The fused kernels draw their directions from a counter-based Philox stream;
:func:`philox_directions` recomputes that stream here with integer tensor arithmetic, so that a
kernel's output can be checked against this module given only the ``(seed, offset)`` tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# --------------------------------------------------------------------------- dtype rules


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a per-sample loss: float32 for half/bfloat16 inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------- Philox stream
_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # a * b for a 32-bit constant and uint32 values held in int64, without int64 overflow:
    # b = bh * 2^16 + bl, so a*b = (a*bh >> 16) * 2^32 + ((a*bh & 0xFFFF) << 16) + a*bl.
    bh, bl = b >> 16, b & 0xFFFF
    t_hi = a * bh
    s = ((t_hi & 0xFFFF) << 16) + a * bl
    return ((t_hi >> 16) + (s >> 32)) & _MASK32, s & _MASK32


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for rnd in range(10):
        if rnd > 0:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _split_seed(seed: Tensor) -> tuple[int, int]:
    s, off = (int(v) & 0xFFFFFFFFFFFFFFFF for v in seed.tolist())
    return s, off


def philox_raw_directions(seed: Tensor, rows: int, dim: int, kind: str) -> Tensor:
    """The unscaled direction values of the kernels' stream, float64 ``(rows, dim)``.

    Element ``j`` of row ``r`` is lane ``j % 4`` of Philox(counter = (j // 4, r, offset), key = seed):
    ``+-1`` from the top bit for ``"rademacher"``; otherwise a standard normal by Box-Muller,
    ``sqrt(-2 ln u) (cos, sin)(2 pi b / 2^32)`` with ``u = (2 (b >> 9) + 1) / 2^24`` from lanes (0, 1)
    and (2, 3). The kernels evaluate ln/cos/sin by fixed polynomials (csrc/fd_math.h); here they are
    exact, so the two agree to a few float32 ulps, not bitwise.
    """
    s, off = _split_seed(seed)
    groups = (dim + 3) // 4
    g = torch.arange(groups, dtype=torch.int64).expand(rows, groups)
    r = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, groups)
    words = philox4x32_10(
        (g, r, torch.full_like(g, off & _MASK32), torch.full_like(g, off >> 32)), (s & _MASK32, s >> 32)
    )
    if kind == "rademacher":
        out = torch.stack([torch.where((w >> 31) == 1, 1.0, -1.0) for w in words], dim=-1)
    else:
        def radius(b):
            u = ((b >> 9) * 2 + 1).double() * 2.0**-24
            return torch.sqrt(-2.0 * torch.log(u))

        def angle(b):
            return b.double() * (2.0 * math.pi / 2.0**32)

        r0, a0, r1, a1 = radius(words[0]), angle(words[1]), radius(words[2]), angle(words[3])
        out = torch.stack([r0 * torch.cos(a0), r0 * torch.sin(a0), r1 * torch.cos(a1), r1 * torch.sin(a1)], -1)
    return out.to(torch.float32).double().reshape(rows, groups * 4)[:, :dim]


def sphere_sum_sq(raw: Tensor) -> Tensor:
    """The kernels' sphere row sums of squares, float64 ``(rows,)``, of raw values ``(rows, d)`` (rounded to
    float32 first, as the kernels hold them): each square (exact in float64) truncated to a multiple of
    ``2^-F``, ``F = 57 - bit_length(d)``, and the integers summed exactly (csrc/fd_math.h ``sphere_sum_sq``),
    so the sum does not depend on the order of the additions."""
    unit = math.ldexp(1.0, 57 - max(raw.shape[-1], 1).bit_length())
    r = raw.to(torch.float32).to(torch.float64)
    return (r * r * unit).to(torch.int64).sum(-1).to(torch.float64) / unit


def philox_directions(seed: Tensor, rows: int, dim: int, kind: str, eps: float, dtype: torch.dtype) -> Tensor:
    """The directions ``v`` the kernels use, ``(rows, dim)`` in ``acc_dtype(dtype)``.

    ``"sphere"``: ``v = eps g / ||g||`` (``||v|| = eps``); ``"rademacher"`` and ``"gaussian"``:
    ``v = eps g / sqrt(dim)``, so that ``E[v v^T] = eps^2 I / dim`` for every kind.
    """
    raw = philox_raw_directions(seed, rows, dim, kind)
    if kind == "sphere":
        scale = eps / sphere_sum_sq(raw).unsqueeze(-1).sqrt()
    else:
        scale = torch.full((rows, 1), eps / math.sqrt(dim), dtype=torch.float64)
    acc = acc_dtype(dtype)
    return raw.to(acc) * scale.to(acc)


def sample_directions(n_slices: int, batch: int, dim: int, kind: str, *, generator=None,
                      dtype=torch.float32, device=None) -> Tensor:
    """Directions with ``E[v v^T] = I`` drawn with torch's RNG, ``(n_slices, batch, dim)``.

    Rademacher ``+-1``, standard Gaussian, or uniform on the sphere of radius ``sqrt(dim)``: the
    vectors of sliced score matching; FD directions are these times ``eps / sqrt(dim)``.
    """
    shape = (n_slices, batch, dim)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
    v = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if kind == "sphere":
        v = v * (math.sqrt(dim) / v.norm(dim=-1, keepdim=True))
    return v


# --------------------------------------------------------------------------- fused-op references


def perturb(x: Tensor, v: Tensor, include_center: bool) -> Tensor:
    """``[x; x + v_1..x + v_n; x - v_1..x - v_n]`` for ``x`` ``(B, d)`` and ``v`` ``(n, B, d)``."""
    xa = x.to(v.dtype)
    plus, minus = (xa + v).flatten(0, 1), (xa - v).flatten(0, 1)
    blocks = [xa, plus, minus] if include_center else [plus, minus]
    return torch.cat(blocks).to(x.dtype)


def dsm_perturb(x: Tensor, sigma: Tensor, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """FD-DSM's stacked batch and noise projections, for ``x`` ``(B, d)``, ``sigma`` ``(B,)``, noise draws
    ``z`` ``(B, d)`` and directions ``v`` ``(n, B, d)``: ``[x~ + v_1..x~ + v_n; x~ - v_1..x~ - v_n]`` with
    ``x~ = x + sigma z`` (in ``x``'s dtype), and ``proj[k, i] = v_ki^T z_i / sigma_i`` ``(n, B)``, which is
    ``v^T (x~ - x) / sigma^2`` of the FD-DSM residual (docs/math.md, FD-DSM)."""
    acc = v.dtype
    sig = sigma.to(acc)
    za = z.to(acc)
    xt = x.to(acc) + sig[:, None] * za
    return perturb(xt, v, False).to(x.dtype), (v * za).sum(-1) / sig


def fd_dsm_residual_loss(fp: Tensor, fm: Tensor, proj: Tensor, eps: float, dim_scale: float) -> Tensor:
    """FD-DSM per sample from :func:`dsm_perturb`'s ``proj``: ``mean_k dim_scale/(2 eps^2) [(f+ - f-)/2 +
    proj]^2``, ``fp``, ``fm``, ``proj`` ``(n, B)``; in ``proj``'s dtype (the loss dtype)."""
    res = torch.add(proj, fp.to(proj.dtype) - fm.to(proj.dtype), alpha=0.5)
    return res.square().mean(0) * (0.5 * dim_scale / (eps * eps))


def fd_ssm_quotient(f0: Tensor, fp: Tensor, fm: Tensor, eps: float, dim_scale: float) -> Tensor:
    """FD-SSM per sample: ``dim_scale/eps^2 * mean_k [(f+ - f-)^2/8 + (f+ + f- - 2 f0)]``.

    ``E_v`` of it is ``1/2 ||grad f||^2 + tr hess f + O(eps^2)`` (docs/math.md, FD-SSM).
    """
    acc = acc_dtype(f0.dtype)
    f0, fp, fm = f0.to(acc), fp.to(acc), fm.to(acc)
    diff = fp - fm
    term = diff * diff * 0.125 + ((fp + fm) - 2 * f0)
    return (dim_scale / (eps * eps) / fp.shape[0]) * term.sum(0)


def fd_ssm_vr(sp: Tensor, sm: Tensor, v: Tensor, eps: float, dim_scale: float) -> Tensor:
    """FD-SSM-VR per sample: ``mean_k ||s+ + s-||^2/8 + dim_scale/(2 eps^2) v_k^T (s+ - s-)``.

    ``sp``, ``sm``, ``v`` are ``(n, B, d)``.
    """
    acc = acc_dtype(sp.dtype)
    sp, sm, v = sp.to(acc), sm.to(acc), v.to(acc)
    k = dim_scale / (2.0 * eps * eps)
    per = ((sp + sm).square() * 0.125 + k * v * (sp - sm)).sum(-1)
    return per.mean(0)


def fd_dsm_quotient(fp: Tensor, fm: Tensor, noise: Tensor, sigma: Tensor, v: Tensor, eps: float,
                    dim_scale: float) -> Tensor:
    """FD-DSM per sample: ``mean_k dim_scale/(2 eps^2) [(f+ - f-)/2 + v_k^T noise / sigma^2]^2``.

    ``fp``, ``fm`` are ``(n, B)``; ``noise = x~ - x`` is ``(B, d)``; ``sigma`` is ``(B,)``; ``v`` is
    ``(n, B, d)``. Its v-expectation is the DSM objective up to O(eps^2) (docs/math.md, FD-DSM).
    """
    acc = acc_dtype(fp.dtype)
    fp, fm, noise, sigma, v = fp.to(acc), fm.to(acc), noise.to(acc), sigma.to(acc), v.to(acc)
    proj = (v * noise).sum(-1)
    res = (fp - fm) * 0.5 + proj / (sigma * sigma)
    return (0.5 * dim_scale / (eps * eps)) * res.square().mean(0)


def fd_divergence(sp: Tensor, sm: Tensor, v: Tensor, eps: float) -> Tensor:
    """FD divergence per (slice, sample): ``d / (2 eps^2) v_k^T (s+ - s-)``, ``(n, B)``.

    ``sp = s(x + v)``, ``sm = s(x - v)`` and ``v`` (``E[v v^T] = eps^2 I / d``, the directions of
    :func:`philox_directions`) are ``(n, B, d)``; the result, in the accumulation dtype, estimates
    ``tr(ds/dx)`` to ``O(eps^2)`` (docs/math.md, FD divergence).
    """
    acc = acc_dtype(sp.dtype)
    sp, sm, v = sp.to(acc), sm.to(acc), v.to(acc)
    return (sp.shape[-1] / (2.0 * eps * eps)) * (v * (sp - sm)).sum(-1)


def stencil_weights(order: int, eps: float) -> list[tuple[float, float]]:
    """``(shift_t, weight_t)`` of the order-T central stencil (paper Appendix C.1, Algorithm 1):
    ``D_v^T f(x) ~ sum_t weight_t f(x + shift_t v)``, ``shift_t = (T - 2t) eps``,
    ``weight_t = (-1)^t C(T, t) / (2 eps)^T``; error O(eps^2)."""
    return [((order - 2 * t) * eps, (-1) ** t * math.comb(order, t) / (2 * eps) ** order) for t in range(order + 1)]


def stencil_perturb(x: Tensor, v: Tensor, eps: float, order: int) -> Tensor:
    """Rows ``t*B + i`` hold ``x_i + (T - 2t) eps v_i``: ``((T+1) B, d)``."""
    acc = acc_dtype(x.dtype)
    xa, va = x.to(acc), v.to(acc)
    return torch.cat([xa + shift * va for shift, _ in stencil_weights(order, eps)]).to(x.dtype)


def stencil_combine(f: Tensor, eps: float, order: int) -> Tensor:
    """``sum_t weight_t f[t]`` for ``f`` of shape ``(T+1, B)``: ``(B,)``."""
    w = torch.tensor([wt for _, wt in stencil_weights(order, eps)], dtype=torch.float64, device=f.device)
    return (w[:, None] * f.to(acc_dtype(f.dtype)).double()).sum(0).to(loss_dtype(f.dtype))


def langevin_noise(seed: Tensor, x: Tensor) -> Tensor:
    """The ``z`` of the fused Langevin step for a batch shaped like ``x`` ``(B, *event)``, in
    ``acc_dtype(x.dtype)``: element ``j`` of the flattened sample ``i`` is the gaussian stream's
    ``philox_raw_directions(seed, B, d, "gaussian")[i, j]`` (row = sample, no scaling)."""
    B, d = x.shape[0], math.prod(x.shape[1:])
    return philox_raw_directions(seed, B, d, "gaussian").to(acc_dtype(x.dtype)).reshape(x.shape)


def langevin_step(x: Tensor, score: Tensor, alpha: Tensor | float, z: Tensor, clamp_min: float | None = None,
                  clamp_max: float | None = None, noise_scale: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Langevin step (docs/math.md "Langevin dynamics"): ``clamp(x + alpha s + b z)``, ``b = noise_scale``, or
    ``b = sqrt(2 alpha)`` when ``noise_scale`` is None.

    ``x``, ``score``, ``z`` are ``(B, *event)``; ``alpha`` and ``noise_scale`` each a float or a tensor of
    one element or ``(B,)``. Computed in ``acc_dtype(x.dtype)`` as the kernels do: ``alpha`` and
    ``noise_scale`` rounded to it, ``sqrt(2 alpha)`` rounded from float64, ``(x + alpha s) + b z``; the
    clamp keeps NaN. Returns ``x_new`` in ``x``'s dtype and the per-sample norms ``(3, B)`` =
    ``(||s||, ||z||, ||x_new||)`` in ``loss_dtype(x.dtype)``.
    """
    acc = acc_dtype(x.dtype)
    B = x.shape[0]
    bshape = (B,) + (1,) * (x.dim() - 1)

    def per_sample(v):  # a float or tensor of 1 or B elements, rounded to acc, broadcastable against x
        v = (v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)).to(x.device, acc)
        return v.reshape(bshape) if v.numel() == B and v.numel() != 1 else v.reshape(())

    a = per_sample(alpha)
    b = torch.sqrt(2.0 * a.double()).to(acc) if noise_scale is None else per_sample(noise_scale)
    xa, sa, za = x.to(acc), score.to(acc), z.to(acc)
    new = (xa + a * sa) + b * za
    if clamp_min is not None:
        new = torch.where(new < clamp_min, torch.full_like(new, clamp_min), new)
    if clamp_max is not None:
        new = torch.where(new > clamp_max, torch.full_like(new, clamp_max), new)
    out = new.to(x.dtype)

    def norm(t):
        return t.double().reshape(B, -1).square().sum(-1).sqrt()

    norms = torch.stack([norm(sa), norm(za), norm(out)]).to(loss_dtype(x.dtype))
    return out, norms


# --------------------------------------------------------------------------- baseline objectives
# Per-sample (per-slice) forms; the losses module computes the scores and Hessian terms by autograd.


def exact_sm_objective(trace: Tensor, score: Tensor) -> Tensor:
    """Exact SM: ``tr grad s + 1/2 ||s||^2`` per sample, ``score`` ``(B, d)``."""
    return trace + 0.5 * score.square().sum(-1)


def ssm_objective(vjv: Tensor, sv: Tensor) -> Tensor:
    """SSM: ``v^T grad(v^T s) + 1/2 (v^T s)^2``."""
    return vjv + 0.5 * sv.square()


def ssm_vr_objective(vjv: Tensor, score: Tensor) -> Tensor:
    """SSM-VR: ``v^T grad(v^T s) + 1/2 ||s||^2`` (the second term in closed-form expectation)."""
    return vjv + 0.5 * score.square().sum(-1)


def dsm_objective(score: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """DSM: ``1/2 ||s(x~) + (x~ - x)/sigma^2||^2`` per sample; ``noise = x~ - x`` ``(B, d)``, ``sigma`` ``(B,)``."""
    return 0.5 * (score + noise / sigma[:, None].square()).square().sum(-1)
