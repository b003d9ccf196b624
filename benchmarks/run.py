"""Runs every fdsm_ext benchmark and writes benchmarks/results/<device>.md, <device>.json and PNG plots.

    python benchmarks/run.py --device cpu|cuda [--quick] [--only floor,e2e,micro,order,sampling,instructions] [--threads N] [--out DIR]
    python benchmarks/run.py --report-only benchmarks/results/cpu.json   # re-render md + plots, no measuring

Suites (one module each): ``floor`` a fused FD loss step over the bare model step on the stacked
batch, and each loss's per-call overhead (bench_floor.py), ``e2e`` one optimizer step and its memory per score-matching method and
model (bench_e2e.py), ``micro`` every fused op vs its eager composite vs torch.compile (bench_micro.py),
``order`` the order-T directional derivative, batched FD vs nested autograd (bench_order.py),
``sampling`` the Langevin step and annealed sampler, fused vs eager (bench_sampling.py),
``instructions`` instructions per element of the fused CPU kernels vs their eager composites and a
copy, counted by callgrind (callgrind_counts.py; CPU only). Presets and the timing method (interleaved
rounds, ratios paired per round): bench_common.py. ``--quick`` is the same harness on fewer sizes with a shorter
timing budget (minutes on a 2-core CPU); its results go to ``<device>_quick.*`` so they never
overwrite a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import bench_common
import bench_e2e
import bench_floor
import bench_micro
import bench_order
import bench_report
import bench_sampling
import callgrind_counts

SUITES = {"floor": bench_floor, "e2e": bench_e2e, "micro": bench_micro, "order": bench_order, "sampling": bench_sampling,
          "instructions": callgrind_counts}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_all(device: str, mode: str = "full", only=None, out_dir: str = RESULTS, plots: bool = True,
            command: str | None = None, log=print, preset: bench_common.Preset | None = None,
            threads: int | None = None, name: str | None = None) -> dict:
    """Runs the suites, writes ``<out_dir>/<name>.md``, ``.json`` and PNGs (``name`` defaults to
    ``<device>[_<mode>]``), returns the result dict. ``mode`` names a preset of bench_common (``preset``
    replaces it, keeping the name)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    p = preset or bench_common.preset(device, mode)
    if threads is not None:
        torch.set_num_threads(threads)
    env = {**bench_common.environment(dev), "threads_option": threads}
    log(f"fdsm_ext benchmarks on {env['device_name']} ({env['torch_threads']} threads), torch {env['torch']}, "
        f"preset {mode}")
    probe = bench_common.MachineLoad()
    time.sleep(1.0)
    busy = probe.others_fraction()
    if dev.type == "cpu" and busy is not None and busy > 0.25 and torch.get_num_threads() > 1:
        log(f"warning: other processes are using {100 * busy:.0f} % of the CPUs; with {torch.get_num_threads()} "
            "threads each OpenMP barrier may wait a scheduler time slice and swamp the timings: consider --threads 1")
    load = bench_common.MachineLoad()
    t0 = time.perf_counter()
    suites = {}
    command = command or f"python benchmarks/run.py --device {dev.type}" + ("" if mode == "full" else f" --{mode}")
    name = name or dev.type + ("" if mode == "full" else f"_{mode}")
    result = {"preset": mode, "preset_config": _jsonable(p.__dict__), "command": command, "environment": env,
              "json_name": f"{name}.json", "suites": suites}
    # In the order asked for (``only`` may be a list), each suite's results written as soon as it is done,
    # so a run cut short by a time budget (benchmarks/gpu_check.sh) keeps what it measured.
    for key in (list(only) if only else list(SUITES)):
        ts = time.perf_counter()
        suites[key] = SUITES[key].run(p, dev, log)
        suites[key]["seconds"] = round(time.perf_counter() - ts, 1)
        log(f"-- {key} done in {suites[key]['seconds']:.0f} s")
        _write(result, load, t0, out_dir, plots=False, log=lambda *a: None)
    _write(result, load, t0, out_dir, plots, log)
    return result


def _write(result: dict, load, t0: float, out_dir: str, plots: bool, log) -> None:
    result["load"] = load.finish()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["goals"] = bench_report.goals(result)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, result["json_name"]), "w") as fh:
        json.dump(_jsonable(result), fh, indent=1)
        fh.write("\n")
    write_report(result, out_dir, plots, log)


def write_report(result: dict, out_dir: str, plots: bool = True, log=print) -> None:
    """``<name>.md`` and the plots from a result (fresh, or read back from its JSON)."""
    name = result["json_name"].removesuffix(".json")
    written = []
    if plots:
        try:
            written = bench_report.plots(result, os.path.join(out_dir, name))
        except ImportError as exc:
            log(f"plots skipped: {exc} (pip install matplotlib)")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as fh:
        fh.write(bench_report.markdown(result, result["command"], written))
    log(f"wrote {os.path.join(out_dir, name)}.md" + (f" and {len(written)} plots" if written else "")
        + f" ({result['seconds']:.0f} s of measurements)")
    for g in bench_report.goals(result):
        log(f"goal: {g['goal']}: {g['measured']}: {g['verdict']}")


def _jsonable(obj):
    """JSON-ready copy; floats rounded to 5 significant digits (timer resolution, not bias, limits them)."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and a shorter timing budget")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: tiny sizes through every code path (numbers meaningless; the GPU kit's dry run)")
    ap.add_argument("--only", default=None, help=f"comma-separated suites out of {','.join(SUITES)}")
    ap.add_argument("--out", default=RESULTS, help="output folder (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, one per core). On a machine shared with other "
                         "busy processes, 2-thread CPU ops can stall a whole scheduler time slice at each "
                         "OpenMP barrier; 1 thread gives steadier numbers there")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--name", default=None, help="base name of the written files (default: <device>[_quick])")
    ap.add_argument("--report-only", metavar="JSON", default=None,
                    help="measure nothing: rewrite the Markdown and plots beside JSON from its measurements")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(args.report_only) as fh:
            result = json.load(fh)
        if "command" not in result:  # written before the command was recorded
            env = result["environment"]
            result["command"] = (f"python benchmarks/run.py --device {env['device'].split(':')[0]}"
                                 + ("" if result["preset"] == "full" else f" --{result['preset']}")
                                 + (f" --threads {env['threads_option']}" if env.get("threads_option") else ""))
        write_report(result, os.path.dirname(os.path.abspath(args.report_only)), not args.no_plots)
        return
    only = args.only.split(",") if args.only else None
    if only and not set(only) <= set(SUITES):
        ap.error(f"--only: unknown suites {sorted(set(only) - set(SUITES))}")
    run_all(args.device, "smoke" if args.smoke else "quick" if args.quick else "full", only, args.out, not args.no_plots,
            command="python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
            threads=args.threads, name=args.name)


if __name__ == "__main__":
    main()
