"""Instructions per element of the fused CPU kernels against their eager composites and a copy, counted by
``valgrind --tool=callgrind``: counts repeat exactly whatever else the machine runs, where times do not.

    python benchmarks/callgrind_counts.py [--json FILE] [--dim 256] [--sizes 8192,32768] [--ops perturb,fd_ssm_vr]

How: the script re-runs itself under ``valgrind --tool=callgrind --instr-atstart=no`` (Python and torch
start uninstrumented); around each measured call a tiny C helper, compiled at run time from
``<valgrind/callgrind.h>``, issues the client requests START_INSTRUMENTATION + ZERO_STATS before and
DUMP_STATS_AT(label) + STOP_INSTRUMENTATION after, so each dump holds the instructions (``Ir``) of exactly
one call, after two uninstrumented warm-up calls. Each variant is counted at two sizes ``n1 < n2`` and
reported as the slope ``(Ir(n2) - Ir(n1)) / (n2 - n1)`` instructions per element of the op's main tensor:
what the call costs per element once its fixed cost (dispatch, checks, Python) is subtracted. Every
count is taken twice; ``repeat_spread`` is the largest relative difference of the two (Python's own
bookkeeping around the call differs by a few hundred instructions; the kernels' counts do not vary).

The variants and inputs are bench_micro's (``fused``, ``eager`` fed pre-drawn directions, ``eager+draw``
drawing them with torch's RNG each call, ``copy`` of the op's compulsory bytes), plus the Langevin
step of bench_sampling; forward and forward + backward. One torch thread; torch's kernels run at
the ISA level valgrind emulates (AVX2 at most, no AVX-512), which the result records.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_HELPER_C = r"""
#include <valgrind/callgrind.h>
void fdsm_cg_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void fdsm_cg_stop(const char *label) { CALLGRIND_DUMP_STATS_AT(label); CALLGRIND_STOP_INSTRUMENTATION; }
"""


def unavailable() -> str | None:
    """Why the counts cannot be taken here, or None."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (apt-get install valgrind)"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the callgrind client-request helper"
    if not any(os.path.exists(os.path.join(d, "valgrind", "callgrind.h")) for d in ("/usr/include", "/usr/local/include")):
        return "valgrind/callgrind.h is not installed (the valgrind development headers)"
    return None


_TRIGGER = "desc: Trigger: Client Request: "


def parse_dumps(folder: str) -> dict[str, list[int]]:
    """``label -> [Ir of each dump with that label]`` from callgrind's dump files in ``folder``."""
    counts: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "cg.out*")), key=lambda p: int(p.rsplit(".", 1)[-1])
                       if p.rsplit(".", 1)[-1].isdigit() else -1):
        label, total = None, None
        with open(path, errors="replace") as fh:
            for line in fh:
                if line.startswith(_TRIGGER):
                    label = line[len(_TRIGGER):].strip()
                elif line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
        if label is not None and total is not None:
            counts.setdefault(label, []).append(total)
    return counts


# --------------------------------------------------------------------------- the child, under valgrind
def _child(helper: str, dim: int, sizes: list[int], plan_path: str, only: list[str] | None = None) -> None:
    import ctypes

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, HERE)
    import bench_micro
    import bench_sampling
    from fdsm_ext import ops

    lib = ctypes.CDLL(helper)
    lib.fdsm_cg_stop.argtypes = [ctypes.c_char_p]
    plan = []

    def count(label: str, fn) -> None:
        fn()
        fn()  # warm: the allocator's cache and lazy initialisations are not the op's cost
        for rep in range(2):
            lib.fdsm_cg_start()
            fn()
            lib.fdsm_cg_stop(f"{label}#{rep}".encode())

    seed = torch.tensor([20240601, 0], dtype=torch.int64)
    for op, (build, _size_of) in bench_micro.OPS.items():
        if only is not None and op not in only:
            continue
        for n in sizes:
            case = build(n, dim, torch.device("cpu"), False)
            for mode in bench_micro.MODES:
                nbytes = case.fwd_bytes + (case.bwd_bytes if mode == "fwd+bwd" else 0)
                for variant, fn in bench_micro.variants(case, mode, nbytes, {}, torch.device("cpu")).items():
                    label = f"{op}|{mode}|{variant}|{case.elements}"
                    count(label, fn)
                    plan.append(label)
    for n in sizes if only is None or "langevin_step" in only else ():
        B = max(1, n // dim)
        x, s = torch.randn(B, dim), torch.randn(B, dim)
        src = torch.empty(3 * B * dim // 2)
        dst = torch.empty_like(src)
        variants = {"fused": lambda: ops.langevin_step(x, s, bench_sampling.ALPHA, seed),
                    "eager": lambda: bench_sampling.eager_langevin_step(x, s, bench_sampling.ALPHA),
                    "copy": lambda: dst.copy_(src)}
        with torch.no_grad():
            for variant, fn in variants.items():
                label = f"langevin_step|fwd|{variant}|{B * dim}"
                count(label, fn)
                plan.append(label)
    with open(plan_path, "w") as fh:
        json.dump(plan, fh)


# --------------------------------------------------------------------------- the parent
def count_all(dim: int = 256, sizes=(8_192, 32_768), log=print, timeout_s: float = 900, only=None) -> dict:
    """Runs the child under callgrind and returns ``{"records": [...], "skipped": [...], ...}``; ``only``:
    the op names to count (bench_micro's, and ``langevin_step``), default all."""
    why = unavailable()
    if why:
        return {"records": [], "skipped": [f"instructions: {why}"]}
    sizes = sorted(sizes)
    with tempfile.TemporaryDirectory(prefix="fdsm_callgrind_") as tmp:
        helper = os.path.join(tmp, "libfdsm_cg.so")
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-x", "c", "-", "-o", helper], input=_HELPER_C, text=True,
                       check=True)
        plan_path = os.path.join(tmp, "plan.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, os.path.abspath(__file__), "--child", helper, "--dim", str(dim),
               "--sizes", ",".join(map(str, sizes)), "--plan", plan_path] + (["--ops", ",".join(only)] if only else [])
        log(f"instructions: running the counts under callgrind ({len(sizes)} sizes, d={dim}); a few minutes")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(plan_path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"records": [], "skipped": [f"instructions: the callgrind run failed (exit {proc.returncode}): "
                                               + " / ".join(tail)]}
        counts = parse_dumps(tmp)
        valgrind_version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    return {"records": per_element(counts), "skipped": [], "valgrind": valgrind_version, "dim": dim,
            "sizes": sizes}


def per_element(counts: dict[str, list[int]]) -> list[dict]:
    """Records ``{op, mode, variant, ir_per_element, ir: {elements: Ir}, repeat_spread}`` from the dumps
    (labels ``op|mode|variant|elements#repeat``): the slope between the smallest and largest size;
    ``repeat_spread``: the largest relative difference between two counts of one call."""
    by: dict[tuple, dict[int, list[int]]] = {}
    for label, irs in counts.items():
        m = re.fullmatch(r"(.+)\|(.+)\|(.+)\|(\d+)#(\d+)", label)
        if not m:
            continue
        op, mode, variant, elements, _rep = m.groups()
        by.setdefault((op, mode, variant), {}).setdefault(int(elements), []).extend(irs)
    records = []
    for (op, mode, variant), per_size in by.items():
        sizes = sorted(per_size)
        if len(sizes) < 2:
            continue
        lo, hi = sizes[0], sizes[-1]
        ir = {n: min(per_size[n]) for n in sizes}
        records.append({"op": op, "mode": mode, "variant": variant, "ir": ir,
                        "ir_per_element": (ir[hi] - ir[lo]) / (hi - lo),
                        "repeat_spread": max(max(v) / min(v) - 1 for v in per_size.values())})
    return records


def markdown(suite: dict) -> list[str]:
    recs = suite.get("records", [])
    if not recs:
        return []
    lines = ["## Instructions per element (callgrind)", "",
             f"`valgrind --tool=callgrind` ({suite.get('valgrind', 'valgrind')}), one torch thread, d = "
             f"{suite.get('dim')}: instructions of one call at {' and '.join(f'{n:,}' for n in suite.get('sizes', []))}"
             " elements of the op's main tensor, after two warm-up calls; per element = the slope between the two "
             "sizes (the fixed cost per call cancels). Counts do not depend on the machine's load (each was taken "
             "twice; `repeat spread`: the largest relative difference between the two counts of one call). torch's kernels run at the ISA level "
             "valgrind emulates (AVX2 at most). `eager / fused`, `copy / fused`: ratios of instructions per element "
             "(method: `benchmarks/callgrind_counts.py`).", ""]
    by: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        by.setdefault((r["op"], r["mode"]), {})[r["variant"]] = r
    rows = []
    for (op, mode), v in by.items():
        fused = v.get("fused")
        cell = lambda k: f"{v[k]['ir_per_element']:.1f}" if k in v else "–"  # noqa: E731
        ratio = lambda k: (f"{v[k]['ir_per_element'] / fused['ir_per_element']:.2f}×"  # noqa: E731
                           if k in v and fused and fused["ir_per_element"] > 0 else "–")
        rows.append([op, mode, cell("fused"), cell("eager"), cell("eager+draw"), cell("copy"), ratio("eager"),
                     ratio("eager+draw"), ratio("copy"), f"{max(r['repeat_spread'] for r in v.values()):.1e}"])
    header = ["op", "mode", "fused", "eager", "eager+draw", "copy", "eager / fused", "eager+draw / fused",
              "copy / fused", "repeat spread"]
    return lines + ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows] + [""]


def run(p, device, log) -> dict:
    """The ``instructions`` suite of run.py: CPU only, at ``p.callgrind_sizes`` (empty: not in this preset)."""
    if device.type != "cpu":
        return {"records": [], "skipped": ["instructions: callgrind counts CPU instructions; run with --device cpu"]}
    if not p.callgrind_sizes:
        return {"records": [], "skipped": [f"instructions: not in the {p.name} preset"]}
    return count_all(p.micro_dim, p.callgrind_sizes, log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--sizes", default="8192,32768", help="two or more element counts (comma-separated)")
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--ops", default=None, help="only these ops (comma-separated; bench_micro's names, langevin_step)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    only = args.ops.split(",") if args.ops else None
    if args.child:
        _child(args.child, args.dim, sizes, args.plan, only)
        return
    result = count_all(args.dim, sizes, only=only)
    print("\n".join(markdown(result)) or "\n".join(result["skipped"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
