"""Turns the records of a ``run.py`` run into the Markdown report, the goal verdicts and the PNG plots.

Every ratio is between two methods of the same :func:`bench_common.compare` call, taken per round of
alternating blocks and reported as the median ratio ``[20 %, 80 %]`` quantiles of the per-round
ratios. Times are medians; ``[a, b]`` are the 20 % and 80 % quantiles.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import bench_floor
import callgrind_counts

# --------------------------------------------------------------------------- formatting


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def fmt_timing(rec: dict) -> str:
    """``median [q20, q80]`` in the median's unit."""
    med = rec["median_s"]
    unit, scale = next(((u, s) for u, s in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)) if med >= s), ("ns", 1e-9))
    return f"{_num(med / scale)} [{_num(rec['q20_s'] / scale)}, {_num(rec['q80_s'] / scale)}] {unit}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def fmt_paired(rec: dict | None, invert: bool = False) -> str:
    """A record's paired ratio ``median× [q20, q80]`` (``invert``: of the reciprocal ratios)."""
    if rec is None or rec.get("ratio") is None:
        return "–"
    med, lo, hi = rec["ratio"], rec["ratio_q20"], rec["ratio_q80"]
    if invert:
        med, lo, hi = 1 / med, 1 / hi, 1 / lo
    return f"{med:.2f}× [{lo:.2f}, {hi:.2f}]"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# --------------------------------------------------------------------------- same-run ratios


def e2e_ratios(records: list[dict]) -> list[dict]:
    """Per (model, batch): SSM and SSM-VR step time over fused FD's, fused FD's memory over theirs,
    eager FD's step time over fused FD's."""
    groups = defaultdict(dict)
    for r in records:
        groups[(r["model"], r["batch"])][r["method"]] = r
    out = []
    for (model, batch), m in groups.items():
        fd = m.get("fd_fused")
        if fd is None:
            continue
        row = {"model": model, "batch": batch, "family": fd["family"], "config": fd["config"], "params": fd["params"]}
        for base in ("ssm", "ssm_vr", "fd_torch", "dsm", "exact_sm"):
            if base in m:
                row[f"speedup_vs_{base}"] = m[base]["ratio"]  # t(base) / t(FD fused), paired per round
                row[f"mem_vs_{base}"] = fd["mem_bytes"] / m[base]["mem_bytes"] if m[base]["mem_bytes"] else None
        out.append(row)
    return out


def order_ratios(records: list[dict], order: int = 4) -> list[dict]:
    """Per (method, batch): time at ``order`` over time at T = 1."""
    by = {(r["method"], r["batch"], r["order"]): r for r in records}
    out = []
    for (method, batch, T), r in by.items():
        if T == order and (method, batch, 1) in by:
            out.append({"method": method, "label": r["label"], "batch": batch, "ratio": r["ratio"]})
    return out


def _nice_sized(row: dict) -> bool:
    """NICE/NCSN rows, or the MLP standing in for NICE's size (d = 784, width >= 1000)."""
    c = row["config"]
    return row["family"] in ("nice", "ncsn") or (row["family"] == "mlp" and c.get("width", 0) >= 1000)


def _span(values: list[float]) -> str:
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}×" if abs(hi - lo) < 5e-3 else f"{lo:.2f}× – {hi:.2f}× (median {statistics.median(values):.2f}×)"


def _verdict(values: list[float], ok) -> str:
    if not values:
        return "not measured"
    n_ok = sum(bool(ok(v)) for v in values)
    return "met" if n_ok == len(values) else ("not met" if n_ok == 0 else f"met in {n_ok} of {len(values)}")


def goals(result: dict) -> list[dict]:
    """The issue's goals, each with what this run measured and a verdict."""
    device = result["environment"]["device"]
    on_gpu = device.startswith("cuda")
    e2e = e2e_ratios(result["suites"].get("e2e", {}).get("records", []))
    big = [r for r in e2e if r["family"] in ("nice", "ncsn")]
    proxy = not big
    big = big or [r for r in e2e if _nice_sized(r)]  # the MLP stand-in only while NICE/NCSN are missing
    where = ("" if on_gpu else "CPU; the goal is for a GPU") + ("; NICE-sized MLP stand-in" if proxy and big else "")
    where = f" ({where.lstrip('; ')})" if where else ""
    speed = [r["speedup_vs_ssm"] for r in big if "speedup_vs_ssm" in r] or \
            [r["speedup_vs_ssm_vr"] for r in big if "speedup_vs_ssm_vr" in r]
    mem = [r["mem_vs_ssm"] for r in big if r.get("mem_vs_ssm")] or \
          [r["mem_vs_ssm_vr"] for r in big if r.get("mem_vs_ssm_vr")]
    small = [r["speedup_vs_fd_torch"] for r in e2e
             if r["family"] in ("dkef", "mlp") and not _nice_sized(r) and "speedup_vs_fd_torch" in r]
    order = [r["ratio"] for r in order_ratios(result["suites"].get("order", {}).get("records", []))
             if r["method"] == "fd_fused"]
    order_by_batch = ", ".join(f"B={r['batch']}: {r['ratio']:.2f}×"
                               for r in order_ratios(result["suites"].get("order", {}).get("records", []))
                               if r["method"] == "fd_fused")
    return [*_goals_issue8(speed, mem, small, order, order_by_batch, where), *_goals_issue16(result),
            *(_goals_issue15(result) if on_gpu else [])]


def _goals_issue8(speed, mem, small, order, order_by_batch, where) -> list[dict]:
    return [
        {"goal": "FD-SSM step ≥ 2.5× faster than SSM, NICE/NCSN-sized models (GPU)",
         "measured": _span(speed) + where, "verdict": _verdict(speed, lambda v: v >= 2.5), "values": speed},
        {"goal": "FD-SSM activation memory ≤ 0.6× SSM's, NICE/NCSN-sized models (GPU)",
         "measured": _span(mem) + where, "verdict": _verdict(mem, lambda v: v <= 0.6), "values": mem},
        {"goal": "fused FD-SSM step ≥ 1.3× faster than eager FD-SSM, DKEF/MLP-sized models",
         "measured": _span(small), "verdict": _verdict(small, lambda v: v >= 1.3), "values": small},
        {"goal": "order-4 derivative ≤ 1.5× the time of order 1 (batched FD, fused)",
         "measured": order_by_batch or "–", "verdict": _verdict(order, lambda v: v <= 1.5), "values": order},
    ]


def _largest(records: list[dict]) -> list[dict]:
    """The records at each (op or bench, mode)'s largest size: the bandwidth-bound end of a sweep."""
    top: dict[tuple, int] = {}
    for r in records:
        key = (r.get("op", r.get("bench")), r.get("mode"))
        top[key] = max(top.get(key, 0), r["size"])
    return [r for r in records if r["size"] == top[(r.get("op", r.get("bench")), r.get("mode"))]]


def _goals_issue15(result: dict) -> list[dict]:
    """The GPU kit's goals (issue 15) for the memory-bound kernels and the CUDA-graph sampler, at the
    largest size of each sweep; every ratio paired per round (the FD-SSM vs SSM goals are issue 8's)."""
    suites = result["suites"]
    micro = _largest(suites.get("micro", {}).get("records", []))
    step = _largest([r for r in suites.get("sampling", {}).get("records", []) if r["bench"] == "langevin_step"])
    kernels = micro + step

    def of(variant):
        recs = [r for r in kernels if r["variant"] == variant and r.get("ratio") is not None]
        return [r["ratio"] for r in recs], ", ".join(f"{r.get('op', r.get('bench'))} {r.get('mode', 'fwd')}: "
                                                      f"{r['ratio']:.2f}" for r in recs)

    copy, copy_txt = of("copy")
    comp, comp_txt = of("compile")
    eager, eager_txt = of("eager")
    graph = [r["ratio"] for r in suites.get("sampling", {}).get("records", [])
             if r["bench"] == "annealed_langevin" and r["variant"] == "fused, CUDA graph"]
    return [
        {"goal": "memory-bound fused kernels ≥ 0.85× a device copy's bandwidth (copy time / fused time)",
         "measured": copy_txt or "–", "verdict": _verdict(copy, lambda v: v >= 0.85), "values": copy},
        {"goal": "memory-bound fused kernels ≥ 1.0× torch.compile of the composite",
         "measured": comp_txt or "–", "verdict": _verdict(comp, lambda v: v >= 1.0), "values": comp},
        {"goal": "memory-bound fused kernels ≥ 2× the eager composite",
         "measured": eager_txt or "–", "verdict": _verdict(eager, lambda v: v >= 2.0), "values": eager},
        {"goal": "CUDA-graph annealed sampler ≥ 2× the eager loop (small score net)",
         "measured": _span(graph), "verdict": _verdict(graph, lambda v: v >= 2.0), "values": graph},
    ]


IN_KERNEL_DRAW = ("perturb", "fd_ssm_vr", "fd_dsm_quotient", "dsm_perturb")  # the fused ops that draw directions themselves


def _goals_issue16(result: dict) -> list[dict]:
    """Issue 16's goals from the paired ratios (floor, sampling, micro suites)."""
    suites = result["suites"]
    floor = [r for r in suites.get("floor", {}).get("records", []) if r["bench"] == "floor"]
    wide = [r["ratio"] for r in floor if r["config"]["model"] == "mlp" and r["config"]["width"] >= 512]
    toy = [r["ratio"] for r in floor if r["config"]["model"] == "mlp" and r["config"]["dim"] == 2]
    ann = [r for r in suites.get("sampling", {}).get("records", []) if r["bench"] == "annealed_langevin"
           and r["variant"] == "fused"]
    plain = [r["ratio"] for r in ann if r.get("setup", "plain") == "plain"]
    extras = [r["ratio"] for r in ann if r.get("setup") == "clamp+norms"]
    copy = [r for r in suites.get("micro", {}).get("records", [])
            if r["variant"] == "copy" and r["op"] in IN_KERNEL_DRAW and r.get("ratio") is not None]
    share = [r["ratio"] for r in copy]
    share_txt = ", ".join(f"{r['op']} {r['mode']} n={r['size']:,}: {r['ratio']:.2f}" for r in copy)
    return [
        {"goal": "fused FD loss step ≤ 1.05× its floor (bare step on the stacked batch), MLPs of width ≥ 512",
         "measured": _span(wide), "verdict": _verdict(wide, lambda v: v <= 1.05), "values": wide},
        {"goal": "fused FD loss step ≤ 1.15× its floor, toy MLP 2→128→128→1",
         "measured": _span(toy), "verdict": _verdict(toy, lambda v: v <= 1.15), "values": toy},
        {"goal": "annealed sampler ≥ 1.0× the bare eager loop, tiny MLP score",
         "measured": _span(plain), "verdict": _verdict(plain, lambda v: v >= 1.0), "values": plain},
        {"goal": "annealed sampler ≥ 1.3× the eager loop with NCSNv2's clamp and norms",
         "measured": _span(extras), "verdict": _verdict(extras, lambda v: v >= 1.3), "values": extras},
        {"goal": "fused kernels drawing directions in-kernel ≥ 0.5× a copy's bandwidth of the same bytes",
         "measured": share_txt or "–", "verdict": _verdict(share, lambda v: v >= 0.5), "values": share},
    ]


# --------------------------------------------------------------------------- markdown


def markdown(result: dict, command: str, plots: list[str]) -> str:
    env, load = result["environment"], result.get("load")
    lines = [f"# fdsm_ext benchmarks: {env['device']}", "",
             f"Generated by `{command}` (preset `{result['preset']}`) on {env['date']}, fdsm_ext commit "
             f"`{env['git_commit']}`. Every measurement, with its per-block samples, is in "
             f"[{result['json_name']}]({result['json_name']}).", ""]
    rows = [["device", env["device_name"]],
            ["threads", f"{env['torch_threads']} torch thread{'s' if env['torch_threads'] != 1 else ''}"
                        f"{' (--threads)' if env.get('threads_option') else ''}, {env['logical_cpus']} logical CPUs"],
            ["versions", f"torch {env['torch']}, triton {env['triton'] or 'not installed'}, python {env['python']}"
                         + (f", CUDA {env['cuda']}" if env.get("cuda") else "")]]
    if env["device"].startswith("cuda"):
        rows.append(["host CPU", env["cpu_name"]])
    if load:
        shared = load["other_processes_cpu_fraction"] > 0.1
        rows.append(["machine load", f"other processes used {100 * load['other_processes_cpu_fraction']:.0f} % of "
                     f"the CPUs during the {load['wall_s']:.0f} s run; load average {load['loadavg_before'][0]} "
                     f"before, {load['loadavg_after'][0]} after"
                     + (" — **measured on a shared machine: absolute times are noisy; compare ratios**"
                        if shared else "")
                     + (". Fewer torch threads than CPUs (`--threads`): when other processes keep every core "
                        "busy, each OpenMP barrier of a multi-threaded op can wait a whole scheduler time slice, "
                        "which swamps what is measured" if shared and env.get("threads_option") else "")])
    lines += _table(["", ""], rows) + [""]
    lines += ["Timing: the methods of one comparison are timed interleaved: after a warm-up, rounds of one "
              "block of calls per method, in alternating order (A, B, then B, A, ...), timed with "
              "`time.perf_counter` (with `torch.cuda.synchronize` around each block on a GPU). Times are the "
              "median and `[20 %, 80 %]` quantiles of the per-block samples. **Ratios are taken per round** "
              "(the two blocks ran a fraction of a second apart, so a drift in the machine's load hits both) "
              "and reported as the median `[20 %, 80 %]` of the per-round ratios; on a shared machine they hold "
              "where the absolute times do not (method: `benchmarks/bench_common.py`). Kernel-level instruction "
              "counts (callgrind), which do not depend on the load at all, are in their own section.", ""]

    lines += ["## Goals (issues 8 and 16)", ""]
    lines += _table(["goal", "measured", "verdict"], [[g["goal"], g["measured"], g["verdict"]] for g in goals(result)])
    lines += [""]
    suites = result["suites"]
    if "floor" in suites:
        lines += bench_floor.markdown(suites["floor"])
    if "e2e" in suites:
        lines += _e2e_md(suites["e2e"])
    if "micro" in suites:
        lines += _micro_md(suites["micro"])
    if "order" in suites:
        lines += _order_md(suites["order"])
    if "sampling" in suites:
        lines += _sampling_md(suites["sampling"])
    if "instructions" in suites:
        lines += callgrind_counts.markdown(suites["instructions"])
    skipped = list(dict.fromkeys(s for suite in suites.values() for s in suite.get("skipped", [])))
    if skipped:
        lines += ["## Not measured", ""] + [f"- {s}" for s in skipped] + [""]
    if plots:
        lines += ["## Plots", "", "Written next to this file by the same command and not committed (every plotted "
                  "number is in the tables above and in the JSON): " + ", ".join(f"`{p}`" for p in plots) + ".", ""]
    return "\n".join(lines)


def _e2e_md(suite: dict) -> list[str]:
    lines = ["## End to end: one optimizer step", "",
             "Forward + backward + Adam step of the model on a fixed batch. `t / t(FD fused)`: this method's step "
             "time over the fused FD step's (above 1: fused FD is faster). Memory: "
             + ("`torch.cuda.max_memory_allocated` during loss + backward, above parameters, gradients and optimizer "
                "state." if any(r["mem_method"] == "cuda_max_allocated" for r in suite["records"]) else
                "bytes autograd saves for the backward (`saved_tensors_hooks`, parameters excluded), the activation "
                "memory that differs between methods.") + " `mem(FD fused) / mem`: below 1, fused FD needs less.",
             ""]
    by_model = defaultdict(list)
    for r in suite["records"]:
        by_model[r["model"]].append(r)
    for model, recs in by_model.items():
        lines += [f"**{model}** ({recs[0]['params']:,} parameters)", ""]
        fd = {r["batch"]: r for r in recs if r["method"] == "fd_fused"}
        rows = []
        for r in recs:
            base = fd.get(r["batch"])
            rows.append([str(r["batch"]), r["label"], fmt_timing(r),
                         fmt_paired(r) if base else "–",
                         fmt_bytes(r["mem_bytes"]),
                         fmt_ratio(base["mem_bytes"] / r["mem_bytes"]) if base and r["mem_bytes"] else "–"])
        lines += _table(["batch", "method", "step", "t / t(FD fused)", "memory", "mem(FD fused) / mem"], rows) + [""]
    return lines


def _micro_md(suite: dict) -> list[str]:
    lines = ["## Micro-benchmarks: fused ops", "",
             "`fused`: the op of `fdsm_ext.ops` (random directions drawn in-kernel); `eager`: its "
             "`fdsm_ext.reference` composite fed pre-drawn directions; `eager+draw`: the composite drawing them "
             "with `torch.randn` each call (what `backend=\"torch\"` does); `compile`: "
             "`torch.compile(eager, dynamic=True)`; `copy`: `Tensor.copy_` of the same number of bytes. GB/s: the "
             "op's compulsory bytes (inputs read once, outputs written once) over the fused time. `eager/fused`, "
             "`compile/fused`: time ratios paired per round (above 1: fused is faster).", ""]
    by = defaultdict(dict)
    for r in suite["records"]:
        by[(r["mode"], r["op"], r["size"])][r["variant"]] = r
    for mode in ("fwd", "fwd+bwd"):
        lines += [f"**{'forward' if mode == 'fwd' else 'forward + backward'}**", ""]
        rows = []
        for (m, op, size), v in by.items():
            if m != mode:
                continue
            any_rec = next(iter(v.values()))
            fused = v.get("fused")
            cell = lambda k: fmt_timing(v[k]) if k in v else "–"  # noqa: E731
            ratio = lambda k: fmt_paired(v.get(k)) if fused else "–"  # noqa: E731
            rows.append([op, f"{size:,} ({any_rec['size_of']})", cell("fused"), cell("eager"), cell("eager+draw"),
                         cell("compile"), cell("copy"),
                         f"{fused['gbps']:.2f}" if fused else "–",
                         f"{v['copy']['gbps']:.2f}" if "copy" in v else "–",
                         ratio("copy"), ratio("eager"), ratio("compile")])
        lines += _table(["op", "elements", "fused", "eager", "eager+draw", "compile", "copy", "fused GB/s",
                         "copy GB/s", "copy/fused (share of copy bandwidth)", "eager/fused", "compile/fused"],
                        rows) + [""]
    return lines


def _order_md(suite: dict) -> list[str]:
    recs = suite["records"]
    if not recs:
        return []
    model = recs[0]["model"]
    orders = sorted({r["order"] for r in recs})
    lines = ["## Order scaling (paper Alg. 1)", "",
             f"Time of the order-T directional derivative of an MLP energy (d={model['dim']}, {model['depth']}x"
             f"{model['width']} softplus), value differentiable w.r.t. the parameters. `T=k / T=1`: time ratio "
             "within a method.", ""]
    by = {(r["method"], r["batch"], r["order"]): r for r in recs}
    keys = sorted(dict.fromkeys((r["batch"], r["method"], r["label"]) for r in recs), key=lambda k: k[0])
    rows = []
    for batch, method, label in keys:
        t1 = by.get((method, batch, 1))
        cells = [fmt_timing(by[(method, batch, T)]) if (method, batch, T) in by else "–" for T in orders]
        ratios = [fmt_paired(by[(method, batch, T)]) if t1 and (method, batch, T) in by else "–"
                  for T in (4, max(orders))]
        rows.append([str(batch), label, *cells, *ratios])
    lines += _table(["batch", "method", *[f"T={T}" for T in orders], "T=4 / T=1", f"T={max(orders)} / T=1"], rows)
    return lines + [""]


def _by_size(records: list[dict]) -> tuple[dict, list[str]]:
    """``{size: {variant: record}}`` and the variants in order of first appearance."""
    by = defaultdict(dict)
    for r in records:
        by[r["size"]][r["variant"]] = r
    return by, list(dict.fromkeys(r["variant"] for r in records))


def _sampling_md(suite: dict) -> list[str]:
    recs = suite["records"]
    if not recs:
        return ["## Sampling", "", "Not measured in this run (see below).", ""]
    lines = ["## Sampling", ""]
    step = [r for r in recs if r["bench"] == "langevin_step"]
    if step:
        by, variants = _by_size(step)
        rows = [[f"{size:,}", *[fmt_timing(v[k]) if k in v else "–" for k in variants],
                 f"{v['fused']['gbps']:.2f}" if "fused" in v else "–",
                 fmt_paired(v.get("eager"))]
                for size, v in by.items()]
        lines += ["**Langevin step** `x + α s + √(2α) z` (bytes: read x and s, write x)", ""]
        lines += _table(["elements", *variants, "fused GB/s", "eager/fused"], rows) + [""]
    full = [r for r in recs if r["bench"] == "langevin_step_full"]
    if full:
        by, variants = _by_size(full)
        rows = [[f"{size:,}", *[fmt_timing(v[k]) if k in v else "–" for k in variants],
                 fmt_paired(v.get("eager"))]
                for size, v in by.items()]
        lines += ["**Langevin step with NCSNv2's extras** (clamp to [-1, 1], per-sample ‖s‖, ‖z‖ and ‖x_new‖)", ""]
        lines += _table(["elements", *variants, "eager/fused"], rows) + [""]
    ann = [r for r in recs if r["bench"] == "annealed_langevin"]
    if ann:
        a = ann[0]
        lines += [f"**Annealed Langevin** (batch {a['batch']}, d={a['dim']}, {a['levels']} levels x "
                  f"{a['steps_each']} steps, score net d→128→d, no denoising step). `plain`: the sampler against "
                  "the bare eager loop; `clamp+norms`: both also clamp to [0, 1] and produce the per-sample ‖s‖, "
                  "‖z‖, ‖x_new‖ NCSNv2 logs (the sampler hands them to a callback). `eager/this`: paired per round, above 1 "
                  "this is faster than the eager loop.", ""]
        lines += _table(["setup", "variant", "time", "Langevin steps/s", "eager/this"],
                        [[r.get("setup", "plain"), r["variant"], fmt_timing(r),
                          f"{r['steps_per_s']:,.0f}" if "steps_per_s" in r else "–", fmt_paired(r)]
                         for r in ann]) + [""]
    return lines


# --------------------------------------------------------------------------- plots


def plots(result: dict, prefix: str) -> list[str]:
    """PNG plots next to the report (small: 80 dpi); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    dev = result["environment"]["device_name"]

    def save(fig, name, title):
        fig.suptitle(f"{title} — {dev}", fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{prefix}_{name}.png", dpi=80)
        plt.close(fig)
        written.append(f"{prefix.rsplit('/', 1)[-1]}_{name}.png")

    micro = result["suites"].get("micro", {}).get("records", [])
    if micro:
        ops = list(dict.fromkeys(r["op"] for r in micro))
        fig, axes = plt.subplots(2, len(ops), figsize=(2.6 * len(ops), 5), squeeze=False)
        for j, op in enumerate(ops):
            for i, mode in enumerate(("fwd", "fwd+bwd")):
                ax = axes[i][j]
                for variant in ("fused", "eager", "eager+draw", "compile", "copy"):
                    pts = sorted((r["size"], r["gbps"]) for r in micro
                                 if r["op"] == op and r["mode"] == mode and r["variant"] == variant)
                    if pts:
                        ax.loglog(*zip(*pts), marker="o", ms=3, label=variant,
                                  ls="--" if variant == "copy" else "-")
                ax.set_title(f"{op} {mode}", fontsize=8)
                ax.tick_params(labelsize=6)
                if j == 0:
                    ax.set_ylabel("GB/s", fontsize=7)
                if i == 1:
                    ax.set_xlabel("elements", fontsize=7)
        axes[0][0].legend(fontsize=6)
        save(fig, "micro", "fused ops: achieved bandwidth")

    e2e = result["suites"].get("e2e", {}).get("records", [])
    if e2e:
        models = list(dict.fromkeys(r["model"] for r in e2e))
        fig, axes = plt.subplots(1, len(models), figsize=(3 * len(models), 3), squeeze=False)
        for ax, model in zip(axes[0], models):
            for label in dict.fromkeys(r["label"] for r in e2e if r["model"] == model):
                pts = sorted((r["batch"], r["median_s"] * 1e3) for r in e2e if r["model"] == model and
                             r["label"] == label)
                ax.loglog(*zip(*pts), marker="o", ms=3, label=label)
            ax.set_title(model, fontsize=7)
            ax.set_xlabel("batch", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[0][0].set_ylabel("step time (ms)", fontsize=7)
        axes[0][0].legend(fontsize=6)
        save(fig, "e2e", "one optimizer step")

    order = result["suites"].get("order", {}).get("records", [])
    if order:
        batches = sorted({r["batch"] for r in order})
        fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches), 3), squeeze=False)
        for ax, B in zip(axes[0], batches):
            for label in dict.fromkeys(r["label"] for r in order):
                pts = sorted((r["order"], r["median_s"] * 1e3) for r in order
                             if r["batch"] == B and r["label"] == label)
                ax.semilogy(*zip(*pts), marker="o", ms=3, label=label)
            ax.set_title(f"batch {B}", fontsize=8)
            ax.set_xlabel("order T", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[0][0].set_ylabel("time (ms)", fontsize=7)
        axes[0][0].legend(fontsize=6)
        save(fig, "order", "order-T directional derivative")

    step = [r for r in result["suites"].get("sampling", {}).get("records", []) if r["bench"] == "langevin_step"]
    if step:
        fig, ax = plt.subplots(figsize=(4, 3))
        for variant in dict.fromkeys(r["variant"] for r in step):
            pts = sorted((r["size"], r["gbps"]) for r in step if r["variant"] == variant)
            ax.loglog(*zip(*pts), marker="o", ms=3, label=variant)
        ax.set_xlabel("elements", fontsize=7)
        ax.set_ylabel("GB/s", fontsize=7)
        ax.legend(fontsize=6)
        save(fig, "sampling", "Langevin step")
    return written
