"""The Python-side cost of a loss call and of a sampler step (issue 16), before and after a change.

Two measures:

* ``ops``: aten (and fdsm_ext) ops dispatched by one call, counted with a ``TorchDispatchMode``; a
  number that does not depend on the machine's load. Per loss: the forward alone and forward +
  backward, on the one-parameter model of ``bench_floor.py`` (``f(y) = w * sum(y)``, batch 8, d = 2);
  per sampler: one ``langevin_dynamics`` run of 100 steps and one ``pc_sampler`` run of 4 levels of 4
  corrector steps and a predictor (batch 8, d = 2, score ``-y``).
* ``time`` (with ``--baseline REV``): the same calls of fdsm_ext's pure-Python layer as it is at git
  revision ``REV`` and as it is in the working tree, timed in one process by
  ``bench_common.compare`` (alternating blocks, A B then B A) and reported as the median and 20 / 80 %
  quantiles of the per-round ratio ``now / baseline``, and of the per-round difference in µs (for a
  loss also each version's overhead over bench_floor's bare step, timed in the same rounds); by
  default on this thread's CPU clock (``--clock thread``: the time other jobs of a shared machine
  hold the core is left out; ``--clock wall`` times as the benchmarks do). The
  baseline's Python modules (``--modules``: the loss/sampler layer) are loaded from ``git show
  REV:fdsm_ext/<module>.py`` as a shadow package sharing this tree's compiled ops (``ops``, ``_ext``,
  ``reference`` and ``triton`` are not shadowed, so only a revision whose ops layer matches works).

* ``instructions`` (with ``--instructions``): the instructions (``Ir``) of one loss step and of its bare
  step, counted by ``valgrind --tool=callgrind`` as ``callgrind_counts.py`` counts them (the script
  re-runs itself under callgrind, instrumenting only the measured calls, after two warm-up calls): the
  per-call overhead in a unit that does not depend on the machine's load, for this tree and, with
  ``--baseline``, the baseline's layer.

Usage (one torch thread)::

    python benchmarks/profile_overhead.py                      # op counts of this tree
    python benchmarks/profile_overhead.py --baseline main      # op counts of both, and the paired timing
    python benchmarks/profile_overhead.py --instructions [--baseline main]   # instruction counts
"""

from __future__ import annotations

import argparse
import collections
import importlib
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import bench_common  # noqa: E402
import fdsm_ext  # noqa: E402
from bench_common import Preset, compare, paired_difference, paired_ratio  # noqa: E402

SHADOWED = ("_checks", "numerics", "losses", "sampling", "pc_sampling")
SHARED = ("_ext", "ops", "reference", "triton")


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def shadow_package(rev: str, modules=SHADOWED) -> types.SimpleNamespace:
    """fdsm_ext's ``modules`` as of git revision ``rev``, importable side by side with this tree's."""
    tmp = Path(tempfile.mkdtemp(prefix="fdsm_base_"))
    for name in modules:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:fdsm_ext/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        (tmp / f"{name}.py").write_text(text)
    pkg = types.ModuleType("fdsm_base")
    pkg.__path__ = [str(tmp)]
    sys.modules["fdsm_base"] = pkg
    for name in SHARED:
        real = importlib.import_module(f"fdsm_ext.{name}")
        sys.modules[f"fdsm_base.{name}"] = real
        setattr(pkg, name, real)
    return types.SimpleNamespace(**{m: importlib.import_module(f"fdsm_base.{m}") for m in modules})


def calls(api) -> dict:
    """name -> (fresh-state factory returning a no-argument step); ``api``: an object with the losses
    and samplers as attributes (fdsm_ext's modules, or a shadow package's)."""
    losses, sampling = api.losses, api.sampling

    def one_parameter(kind):
        w = torch.nn.Parameter(torch.ones(()))
        x = torch.randn(8, 2)
        f = (lambda y: w * y.sum(-1)) if kind == "energy" else (lambda y: w * y)
        return w, f, x

    def loss_step(call, kind):
        def make():
            w, f, x = one_parameter(kind)

            def step():
                w.grad = None
                call(f, x).backward()
            return step
        return make

    def sampler(steps, **kw):
        def make():
            x = torch.rand(8, 2)
            return lambda: sampling.langevin_dynamics(lambda y: -y, x, steps, 1e-3, **kw)
        return make

    def pc():
        def make():
            x = torch.rand(8, 2)
            return lambda: api.pc_sampling.pc_sampler(lambda y, sigma: -y, x, [1.0, 0.5, 0.2, 0.1], n_corrector=4)
        return make

    return {
        "fd_ssm": loss_step(lambda f, x: losses.fd_ssm_loss(f, x, 0.1), "energy"),
        "fd_ssm_vr": loss_step(lambda f, x: losses.fd_ssm_vr_loss(f, x, 0.1), "score"),
        "fd_dsm": loss_step(lambda f, x: losses.fd_dsm_loss(f, x, 0.1, 0.1), "energy"),
        "langevin x100": sampler(100),
        "langevin x100 clamp+cb": sampler(100, clamp=(0.0, 1.0), callback=lambda info: None),
        "pc_sampler 4 levels x 5": pc(),
    }


def annealed(api, clamp: bool):
    """bench_sampling's annealed run (batch 256, d = 64, 10 levels x 10 steps, MLP d -> 128 -> d score),
    plain or with NCSNv2's clamp and a callback receiving the norms, and the matching eager loop."""
    from bench_sampling import eager_annealed_langevin, eager_annealed_langevin_full
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Softplus(), torch.nn.Linear(128, 64))

    def score(x, sigma):
        return net(x) / sigma[:, None]

    args = (score, torch.rand(256, 64), torch.logspace(0, -2, 10), 10, 1e-5)
    extra = {"clamp": (0.0, 1.0), "callback": lambda info: None} if clamp else {}
    eager = eager_annealed_langevin_full if clamp else eager_annealed_langevin
    return (lambda: api.sampling.annealed_langevin(*args, denoise=False, cuda_graph=False, **extra),
            lambda: eager(*args))


def floor_step(name: str):
    """bench_floor's bare step for the loss ``name`` on the one-parameter model: ``f(stacked).sum()``
    and its backward on the stacked batch of the same rows, or None for a sampler."""
    rows = {"fd_ssm": 3, "fd_ssm_vr": 2, "fd_dsm": 2}.get(name)
    if rows is None:
        return None
    w = torch.nn.Parameter(torch.ones(()))
    stacked = torch.cat([torch.randn(8, 2)] * rows)
    f = (lambda y: w * y) if name == "fd_ssm_vr" else (lambda y: w * y.sum(-1))

    def step():
        w.grad = None
        f(stacked).sum().backward()
    return step


def op_counts(api) -> dict:
    out = {}
    for name, make in calls(api).items():
        step = make()
        step()
        with OpCount() as spy:
            step()
        out[name] = spy.counts
    return out


LOSSES = ("fd_ssm", "fd_ssm_vr", "fd_dsm")


def _instruction_child(helper: str, baseline: str | None) -> None:
    """Under callgrind: dumps ``api|call#rep`` for each loss step and ``floor|call#rep`` for its bare step."""
    import ctypes

    lib = ctypes.CDLL(helper)
    lib.fdsm_cg_stop.argtypes = [ctypes.c_char_p]

    def count(label: str, fn) -> None:
        fn()
        fn()  # warm: lazy initialisations and the allocator's cache are not the call's cost
        for rep in range(3):
            lib.fdsm_cg_start()
            fn()
            lib.fdsm_cg_stop(f"{label}#{rep}".encode())

    apis = {"now": types.SimpleNamespace(losses=fdsm_ext.losses, sampling=fdsm_ext.sampling,
                                         pc_sampling=fdsm_ext.pc_sampling)}
    if baseline:
        apis["baseline"] = shadow_package(baseline)
    for name in LOSSES:
        count(f"floor|{name}", floor_step(name))
        for key, api in apis.items():
            count(f"{key}|{name}", calls(api)[name]())


def instructions(baseline: str | None) -> None:
    """Runs :func:`_instruction_child` under callgrind and prints the counts (minimum of 3 repeats)."""
    import os

    import callgrind_counts as cg

    why = cg.unavailable()
    if why:
        raise SystemExit(f"instructions: {why}")
    with tempfile.TemporaryDirectory(prefix="fdsm_overhead_") as tmp:
        helper = os.path.join(tmp, "libfdsm_cg.so")
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-x", "c", "-", "-o", helper], input=cg._HELPER_C,
                       text=True, check=True)
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, os.path.abspath(__file__), "--instruction-child", helper]
        if baseline:
            cmd += ["--baseline", baseline]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit("the callgrind run failed: " + (proc.stderr or proc.stdout)[-2000:])
        counts = cg.parse_dumps(tmp)
    ir = {label.split("#")[0]: min(v) for label, v in counts.items()}
    print("instructions (callgrind, minimum of 3 calls after 2 warm-up calls): loss step, bare step, "
          "overhead = loss step - bare step")
    for name in LOSSES:
        floor = ir[f"floor|{name}"]
        cells = [f"{key} {ir[f'{key}|{name}']:,} (+{ir[f'{key}|{name}'] - floor:,})"
                 for key in ("baseline", "now") if f"{key}|{name}" in ir]
        print(f"  {name:10s} bare {floor:,}   " + "   ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", help="git revision whose Python layer to compare against")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block-s", type=float, default=0.02)
    ap.add_argument("--only", nargs="*", help="names of the calls to time (default: all)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="thread",
                    help="thread (default): this thread's CPU time, which leaves out the time other jobs of a "
                         "shared machine hold the core; wall: time.perf_counter, as the benchmarks time")
    ap.add_argument("-v", action="store_true", help="print the ops of each call")
    ap.add_argument("--instructions", action="store_true",
                    help="count the instructions of each loss step and its bare step under callgrind")
    ap.add_argument("--instruction-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.instruction_child:
        _instruction_child(args.instruction_child, args.baseline)
        return
    if args.instructions:
        instructions(args.baseline)
        return
    now = types.SimpleNamespace(losses=fdsm_ext.losses, sampling=fdsm_ext.sampling, pc_sampling=fdsm_ext.pc_sampling)
    apis = {"now": now}
    if args.baseline:
        apis["baseline"] = shadow_package(args.baseline)
    counts = {k: op_counts(api) for k, api in apis.items()}
    print("ops per call (" + " -> ".join(apis) + ")")
    for name in counts["now"]:
        print(f"  {name:24s} " + " -> ".join(str(sum(c[name].values())) for c in counts.values()))
        if args.v:
            for k, c in counts.items():
                print(f"    {k}: {dict(c[name])}")
    if not args.baseline:
        return
    if args.clock == "thread":  # bench_common's timer reads time.perf_counter: give it the thread's CPU clock
        bench_common.time = types.SimpleNamespace(perf_counter=time.thread_time)
    p = Preset("profile", warmup_s=0.2, block_s=args.block_s)
    cpu = torch.device("cpu")
    print(f"time ({args.clock} clock), {args.rounds} alternating rounds: now/baseline median [q20, q80]; "
          "now - baseline per call")
    base_calls, now_calls = calls(apis["baseline"]), calls(now)
    for name in now_calls:
        if args.only and name not in args.only:
            continue
        fns = {"baseline": base_calls[name](), "now": now_calls[name]()}
        floor = floor_step(name)
        if floor is not None:
            fns["floor"] = floor
        t = compare(fns, cpu, p, rounds=args.rounds)
        r, d = paired_ratio(t["now"], t["baseline"]), paired_difference(t["now"], t["baseline"])
        line = (f"  {name:24s} {t['baseline'].median_s * 1e6:9.1f} µs -> {t['now'].median_s * 1e6:9.1f} µs   "
                f"ratio {r['ratio']:.3f} [{r['ratio_q20']:.3f}, {r['ratio_q80']:.3f}]   "
                f"diff {d['diff_s'] * 1e6:+.1f} [{d['diff_q20_s'] * 1e6:+.1f}, {d['diff_q80_s'] * 1e6:+.1f}] µs")
        if floor is not None:  # bench_floor's per-call overhead: loss step - bare step, per round
            o0, o1 = paired_difference(t["baseline"], t["floor"]), paired_difference(t["now"], t["floor"])
            line += (f"   over the bare step ({t['floor'].median_s * 1e6:.1f} µs): {o0['diff_s'] * 1e6:.1f} "
                     f"[{o0['diff_q20_s'] * 1e6:.1f}, {o0['diff_q80_s'] * 1e6:.1f}] -> {o1['diff_s'] * 1e6:.1f} "
                     f"[{o1['diff_q20_s'] * 1e6:.1f}, {o1['diff_q80_s'] * 1e6:.1f}] µs")
        print(line)
    for clamp in (False, True):
        name = "annealed " + ("clamp+norms" if clamp else "plain")
        if args.only and name not in args.only:
            continue
        (base, eager), (cur, _) = annealed(apis["baseline"], clamp), annealed(now, clamp)
        with torch.no_grad():
            t = compare({"baseline": base, "now": cur, "eager": eager}, cpu, p, rounds=args.rounds)
        r = paired_ratio(t["now"], t["baseline"])
        e0, e1 = paired_ratio(t["eager"], t["baseline"]), paired_ratio(t["eager"], t["now"])
        print(f"  {name:24s} now/baseline {r['ratio']:.3f} [{r['ratio_q20']:.3f}, {r['ratio_q80']:.3f}]   eager loop / "
              f"sampler: baseline {e0['ratio']:.3f} [{e0['ratio_q20']:.3f}, {e0['ratio_q80']:.3f}], now "
              f"{e1['ratio']:.3f} [{e1['ratio_q20']:.3f}, {e1['ratio_q80']:.3f}]")


if __name__ == "__main__":
    main()
