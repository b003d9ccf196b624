"""Toy experiment: an MLP log-density on 2-D densities, fitted by score matching, sampled by Langevin.

Data are generated (nothing to download): :mod:`fdsm_train.data.toy`. Each run reports on a held-out
sample of the density:

- ``heldout_exact_sm``: the exact score-matching loss (Fisher divergence up to a constant; lower is better);
- ``heldout_nll``: negative log-likelihood in nats of the model normalised on a grid over the plotting
  square (the score-matching losses never see the normaliser; this is the likelihood they imply);
- ``mmd2``: squared MMD between samples of fdsm_ext's annealed Langevin sampler (uniform start on the
  plotting square) and held-out data, with ``mmd2_floor`` the same number for a fresh sample of the
  true density (what a perfect sampler would score).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import fdsm_ext

from ..config import ConfigError, TrainConfig, option, sweep
from ..data.toy import BOX, DENSITIES, sample_toy
from ..figures import draw_toy_density, draw_toy_histogram, toy_panels
from ..metrics import grid_log_normalizer, heldout_exact_sm, log_density_chunked, mmd2
from ..models.mlp import MLPLogDensity
from ..objectives import score_matching_loss
from ..trainer import seed_everything
from . import EvalProgress, save_metrics, summary_grid, train_model

# fixed data seeds, so runs with different training seeds see the same data
TRAIN_SEED, TEST_SEED, REFERENCE_SEED = 1234, 1235, 1236


@dataclass
class Config(TrainConfig):
    """Toy 2-D densities (no paper table; the FD paper's losses on a picture you can check by eye)."""

    density: str = sweep("mog", "2-D density: " + ", ".join(DENSITIES))
    n_train: int = option(20000, "training points drawn from the density")
    n_test: int = option(2000, "held-out points (exact SM loss, NLL, MMD)")
    hidden: int = option(128, "MLP width")
    depth: int = option(3, "MLP hidden layers")
    grid: int = option(200, "grid resolution of the density plot and of the normaliser")
    n_samples: int = option(2000, "Langevin samples for the figure and the MMD")
    langevin_levels: int = option(3, "step-size levels of the sampler (each halves sigma)")
    langevin_steps: int = option(300, "Langevin steps per level")
    langevin_lr: float = option(0.005, "Langevin step size at the last level (x4 per earlier level)")

    # where the toy's settings differ from TrainConfig's (steps, batch, logging: TrainConfig's own)
    lr: float = option(3e-3, "Adam learning rate")
    ema_decay: float = option(0.99, "EMA of the weights used for evaluation and sampling (0: off)")

    def validate(self) -> None:
        super().validate()
        if self.density not in DENSITIES:
            raise ConfigError(f"unknown density {self.density!r}; choose from {', '.join(DENSITIES)}")


SMOKE = {"steps": 60, "n_train": 2000, "n_test": 256, "hidden": 32, "depth": 2, "batch_size": 64, "grid": 48,
         "n_samples": 256, "langevin_steps": 20, "ckpt_every": 30, "log_every": 5}
SWEEP_ALL = {"density": tuple(DENSITIES)}
TABLE = ("heldout_exact_sm", "heldout_nll", "mmd2", "mmd2_floor", "seconds_per_step")


def run(cfg: Config, run_dir: str, *, info, resume: bool = False, progress: bool = True) -> dict:
    """Train one (density, loss) configuration and evaluate it; see the module docstring."""
    seed_everything(cfg.seed)
    train = sample_toy(cfg.density, cfg.n_train, TRAIN_SEED)
    test = sample_toy(cfg.density, cfg.n_test, TEST_SEED)
    model = MLPLogDensity(2, cfg.hidden, cfg.depth)

    def loss_fn(net, x, generator):
        return score_matching_loss(cfg.loss, net, x, cfg, generator)

    result, metrics = train_model(cfg, model, train, loss_fn, run_dir, info=info, resume=resume, progress=progress,
                                  experiment="toy", density=cfg.density, loss=cfg.loss)
    if not info.is_main:
        return {}
    with EvalProgress(cfg, 4, progress) as stage:
        metrics.update(evaluate(cfg, result.eval_model, train, test, run_dir, info.device, stage))
    return save_metrics(metrics, cfg, run_dir)


def evaluate(cfg: Config, model: torch.nn.Module, train: torch.Tensor, test: torch.Tensor, run_dir: str,
             device, stage=lambda name: None) -> dict:
    """Held-out exact SM loss, grid NLL, Langevin samples and their MMD; writes ``toy.png``.

    ``stage(name)`` is called as each of the 4 stages starts (:class:`~fdsm_train.experiments.EvalProgress`).
    """
    model.eval()
    test = test.to(device)
    stage("held-out exact SM")
    out = {"heldout_exact_sm": heldout_exact_sm(model, test)}
    stage("grid NLL")
    log_z, log_prob = grid_log_normalizer(model, BOX, cfg.grid, device)
    out["heldout_nll"] = float(log_z - log_density_chunked(model, test).double().mean())

    stage(f"Langevin, {cfg.n_samples} chains")
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 99)
    x0 = (torch.rand(cfg.n_samples, 2, generator=gen, device=device) * 2 - 1) * BOX
    # the model is not noise-conditional: the ladder only halves the step size level by level
    sigmas = [2.0 ** (cfg.langevin_levels - 1 - i) for i in range(cfg.langevin_levels)]
    samples = fdsm_ext.annealed_langevin(fdsm_ext.score_from_log_density(model, takes_sigma=False), x0, sigmas,
                                         cfg.langevin_steps, cfg.langevin_lr, denoise=False, clamp=(-BOX, BOX),
                                         generator=gen).cpu()
    test = test.cpu()
    stage("MMD")
    out["mmd2"] = mmd2(samples, test)
    out["mmd2_floor"] = mmd2(sample_toy(cfg.density, cfg.n_samples, REFERENCE_SEED), test)
    row = {"title": f"{cfg.density} / {cfg.loss}", "data": train[:20000], "density": log_prob.exp(),
           "samples": samples}
    toy_panels(os.path.join(run_dir, "toy.png"), [row], BOX)
    out["_panel"] = row
    return out


def summarize(runs: list, out_dir: str) -> None:
    """``toy.png`` in ``out_dir``: a row per density (its training data first), a column per loss, each
    cell the learned density with the run's Langevin samples as dots."""

    def data(ax, cfg, metrics):
        draw_toy_histogram(ax, metrics["_panel"]["data"], BOX)

    def cell(ax, cfg, metrics):
        draw_toy_density(ax, metrics["_panel"]["density"], BOX, metrics["_panel"]["samples"])
        ax.set_xlabel(f"MMD² {metrics['mmd2']:.2g}, NLL {metrics['heldout_nll']:.3g}", fontsize=8)

    summary_grid(runs, out_dir, "toy", cell, first_column=("training data", data))
