"""The results table of the reference trainers: experiment x loss x metric x time per step, on offline data.

Runs ``python -m fdsm_train <experiment> --loss <list> --out <out>/<experiment> ...`` for toy, dkef, nice
and ebm (the settings are :data:`SPECS`: between ``--smoke`` and the paper's defaults, sized for a
CPU), reads every run's ``metrics.json`` and prints one markdown table per experiment: the
experiment's own metrics (its ``TABLE``), the median seconds per training step with its 20-80 %
quantiles, and the ratio of each median to the gradient-based baseline's (SSM, or DSM for the EBM).

    python benchmarks/results_table.py [--out runs/results] [--experiments toy,dkef,nice,ebm]
                                       [--threads 1] [--reuse] [--smoke]

``--reuse`` does not train: it reads the runs already under ``--out`` (to reprint or reformat a table).
``--smoke`` adds ``--smoke`` to every command (seconds; a check of this script, not results).
Writes ``<out>/results.md`` (what is printed) and ``<out>/results.json`` (rows, commands, machine).
A loss that stops (non-finite loss, error) gets a row saying so, and the losses after it in the list
still run, in a second command.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import torch

from bench_common import MachineLoad, environment

# experiment -> its settings: the command's flags (beyond --out, --threads, --no-progress), the
# losses compared (the FD loss first, then its gradient-based counterparts), the baseline of the
# time ratio, and how the settings differ from the paper's defaults (for the table's heading)
SPECS = {
    "toy": {
        "flags": [],
        "losses": ["fd_ssm", "ssm", "ssm_vr", "exact_sm"],
        "baseline": "ssm",
        "differs": "none: the main job's defaults (mog, 20000 points, 3 x 128 MLP, 2000 steps of batch 256)",
    },
    "dkef": {
        "flags": ["--dataset", "wine", "--epochs", "200"],
        "losses": ["fd_ssm", "ssm", "ssm_vr", "exact_sm"],
        "baseline": "ssm",
        "differs": "200 epochs instead of 500 (200 steps: 145 training rows, batch 100); the offline wine "
                   "table with its preset batch 100 and M = 100 instead of the UCI tables' 200 and 200",
    },
    "nice": {
        "flags": [],
        "losses": ["fd_ssm", "ssm", "ssm_vr"],
        "baseline": "ssm",
        "differs": "the offline digits preset (8x8, width 256 instead of MNIST's 1000; 100 epochs = 1100 "
                   "steps); exact_sm left out (64 backward passes per step)",
    },
    "ebm": {
        "flags": ["--steps", "1000"],
        "losses": ["fd_dsm", "dsm"],
        "baseline": "dsm",
        "differs": "1000 steps instead of the digits preset's 4000 (the paper's 300K on MNIST); "
                   "the digits preset's Adam 5e-4",
    },
}


def fmt(value) -> str:
    """A metric cell: 4 significant digits, '-' when missing (null: NaN or inf in metrics.json)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def collect(exp_dir: str, losses: list[str]) -> dict[str, dict]:
    """``{loss: metrics}`` from ``<exp_dir>/<dataset or density>/<loss>/metrics.json`` (losses with a file)."""
    found = {}
    for loss in losses:
        paths = sorted(glob.glob(os.path.join(exp_dir, "*", loss, "metrics.json")))
        if paths:
            with open(paths[0]) as fh:
                found[loss] = json.load(fh)
    return found


def table_rows(metrics_by_loss: dict[str, dict], losses: list[str], baseline: str, failures: dict[str, str],
               table: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one experiment's table (pure: the test feeds it made-up metrics)."""
    names = [m for m in table if m != "seconds_per_step"]
    header = ["loss", "steps", *names, "median s/step", "q20-q80", f"vs {baseline}"]
    base = (metrics_by_loss.get(baseline) or {}).get("seconds_per_step")
    rows = []
    for loss in losses:
        m = metrics_by_loss.get(loss)
        if m is None:
            why = failures.get(loss, "not run")
            rows.append([loss, "-", *["-"] * len(names), f"stopped: {why}", "-", "-"])
            continue
        med, q20, q80 = m.get("seconds_per_step"), m.get("seconds_per_step_q20"), m.get("seconds_per_step_q80")
        spread = f"{q20:.3g}-{q80:.3g}" if q20 is not None and q80 is not None else "-"
        ratio = f"{med / base:.2f}x" if med is not None and base else "-"
        rows.append([loss, fmt(m.get("steps")), *[fmt(m.get(n)) for n in names], fmt(med), spread, ratio])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_experiment(exp: str, spec: dict, out: str, threads: int, smoke: bool, log, shown_out: str = "") -> dict:
    """Train every loss of ``spec`` (one command; after a failure, one more for the losses left).

    ``shown_out``: ``--out`` as the user wrote it, for the commands recorded (``out`` is absolute).
    """
    exp_dir = os.path.join(out, exp)
    losses, failures, commands = list(spec["losses"]), {}, []
    remaining = list(losses)
    load = MachineLoad()
    t0 = time.perf_counter()
    while remaining:
        # --smoke alone: the spec's flags would override the smoke settings
        flags = [*(["--smoke"] if smoke else spec["flags"]), "--loss", ",".join(remaining),
                 "--threads", str(threads), "--no-progress"]
        shown = "fdsm-train " + shlex.join([exp, *flags, "--out", os.path.join(shown_out or out, exp)])
        log(f"$ {shown}")
        c0 = time.perf_counter()
        # cwd: `python -m` puts the cwd first on sys.path; the repository root's unbuilt fdsm_ext/
        # sources would shadow the installed package there
        proc = subprocess.run([sys.executable, "-m", "fdsm_train", exp, *flags, "--out", os.path.abspath(exp_dir)],
                              cwd=out, capture_output=True, text=True)
        commands.append({"command": shown, "returncode": proc.returncode,
                         "wall_s": round(time.perf_counter() - c0, 1)})
        done = collect(exp_dir, remaining)
        if proc.returncode == 0 and len(done) == len(remaining):
            log(proc.stdout.strip().split("\n\n")[-1])
            break
        failed = next((loss for loss in remaining if loss not in done), None)
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        log(f"{exp}: {failed} stopped (exit {proc.returncode}): {last}")
        if failed is None:
            break
        failures[failed] = f"exit {proc.returncode}: {last}"
        remaining = remaining[remaining.index(failed) + 1:]
    return {"commands": commands, "failures": failures, "wall_s": round(time.perf_counter() - t0, 1),
            "load": load.finish()}


def render(results: dict, env: dict) -> str:
    """The markdown of every experiment's table, with its commands, settings and machine load."""
    from fdsm_train import experiments

    parts = [f"{env['cpu_name']} ({env['logical_cpus']} logical CPUs), torch {env['torch']}, fdsm_ext "
             f"{env['fdsm_ext']}, {env['threads']} intra-op thread(s), git {env.get('git_commit')}"]
    run = env.get("run") or {}
    if run:
        parts[0] += (f"; {run['wall_s']:.0f} s in all, load average {run['loadavg_before'][0]:.1f} -> "
                     f"{run['loadavg_after'][0]:.1f}, other processes used "
                     f"{100 * run['other_processes_cpu_fraction']:.0f}% of the CPUs")
    for exp, res in results.items():
        spec = SPECS[exp]
        header, rows = table_rows(res["metrics"], spec["losses"], spec["baseline"], res.get("failures", {}),
                                  experiments.load(exp).TABLE)
        load = res.get("load") or {}
        cmds = "\n".join(c["command"] for c in res.get("commands", [])) or "(reused runs)"
        others = load.get("other_processes_cpu_fraction")
        before, after = load.get("loadavg_before"), load.get("loadavg_after")
        timing = [f"{res['wall_s']:.0f} s wall"] if res.get("wall_s") is not None else []
        if before and after:
            timing.append(f"load average {before[0]:.1f} -> {after[0]:.1f}")
        if others is not None:
            timing.append(f"other processes used {100 * others:.0f}% of the CPUs")
        parts.append(f"### {exp}\n\nSettings that differ from the paper's defaults: {spec['differs']}.\n\n"
                     f"```bash\n{cmds}\n```\n\n{', '.join(timing)}\n\n{markdown(header, rows)}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "results"), help="where the runs and tables go")
    p.add_argument("--experiments", default=",".join(SPECS), help="comma list of " + ", ".join(SPECS))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each run")
    p.add_argument("--reuse", action="store_true", help="do not train: tabulate the runs already under --out")
    p.add_argument("--smoke", action="store_true", help="tiny runs (--smoke), to check this script")
    args = p.parse_args(argv)
    names = args.experiments.split(",")
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        p.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    out = os.path.abspath(args.out)
    json_path = os.path.join(out, "results.json")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.reuse:
        if not os.path.isfile(json_path):
            p.error(f"--reuse: no {json_path}")
        with open(json_path) as fh:
            saved = json.load(fh)
        env, results = saved["env"], {exp: saved["experiments"].get(exp, {}) for exp in names}
    else:
        taken = [exp for exp in names if os.path.exists(os.path.join(out, exp))]
        if taken:
            p.error(f"{out} already holds runs of {', '.join(taken)}; choose another --out (or --reuse)")
        os.makedirs(out, exist_ok=True)
        torch.set_num_threads(max(args.threads, 1))
        env = environment(torch.device("cpu"))
        env["threads"] = args.threads
        total = MachineLoad()
        results = {exp: run_experiment(exp, SPECS[exp], out, args.threads, args.smoke, log, args.out)
                   for exp in names}
        env["run"] = total.finish()
    for exp, res in results.items():
        res["metrics"] = collect(os.path.join(out, exp), SPECS[exp]["losses"])
    text = render(results, env)
    print(text)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    if not args.reuse:
        slim = {exp: {**{k: v for k, v in res.items() if k != "metrics"},
                      "rows": {loss: {k: v for k, v in m.items() if k not in ("config", "loss_curve")}
                               for loss, m in res["metrics"].items()}} for exp, res in results.items()}
        with open(json_path, "w") as fh:
            json.dump({"env": env, "specs": SPECS, "experiments": slim}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
