"""What every benchmark suite of ``run.py`` shares: the presets, the timer, the environment record.

Timing method (one place, so every number in benchmarks/results/ means the same thing): every
comparison is timed by :func:`compare`, which interleaves the methods it compares. Each callable is
warmed up (at least 2 calls and ``warmup_s`` seconds: torch.compile, the allocator and the caches
settle); its last warm-up call calibrates ``inner``, the number of calls per block so that a block
lasts about ``block_s``. Then ``rounds`` rounds are timed; each round times one block of every
method, in the given order in even rounds and in the reverse order in odd ones (A, B, then B, A,
...), with ``torch.cuda.synchronize()`` around each block on a GPU. A block gives one sample, its time
divided by ``inner``. A time is reported as the median and the 20 % / 80 % quantiles of its samples;
a ratio of two methods is taken **per round** (both blocks ran within one round, a fraction of a
second apart, so a drift in the machine's load hits both) and reported as the median of the per-round
ratios with their 20 % / 80 % quantiles (:func:`paired_ratio`). On a shared machine the absolute times
swing with the other jobs; the paired ratios hold (issue 16: two block-after-block runs of one
comparison gave 2.1x and 0.6x). Blocks rather than single calls, because a single sub-millisecond
call is dominated by timer and launch jitter; ``max_s`` caps the time spent on slow configurations so
that the full CPU run fits its budget. Instruction counts, which do not depend on the load at all,
come from benchmarks/callgrind_counts.py.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import torch


class Skip(Exception):
    """A benchmark that cannot run here; the message says why and is printed and recorded."""


@dataclass(frozen=True)
class Preset:
    """Sizes and timing budget of one run (``full``, ``quick`` or ``smoke``) on one device type."""

    name: str
    # timer
    warmup_s: float = 0.2
    block_s: float = 0.05
    blocks: int = 10
    max_s: float = 3.0  # per method of a comparison, warm-up excluded; at least 3 rounds are always timed
    # floor (bench_floor.py): models of the "loss step / bare floor step" table, rounds of each comparison
    floor_models: tuple[dict, ...] = field(default_factory=lambda: _FLOOR_MODELS)
    pairs: int = 30
    # instructions (CPU only): element counts of the callgrind slope (callgrind_counts.py); () skips the suite
    callgrind_sizes: tuple[int, ...] = (8_192, 32_768)
    # micro: element counts of each op's main tensor, feature dimension, torch.compile column
    micro_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000, 10_000_000)
    micro_dim: int = 256
    compile: bool = True
    compile_modes: tuple[str, ...] = ("fwd", "fwd+bwd")  # micro modes that get the torch.compile column
    # end to end: model configurations per family (a configuration's "batches" replaces e2e_batches)
    e2e_configs: dict = field(default_factory=dict)
    e2e_batches: tuple[int, ...] = (64, 256, 1024)
    exact_sm_max_dim: int = 64
    # order scaling
    orders: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    order_batches: tuple[int, ...] = (16, 1024)
    order_model: dict = field(default_factory=lambda: {"dim": 64, "width": 128, "depth": 3})
    # sampling
    sampling_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000, 10_000_000)
    annealed: dict = field(default_factory=lambda: {"batch": 256, "dim": 64, "levels": 10, "steps_each": 10})


# Issue 16's table: softplus MLPs d -> w -> w -> 1 at their batch, and NCSNv2's tiny conv net.
_FLOOR_MODELS = (
    {"model": "mlp", "dim": 2, "width": 128, "batch": 256},
    {"model": "mlp", "dim": 784, "width": 512, "batch": 128},
    {"model": "mlp", "dim": 3072, "width": 1024, "batch": 128},
    {"model": "ncsn_tiny", "size": 16, "batch": 32},  # a 128-image step is ~1 s on one CPU thread
)

# Model configurations per family of bench_e2e.FAMILIES. The MLP of d = 784 and width 1000 stands in
# for NICE's size (~4M weights applied to every row) until NICE itself can be measured. DKEF, NICE
# and NCSN come from fdsm_train and are skipped (with the reason) while it is not installed; on a CPU
# they get their papers' batch (DKEF) or one small batch, since a NICE step is seconds there.
_MLP_FULL = [{"dim": d, "width": 128, "depth": 3} for d in (2, 64, 784)] + [
    {"dim": 784, "width": 1000, "depth": 4}]
_MODELS_CPU = {"dkef": [{"dim": 11, "inducing": 200, "batches": (200,)}], "nice": [{"dim": 784, "batches": (64,)}],
               "ncsn": [{"shape": (3, 32, 32), "batches": (16,)}]}
_MODELS_FULL = {"mlp": _MLP_FULL, **_MODELS_CPU}
_MODELS_QUICK = {"mlp": [{"dim": d, "width": 128, "depth": 3} for d in (2, 64, 784)]
                 + [{"dim": 784, "width": 1000, "depth": 4, "batches": (64,)}],
                 **_MODELS_CPU, "nice": [{"dim": 784, "batches": (16,)}]}
_MODELS_CUDA = {"mlp": _MLP_FULL, "dkef": [{"dim": 11, "inducing": 200, "batches": (200, 1000)}],
                "nice": [{"dim": 784, "batches": (64, 256)}], "ncsn": [{"shape": (3, 32, 32), "batches": (32, 128)}]}

PRESETS = {
    # Sized for a shared 2-core machine (issue 16: one torch thread, other jobs running): the CPU's
    # compile column is the forward's only, and the e2e sweep stops at batch 256.
    ("cpu", "full"): Preset("full", max_s=1.5, e2e_configs=_MODELS_FULL, e2e_batches=(64, 256),
                            micro_sizes=(10_000, 1_000_000, 10_000_000), sampling_sizes=(10_000, 1_000_000, 10_000_000),
                            compile_modes=("fwd",)),
    ("cpu", "quick"): Preset(
        "quick", warmup_s=0.05, block_s=0.02, blocks=5, max_s=0.5,
        micro_sizes=(10_000, 1_000_000), e2e_configs=_MODELS_QUICK, exact_sm_max_dim=16,
        e2e_batches=(64, 256), orders=(1, 2, 4, 6), order_batches=(16, 256), sampling_sizes=(10_000, 1_000_000),
        annealed={"batch": 64, "dim": 64, "levels": 5, "steps_each": 5}, pairs=10,
    ),
    ("cuda", "full"): Preset(
        "full", warmup_s=0.5, blocks=20, micro_sizes=(10_000, 100_000, 1_000_000, 10_000_000, 100_000_000),
        e2e_configs=_MODELS_CUDA, e2e_batches=(64, 256, 1024, 4096),
        sampling_sizes=(10_000, 100_000, 1_000_000, 10_000_000, 100_000_000),
    ),
    # The GPU kit's preset (benchmarks/gpu_check.sh, about 2 minutes on an H200): memory-bound kernels at a
    # launch-bound and a bandwidth-bound size, torch.compile of the forwards only (each compilation costs
    # seconds), FD-SSM vs SSM on NICE and on NCSNv2's CIFAR-10 network, the CUDA-graph sampler.
    ("cuda", "quick"): Preset(
        "quick", warmup_s=0.1, block_s=0.02, blocks=7, max_s=0.5, micro_sizes=(1_000_000, 64_000_000),
        compile_modes=("fwd",), e2e_configs={"nice": [{"dim": 784, "batches": (256,)}],
                                             "ncsn": [{"shape": (3, 32, 32), "preset": "cifar10", "batches": (32,)}]},
        orders=(1, 2, 4, 6), order_batches=(16, 1024), sampling_sizes=(1_000_000, 64_000_000), pairs=10,
        floor_models=(_FLOOR_MODELS[1], {"model": "ncsn_tiny", "size": 32, "batch": 128}),
        annealed={"batch": 256, "dim": 64, "levels": 10, "steps_each": 10},
    ),
}
# A seconds-long configuration that goes through every code path (tests/test_benchmarks.py).
SMOKE = Preset(
    "smoke", warmup_s=0.0, block_s=0.0, blocks=3, max_s=0.1, micro_sizes=(2048,), micro_dim=32, compile=False,
    callgrind_sizes=(), pairs=3, floor_models=({"model": "mlp", "dim": 2, "width": 8, "batch": 4},),
    e2e_configs={"mlp": [{"dim": 2, "width": 8, "depth": 1}]}, e2e_batches=(8,), orders=(1, 2),
    order_batches=(4,), order_model={"dim": 4, "width": 8, "depth": 1}, sampling_sizes=(2048,),
    annealed={"batch": 4, "dim": 4, "levels": 2, "steps_each": 2},
)


def preset(device: str, mode: str) -> Preset:
    if mode == "smoke":
        return SMOKE
    return PRESETS[(torch.device(device).type, mode)]


# --------------------------------------------------------------------------- timer
@dataclass
class Timing:
    """Per-call time of one method of a comparison; ``samples_s[k]`` is its block in round ``k``, so
    the samples of two methods of the same :func:`compare` pair up by index."""

    median_s: float
    q20_s: float
    q80_s: float
    inner: int
    samples_s: list[float]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """Median and 20 % / 80 % quantiles (linear interpolation between order statistics)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=5, method="inclusive")
    return statistics.median(values), q[0], q[3]


def _block(fn, inner: int, device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / inner


def compare(fns: dict, device: torch.device, p: Preset, rounds: int | None = None) -> dict[str, Timing]:
    """Times the callables of ``fns`` (name -> no-argument callable) interleaved, one block of each per
    round, the order alternating between rounds (module docstring: the method). ``rounds`` defaults to
    ``p.blocks``; fewer when the slowest method would exceed ``p.max_s``, never fewer than 3.
    Ratios between two of the returned timings: :func:`paired_ratio`."""
    names = list(fns)
    inner, one = {}, {}
    for name in names:
        t0, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - t0 < p.warmup_s:
            one[name] = max(_block(fns[name], 1, device), 1e-7)  # the last warm-up call calibrates
            calls += 1
        inner[name] = max(1, min(10_000, round(p.block_s / one[name])))
    wanted = rounds or p.blocks
    slowest = max(inner[n] * one[n] for n in names)
    n_rounds = max(3, min(wanted, int(p.max_s / slowest))) if rounds is None else wanted
    samples = {n: [] for n in names}
    for r in range(n_rounds):
        for name in (names if r % 2 == 0 else reversed(names)):
            samples[name].append(_block(fns[name], inner[name], device))
    return {n: Timing(*quantiles(samples[n]), inner[n], samples[n]) for n in names}


def measure(fn, device: torch.device, p: Preset) -> Timing:
    """One callable alone (nothing to pair with): :func:`compare` of one method."""
    return compare({"fn": fn}, device, p)["fn"]


def paired_ratio(num: Timing | dict, den: Timing | dict) -> dict:
    """``num / den`` per round of the same :func:`compare` (records or Timings), as
    ``{"ratio", "ratio_q20", "ratio_q80", "pairs"}``: median and 20/80 % quantiles of the ratios."""
    a = num["samples_s"] if isinstance(num, dict) else num.samples_s
    b = den["samples_s"] if isinstance(den, dict) else den.samples_s
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio: {len(a)} and {len(b)} samples do not pair up (not one compare() call?)")
    med, lo, hi = quantiles([x / y for x, y in zip(a, b)])
    return {"ratio": med, "ratio_q20": lo, "ratio_q80": hi, "pairs": len(a)}


def paired_difference(num: Timing | dict, den: Timing | dict) -> dict:
    """``num - den`` in seconds per round, as ``{"diff_s", "diff_q20_s", "diff_q80_s", "pairs"}``."""
    a = num["samples_s"] if isinstance(num, dict) else num.samples_s
    b = den["samples_s"] if isinstance(den, dict) else den.samples_s
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} samples do not pair up")
    med, lo, hi = quantiles([x - y for x, y in zip(a, b)])
    return {"diff_s": med, "diff_q20_s": lo, "diff_q80_s": hi, "pairs": len(a)}


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


# --------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Everything a reader needs to reproduce or discount a number."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fdsm_ext

    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_name": device_name(torch.device("cpu")),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fdsm_ext": fdsm_ext.__version__,
        "fdsm_ext_cuda_kernels": fdsm_ext.has_cuda_kernels(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit + ("-dirty" if dirty else "") if commit else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


class MachineLoad:
    """How much CPU other processes used while we ran: busy time from /proc/stat minus our own
    (self + children) CPU time, as a fraction of ``wall x logical CPUs``. Linux only (else None)."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / hz  # minus idle, iowait
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return time.monotonic(), busy, own, os.getloadavg()

    def others_fraction(self) -> float | None:
        """The CPU share other processes have used since this object was made."""
        done = self.finish()
        return None if done is None else done["other_processes_cpu_fraction"]

    def finish(self) -> dict | None:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        others = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        return {
            "wall_s": round(wall, 1),
            "other_processes_cpu_fraction": round(others / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else 0.0,
            "loadavg_before": [round(v, 2) for v in self.start[3]],
            "loadavg_after": [round(v, 2) for v in end[3]],
        }
