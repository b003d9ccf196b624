"""Relative error of FD-SSM against the exact per-direction SSM value, per evaluation dtype and eps.

For a fixed set of unit directions u (the same Philox seed for every eps), the FD-SSM quotient of a
model evaluated in dtype D is compared with the float64 value it approximates,
``d [1/2 (u^T grad f)^2 + u^T (hess f) u]``, so the error is truncation + round-off, without Monte
Carlo noise. Writes docs/numerics.json and the table into docs/numerics.md. Run:

    python benchmarks/numerics_table.py [--out docs]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform

import torch
from torch import nn

import fdsm_ext
from fdsm_ext import numerics, ops


def make_models(d: int):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(d, 64), nn.Softplus(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    class Quartic(nn.Module):
        """f(x) = -1/4 sum x^4 + a^T x: smooth, with non-zero fourth derivative (truncation shows)."""

        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(d))

        def forward(self, x):
            return -0.25 * x.pow(4).sum(-1) + x @ self.a

    return {"mlp": mlp.double(), "quartic": Quartic().double()}


def exact_directional(model, x, u):
    """d [1/2 (u^T s)^2 + u^T H u] in float64 for unit directions u, per sample."""
    xl = x.double().clone().requires_grad_()
    f = model(xl).reshape(-1)
    (s,) = torch.autograd.grad(f.sum(), xl, create_graph=True)
    (hu,) = torch.autograd.grad((s * u).sum(), xl)
    return (x.shape[1] * (0.5 * (s * u).sum(-1) ** 2 + (hu * u).sum(-1))).detach()


MODES = [  # (label, parameter/input dtype, autocast dtype or None)
    ("float64", torch.float64, None),
    ("float32", torch.float32, None),
    ("bfloat16", torch.bfloat16, None),
    ("float16", torch.float16, None),
    ("float32 + autocast(bfloat16)", torch.float32, torch.bfloat16),
]


def measure(d=8, batch=256, eps_grid=None):
    eps_grid = eps_grid or [10 ** (k / 2) for k in range(-8, 2)]
    x64 = torch.randn(batch, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen_seed = 1234
    seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(gen_seed))
    u = ops.perturb(torch.zeros(batch, d, dtype=torch.float64), seed, 1.0, 1, 0, False)[:batch]
    rows = []
    for name, model64 in make_models(d).items():
        exact = exact_directional(model64, x64, u)
        for label, dtype, autocast in MODES:
            model = copy.deepcopy(model64).to(dtype)
            x = x64.to(dtype)
            auto = numerics.auto_eps(x, autocast or dtype)
            for eps in sorted(set(eps_grid + [auto])):
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    fd = fdsm_ext.fd_ssm_loss(lambda y: model(y).reshape(-1), x, eps, reduction="none",
                                              generator=torch.Generator().manual_seed(gen_seed),
                                              on_nonfinite="ignore")
                err = ((fd.double() - exact).abs().mean() / exact.abs().mean()).item()
                rows.append(dict(model=name, mode=label, eps=eps, auto=eps == auto,
                                 rel_error=err if math.isfinite(err) else float("inf")))
    return rows


def to_markdown(rows) -> str:
    models = sorted({r["model"] for r in rows})
    modes = [m[0] for m in MODES]
    eps_grid = sorted({r["eps"] for r in rows if not r["auto"]})
    out = []
    for model in models:
        out.append(f"\n### {model} (d = 8, 256 samples, one sphere direction each)\n")
        out.append("| eps | " + " | ".join(modes) + " |")
        out.append("|---|" + "---|" * len(modes))
        for eps in eps_grid:
            cells = []
            for mode in modes:
                (r,) = [r for r in rows if r["model"] == model and r["mode"] == mode and r["eps"] == eps and not r["auto"]]
                cells.append(f"{r['rel_error']:.2e}")
            out.append(f"| {eps:.3g} | " + " | ".join(cells) + " |")
        cells = []
        for mode in modes:
            (r,) = [r for r in rows if r["model"] == model and r["mode"] == mode and r["auto"]]
            cells.append(f"**{r['rel_error']:.2e}** (eps {r['eps']:.3g})")
        out.append("| `eps='auto'` | " + " | ".join(cells) + " |")
    return "\n".join(out)


def replace_marked(path: str, name: str, text: str) -> None:
    """Put ``text`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` lines of ``path``."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        doc = fh.read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + start + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1]
        with open(path, "w") as fh:
            fh.write(doc)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs"))
    args = parser.parse_args()
    rows = measure()
    os.makedirs(args.out, exist_ok=True)
    meta = dict(torch=torch.__version__, machine=platform.machine(), kappa=numerics.AUTO_EPS_KAPPA,
                command="python benchmarks/numerics_table.py")
    with open(os.path.join(args.out, "numerics.json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    table = to_markdown(rows)
    print(table)
    replace_marked(os.path.join(args.out, "numerics.md"), "error-table", table)


if __name__ == "__main__":
    main()
