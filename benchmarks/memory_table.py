"""Activation memory of one loss evaluation: FD-SSM (with and without chunk_size) vs SSM, SSM-VR, DSM.

Measured on CPU as the bytes of the tensors autograd keeps for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``), which is what grows with the stacked batch; with
``chunk_size`` (activation checkpointing per chunk) the backward recomputes one chunk at a time, so
the bytes one chunk's recomputation saves are added. On a GPU, ``--device cuda`` reports
``torch.cuda.max_memory_allocated`` of a full step instead. Run:

    python benchmarks/memory_table.py [--device cpu|cuda] [--batch 256] [--dim 784] [--width 1024]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import fdsm_ext


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, not counting the
    storages of the tensors in ``exclude`` (the parameters, which exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=784)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    d, w, B = args.dim, args.width, args.batch
    net = nn.Sequential(nn.Linear(d, w), nn.Softplus(), nn.Linear(w, w), nn.Softplus(), nn.Linear(w, w),
                        nn.Softplus(), nn.Linear(w, 1)).to(args.device)
    f = lambda y: net(y).squeeze(-1)  # noqa: E731
    x = torch.randn(B, d, device=args.device)
    rows = [(f"fd_ssm, chunk_size={c}", lambda c=c: fdsm_ext.fd_ssm_loss(f, x, chunk_size=c), c)
            for c in (None, 3 * B // 2, 3 * B // 4, 3 * B // 8)]
    rows += [
        ("ssm (Rademacher, 1 slice)", lambda: fdsm_ext.ssm_loss(f, x), None),
        ("ssm_vr", lambda: fdsm_ext.ssm_vr_loss(f, x), None),
        ("dsm (sigma 0.1)", lambda: fdsm_ext.dsm_loss(f, x, 0.1), None),
        ("fd_dsm (sigma 0.1)", lambda: fdsm_ext.fd_dsm_loss(f, x, 0.1), None),
    ]
    params = list(net.parameters())
    lines = [f"MLP energy d={d}, 3 hidden layers of {w}, batch {B}, {args.device}, torch {torch.__version__}", "",
             f"| loss | {{what}} |", "|---|---|"]
    measure = cuda_peak if args.device.startswith("cuda") else (lambda fn: saved_bytes(fn, params))
    what = "peak allocated (MiB)" if args.device.startswith("cuda") else "saved for backward (MiB)"
    lines[2] = lines[2].format(what=what)
    for name, fn, chunk in rows:
        total = measure(fn)
        if chunk is not None and not args.device.startswith("cuda"):  # one chunk's recomputation
            total += saved_bytes(lambda: f(torch.randn(chunk, d, device=args.device)), params)
        lines.append(f"| {name} | {total / 2**20:.1f} |")
    print("\n".join(lines))
    if args.device == "cpu":
        from numerics_table import replace_marked

        replace_marked(os.path.join(os.path.dirname(__file__), "..", "docs", "numerics.md"), "memory-table",
                       "\n".join(lines))


if __name__ == "__main__":
    main()
