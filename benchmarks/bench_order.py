"""Order scaling (paper Appendix C.1, Algorithm 1): the order-T directional derivative ``D_v^T f(x)``,
T = 1..6, by one batched central stencil (``fdsm_ext.fd_directional_derivative``) against T nested
autograd passes.

Both produce a value that is differentiable w.r.t. the model's parameters, as a training loss needs:
the stencil evaluates ``f`` on ``(T+1) B`` rows with autograd recording; nested autograd keeps
``create_graph=True`` at every level. The time is that of computing the value (no parameter
backward). ``f`` is a softplus MLP energy, float32; the stencil's step is the library default, 1e-2
(timing does not depend on it; accuracy does, and float32 loses the high orders to round-off).
"""

from __future__ import annotations

import torch

import fdsm_ext
from bench_common import Preset, compare, paired_ratio
from bench_e2e import build_mlp

FD_EPS = 1e-2


def nested_autograd(f, x, v, order):
    """``D_v^T f(x)`` by T nested ``torch.autograd.grad`` calls, ``(B,)``, differentiable."""
    xl = x.detach().requires_grad_(True)
    out = f(xl)
    for _ in range(order):
        (g,) = torch.autograd.grad(out.sum(), xl, create_graph=True)
        out = (g * v).sum(-1)
    return out


METHODS = {
    "fd_fused": ("batched FD, fused", lambda f, x, v, T: fdsm_ext.fd_directional_derivative(f, x, v, T, FD_EPS,
                                                                                           backend="cpp")),
    "fd_torch": ("batched FD, eager", lambda f, x, v, T: fdsm_ext.fd_directional_derivative(f, x, v, T, FD_EPS,
                                                                                           backend="torch")),
    "autograd": ("nested autograd", nested_autograd),
}


def _check(model_cfg, device):
    """The stencil agrees with autograd for T = 1, 2 (float64, a tiny batch): the harness times the
    derivative it claims to."""
    built = build_mlp(model_cfg, device)
    built.module.double()
    x = torch.randn(4, model_cfg["dim"], dtype=torch.float64, device=device)
    v = torch.randn_like(x)
    for T in (1, 2):
        want = nested_autograd(built.fn, x, v, T)
        got = fdsm_ext.fd_directional_derivative(built.fn, x, v, T, FD_EPS, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def run(p: Preset, device: torch.device, log) -> dict:
    records, skipped = [], []
    _check(p.order_model, device)
    if device.type == "cuda" and not fdsm_ext.has_cuda_kernels():
        skipped.append("order: batched FD, fused: this build of fdsm_ext has no CUDA kernels")
    built = build_mlp(p.order_model, device)
    for B in p.order_batches:
        torch.manual_seed(0)
        x = torch.randn(B, p.order_model["dim"], device=device)
        v = torch.randn_like(x)
        for key, (label, fn) in METHODS.items():
            if key == "fd_fused" and device.type == "cuda" and not fdsm_ext.has_cuda_kernels():
                continue
            # The orders of one method in one comparison: the T=k / T=1 ratios are paired per round.
            timings = compare({T: (lambda T=T: fn(built.fn, x, v, T)) for T in p.orders}, device, p)
            for T, t in timings.items():
                records.append({"method": key, "label": label, "batch": B, "order": T, "model": p.order_model,
                                **t.as_dict(), **paired_ratio(t, timings[p.orders[0]])})
                log(f"order {label:18s} B={B:5d} T={T} {t.median_s * 1e3:9.3f} ms")
    return {"records": records, "skipped": skipped}
