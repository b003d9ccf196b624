"""ode_likelihood with the FD divergence vs the autograd Hutchinson divergence: time, peak memory, variance.

For each score model (a softplus MLP ``s(x, sigma) = net(x) / sigma`` and NCSNv2's ``tiny`` RefineNet on
16x16 RGB images, both at their random initialisation, float32) one batch is solved three ways:
``divergence="fd"`` on the fused kernels (``backend="auto"``: ``perturb`` + the ``fd_divergence`` op,
probes regenerated in-kernel), ``divergence="fd"`` with ``backend="torch"`` (the composite: probes drawn
with torch's RNG and kept, ``torch.cat``, an einsum) and ``divergence="hutchinson"`` (one Rademacher
probe; FD and Hutchinson of one backend see the same probes; rtol = atol = 1e-5 as score_sde, 1e-3 with
``--quick``), in rounds whose order rotates (A B C, B C A, C A B, ...): each round gives the ratios
fused FD / Hutchinson and fused FD / composite FD of the time per solve and per ODE evaluation, so that
load drifts of a shared machine cancel; we report the median ratio and its 20/80 % quantiles, with the
median time per sample.

Peak memory of one ODE evaluation (one probe, a larger batch than the timed one so that every tensor
is well over 64 KiB): on a GPU ``torch.cuda.max_memory_allocated`` minus what was allocated before. On
the CPU the rise of the process's resident set: the kernel's high-water mark (``VmHWM``) is reset
through ``/proc/self/clear_refs`` first, and glibc's malloc is made to return every block over 64 KiB
to the system when freed (the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536``), so the
rise is the evaluation's own peak. A solve's peak is that plus the solver's few copies of the state.

Variance: one more solve per method with ``n_probes`` probes gives the standard deviation of the
NLL over probes (``nll_se * sqrt(n_probes)``), per sample, averaged over the batch, in bits/dim.

    python benchmarks/bench_likelihood.py [--quick] [--device cpu|cuda] [--json OUT.json]

``--quick`` (about 1 min on a 2-core CPU) uses smaller batches and fewer rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402

from fdsm_ext import _checks  # noqa: E402
from fdsm_ext.likelihood import (  # noqa: E402
    fd_divergence,
    fused_fd_divergence,
    hutchinson_divergence,
    ode_likelihood,
)

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
#: The solves compared: name -> ode_likelihood's (divergence, backend). "fd" is the fused path.
METHODS = {"fd": ("fd", "auto"), "fd_torch": ("fd", "torch"), "hutchinson": ("hutchinson", "auto")}


class DenoiserScore(nn.Module):
    """``s(x, sigma) = (D(x) - x) / sigma^2`` for a network ``D`` (the denoiser form of trained diffusion
    models). At random initialisation it keeps the ODE as tame as a trained model's (the drift is
    ``ln(sigma_max/sigma_min) (x - D(x))``), where NCSNv2's ``net(x) / sigma`` makes the solver take
    thousands of steps; the cost of an evaluation is the network's either way."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        return (self.net(x) - x) / sigma.reshape(-1, *([1] * (x.dim() - 1))) ** 2


def mlp_score(dim: int, width: int) -> nn.Module:
    return DenoiserScore(nn.Sequential(nn.Linear(dim, width), nn.Softplus(), nn.Linear(width, width), nn.Softplus(),
                                       nn.Linear(width, dim)))


def ncsn_tiny_score() -> nn.Module:
    from fdsm_train.models.ncsnv2 import ncsnv2_score_model

    return DenoiserScore(ncsnv2_score_model("tiny", channels=3).net)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes(fn, device: torch.device) -> int | None:
    """The rise of allocated memory over ``fn()`` (see the module docstring); None where not measurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current VmRSS
        base = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def eval_peaks(score, x: torch.Tensor, device: torch.device) -> dict:
    """Peak memory of one ODE right-hand side evaluation (one probe, at sigma = 1) per method, the
    solve's peak less the solver's own few state copies; measured after one warm-up of each."""
    B, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    sigma = torch.ones(2 * B, device=device)

    def fn(rows):
        return score(rows.reshape(rows.shape[0], *shape), sigma[:rows.shape[0]]).reshape(rows.shape[0], d)

    xf = x.reshape(B, d)
    v = torch.randint(0, 2, (1, B, d), device=device).to(x.dtype) * 2 - 1
    seed, backend = torch.tensor([1, 0]), _checks.resolve_backend_for("auto", device.type)
    calls = {"fd": lambda: fused_fd_divergence(fn, xf, seed, 1e-3, 1, "rademacher", backend),
             "fd_torch": lambda: fd_divergence(fn, xf, v, 1e-3), "hutchinson": lambda: hutchinson_divergence(fn, xf, v)}
    out = {}
    with torch.no_grad():
        for method in (*METHODS, *reversed(METHODS)):
            out[f"peak_bytes_{method}"] = peak_bytes(calls[method], device)  # the second of each is kept
    return out


def _ratio_stats(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=5, method="inclusive") if len(values) > 1 else [values[0]] * 4
    return {"median": statistics.median(values), "q20": q[0], "q80": q[3]}


def run_model(name: str, score, x: torch.Tensor, sigma_min: float, sigma_max: float, pairs: int,
              n_probes: int, tol: float, mem_batch: int, device: torch.device) -> dict:
    """One model's row; ``pairs`` rounds of the three solves (every method once a round, the order rotating)."""
    B, d = x.shape[0], x[0].numel()

    def solve(method: str, probes: int = 1):
        divergence, backend = METHODS[method]
        return ode_likelihood(score, x, sigma_min, sigma_max, divergence=divergence, n_probes=probes, rtol=tol,
                              atol=tol, generator=torch.Generator(device=device).manual_seed(0), backend=backend)

    row = {"model": name, "batch": B, "dim": d, "params": sum(p.numel() for p in score.parameters()),
           "mem_batch": mem_batch}
    row.update(eval_peaks(score, torch.rand(mem_batch, *x.shape[1:], device=device), device))
    for method in METHODS:  # warm-up: allocator, first-call costs
        solve(method)
    names = list(METHODS)
    times = {m: [] for m in names}
    nfes = {m: [] for m in names}
    for k in range(pairs):
        for method in names[k % len(names):] + names[:k % len(names)]:
            bench_common.synchronize(device)
            t = time.perf_counter()
            res = solve(method)
            bench_common.synchronize(device)
            times[method].append(time.perf_counter() - t)
            nfes[method].append(res.nfe)

    def ratios(a: str, b: str, per_eval: bool) -> dict:
        return _ratio_stats([(ta / (na if per_eval else 1)) / (tb / (nb if per_eval else 1))
                             for ta, tb, na, nb in zip(times[a], times[b], nfes[a], nfes[b])])

    for method in names:
        row[f"time_per_sample_s_{method}"] = statistics.median(times[method]) / B
        row[f"nfe_{method}"] = statistics.median(nfes[method])
    row["ratio_fd_over_hutchinson"] = ratios("fd", "hutchinson", False)
    row["ratio_per_eval"] = ratios("fd", "hutchinson", True)
    row["ratio_fd_over_fd_torch"] = ratios("fd", "fd_torch", False)
    row["ratio_fd_over_fd_torch_per_eval"] = ratios("fd", "fd_torch", True)
    for method in names:
        res = solve(method, n_probes)
        per_probe_sd = res.bpd_se * math.sqrt(n_probes)
        row[f"bpd_{method}"] = float(res.bpd.mean())
        row[f"bpd_sd_per_probe_{method}"] = float(per_probe_sd.mean())
    return row


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def table(rows: list[dict]) -> str:
    """Markdown table of the rows: fused FD (``FD``), composite FD (``FD torch``) and Hutchinson (``H``)."""
    lines = ["| model | B x d | time/sample FD / FD torch / H | FD/H time (q20-q80) | per eval | FD/FD torch time "
             "(q20-q80) | per eval | NFE FD/FD torch/H | peak/eval FD / FD torch / H (batch) | bpd FD / FD torch / H "
             "| sd per probe (bpd) FD / FD torch / H |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt_t = bench_common.fmt_time
    for r in rows:
        rt, re = r["ratio_fd_over_hutchinson"], r["ratio_per_eval"]
        rc, rce = r["ratio_fd_over_fd_torch"], r["ratio_fd_over_fd_torch_per_eval"]
        each = lambda key, f: " / ".join(f(r[f"{key}_{m}"]) for m in METHODS)  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']} x {r['dim']} | {each('time_per_sample_s', fmt_t)} | "
            f"{rt['median']:.2f} ({rt['q20']:.2f}-{rt['q80']:.2f}) | {re['median']:.2f} | "
            f"{rc['median']:.2f} ({rc['q20']:.2f}-{rc['q80']:.2f}) | {rce['median']:.2f} | "
            f"{each('nfe', lambda v: f'{v:.0f}')} | {each('peak_bytes', fmt_bytes)} ({r['mem_batch']}) | "
            f"{each('bpd', lambda v: f'{v:.3f}')} | {each('bpd_sd_per_probe', lambda v: f'{v:.4f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small models and batches, 3 rounds, rtol = atol = 1e-3 (< 1 min on an idle 2-core CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", help="also write the rows and the environment to this file")
    args = p.parse_args(argv)
    if sys.platform.startswith("linux") and _MMAP_ENV not in os.environ:
        # freed blocks must leave the resident set for the CPU peak to be the solve's own (module docstring)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, _MMAP_ENV: "65536"})
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    pairs, n_probes, tol = (3, 4, 1e-3) if args.quick else (6, 8, 1e-5)  # rounds: a multiple of the 3 orders
    load = bench_common.MachineLoad()
    rows = []
    mlp_b, ncsn_b = (32, 4) if args.quick else (128, 16)
    mlp_mem, ncsn_mem = (128, 64) if args.quick else (512, 256)  # memory of one evaluation: tensors well over 64 KiB
    mlp = mlp_score(64 if args.quick else 784, 256 if args.quick else 512).to(device)
    rows.append(run_model("MLP", mlp, torch.rand(mlp_b, mlp.net[0].in_features, device=device), 0.01, 10.0, pairs,
                          n_probes, tol, mlp_mem, device))
    try:
        ncsn = ncsn_tiny_score().to(device)
    except ImportError as exc:
        print(f"NCSN tiny skipped: fdsm_train cannot be imported ({exc}); add python/ to PYTHONPATH", file=sys.stderr)
    else:
        rows.append(run_model("NCSN tiny", ncsn, torch.rand(ncsn_b, 3, 16, 16, device=device), 0.01, 50.0, pairs,
                              n_probes, tol, ncsn_mem, device))
    print(table(rows))
    env = {**bench_common.environment(device), "load": load.finish(), "rounds": pairs, "n_probes": n_probes,
           "rtol_atol": tol}
    print(f"\n{env['device_name']}, torch {env['torch']}, {args.threads} thread(s), {pairs} rounds, "
          f"rtol = atol = {tol:g}; "
          f"other processes used {env['load'] and env['load']['other_processes_cpu_fraction']} of the CPUs")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "environment": env}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
