#!/usr/bin/env bash
# Proves that the CUDA kernels compile (no GPU needed): builds fdsm_ext against the CUDA 13.0 build of
# torch 2.14.1 for an explicit arch list, then imports it and runs the CPU op tests against that build
# (which also covers the newest supported torch). A compile error fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FDSM_CI_CUDA_VENV:-$HOME/.cache/fdsm_ext-ci/venv-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "CI: no CUDA toolkit at CUDA_HOME=$CUDA_HOME; cannot prove the CUDA kernels compile" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -U pip
# The test requirements without the CPU torch pin (and without their -r line).
"$venv/bin/pip" install -q torch==2.14.1 $(grep -hvE '^(torch|-r|#)' requirements.txt requirements-test.txt)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# A copy of the tree, so that this build's objects never mix with the CPU build's.
git ls-files -z | xargs -0 cp --parents -t "$build"
(
  cd "$build"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" FDSM_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}"
  # plain `pip install .`, as users type it: also proves the isolated build finds the CUDA torch
  time "$venv/bin/pip" install -q .
)
# Run from / : with stdin as the script, python puts the cwd first on sys.path, and the cwd here
# holds the unbuilt fdsm_ext/ sources.
(cd / && "$venv/bin/python" - <<'PY'
import torch, fdsm_ext
assert torch.version.cuda, "expected a CUDA build of torch"
assert fdsm_ext.has_cuda_kernels(), "the extension was built without its CUDA kernels"
print(f"CI: fdsm_ext CUDA kernels compiled for torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
)
# pytest's console script (not `python -m pytest`) keeps ./fdsm_ext, the unbuilt sources, off sys.path.
"$venv/bin/pytest" -q -p no:cacheprovider tests/test_ops.py tests/test_cuda.py
