"""The formulas of csrc/fd_math.h as ``@triton.jit`` helpers, one per formula, with the same operations in
the same order (so float32/float64 results are bitwise the C++ kernels' where the reduction order is
the same). The direction stream's own functions are in :mod:`.philox`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fd_ssm_term(f0, fp, fm):
    """FD-SSM quotient of one direction (docs/math.md "FD-SSM, log-density form"), before the factor
    ``dim_scale / eps^2``: ``(f+ - f-)^2 / 8 + (f+ + f- - 2 f0)``."""
    diff = fp - fm
    return diff * diff * 0.125 + ((fp + fm) - 2.0 * f0)


@triton.jit
def fd_ssm_dfp(fp, fm):
    """d fd_ssm_term / d f+ (d / d f0 is -2)."""
    return (fp - fm) * 0.25 + 1.0


@triton.jit
def fd_ssm_dfm(fp, fm):
    """d fd_ssm_term / d f-."""
    return (fm - fp) * 0.25 + 1.0


@triton.jit
def fd_ssm_vr_elem(sp, sm, v, k):
    """FD-SSM-VR per element (docs/math.md "FD-SSM-VR"): ``(s+ + s-)^2 / 8 + k v (s+ - s-)``,
    ``k = dim_scale / (2 eps^2)``."""
    s = sp + sm
    return s * s * 0.125 + k * v * (sp - sm)


@triton.jit
def fd_ssm_vr_dsp(sp, sm, v, k):
    """d fd_ssm_vr_elem / d s+ = (s+ + s-)/4 + k v."""
    return (sp + sm) * 0.25 + k * v


@triton.jit
def fd_ssm_vr_dsm(sp, sm, v, k):
    """d fd_ssm_vr_elem / d s- = (s+ + s-)/4 - k v."""
    return (sp + sm) * 0.25 - k * v


@triton.jit
def fd_dsm_residual(fp, fm, proj, sig2):
    """FD-DSM residual (docs/math.md "FD-DSM"): ``(f+ - f-)/2 + v^T (x~ - x) / sigma^2``, ``sig2 = sigma^2``;
    the loss is ``dim_scale / (2 eps^2) r^2``."""
    return (fp - fm) * 0.5 + div(proj, sig2)


@triton.jit
def div(a, b):
    """``a / b`` correctly rounded in float32 too (Triton's ``/`` may use a faster, inexact division)."""
    if a.dtype == tl.float32:
        q = tl.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _f64(k):
    # int -> float64 for tensors, constexprs and the interpreter's plain-int loop variables alike
    return tl.full([], 0.0, tl.float64) + k


@triton.jit
def stencil_shift(order, t, eps):
    """Order-T central stencil shift ``(T - 2t) eps`` in float64 (paper Appendix C.1)."""
    return _f64(order - 2 * t) * eps


@triton.jit
def stencil_weight(order, t, eps):
    """Order-T central stencil weight ``(-1)^t C(T, t) / (2 eps)^T`` in float64, by fd_math.h's loops."""
    binom = tl.full([], 1.0, tl.float64)
    for j in range(1, t + 1):
        binom = binom * _f64(order - t + j) / _f64(j)
    denom = tl.full([], 1.0, tl.float64)
    for _ in range(order):
        denom = denom * (2.0 * eps)
    return tl.where(t % 2 == 1, -binom, binom) / denom


@triton.jit
def langevin_noise_scale(alpha, ACC: tl.constexpr):
    """``sqrt(2 alpha)``, the Langevin step's noise scale when none is given (csrc/fd_math.h
    ``step_noise_scale``): in float64 from ``alpha`` (already rounded to ``ACC``), correctly rounded to ``ACC``."""
    return tl.sqrt(2.0 * alpha.to(tl.float64)).to(ACC)


@triton.jit
def langevin_update(x, s, z, alpha, noise_scale):
    """One step ``x + a s + b z`` of an element (docs/math.md "Langevin dynamics"): ``(x + alpha s) + noise_scale z``,
    two roundings (kernels launch without fma contraction)."""
    return (x + alpha * s) + noise_scale * z


@triton.jit
def clamp_keep_nan(v, lo, hi):
    """Clamp to ``[lo, hi]`` that keeps NaN (both comparisons are false for it)."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))
