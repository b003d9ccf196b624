#!/usr/bin/env bash
# The GPU kit (issue 15): a one-shot proof of the GPU path that fits a short GPU lease.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on a GPU machine, from a fresh copy of the repository
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # on any CPU machine: every stage, tiny, GPU parts skipped
#
# Needs: a Python (PYTHON, default python3) with torch (a CUDA build on the GPU machine), pytest,
# setuptools, ninja (optional: without it the build is serial) and, for stage 3, compute-sanitizer on
# PATH. No network: nothing is downloaded or pip-installed. In at most GPU_CHECK_TOTAL_S seconds
# (default 480) of wall time it
#   1. builds the extension in place for the local GPU arch only (TORCH_CUDA_ARCH_LIST from
#      torch.cuda.get_device_capability, FDSM_EXT_CUDA=1, MAX_JOBS=16): `setup.py build_ext --inplace`,
#      used through PYTHONPATH=<repo>:<repo>/python (python/ is fdsm_train);
#   2. runs the whole test suite on the GPU with a junit report (tests/conftest.py switches Triton's
#      interpreter on only when no GPU is visible; this script also unsets TRITON_INTERPRET), and fails
#      when pytest collects nothing (exit 5);
#   3. runs compute-sanitizer memcheck over benchmarks/sanitizer_driver.py (every op, forward and
#      backward, odd shapes and layouts, fp16/bf16/fp32/fp64, checked against the CPU kernels), then
#      racecheck and synccheck over the ops with block reductions;
#   4. runs the benchmarks' quick GPU preset (benchmarks/run.py --device cuda --quick: the Langevin
#      step and the CUDA-graph sampler vs the eager loop, FD-SSM vs SSM step time and peak memory on
#      NICE and NCSNv2-CIFAR-10, each memory-bound kernel next to a device copy of the same bytes with
#      its eager and torch.compile composites), each suite's results written as soon as it is done;
#   5. writes, flat into OUT_DIR, at most 8 files: gpu_check.log (this transcript), build.log,
#      tests.log, junit.xml, sanitizer.log, bench.log, cuda-<gpu>.md and cuda-<gpu>.json (the
#      benchmark report, with a "GPU kit" section: each stage's outcome and PASS/MISS per goal:
#      memory-bound kernels >= 0.85x copy bandwidth, >= 1.0x torch.compile, >= 2x eager; FD-SSM step
#      >= 2.5x faster than SSM and <= 0.6x its memory on NICE/NCSN-sized models; CUDA-graph sampler
#      >= 2x the eager loop).
# Each stage has a time budget (`timeout`); time a stage leaves unused passes to the next ones. When a
# budget runs out the stage is stopped (SIGINT first, so pytest still writes its junit report and the
# benchmarks keep their finished suites), the script says what it skipped and goes on.
# Exit status: 0 when every stage ran to completion and passed; 1 otherwise (goal MISSes do not count:
# they are findings, written into the report).
# --dry-run runs the same stages on the CPU in about a minute on an idle 2-core machine: the CUDA build, the GPU tests,
# compute-sanitizer and the GPU presets are skipped (each says so), the rest runs at tiny sizes; .ci/run
# runs it so that the kit cannot rot.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]" >&2
  exit 2
fi
OUT=$1
DRY=0
if [ "${2:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${2:-}" ]; then echo "unknown option: $2" >&2; exit 2; fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
if [[ "$PY" == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
cd "$REPO"
unset TRITON_INTERPRET

START=$(date +%s)
if [ $DRY = 1 ]; then
  # a cap, not a target: on an idle 2-core machine the dry run takes about a minute; a loaded CI
  # machine can take a few times that, and a dry run that times out fails
  TOTAL=${GPU_CHECK_TOTAL_S:-420}; SHARE_BUILD=10; SHARE_TESTS=160; SHARE_SANITIZER=100; SHARE_BENCH=150
  DEVICE_TESTS_PCT=75
else
  TOTAL=${GPU_CHECK_TOTAL_S:-480}; SHARE_BUILD=170; SHARE_TESTS=150; SHARE_SANITIZER=70; SHARE_BENCH=90
  DEVICE_TESTS_PCT=40
fi
STATUS=()   # one "stage|outcome|detail" line per stage, for the report
FAILED=0

say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
# budget REST: the seconds left for this stage when REST seconds are kept for the stages after it
budget() { local b=$(( START + TOTAL - $(date +%s) - $1 )); echo $(( b > 0 ? b : 0 )); }
record() { STATUS+=("$1|$2|$3"); say "$1: $2${3:+ ($3)}"; case $2 in FAIL|TIMEOUT) FAILED=1 ;; esac; }
# run_timed SECONDS LOG CMD...: runs CMD with its output appended to LOG; SIGINT at the budget, KILL 20 s later
run_timed() {
  local secs=$1 log=$2; shift 2
  timeout -s INT -k 20 "$secs" "$@" >>"$log" 2>&1
}

# ---------------------------------------------------------------- 0. the machine
say "fdsm_ext GPU kit$([ $DRY = 1 ] && echo ' (dry run on the CPU)') in $REPO, out: $OUT, budget ${TOTAL} s"
# One Python start (torch's import is seconds): the versions, and on its last line "GPU NAME".
INFO=$("$PY" - <<'PY'
import os, platform, re, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{os.cpu_count()} CPUs, CUDA devices: {torch.cuda.device_count()}")
import importlib.util
# what the tests and the trainers import (requirements*.txt): nothing can be installed without a network
wanted = ("pytest", "hypothesis", "expecttest", "numpy", "setuptools", "ninja", "triton", "yaml", "tqdm",
          "matplotlib", "sklearn", "torchmetrics")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
print("python modules: all of " + ", ".join(wanted) if not missing else
      f"python modules MISSING (stages that need them will fail or skip): {', '.join(missing)}")
gpu = torch.cuda.is_available()
if gpu:
    print(f"GPU: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower().replace("nvidia", "")).strip("-")
    print(f"1 cuda-{slug} {'%d.%d' % torch.cuda.get_device_capability(0)}")
else:
    print("0 cpu-dry-run none")
PY
) || { echo "gpu_check: $PY cannot import torch" >&2; exit 1; }
echo "$INFO" | sed '$d'
read -r GPU NAME ARCH <<<"$(echo "$INFO" | tail -n 1)"
for tool in nvcc compute-sanitizer ncu ninja; do
  printf '  %-18s %s\n' "$tool" "$(command -v "$tool" || echo 'not found')"
done
if [ $DRY = 0 ] && [ "$GPU" != 1 ]; then
  echo "gpu_check: torch sees no CUDA device; on a CPU machine run: bash benchmarks/gpu_check.sh OUT_DIR --dry-run" >&2
  exit 1
fi
[ $DRY = 1 ] && NAME=cpu-dry-run

# ---------------------------------------------------------------- 1. build
B=$(budget $(( SHARE_TESTS + SHARE_SANITIZER + SHARE_BENCH )))
if [ $DRY = 1 ]; then
  record build SKIPPED "needs a GPU: TORCH_CUDA_ARCH_LIST comes from torch.cuda.get_device_capability; would run: \
TORCH_CUDA_ARCH_LIST=<arch> FDSM_EXT_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace"
else
  say "build: TORCH_CUDA_ARCH_LIST=$ARCH FDSM_EXT_CUDA=1 MAX_JOBS=16 setup.py build_ext --inplace (budget ${B} s)"
  run_timed "$B" "$OUT/build.log" env TORCH_CUDA_ARCH_LIST="$ARCH" FDSM_EXT_CUDA=1 MAX_JOBS=16 \
    "$PY" setup.py build_ext --inplace
  rc=$?
  if [ $rc = 0 ]; then record build PASS "sm_${ARCH/./}, $(( $(date +%s) - START )) s"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then record build TIMEOUT "ran out of its ${B} s; see build.log"
  else record build FAIL "exit $rc; see build.log"; fi
fi
# Use the in-place build (and python/ for fdsm_train) when there is one; else the installed packages,
# kept ahead of the unbuilt sources in this tree by running pytest's console script.
if compgen -G "fdsm_ext/_C*.so" >/dev/null; then
  export PYTHONPATH="$REPO:$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
  PYTEST=("$PY" -m pytest)
else
  PYTEST=("$(dirname "$PY")/pytest")
fi
# From /, so that the unbuilt sources of this tree never shadow an installed fdsm_ext.
(cd / && "$PY" -c "
import fdsm_ext
print(f'fdsm_ext {fdsm_ext.__version__} from {fdsm_ext.__file__}, CUDA kernels: {fdsm_ext.has_cuda_kernels()}')
assert $DRY or fdsm_ext.has_cuda_kernels(), 'the build has no CUDA kernels'
") || record import FAIL "fdsm_ext does not import (or has no CUDA kernels); the stages below will fail"

# ---------------------------------------------------------------- 2. tests
B=$(budget $(( SHARE_SANITIZER + SHARE_BENCH )))
# Two runs, the device tests first (a budget cut then still leaves them done), merged into one junit.xml.
JUNIT_TMP=$(mktemp -d)
if [ $DRY = 1 ]; then
  # The GPU-only tests (they skip here, saying why) and a quick harness test of the benchmarks (the
  # bench stage below runs the harness itself).
  PARTS=("tests/test_cuda.py tests/triton/test_gpu_compile.py"
         "tests/test_benchmarks.py::test_callgrind_dumps_to_instructions_per_element")
  say "tests: dry run: the GPU-only tests (skipped without a GPU) and one harness test (budget ${B} s)"
else
  PARTS=("tests/test_cuda.py tests/triton" "tests --ignore=tests/test_cuda.py --ignore=tests/triton")
  say "tests: the whole suite on the GPU, device tests first (budget ${B} s)"
fi
outcome=PASS detail=""
for i in 0 1; do
  secs=$(budget $(( SHARE_SANITIZER + SHARE_BENCH )))
  [ $i = 0 ] && secs=$(( secs * DEVICE_TESTS_PCT / 100 ))  # the rest of the stage goes to the other tests
  # shellcheck disable=SC2086
  run_timed "$secs" "$OUT/tests.log" "${PYTEST[@]}" -q -rs -p no:cacheprovider --junitxml="$JUNIT_TMP/part$i.xml" \
    ${PARTS[$i]}
  rc=$?
  tail -n 1 "$OUT/tests.log"
  part=$([ $i = 0 ] && echo "device tests" || echo "other tests")
  case $rc in
    0) detail+="$part: $(tail -n 1 "$OUT/tests.log" | tr -d '='); " ;;
    5) outcome=FAIL; detail+="$part: pytest collected no tests (exit 5); " ;;
    124|130|137) [ $outcome = PASS ] && outcome=TIMEOUT; detail+="$part: stopped at its ${secs} s budget; " ;;
    *) outcome=FAIL; detail+="$part: exit $rc: $(tail -n 1 "$OUT/tests.log" | tr -d '='); " ;;
  esac
done
"$PY" - "$OUT/junit.xml" "$JUNIT_TMP"/part*.xml <<'PY'
import sys, xml.etree.ElementTree as ET
merged = ET.Element("testsuites")
for path in sys.argv[2:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        print(f"junit: {path} unreadable ({exc})")
        continue
    merged.extend([root] if root.tag == "testsuite" else list(root))
ET.ElementTree(merged).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
PY
rm -rf "$JUNIT_TMP"
record tests "$outcome" "${detail%; }"

# ---------------------------------------------------------------- 3. compute-sanitizer
B=$(budget "$SHARE_BENCH")
DRIVER=(benchmarks/sanitizer_driver.py)
# the ops whose CUDA kernels reduce across threads (shared memory, warp shuffles): racecheck and synccheck
REDUCTIONS=perturb,dsm_perturb,fd_ssm_vr,fd_dsm_quotient,fd_divergence,stencil_combine,langevin_step,langevin_step_
if [ $DRY = 1 ] || ! command -v compute-sanitizer >/dev/null; then
  why=$([ $DRY = 1 ] && echo "needs a GPU" || echo "compute-sanitizer is not on PATH")
  say "sanitizer: compute-sanitizer skipped ($why); the driver runs alone on the CPU, small (budget ${B} s)"
  run_timed "$B" "$OUT/sanitizer.log" "$PY" "${DRIVER[@]}" --device cpu --max-shapes 3 --dtypes float32,float16
  rc=$?
  tail -n 1 "$OUT/sanitizer.log"
  case $rc in
    0) record sanitizer "$([ $DRY = 1 ] && echo PASS || echo SKIPPED)" "driver only: compute-sanitizer $why" ;;
    124|130|137) record sanitizer TIMEOUT "driver stopped at its ${B} s budget" ;;
    *) record sanitizer FAIL "driver exit $rc; see sanitizer.log" ;;
  esac
else
  # memcheck over everything: 55 % of the stage; racecheck and synccheck over the block reductions
  outcome=PASS detail=""
  for spec in "memcheck 55 --dtypes float32,float16,bfloat16,float64" \
              "racecheck 25 --only $REDUCTIONS --dtypes float32,float16" \
              "synccheck 20 --only $REDUCTIONS --dtypes float32,float16"; do
    read -r tool pct args <<<"$spec"
    secs=$(( B * pct / 100 ))
    say "sanitizer: compute-sanitizer --tool $tool ($secs s)"
    echo "===== compute-sanitizer --tool $tool $args" >>"$OUT/sanitizer.log"
    # shellcheck disable=SC2086
    # without torch's caching allocator every tensor is its own allocation, so memcheck sees an
    # out-of-bounds access that would otherwise land inside a cached block
    run_timed "$secs" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
      "$PY" "${DRIVER[@]}" --device cuda $args
    rc=$?
    case $rc in
      0) detail+="$tool clean; " ;;
      3) outcome=FAIL; detail+="$tool found errors; " ;;
      124|130|137) [ $outcome = PASS ] && outcome=TIMEOUT; detail+="$tool stopped at its ${secs} s; " ;;
      *) outcome=FAIL; detail+="$tool: driver exit $rc; " ;;
    esac
  done
  record sanitizer "$outcome" "${detail%; }"
fi

# ---------------------------------------------------------------- 4. benchmarks
B=$(budget 5)
BENCH_TMP=$(mktemp -d)
if [ $DRY = 1 ]; then
  say "bench: dry run: the smoke preset on the CPU (GPU-only rows skipped, saying so) (budget ${B} s)"
  BENCH=("$PY" benchmarks/run.py --device cpu --smoke --only sampling,e2e,micro,floor)
else
  say "bench: the quick GPU preset (budget ${B} s)"
  BENCH=("$PY" benchmarks/run.py --device cuda --quick --only sampling,e2e,micro,floor)
fi
run_timed "$B" "$OUT/bench.log" "${BENCH[@]}" --no-plots --out "$BENCH_TMP" --name "$NAME"
rc=$?
if [ -f "$BENCH_TMP/$NAME.json" ]; then cp "$BENCH_TMP/$NAME.json" "$OUT/"; fi
case $rc in
  0) record bench PASS "$(grep -c '^-- .* done' "$OUT/bench.log") suites" ;;
  124|130|137) record bench TIMEOUT "stopped at its ${B} s budget after: $(grep '^-- .* done' "$OUT/bench.log" \
    | awk '{print $2}' | paste -sd, -); the report keeps the finished suites" ;;
  *) record bench FAIL "exit $rc; see bench.log" ;;
esac
rm -rf "$BENCH_TMP"

# ---------------------------------------------------------------- 5. the report
printf '%s\n' "${STATUS[@]}" | "$PY" benchmarks/gpu_check_report.py "$OUT" "$NAME" "$DRY" \
  || { say "report: could not be written"; FAILED=1; }
say "done in $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | paste -sd' ' -)"
exit $FAILED
