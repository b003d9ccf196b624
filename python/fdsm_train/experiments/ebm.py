"""Deep image EBM trained with multi-scale FD-DSM (FD paper's deep-EBM experiment), DSM as the baseline.

Data: :mod:`fdsm_train.data.images` (offline default ``digits``; ``--dataset mnist --data-root DIR``),
dequantized to ``[0, 1)`` per batch. Model: :class:`fdsm_train.models.ebm.ConvLogDensity`. Each sample
gets its own noise level ``sigma ~ U[sigma_min, sigma_max]`` (the authors' "lin" noise distribution)
and a loss weight ``sigma ** sigma_power`` (default 2, NCSN's ``lambda(sigma) = sigma^2``, which keeps
every level's term O(1); the authors' script uses other constants, docs/math.md "FD-DSM").

Evaluation (EMA weights if ``--ema-decay`` > 0):

- ``test_dsm``: the (gradient-based) DSM loss on the test split at ``sigma`` = 0.1, 0.3 and 0.6,
  weighted by ``sigma^2`` and averaged, with a fixed seed: comparable across ``--loss``;
- ``samples.png`` by fdsm_ext's annealed Langevin sampler from uniform noise (FD paper: 10 geometric
  levels from 1 to 0.01, 100 steps each, then NCSNv2's denoising step) and ``mmd2`` of those samples
  to test images; ``ebm.png``: the loss curve.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

import fdsm_ext

from ..config import ConfigError, TrainConfig, eps_option, int_at_least, option, sweep
from ..data.images import IMAGE_DATASETS, dequantize, load_images
from ..figures import draw_image_grid, plot_loss_curve, save_image_grid
from ..metrics import mmd2
from ..models.ebm import ConvLogDensity
from ..objectives import score_matching_loss
from ..trainer import seed_everything
from . import EvalProgress, save_metrics, summary_grid, train_model

EVAL_SIGMAS = (0.1, 0.3, 0.6)


@dataclass
class Config(TrainConfig):
    """Deep-EBM settings; defaults are the paper's and its code's (300K steps at batch 64, Adam 5e-5 with
    betas (0.9, 0.95), gradient clip 0.1, eps 0.05, sigma in [0.05, 1.2])."""

    loss: str = sweep("fd_dsm", "fd_dsm (the paper's) or dsm (its gradient-based counterpart)")
    dataset: str = sweep("digits", "images: digits (scikit-learn 8x8, offline) or mnist (needs --data-root)")
    data_root: str = option("", "MNIST root directory (torchvision layout MNIST/raw/, download=False)")
    width: int = option(64, "channels of the first convolutions")
    sigma_min: float = option(0.05, "smallest training noise level")
    sigma_max: float = option(1.2, "largest training noise level")
    sigma_power: float = option(2.0, "per-sample loss weight sigma ** sigma_power")
    sample_levels: int = option(10, "annealed Langevin levels, geometric from 1 to 0.01")
    sample_steps: int = option(100, "Langevin steps per level")
    sample_lr: float = option(2e-5, "Langevin step_lr (step at level i: step_lr * sigma_i^2 / sigma_L^2)")
    n_samples: int = option(64, "samples in samples.png and the MMD")
    steps: int = option(300_000, "optimizer steps")
    batch_size: int = option(64, "global batch size")
    lr: float = option(5e-5, "Adam learning rate")
    beta2: float = option(0.95, "Adam beta2")
    grad_clip: float = option(0.1, "global gradient-norm clip")
    eps: float = eps_option(0.05, "finite-difference step of fd_dsm (the authors' deep-EBM value)")
    log_every: int = option(50, "write the training loss every this many steps")
    ckpt_every: int = option(5000, "checkpoint every this many steps")

    allowed_losses = ("fd_dsm", "dsm")
    unused_fields = ("dsm_sigma",)  # each sample draws its own sigma from [sigma_min, sigma_max]

    def validate(self) -> None:
        super().validate()
        if self.dataset not in IMAGE_DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose from {', '.join(IMAGE_DATASETS)}")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ConfigError(f"need 0 < sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")
        for name in ("width", "sample_levels", "sample_steps", "n_samples"):
            int_at_least(self, name, 1)


# the digits are small and few: far fewer steps, a larger learning rate
PRESETS = {"dataset": {"digits": {"steps": 4000, "lr": 5e-4, "log_every": 10, "ckpt_every": 1000}}}
SMOKE = {"steps": 10, "batch_size": 16, "width": 8, "sample_levels": 2, "sample_steps": 5, "n_samples": 16,
         "log_every": 2, "ckpt_every": 5}
SWEEP_ALL = {"dataset": IMAGE_DATASETS}
TABLE = ("test_dsm", "mmd2", "seconds_per_step")


def run(cfg: Config, run_dir: str, *, info, resume: bool = False, progress: bool = True) -> dict:
    """Train the EBM with ``cfg.loss`` on ``cfg.dataset`` and evaluate it; see the module docstring."""
    data, levels = load_images(cfg.dataset, cfg.data_root or None)
    train = data["train"]
    seed_everything(cfg.seed)
    model = ConvLogDensity(train.shape[1], train.shape[-1], cfg.width)

    def loss_fn(net, batch, generator):
        x = dequantize(batch, levels, generator)
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        sigma = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * u
        return score_matching_loss(cfg.loss, net, x, cfg, generator, sigma=sigma, sigma_power=cfg.sigma_power)

    result, metrics = train_model(cfg, model, train, loss_fn, run_dir, info=info, resume=resume, progress=progress,
                                  experiment="ebm", dataset=cfg.dataset, loss=cfg.loss)
    if not info.is_main:
        return {}
    with EvalProgress(cfg, 3, progress) as stage:
        metrics.update(evaluate(cfg, result.eval_model, data["test"], levels, run_dir, info.device, stage))
    return save_metrics(metrics, cfg, run_dir)


def evaluate(cfg: Config, model: torch.nn.Module, test: torch.Tensor, levels: int, run_dir: str, device,
             stage=lambda name: None) -> dict:
    """Test DSM loss, annealed-Langevin samples and their MMD to test images; writes the figures.

    ``stage(name)`` is called as each of the 3 stages starts.
    """
    model.eval()
    stage("test DSM")
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 99)
    x = dequantize(test.to(device), levels, gen)
    total = 0.0
    for s in EVAL_SIGMAS:
        sigma = torch.full((x.shape[0],), s, device=device)
        total += float(score_matching_loss("dsm", model, x, cfg, gen, sigma=sigma, sigma_power=2.0).detach())
    out = {"test_dsm": total / len(EVAL_SIGMAS)}
    stage(f"Langevin, {cfg.n_samples} chains")
    ladder = torch.logspace(0, -2, cfg.sample_levels).tolist()
    x0 = torch.rand(cfg.n_samples, *x.shape[1:], generator=gen, device=device)
    # an unconditional energy: its score does not depend on sigma, the ladder sets the step sizes
    samples = fdsm_ext.annealed_langevin(fdsm_ext.score_from_log_density(model, takes_sigma=False), x0, ladder,
                                         cfg.sample_steps, cfg.sample_lr, denoise=True, clamp=(0.0, 1.0),
                                         generator=gen)
    save_image_grid(samples, os.path.join(run_dir, "samples.png"), nrow=8)
    stage("MMD")
    dim = math.prod(x.shape[1:])
    out["mmd2"] = mmd2(samples.cpu(), x[: cfg.n_samples * 4].cpu(),
                       bandwidths=[h * math.sqrt(dim) for h in (0.1, 0.3, 1.0)])
    fig = Figure(figsize=(4, 3), dpi=100, layout="constrained")
    plot_loss_curve(fig.subplots(), os.path.join(run_dir, "scalars.csv"), f"EBM {cfg.dataset} / {cfg.loss}")
    fig.savefig(os.path.join(run_dir, "ebm.png"))
    out["_samples"] = samples
    return out


def summarize(runs: list, out_dir: str) -> None:
    """``ebm.png`` in ``out_dir``: each run's samples, a row per dataset, a column per loss."""

    def cell(ax, cfg, metrics):
        draw_image_grid(ax, metrics["_samples"])
        ax.set_xlabel(f"MMD² {metrics['mmd2']:.2g}, test DSM {metrics['test_dsm']:.3g}", fontsize=8)

    summary_grid(runs, out_dir, "ebm", cell)
