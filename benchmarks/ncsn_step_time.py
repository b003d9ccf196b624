"""Time per training step of the NCSN experiment: FD-SSM-VR vs SSM-VR vs DSM on the tiny and CIFAR-10 networks.

One step is what ``fdsm-train ncsn`` does per batch: the sigma^2-weighted annealed loss of the
noise-conditional NCSNv2 network (fdsm_train.objectives.noise_conditional_loss), its backward and an
Adam step. The losses are timed interleaved by ``bench_common.compare`` (one step of each per round, the
order alternating), so a change in the machine's load hits them alike; reported are the median and the
20%/80% quantiles of the step time, and each loss's step time over SSM-VR's (the gradient-based
counterpart of FD-SSM-VR) taken per round: median [20 %, 80 %] of the per-round ratios.

    python benchmarks/ncsn_step_time.py [--nets tiny,cifar10] [--batch-tiny 128] [--batch-cifar10 8]
                                        [--repeats 5] [--threads 1] [--device cpu] [--json FILE]

Networks: ``tiny`` (~4.6k parameters, 3x16x16 images, the FD paper's 10-level ladder) and ``cifar10``
(NCSNv2's published 29.7M-parameter network, 3x32x32 images, its 232-level ladder).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import fdsm_ext
from bench_common import Preset, compare, device_name, paired_ratio
from fdsm_train.experiments import ncsn
from fdsm_train.models.ncsnv2 import ncsnv2_score_model
from fdsm_train.objectives import SCORE_LOSSES, noise_conditional_loss

SETUPS = {"tiny": dict(size=16, recipe="fd_paper"), "cifar10": dict(size=32, recipe="ncsnv2_cifar10")}


def time_net(net: str, batch: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """Step times (seconds) of every loss on network ``net`` at ``batch`` images per step."""
    setup = SETUPS[net]
    cfg = ncsn.Config(recipe=setup["recipe"], net=net, batch_size=batch)
    sigmas = ncsn.noise_schedule(cfg)["sigmas"].to(device=device, dtype=torch.float32)
    torch.manual_seed(0)
    data = torch.rand(batch, 3, setup["size"], setup["size"], device=device)
    runs = {}
    for loss in SCORE_LOSSES:
        torch.manual_seed(0)
        model = ncsnv2_score_model(net).to(device)
        runs[loss] = (model, torch.optim.Adam(model.parameters(), lr=1e-4),
                      torch.Generator(device=device).manual_seed(1))
    cfg_loss = ncsn.Config(net=net)  # eps, n_slices, backend: the trainer's defaults

    def step(loss):
        model, opt, gen = runs[loss]
        opt.zero_grad(set_to_none=True)
        value = noise_conditional_loss(loss, model, data, sigmas, cfg_loss, gen)
        value.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):  # beyond compare's own two warm-up calls per loss
        for loss in SCORE_LOSSES:
            step(loss)
    timing = Preset("ncsn_step_time", warmup_s=0.0, block_s=0.0)  # one step per block, ``repeats`` rounds
    timings = compare({loss: (lambda loss=loss: step(loss)) for loss in SCORE_LOSSES}, device, timing,
                      rounds=repeats)
    n_params = sum(p.numel() for p in runs[SCORE_LOSSES[0]][0].parameters())
    rows = []
    for loss in SCORE_LOSSES:
        t, r = timings[loss], paired_ratio(timings[loss], timings["ssm_vr"])
        rows.append({"net": net, "params": n_params, "image": [3, setup["size"], setup["size"]], "batch": batch,
                     "loss": loss, "median_s": t.median_s, "q20_s": t.q20_s, "q80_s": t.q80_s,
                     "ratio_to_ssm_vr": r["ratio"], "ratio_q20": r["ratio_q20"], "ratio_q80": r["ratio_q80"],
                     "n": len(t.samples_s)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="tiny,cifar10")
    p.add_argument("--batch-tiny", type=int, default=128)
    p.add_argument("--batch-cifar10", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the rows and the environment to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"device": device_name(device),
           "torch": torch.__version__, "fdsm_ext": fdsm_ext.__version__, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    rows = []
    for net in args.nets.split(","):
        rows += time_net(net, getattr(args, f"batch_{net}"), args.repeats, args.warmup, device)
    env["load_after"] = os.getloadavg()
    print(f"# {env['device']}, torch {env['torch']}, {env['threads']} thread(s), load {env['load_before'][0]:.1f}"
          f" -> {env['load_after'][0]:.1f}")
    print("| network | params | batch | loss | median s/step | q20-q80 | vs SSM-VR (paired, q20-q80) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} ({'x'.join(map(str, r['image']))}) | {r['params']:,} | {r['batch']} | {r['loss']} | "
              f"{r['median_s']:.4g} | {r['q20_s']:.3g}-{r['q80_s']:.3g} | {r['ratio_to_ssm_vr']:.2f}x "
              f"({r['ratio_q20']:.2f}-{r['ratio_q80']:.2f}) |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
