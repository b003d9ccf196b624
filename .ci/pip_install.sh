#!/usr/bin/env bash
# `pip install .` as a new user types it (build isolation on; README "Build notes"), from a copy of the
# tree in fresh virtual environments: without torch it must stop at once with the command that works;
# with the CPU torch installed first it must build an extension for that torch, which then imports.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
torch_pin=$(grep -E '^torch==' requirements.txt)

python3 -m venv "$work/bare"
start=$SECONDS
if (cd "$work" && "$work/bare/bin/pip" install -q . >"$work/bare.log" 2>&1); then
  echo "CI: pip install . without torch succeeded; it must refuse" >&2; exit 1
fi
grep -q "pip install $torch_pin && pip install ." "$work/bare.log" || { cat "$work/bare.log" >&2; exit 1; }
echo "CI: pip install . without torch refused in $((SECONDS - start)) s, naming the command that works"

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$torch_pin" numpy ninja
(cd "$work" && time MAX_JOBS="${MAX_JOBS:-2}" "$work/venv/bin/pip" install -q .)
# From /: the copied tree's unbuilt fdsm_ext/ must not shadow the installed one.
(cd / && "$work/venv/bin/python" - <<'PY'
import torch, fdsm_ext
from fdsm_ext import _build_info
assert _build_info.TORCH_VERSION == torch.__version__, (_build_info.TORCH_VERSION, torch.__version__)
loss = fdsm_ext.fd_ssm_loss(lambda y: -0.5 * y.square().sum(-1), torch.randn(16, 3), 0.1)
assert torch.isfinite(loss), loss
print(f"CI: pip install . built fdsm_ext against torch {torch.__version__}, the torch that imports it")
PY
)
