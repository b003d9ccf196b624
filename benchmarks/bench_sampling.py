"""Sampling: the fused Langevin step and the annealed Langevin sampler against eager PyTorch.

Each entry of :data:`BENCHES` runs when the fdsm_ext being measured has what it needs and is skipped
with the reason otherwise:

- ``langevin_step``: the update ``x + alpha s + sqrt(2 alpha) z`` over a size sweep:
  ``fdsm_ext.ops.langevin_step`` (noise drawn in-kernel), its in-place form (what the sampler calls),
  the Triton kernel on a GPU, the eager expression with ``torch.randn_like`` (the authors' form), and
  torch.compile of it (inductor, its own in-kernel RNG); ``copy`` is a bandwidth yardstick moving the
  same bytes. Bytes moved = read ``x`` and ``s``, write ``x_new``.
- ``langevin_step_full``: the same with what NCSNv2's sampler also does each step, a clamp to the data
  range and the per-sample ``||s||``, ``||z||``, ``||x_new||`` its ``anneal_Langevin_dynamics`` computes:
  one fused pass against the eager composite (``clamp`` and three ``norm`` calls) and its torch.compile.
- ``annealed_langevin``: NCSN Algorithm 1 (docs/math.md "Langevin dynamics") with a small score network
  ``s(x, sigma) = net(x) / sigma``: ``fdsm_ext.annealed_langevin`` against the same loop in eager
  PyTorch, and on a GPU also with ``cuda_graph=True`` (one captured step replayed); steps per second
  counts Langevin steps (levels x steps per level).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

import fdsm_ext
from bench_common import Preset, Skip, compare, paired_ratio

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


def _time_variants(bench: str, variants: dict, shape, p: Preset, device: torch.device, log) -> list[dict]:
    """One record per variant of a step over a ``(B, d)`` float32 batch: time, bandwidth (read ``x``
    and ``s``, write ``x_new``) and the paired ratio to the first variant (the fused one)."""
    numel, nbytes = shape[0] * shape[1], 3 * F32 * shape[0] * shape[1]
    records = []
    with torch.no_grad():
        timings = compare(variants, device, p)
    base = next(iter(timings.values()))
    for name, t in timings.items():
        records.append({"bench": bench, "variant": name, "size": numel, "dim": shape[1], "bytes": nbytes,
                        "gbps": nbytes / t.median_s / 1e9, **t.as_dict(), **paired_ratio(t, base)})
    log(f"sampling {bench} n={numel:>10,d} " + "  ".join(f"{r['variant']}={r['median_s'] * 1e3:.3f} ms" for r in records))
    return records


def bench_langevin_step(p: Preset, device: torch.device, log) -> list[dict]:
    step = getattr(fdsm_ext.ops, "langevin_step", None)
    if step is None:
        raise Skip("fdsm_ext.ops has no langevin_step in this build")
    step_ = getattr(fdsm_ext.ops, "langevin_step_", None)
    seed = torch.tensor([20240601, 0], dtype=torch.int64)
    compiled = torch.compile(eager_langevin_step, dynamic=True) if p.compile else None
    records = []
    for n in p.sampling_sizes:
        B = max(1, n // p.micro_dim)
        x, s = torch.randn(B, p.micro_dim, device=device), torch.randn(B, p.micro_dim, device=device)
        variants = {"fused": lambda: step(x, s, ALPHA, seed), "eager": lambda: eager_langevin_step(x, s, ALPHA)}
        x_inplace = x.clone()
        if step_ is not None:
            variants["fused in place"] = lambda: step_(x_inplace, s, ALPHA, seed)
        triton_step = _triton_step(device)
        if triton_step is not None:
            alpha_t = torch.full((1,), ALPHA, device=device)
            variants["triton in place"] = lambda: triton_step(x_inplace, s, alpha_t, seed, None, None, False)
        if compiled is not None:
            variants["compile"] = lambda: compiled(x, s, ALPHA)
        src = torch.empty(max(1, 3 * x.numel() // 2), device=device)   # copy src -> dst moves the same bytes
        dst = torch.empty_like(src)
        variants["copy"] = lambda: dst.copy_(src)
        records += _time_variants("langevin_step", variants, x.shape, p, device, log)
    return records


def eager_langevin_full(x, s, alpha: float, lo: float = -1.0, hi: float = 1.0):
    """The authors' step with NCSNv2's extras: clamp to the data range and the per-sample norms its
    ``anneal_Langevin_dynamics`` takes every step, ``||grad||``, ``||noise||`` and ``||x_mod||`` (of the
    new state), as ``torch.norm(t.view(B, -1), dim=-1)``. (NCSNv2 then logs their batch means, the SNR
    and ``||mean grad||``: a logger's arithmetic on these norms, the same work for any sampler, left out.)"""
    z = torch.randn_like(x)
    new = (x + alpha * s + math.sqrt(2 * alpha) * z).clamp(lo, hi)
    return new, s.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1), new.flatten(1).norm(dim=1)


def _triton_step(device: torch.device):
    """The Triton in-place step on a GPU, when this fdsm_ext has it (CPU: the interpreter, not timed)."""
    if device.type != "cuda":
        return None
    try:
        import fdsm_ext.triton as fdsm_triton
    except Exception:  # triton missing or too old: the rows are simply absent
        return None
    return getattr(fdsm_triton.ops, "langevin_step_", None)


def bench_langevin_step_full(p: Preset, device: torch.device, log) -> list[dict]:
    step = getattr(fdsm_ext.ops, "langevin_step", None)
    if step is None:
        raise Skip("fdsm_ext.ops has no langevin_step in this build")
    seed = torch.tensor([20240601, 0], dtype=torch.int64)
    compiled = torch.compile(eager_langevin_full, dynamic=True) if p.compile else None
    records = []
    for n in p.sampling_sizes:
        B = max(1, n // p.micro_dim)
        x, s = torch.rand(B, p.micro_dim, device=device) * 2 - 1, torch.randn(B, p.micro_dim, device=device)
        x_inplace = x.clone()
        variants = {"fused in place": lambda: fdsm_ext.ops.langevin_step_(x_inplace, s, ALPHA, seed, -1.0, 1.0, True),
                    "eager": lambda: eager_langevin_full(x, s, ALPHA)}
        if compiled is not None:
            variants["compile"] = lambda: compiled(x, s, ALPHA)
        records += _time_variants("langevin_step_full", variants, x.shape, p, device, log)
    return records


def eager_annealed_langevin_full(score, x0, sigmas, n_steps_each: int, step_lr: float, lo=0.0, hi=1.0):
    """NCSN Algorithm 1 with NCSNv2's extras per step: the clamp to the data range and the per-sample
    ``||s||``, ``||z||``, ``||x_new||`` its sampler computes (kept, as a logger would)."""
    x, norms = x0.clone(), []
    for sigma in sigmas.tolist():
        alpha = step_lr * (sigma / float(sigmas[-1])) ** 2
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for _ in range(n_steps_each):
            x, *step_norms = eager_langevin_full(x, score(x, sig), alpha, lo, hi)
            norms.append(step_norms)
    return x


def _norms_of(info):
    """The step's per-sample norms from a callback's info: the (3, B) tensor where the sampler has one
    (no per-step split), else the three rows (older fdsm_ext builds)."""
    norms = getattr(info, "norms", None)
    return norms if norms is not None else (info.score_norm, info.noise_norm, info.x_norm)


def bench_annealed(p: Preset, device: torch.device, log) -> list[dict]:
    sampler = getattr(fdsm_ext, "annealed_langevin", None)
    if sampler is None:
        raise Skip("fdsm_ext has no annealed_langevin in this build")
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
    args = (score, x0, sigmas, a["steps_each"], step_lr)
    records = []
    # Two comparisons, each paired per round: the plain loop, and NCSNv2's loop (clamp to [0, 1] and
    # the per-sample norms, which the fused kernel returns and a callback keeps, as the eager loop does).
    setups = {"plain": ({"fused": lambda: sampler(*args, **options),
                         "eager": lambda: eager_annealed_langevin(*args)}, "eager")}
    if "clamp" in accepted and "callback" in accepted:
        def keep_norms():
            kept = []
            return sampler(*args, **options, clamp=(0.0, 1.0), callback=lambda info: kept.append(_norms_of(info)))

        setups["clamp+norms"] = ({"fused": keep_norms, "eager": lambda: eager_annealed_langevin_full(*args)}, "eager")
    if device.type == "cuda" and "cuda_graph" in accepted:
        setups["plain"][0]["fused, CUDA graph"] = lambda: sampler(*args, **{**options, "cuda_graph": True})
    for setup, (variants, base_name) in setups.items():
        with torch.no_grad():
            timings = compare(variants, device, p)
        for name, t in timings.items():
            records.append({"bench": "annealed_langevin", "setup": setup, "variant": name, **a, **t.as_dict(),
                            "steps_per_s": a["levels"] * a["steps_each"] / t.median_s,
                            # the eager loop's time over this variant's (above 1: this is faster)
                            **paired_ratio(timings[base_name], t)})
            log(f"sampling annealed {setup:12s} {name:18s} {t.median_s * 1e3:9.2f} ms")
    return records


BENCHES = {"langevin_step": bench_langevin_step, "langevin_step_full": bench_langevin_step_full,
           "annealed_langevin": bench_annealed}


def run(p: Preset, device: torch.device, log) -> dict:
    records, skipped = [], []
    for name, bench in BENCHES.items():
        try:
            records += bench(p, device, log)
        except Skip as exc:
            skipped.append(f"sampling {name}: {exc}")
            log(f"sampling {name}: skipped: {exc}")
    return {"records": records, "skipped": skipped}
