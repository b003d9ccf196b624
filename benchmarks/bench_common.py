"""What every benchmark suite of ``run.py`` shares: the presets, the timer, the environment record.

Timing method (one place, so every number in benchmarks/results/ means the same thing): the callable
is warmed up (at least 2 calls and ``warmup_s`` seconds: torch.compile, the allocator and the caches
settle), the last warm-up call calibrates ``inner``, the number of calls per block so that a block
lasts about ``block_s``; then ``blocks`` blocks are timed with ``time.perf_counter``, with
``torch.cuda.synchronize()`` before and after each block on a GPU, and each block gives one sample,
its time divided by ``inner``. We report the median and the 20 % / 80 % quantiles of those samples.
Blocks rather than single calls, because a single sub-millisecond call is dominated by timer and
launch jitter; our own loop rather than ``torch.utils.benchmark.Timer.blocked_autorange``, because
the loop also has to cap the time spent on slow configurations (``max_s``), so that the full CPU run
fits its budget.
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
    max_s: float = 3.0  # per measurement, warm-up excluded; at least 3 blocks are always timed
    # micro: element counts of each op's main tensor, feature dimension, torch.compile column
    micro_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000, 10_000_000)
    micro_dim: int = 256
    compile: bool = True
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


# Model configurations per family of bench_e2e.FAMILIES. The MLP of d = 784 and width 1000 stands in
# for NICE's size (~4M weights applied to every row) until NICE itself can be measured. DKEF, NICE
# and NCSN come from fdsm_train and are skipped (with the reason) while it is not installed; on a CPU
# they get their papers' batch (DKEF) or one small batch, since a NICE step is seconds there.
_MLP_FULL = [{"dim": d, "width": 128, "depth": 3} for d in (2, 16, 64, 256, 784)] + [
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
    ("cpu", "full"): Preset("full", e2e_configs=_MODELS_FULL),
    ("cpu", "quick"): Preset(
        "quick", warmup_s=0.05, block_s=0.02, blocks=5, max_s=0.5,
        micro_sizes=(10_000, 1_000_000), e2e_configs=_MODELS_QUICK, exact_sm_max_dim=16,
        e2e_batches=(64, 256), orders=(1, 2, 4, 6), order_batches=(16, 256), sampling_sizes=(10_000, 1_000_000),
        annealed={"batch": 64, "dim": 64, "levels": 5, "steps_each": 5},
    ),
    ("cuda", "full"): Preset(
        "full", warmup_s=0.5, blocks=20, micro_sizes=(10_000, 100_000, 1_000_000, 10_000_000, 100_000_000),
        e2e_configs=_MODELS_CUDA, e2e_batches=(64, 256, 1024, 4096),
        sampling_sizes=(10_000, 100_000, 1_000_000, 10_000_000, 100_000_000),
    ),
    ("cuda", "quick"): Preset(
        "quick", warmup_s=0.1, block_s=0.02, blocks=5, max_s=0.5, micro_sizes=(100_000, 10_000_000),
        e2e_configs=_MODELS_QUICK, e2e_batches=(64, 1024), orders=(1, 2, 4, 6), order_batches=(16, 1024),
        sampling_sizes=(100_000, 10_000_000),
    ),
}
# A seconds-long configuration that goes through every code path (tests/test_benchmarks.py).
SMOKE = Preset(
    "smoke", warmup_s=0.0, block_s=0.0, blocks=3, max_s=0.1, micro_sizes=(2048,), micro_dim=32, compile=False,
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


def measure(fn, device: torch.device, p: Preset) -> Timing:
    """Median and 20/80 % quantiles of the per-call time of ``fn()`` (module docstring: the method)."""
    t0, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - t0 < p.warmup_s:
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        one = max(time.perf_counter() - t, 1e-7)  # the last warm-up call calibrates
        calls += 1
    inner = max(1, min(10_000, round(p.block_s / one)))
    blocks = max(3, min(p.blocks, int(p.max_s / (inner * one))))
    samples = []
    for _ in range(blocks):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t) / inner)
    q = statistics.quantiles(samples, n=5, method="inclusive")
    return Timing(statistics.median(samples), q[0], q[3], inner, samples)


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
