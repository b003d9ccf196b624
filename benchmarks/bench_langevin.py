"""Langevin sampling benchmark: the fused step against the eager composite and its torch.compile, and
annealed-sampler steps per second for a small MLP score (eager loop, and CUDA graphs on a GPU).

    python benchmarks/bench_langevin.py [--device cpu|cuda] [--threads N] [--max-numel 1e7] [--json out.json]

Every row reports the median and the 20% / 80% quantiles of per-call wall time (time.perf_counter,
with torch.cuda.synchronize on a GPU) and its ratio to the baseline of the same table, measured in
the same run. Step rows ("update" = x + alpha s + sqrt(2 alpha) z; "full" = the same with a clamp
and the per-sample ||s||, ||z|| NCSNv2 logs):

- ``composite``: the update as the NCSN/NCSNv2 code writes it (torch.randn_like, then x + a s + b z;
  for "full" also clamp and two torch.norm calls) -- the baseline;
- ``compiled``: the same function through torch.compile (inductor, its own in-kernel RNG);
- ``fused``: ``ops.langevin_step`` (out of place) and ``fused_``: ``ops.langevin_step_`` (in place,
  what the sampler calls), noise drawn in-kernel from the Philox stream.

The score model's time is not in these rows; the sampler rows include it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import fdsm_ext
from fdsm_ext import ops


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, budget_s: float = 1.5, min_reps: int = 5, max_reps: int = 200) -> dict:
    """Median and 20/80% quantiles (seconds per call) of calls of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max_reps, max(min_reps, budget_s / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return {"median": statistics.median(times), "q20": q[1], "q80": q[7], "reps": reps}


def fmt_time(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


# --------------------------------------------------------------------------- the step
def composite_update(x, s, alpha: float):
    return x + alpha * s + math.sqrt(2 * alpha) * torch.randn_like(x)


def composite_full(x, s, alpha: float):
    z = torch.randn_like(x)
    new = (x + alpha * s + math.sqrt(2 * alpha) * z).clamp(-1.0, 1.0)
    return new, s.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1)


def step_rows(device: torch.device, sizes, dtype, use_compile: bool) -> list[dict]:
    rows = []
    compiled_update = torch.compile(composite_update, dynamic=False) if use_compile else None
    compiled_full = torch.compile(composite_full, dynamic=False) if use_compile else None
    for B, d in sizes:
        x = torch.rand(B, d, device=device, dtype=dtype) * 2 - 1
        s = torch.randn(B, d, device=device, dtype=dtype)
        seed = torch.tensor([1234, 0], dtype=torch.int64)
        alpha = 1e-3
        alpha_t = torch.full((1,), alpha, dtype=ops.loss_dtype(dtype), device=device)
        work = x.clone()
        for variant in ("update", "full"):
            norms = variant == "full"
            lo, hi = (-1.0, 1.0) if norms else (None, None)
            cases = [("composite", (lambda: composite_full(x, s, alpha)) if norms else
                      (lambda: composite_update(x, s, alpha)))]
            if use_compile:
                fn = compiled_full if norms else compiled_update
                cases.append(("compiled", lambda fn=fn: fn(x, s, alpha)))
            cases.append(("fused", lambda: ops.langevin_step(x, s, alpha_t, seed, lo, hi, norms)))
            cases.append(("fused_", lambda: ops.langevin_step_(work, s, alpha_t, seed, lo, hi, norms)))
            base = None
            for name, fn in cases:
                r = measure(fn, device)
                base = base or r["median"]
                rows.append({"table": "step", "variant": variant, "impl": name, "shape": [B, d], "numel": B * d,
                             "dtype": str(dtype).replace("torch.", ""), **r,
                             "elem_per_s": B * d / r["median"], "vs_composite": base / r["median"]})
                print(f"  step {variant:6s} {B:>5d}x{d:<7d} {name:9s} median {fmt_time(r['median']):>9s} "
                      f"[{fmt_time(r['q20'])}, {fmt_time(r['q80'])}]  {B * d / r['median'] / 1e6:8.1f} Melem/s  "
                      f"x{base / r['median']:.2f} vs composite", flush=True)
    return rows


# --------------------------------------------------------------------------- the sampler
def mlp_score(dim: int, width: int, device, dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))
    return fdsm_ext.NoiseConditionalScore(net.to(device=device, dtype=dtype).eval())


def sampler_rows(device: torch.device, dtype, batch: int, dim: int, width: int, levels: int, steps: int) -> list[dict]:
    score = mlp_score(dim, width, device, dtype)
    sigmas = fdsm_ext.geometric_sigmas(1.0, 0.01, levels)
    x0 = torch.rand(batch, dim, device=device, dtype=dtype)
    configs = [("composite", dict(backend="torch", cuda_graph=False)), ("fused", dict(backend="cpp", cuda_graph=False))]
    if device.type == "cuda":
        configs.append(("fused+graph", dict(backend="cpp", cuda_graph=True)))
    rows, base = [], None
    total = levels * steps
    for name, kw in configs:
        try:
            r = measure(lambda kw=kw: fdsm_ext.annealed_langevin(score, x0, sigmas, steps, 1e-5, **kw), device,
                        budget_s=3.0, min_reps=3, max_reps=20)
        except RuntimeError as exc:  # e.g. no CUDA langevin kernel in this build
            print(f"  sampler {name}: skipped ({exc})")
            continue
        base = base or r["median"]
        sps = total / r["median"]
        rows.append({"table": "sampler", "impl": name, "batch": batch, "dim": dim, "width": width,
                     "steps": total, **r, "steps_per_s": sps, "vs_composite": base / r["median"]})
        print(f"  sampler {name:11s} B={batch} d={dim} MLP width {width}: {total} steps in "
              f"{fmt_time(r['median'])} [{fmt_time(r['q20'])}, {fmt_time(r['q80'])}] = {sps:8.1f} steps/s  "
              f"x{base / r['median']:.2f} vs composite", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--max-numel", type=float, default=1e7, help="largest step size, in elements")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--sampler-batch", type=int, default=128)
    p.add_argument("--sampler-dim", type=int, default=64)
    p.add_argument("--sampler-width", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = [(B, d) for B, d in [(16, 64), (64, 1536), (128, 8192), (256, 40960)] if B * d <= args.max_numel * 1.05]
    header = {
        "device": device_name(device), "torch": torch.__version__, "fdsm_ext": fdsm_ext.__version__,
        "threads": torch.get_num_threads(), "dtype": args.dtype, "python": platform.python_version(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton  # noqa: F401

        header["triton"] = triton.__version__
    except ImportError:
        header["triton"] = None
    print("bench_langevin:", json.dumps(header), flush=True)
    rows = step_rows(device, sizes, dtype, not args.no_compile)
    rows += sampler_rows(device, dtype, args.sampler_batch, args.sampler_dim, args.sampler_width, levels=10, steps=10)
    header["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    print("bench_langevin: done; load average at the end", header["loadavg_end"], file=sys.stderr)


if __name__ == "__main__":
    main()
