"""NICE in logit space (FD paper, NICE on MNIST): exact test likelihood for each score-matching loss.

Data: :mod:`fdsm_train.data.images` (offline default ``digits``, scikit-learn's 8x8 digits;
``--dataset mnist --data-root DIR`` for the paper's). Each batch is dequantized with fresh uniform noise,
``x = (v + u) / L``, then logit-transformed, ``y = logit(1e-3 + (1 - 2e-3) x)``; the model
(:class:`fdsm_train.models.nice.NICE`) is a normalised density of ``y`` and is trained with
``--loss`` on ``y``, which never sees the normaliser.

Evaluation on the test split (one fixed dequantization draw):

- ``test_nll_logit``: ``-log p(y)`` in nats, in logit space (what the losses fit);
- ``test_bpd``: bits per dimension of the pixel levels, ``-(log p(y) + log|dy/dx| - D log L) / (D ln 2)``,
  exact since NICE is normalised (L = 256 for MNIST, 17 for digits);
- ``test_exact_sm``: the exact SM loss in logit space on the first ``--sm-eval-rows`` test images;
- ``samples.png``: exact samples (inverse flow) mapped back to pixels, and ``nice.png``: the loss curve.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from ..config import ConfigError, TrainConfig, int_at_least, option, resolve_steps, sweep
from ..data.images import IMAGE_DATASETS, dequantize, from_logit, load_images, to_logit
from ..figures import draw_image_grid, plot_loss_curve, save_image_grid
from ..metrics import heldout_exact_sm, log_density_chunked
from ..models.nice import NICE
from ..objectives import score_matching_loss
from ..trainer import seed_everything
from . import EvalProgress, save_metrics, summary_grid, train_model

LOGIT_LAMBDA = 1e-3


@dataclass
class Config(TrainConfig):
    """NICE settings; defaults are the paper's (4 couplings, 5-layer MLPs of width 1000, batch 128,
    100 epochs, Adam 1e-3)."""

    dataset: str = sweep("digits", "images: digits (scikit-learn 8x8, offline) or mnist (needs --data-root)")
    data_root: str = option("", "MNIST root directory (torchvision layout MNIST/raw/, download=False)")
    epochs: int = option(100, "passes over the training split (sets steps when steps is 0)")
    steps: int = option(0, "optimizer steps; 0: epochs x (training images // batch_size)")
    hidden: int = option(1000, "width of the coupling MLPs")
    mlp_layers: int = option(5, "linear layers per coupling MLP")
    couplings: int = option(4, "additive coupling layers")
    sm_eval_rows: int = option(1000, "test images for the exact SM loss (D backward passes each chunk)")
    n_samples: int = option(64, "samples in samples.png")
    batch_size: int = option(128, "global batch size")
    ckpt_every: int = option(1000, "checkpoint every this many steps")

    min_steps = 0

    def validate(self) -> None:
        super().validate()
        if self.dataset not in IMAGE_DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose from {', '.join(IMAGE_DATASETS)}")
        for name in ("epochs", "hidden", "mlp_layers", "couplings", "sm_eval_rows", "n_samples"):
            int_at_least(self, name, 1)


# the 64-dimensional digits need far less than MNIST's width 1000 (and train in minutes on a CPU)
PRESETS = {"dataset": {"digits": {"hidden": 256}}}
SMOKE = {"steps": 6, "batch_size": 32, "hidden": 32, "mlp_layers": 3, "sm_eval_rows": 64, "n_samples": 16,
         "log_every": 2, "ckpt_every": 3}
SWEEP_ALL = {"dataset": IMAGE_DATASETS}
TABLE = ("test_bpd", "test_nll_logit", "test_exact_sm", "seconds_per_step")


def run(cfg: Config, run_dir: str, *, info, resume: bool = False, progress: bool = True) -> dict:
    """Train NICE with ``cfg.loss`` on ``cfg.dataset`` and evaluate it; see the module docstring."""
    data, levels = load_images(cfg.dataset, cfg.data_root or None)
    train = data["train"]
    cfg = resolve_steps(cfg, train.shape[0])
    shape = tuple(train.shape[1:])
    seed_everything(cfg.seed)
    model = NICE(math.prod(shape), cfg.hidden, cfg.mlp_layers, cfg.couplings)

    def loss_fn(net, batch, generator):
        y, _ = to_logit(dequantize(batch, levels, generator), LOGIT_LAMBDA)
        return score_matching_loss(cfg.loss, net, y, cfg, generator)

    result, metrics = train_model(cfg, model, train, loss_fn, run_dir, info=info, resume=resume, progress=progress,
                                  experiment="nice", dataset=cfg.dataset, loss=cfg.loss, dim=math.prod(shape))
    if not info.is_main:
        return {}
    with EvalProgress(cfg, 3, progress) as stage:
        metrics.update(evaluate(cfg, result.eval_model, data["test"], levels, shape, run_dir, info.device, stage))
    return save_metrics(metrics, cfg, run_dir)


def evaluate(cfg: Config, model: NICE, test: torch.Tensor, levels: int, shape: tuple, run_dir: str, device,
             stage=lambda name: None) -> dict:
    """Exact test NLL (logit nats, bits/dim) and exact SM loss; writes samples.png and nice.png.

    ``stage(name)`` is called as each of the 3 stages starts.
    """
    model.eval()
    stage("test NLL")
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 99)
    y, logdet = to_logit(dequantize(test.to(device), levels, gen), LOGIT_LAMBDA)
    log_py = log_density_chunked(model, y).double()
    dim = y.shape[1]
    log_p_levels = log_py + logdet.double() - dim * math.log(levels)
    out = {
        "test_nll_logit": float(-log_py.mean()),
        "test_bpd": float(-log_p_levels.mean() / (dim * math.log(2))),
    }
    stage("test exact SM")
    out["test_exact_sm"] = heldout_exact_sm(model, y[: cfg.sm_eval_rows], chunk=256)
    stage("samples")
    samples = from_logit(model.sample(cfg.n_samples, gen), LOGIT_LAMBDA).reshape(-1, *shape)
    save_image_grid(samples, os.path.join(run_dir, "samples.png"), nrow=8)
    fig = Figure(figsize=(4, 3), dpi=100, layout="constrained")
    plot_loss_curve(fig.subplots(), os.path.join(run_dir, "scalars.csv"), f"NICE {cfg.dataset} / {cfg.loss}")
    fig.savefig(os.path.join(run_dir, "nice.png"))
    out["_samples"] = samples
    return out


def summarize(runs: list, out_dir: str) -> None:
    """``nice.png`` in ``out_dir``: each run's samples, a row per dataset, a column per loss."""

    def cell(ax, cfg, metrics):
        draw_image_grid(ax, metrics["_samples"])
        ax.set_xlabel(f"test {metrics['test_bpd']:.3g} bits/dim", fontsize=8)

    summary_grid(runs, out_dir, "nice", cell)
