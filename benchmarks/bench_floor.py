"""The floor of an FD loss step (issue 16): what a fused FD loss step costs over the model's own work.

An FD loss evaluates the model once on a stacked batch (``[x; x+v; x-v]`` for FD-SSM, ``[x+v; x-v]``
for FD-SSM-VR and, around ``x + sigma z``, FD-DSM). Its floor is a bare ``model(stacked).sum().backward()``
on a stacked batch of the same shape: everything above it (directions, perturbation, quotient, their
backwards, checks, dispatch) is the loss's own cost. For each model and loss the two steps (gradients
zeroed, loss or floor, backward; no optimizer step) are timed by ``bench_common.compare`` for
``preset.pairs`` rounds, and the reported number is the median of the per-round ratios
``loss step / floor step`` with its 20 % / 80 % quantiles.

Models (``preset.floor_models``): softplus MLP energies ``d -> w -> w -> 1`` for FD-SSM and FD-DSM,
and the same MLP with a ``d``-wide output as the score of FD-SSM-VR; NCSNv2's ``tiny`` RefineNet
(fdsm_train) at a fixed noise level, as a score for FD-SSM-VR and summed over its output to a scalar
energy for FD-SSM and FD-DSM.

``overhead``: the same comparison on a one-parameter model ``f(y) = w * sum(y)`` (batch 8, d = 2),
reported as the per-round difference ``loss step - floor step`` in microseconds: the fixed per-call
cost of the loss (checks, seeds, dispatch, autograd nodes).
"""

from __future__ import annotations

import torch
from torch import nn

import fdsm_ext
from bench_common import Preset, Skip, compare, paired_difference, paired_ratio
from bench_e2e import _fdsm_train_model

EPS = 0.1
SIGMA = 0.1  # FD-DSM's noise level, and the NCSN net's fixed noise level

# loss -> (model output it needs, rows of the stacked batch per sample, the loss call)
LOSSES = {
    "fd_ssm": ("energy", 3, lambda f, x: fdsm_ext.fd_ssm_loss(f, x, EPS)),
    "fd_ssm_vr": ("score", 2, lambda s, x: fdsm_ext.fd_ssm_vr_loss(s, x, EPS)),
    "fd_dsm": ("energy", 2, lambda f, x: fdsm_ext.fd_dsm_loss(f, x, SIGMA, EPS)),
}


def _mlp(d: int, width: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, width), nn.Softplus(), nn.Linear(width, width), nn.Softplus(),
                         nn.Linear(width, out))


def build(cfg: dict, output: str, device: torch.device):
    """``(module, fn, x)`` for one configuration; ``fn`` is what the loss and the floor call."""
    torch.manual_seed(0)
    if cfg["model"] == "mlp":
        d, w, B = cfg["dim"], cfg["width"], cfg["batch"]
        net = _mlp(d, w, 1 if output == "energy" else d).to(device)
        fn = (lambda y: net(y).squeeze(-1)) if output == "energy" else net
        return net, fn, torch.randn(B, d, device=device)
    if cfg["model"] == "ncsn_tiny":
        side, B = cfg["size"], cfg["batch"]
        net = _fdsm_train_model("ncsnv2", "ncsnv2_score_model")("tiny", channels=3).to(device)

        def score(y):
            return net(y, torch.full((y.shape[0],), SIGMA, device=y.device))

        fn = score if output == "score" else (lambda y: score(y).flatten(1).sum(1))
        return net, fn, torch.rand(B, 3, side, side, device=device)
    if cfg["model"] == "one_parameter":
        w = nn.Parameter(torch.ones((), device=device))
        holder = nn.Module()
        holder.w = w
        fn = (lambda y: w * y.sum(-1)) if output == "energy" else (lambda y: w * y)
        return holder, fn, torch.randn(cfg["batch"], cfg["dim"], device=device)
    raise ValueError(f"unknown floor model {cfg['model']!r}")


def describe(cfg: dict) -> str:
    if cfg["model"] == "mlp":
        return f"softplus MLP {cfg['dim']}→{cfg['width']}→{cfg['width']}→1 (score: →{cfg['dim']})"
    if cfg["model"] == "ncsn_tiny":
        return f"NCSNv2 tiny RefineNet, 3x{cfg['size']}x{cfg['size']}"
    return f"one parameter, f(y) = w·Σy, d={cfg['dim']}"


def steps(cfg: dict, loss: str, device: torch.device) -> dict:
    """The two callables compared: the loss step and its floor, each on its own copy of the model."""
    output, rows, call = LOSSES[loss]
    net, fn, x = build(cfg, output, device)
    floor_net, floor_fn, _ = build(cfg, output, device)
    stacked = torch.cat([x] * rows)

    def loss_step():
        net.zero_grad(set_to_none=False)
        call(fn, x).backward()

    def floor_step():
        floor_net.zero_grad(set_to_none=False)
        floor_fn(stacked).sum().backward()

    return {"loss": loss_step, "floor": floor_step}


def run(p: Preset, device: torch.device, log) -> dict:
    records, skipped = [], []
    for cfg in p.floor_models:
        for loss in LOSSES:
            try:
                fns = steps(cfg, loss, device)
            except Skip as exc:
                skipped.append(f"floor {describe(cfg)}: {exc}")
                break
            t = compare(fns, device, p, rounds=p.pairs)
            rec = {"bench": "floor", "config": cfg, "model": describe(cfg), "loss": loss,
                   "loss_s": t["loss"].as_dict(), "floor_s": t["floor"].as_dict(),
                   **paired_ratio(t["loss"], t["floor"]), **paired_difference(t["loss"], t["floor"])}
            records.append(rec)
            log(f"floor {describe(cfg):44s} {loss:9s} loss/floor = {rec['ratio']:.3f} "
                f"[{rec['ratio_q20']:.3f}, {rec['ratio_q80']:.3f}]  ({t['loss'].median_s * 1e3:.3g} ms vs "
                f"{t['floor'].median_s * 1e3:.3g} ms)")
    for loss in LOSSES:
        cfg = {"model": "one_parameter", "dim": 2, "batch": 8}
        t = compare(steps(cfg, loss, device), device, p, rounds=p.pairs)
        rec = {"bench": "overhead", "config": cfg, "model": describe(cfg), "loss": loss,
               "loss_s": t["loss"].as_dict(), "floor_s": t["floor"].as_dict(),
               **paired_ratio(t["loss"], t["floor"]), **paired_difference(t["loss"], t["floor"])}
        records.append(rec)
        log(f"overhead {loss:9s} {rec['diff_s'] * 1e6:8.1f} µs per call over the bare step")
    return {"records": records, "skipped": skipped}


def markdown(suite: dict) -> list[str]:
    recs = suite.get("records", [])
    if not recs:
        return []
    floor = [r for r in recs if r["bench"] == "floor"]
    lines = ["## The floor of a loss step (issue 16)", "",
             "`loss step / floor step`: a fused FD loss step (gradients zeroed, `loss(model, x).backward()`) over "
             "the bare `model(stacked).sum().backward()` on a stacked batch of the same shape (3B rows for FD-SSM, "
             "2B for FD-SSM-VR and FD-DSM), each on its own copy of the model; median `[20 %, 80 %]` of the "
             f"per-round ratios of {floor[0]['pairs'] if floor else '–'} alternating pairs (method: "
             "`benchmarks/bench_floor.py`). Above 1: what the loss adds to the model's own work.", ""]
    if floor:
        models = list(dict.fromkeys(r["model"] for r in floor))
        by = {(r["model"], r["loss"]): r for r in floor}
        rows = []
        for m in models:
            cfg = next(r["config"] for r in floor if r["model"] == m)
            cells = []
            for loss in LOSSES:
                r = by.get((m, loss))
                cells.append(f"{r['ratio']:.2f} [{r['ratio_q20']:.2f}, {r['ratio_q80']:.2f}]" if r else "–")
            floor_ms = [by[(m, loss)]["floor_s"]["median_s"] * 1e3 for loss in LOSSES if (m, loss) in by]
            rows.append([m, str(cfg["batch"]), *cells, ", ".join(f"{v:.3g}" for v in floor_ms)])
        header = ["model", "batch", *[f"{loss} / floor" for loss in LOSSES], "floor step (ms, per loss)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    over = [r for r in recs if r["bench"] == "overhead"]
    if over:
        lines += [f"**Per-call overhead** on a one-parameter model (`f(y) = w·Σy`, batch "
                  f"{over[0]['config']['batch']}, d = {over[0]['config']['dim']}): loss step minus bare step, "
                  "per round, median `[20 %, 80 %]`.", "",
                  "| loss | overhead (µs) | bare step (µs) |", "|---|---|---|"]
        lines += [f"| {r['loss']} | {r['diff_s'] * 1e6:.1f} [{r['diff_q20_s'] * 1e6:.1f}, {r['diff_q80_s'] * 1e6:.1f}]"
                  f" | {r['floor_s']['median_s'] * 1e6:.1f} |" for r in over] + [""]
    return lines


def main() -> None:
    """``python benchmarks/bench_floor.py [--clock thread] [--pairs N] [--models 0,1,...]``: the floor table
    alone (run.py's ``--only floor`` times it as the other suites, on the wall clock), one torch thread."""
    import argparse
    import time
    import types

    import bench_common

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: this thread's CPU time, which leaves out the time other jobs of a shared machine "
                         "hold the core (the loss and the model run on this thread with one torch thread)")
    ap.add_argument("--pairs", type=int, default=None, help="alternating rounds per comparison (default: the preset's)")
    ap.add_argument("--models", default=None, help="indices into the preset's floor models, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.clock == "thread":
        bench_common.time = types.SimpleNamespace(perf_counter=time.thread_time)
    p = bench_common.PRESETS[("cpu", "full")]
    models = p.floor_models if args.models is None else tuple(p.floor_models[int(i)] for i in args.models.split(","))
    p = bench_common.dataclasses.replace(p, floor_models=models, pairs=args.pairs or p.pairs)
    run(p, torch.device("cpu"), print)


if __name__ == "__main__":
    main()
