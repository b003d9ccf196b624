"""ode_likelihood with the FD divergence vs the autograd Hutchinson divergence: time, peak memory, variance.

For each score model (a softplus MLP ``s(x, sigma) = net(x) / sigma`` and NCSNv2's ``tiny`` RefineNet on
16x16 RGB images, both at their random initialisation, float32) one batch is solved with
``divergence="fd"`` and ``divergence="hutchinson"`` (one Rademacher probe, the same probes for both,
rtol = atol = 1e-5 as score_sde; 1e-3 with ``--quick``) in alternating pairs (A B, B A, ...): each pair gives the ratio
FD / Hutchinson of the time per solve and per ODE evaluation, so that load drifts of a shared machine
cancel; we report the median ratio and its 20/80 % quantiles, with the median time per sample.

Peak memory of one ODE evaluation (one probe, a larger batch than the timed one so that every tensor
is well over 64 KiB): on a GPU ``torch.cuda.max_memory_allocated`` minus what was allocated before. On
the CPU the rise of the process's resident set: the kernel's high-water mark (``VmHWM``) is reset
through ``/proc/self/clear_refs`` first, and glibc's malloc is made to return every block over 64 KiB
to the system when freed (the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536``), so the
rise is the evaluation's own peak. A solve's peak is that plus the solver's few copies of the state.

Variance: one more solve per divergence with ``n_probes`` probes gives the standard deviation of the
NLL over probes (``nll_se * sqrt(n_probes)``), per sample, averaged over the batch, in bits/dim.

    python benchmarks/bench_likelihood.py [--quick] [--device cpu|cuda] [--json OUT.json]

``--quick`` (< 1 min on a 2-core CPU) uses smaller batches and fewer pairs.
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

from fdsm_ext.likelihood import fd_divergence, hutchinson_divergence, ode_likelihood  # noqa: E402

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


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
    """Peak memory of one ODE right-hand side evaluation (one probe, at sigma = 1) per divergence, the
    solve's peak less the solver's own few state copies; measured after one warm-up of each."""
    B, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    sigma = torch.ones(2 * B, device=device)

    def fn(rows):
        return score(rows.reshape(rows.shape[0], *shape), sigma[:rows.shape[0]]).reshape(rows.shape[0], d)

    xf = x.reshape(B, d)
    v = torch.randint(0, 2, (1, B, d), device=device).to(x.dtype) * 2 - 1
    calls = {"fd": lambda: fd_divergence(fn, xf, v, 1e-3), "hutchinson": lambda: hutchinson_divergence(fn, xf, v)}
    out = {}
    with torch.no_grad():
        for div in ("fd", "hutchinson", "hutchinson", "fd"):
            out[f"peak_bytes_{div}"] = peak_bytes(calls[div], device)  # the second of each is kept
    return out


def run_model(name: str, score, x: torch.Tensor, sigma_min: float, sigma_max: float, pairs: int,
              n_probes: int, tol: float, mem_batch: int, device: torch.device) -> dict:
    B, d = x.shape[0], x[0].numel()

    def solve(divergence: str, probes: int = 1):
        return ode_likelihood(score, x, sigma_min, sigma_max, divergence=divergence, n_probes=probes, rtol=tol,
                              atol=tol, generator=torch.Generator(device=device).manual_seed(0))

    row = {"model": name, "batch": B, "dim": d, "params": sum(p.numel() for p in score.parameters()),
           "mem_batch": mem_batch}
    row.update(eval_peaks(score, torch.rand(mem_batch, *x.shape[1:], device=device), device))
    for div in ("fd", "hutchinson"):  # warm-up: allocator, first-call costs
        solve(div)
    times = {"fd": [], "hutchinson": []}
    nfes = {"fd": [], "hutchinson": []}
    for k in range(pairs):
        for div in (("fd", "hutchinson") if k % 2 == 0 else ("hutchinson", "fd")):
            bench_common.synchronize(device)
            t = time.perf_counter()
            res = solve(div)
            bench_common.synchronize(device)
            times[div].append(time.perf_counter() - t)
            nfes[div].append(res.nfe)
    ratio = [a / b for a, b in zip(times["fd"], times["hutchinson"])]
    ratio_eval = [(a / na) / (b / nb) for a, b, na, nb in zip(times["fd"], times["hutchinson"], nfes["fd"],
                                                               nfes["hutchinson"])]
    q = lambda v: statistics.quantiles(v, n=5, method="inclusive") if len(v) > 1 else [v[0]] * 4  # noqa: E731
    for div in times:
        row[f"time_per_sample_s_{div}"] = statistics.median(times[div]) / B
        row[f"nfe_{div}"] = statistics.median(nfes[div])
    row["ratio_fd_over_hutchinson"] = {"median": statistics.median(ratio), "q20": q(ratio)[0], "q80": q(ratio)[3]}
    row["ratio_per_eval"] = {"median": statistics.median(ratio_eval), "q20": q(ratio_eval)[0],
                             "q80": q(ratio_eval)[3]}
    for div in ("fd", "hutchinson"):
        res = solve(div, n_probes)
        per_probe_sd = res.bpd_se * math.sqrt(n_probes)
        row[f"bpd_{div}"] = float(res.bpd.mean())
        row[f"bpd_sd_per_probe_{div}"] = float(per_probe_sd.mean())
    return row


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def table(rows: list[dict]) -> str:
    lines = ["| model | B x d | time/sample FD | time/sample Hutch. | FD/Hutch. time (q20-q80) | per eval | NFE FD/H "
             "| peak/eval FD | peak/eval Hutch. (batch) | bpd FD / H | sd per probe (bpd) FD / H |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rt, re = r["ratio_fd_over_hutchinson"], r["ratio_per_eval"]
        lines.append(
            f"| {r['model']} | {r['batch']} x {r['dim']} | {bench_common.fmt_time(r['time_per_sample_s_fd'])} | "
            f"{bench_common.fmt_time(r['time_per_sample_s_hutchinson'])} | {rt['median']:.2f} "
            f"({rt['q20']:.2f}-{rt['q80']:.2f}) | {re['median']:.2f} | {r['nfe_fd']:.0f}/{r['nfe_hutchinson']:.0f} | "
            f"{fmt_bytes(r['peak_bytes_fd'])} | {fmt_bytes(r['peak_bytes_hutchinson'])} ({r['mem_batch']}) | "
            f"{r['bpd_fd']:.3f} / {r['bpd_hutchinson']:.3f} | "
            f"{r['bpd_sd_per_probe_fd']:.4f} / {r['bpd_sd_per_probe_hutchinson']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small models and batches, 2 pairs, rtol = atol = 1e-3 (< 1 min on an idle 2-core CPU)")
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
    pairs, n_probes, tol = (2, 4, 1e-3) if args.quick else (5, 8, 1e-5)
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
    env = {**bench_common.environment(device), "load": load.finish(), "pairs": pairs, "n_probes": n_probes,
           "rtol_atol": tol}
    print(f"\n{env['device_name']}, torch {env['torch']}, {args.threads} thread(s), {pairs} pairs, "
          f"rtol = atol = {tol:g}; "
          f"other processes used {env['load'] and env['load']['other_processes_cpu_fraction']} of the CPUs")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "environment": env}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
