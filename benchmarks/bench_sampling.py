"""Sampling: the fused Langevin step and the annealed Langevin sampler against eager PyTorch.

Each entry of :data:`BENCHES` runs when the fdsm_ext being measured has what it needs (both are being
added on branch `langevin`) and is skipped with the reason otherwise:

- ``langevin_step``: ``x + alpha s + sqrt(2 alpha) z`` over a size sweep: ``fdsm_ext.ops.langevin_step``
  (noise drawn in-kernel), its in-place form, the eager expression with ``torch.randn_like``, and
  torch.compile of it; bytes moved = read ``x`` and ``s``, write ``x_new``.
- ``annealed_langevin``: NCSN Algorithm 1 (MATH.md "Langevin dynamics") with a small score network
  ``s(x, sigma) = net(x) / sigma``: ``fdsm_ext.annealed_langevin`` against the same loop in eager
  PyTorch; on a GPU also with ``cuda_graph=True`` when the sampler offers it.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

import fdsm_ext
from bench_common import Preset, Skip, measure

ALPHA = 1e-3
F32 = 4


def eager_langevin_step(x, s, alpha: float):
    """The authors' step: ``x + alpha s + sqrt(2 alpha) z``, z from torch's RNG."""
    return x + alpha * s + math.sqrt(2 * alpha) * torch.randn_like(x)


def eager_annealed_langevin(score, x0, sigmas, n_steps_each: int, step_lr: float):
    """NCSN Algorithm 1 as an eager loop: ``alpha_i = step_lr sigma_i^2 / sigma_L^2``."""
    x = x0.clone()
    for sigma in sigmas.tolist():
        alpha = step_lr * (sigma / float(sigmas[-1])) ** 2
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for _ in range(n_steps_each):
            x = eager_langevin_step(x, score(x, sig), alpha)
    return x


def bench_langevin_step(p: Preset, device: torch.device, log) -> list[dict]:
    step = getattr(fdsm_ext.ops, "langevin_step", None)
    if step is None:
        raise Skip("fdsm_ext.ops has no langevin_step in this build (it is being added on branch `langevin`)")
    step_ = getattr(fdsm_ext.ops, "langevin_step_", None)
    seed = torch.tensor([20240601, 0], dtype=torch.int64)
    compiled = torch.compile(eager_langevin_step, dynamic=True) if p.compile else None
    records = []
    for n in p.sampling_sizes:
        B = max(1, n // p.micro_dim)
        x, s = torch.randn(B, p.micro_dim, device=device), torch.randn(B, p.micro_dim, device=device)
        nbytes = 3 * F32 * x.numel()
        variants = {"fused": lambda: step(x, s, ALPHA, seed), "eager": lambda: eager_langevin_step(x, s, ALPHA)}
        if step_ is not None:
            x_inplace = x.clone()
            variants["fused in place"] = lambda: step_(x_inplace, s, ALPHA, seed)
        if compiled is not None:
            variants["compile"] = lambda: compiled(x, s, ALPHA)
        src = torch.empty(max(1, nbytes // 2 // F32), device=device)
        dst = torch.empty_like(src)
        variants["copy"] = lambda: dst.copy_(src)
        with torch.no_grad():
            for name, fn in variants.items():
                t = measure(fn, device, p)
                records.append({"bench": "langevin_step", "variant": name, "size": B * p.micro_dim,
                                "dim": p.micro_dim, "bytes": nbytes, "gbps": nbytes / t.median_s / 1e9,
                                **t.as_dict()})
        log(f"sampling langevin_step n={B * p.micro_dim:>10,d} "
            + "  ".join(f"{r['variant']}={r['median_s'] * 1e3:.3f} ms" for r in records[-len(variants):]))
    return records


def bench_annealed(p: Preset, device: torch.device, log) -> list[dict]:
    sampler = getattr(fdsm_ext, "annealed_langevin", None)
    if sampler is None:
        raise Skip("fdsm_ext has no annealed_langevin in this build (it is being added on branch `langevin`)")
    a = p.annealed
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(a["dim"], 128), nn.Softplus(), nn.Linear(128, a["dim"])).to(device)

    def score(x, sigma):
        return net(x) / sigma[:, None]

    sigmas = torch.logspace(0, -2, a["levels"], device=device)
    x0 = torch.rand(a["batch"], a["dim"], device=device)
    step_lr = 1e-5
    # The same work as the eager loop: no final denoising step, no CUDA graph unless asked for.
    accepted = inspect.signature(sampler).parameters
    options = {k: v for k, v in (("denoise", False), ("cuda_graph", False)) if k in accepted}
    variants = {
        "fused": lambda: sampler(score, x0, sigmas, a["steps_each"], step_lr, **options),
        "eager": lambda: eager_annealed_langevin(score, x0, sigmas, a["steps_each"], step_lr),
    }
    if device.type == "cuda" and "cuda_graph" in accepted:
        variants["fused, CUDA graph"] = lambda: sampler(score, x0, sigmas, a["steps_each"], step_lr,
                                                        **{**options, "cuda_graph": True})
    records = []
    with torch.no_grad():
        for name, fn in variants.items():
            t = measure(fn, device, p)
            records.append({"bench": "annealed_langevin", "variant": name, **a, **t.as_dict()})
            log(f"sampling annealed {name:18s} {t.median_s * 1e3:9.2f} ms")
    return records


BENCHES = {"langevin_step": bench_langevin_step, "annealed_langevin": bench_annealed}


def run(p: Preset, device: torch.device, log) -> dict:
    records, skipped = [], []
    for name, bench in BENCHES.items():
        try:
            records += bench(p, device, log)
        except Skip as exc:
            skipped.append(f"sampling {name}: {exc}")
            log(f"sampling {name}: skipped: {exc}")
    return {"records": records, "skipped": skipped}
