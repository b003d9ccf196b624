"""DKEF on UCI tables (FD paper Table 1): test NLL and exact SM loss per training objective.

Model: :class:`fdsm_train.models.dkef.DKEF`; data and preprocessing: :mod:`fdsm_train.data.uci`
(offline default ``wine``, scikit-learn's bundled table; ``--dataset redwine --data-path
winequality-red.csv`` for the paper's). Each step splits the batch in halves: ``alpha`` is solved in
closed form on the first (the objective's own quadratic, ``--alpha-method auto``), the loss is taken on
the second. Inducing points start at random training rows.

Evaluation (EMA weights if ``--ema-decay`` > 0): ``alpha`` is solved once more on the whole training
set, then

- ``test_nll`` (and ``val_nll``), nats: ``-mean log p~(x) + log Z`` with ``log Z`` estimated by
  importance sampling from ``q0 = N(0, 2^2 I)`` with ``--is-samples`` draws (default 10^5; the authors
  used 10^6); ``is_ess`` is the effective sample size fraction of those weights (near 0 means the
  estimate, hence the NLL, is unreliable);
- ``test_exact_sm``: the exact score-matching loss on the test split.

Not reproduced from the authors' code: early stopping on the validation loss and the final 1000-step
tuning of ``lambda`` on the validation split; training runs the fixed number of epochs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from ..config import ConfigError, TrainConfig, int_at_least, option, resolve_steps, sweep
from ..data.uci import DATASETS, load_uci
from ..figures import plot_loss_curve
from ..metrics import heldout_exact_sm, log_density_chunked
from ..models.dkef import ALPHA_METHODS, DKEF
from ..objectives import score_matching_loss
from ..trainer import seed_everything
from . import EvalProgress, run_parts, save_metrics, summary_grid, train_model

#: the alpha solve of each loss in the authors' code (FD-SSM reuses SSM's sliced quadratic)
AUTO_ALPHA = {"fd_ssm": "sliced", "ssm": "sliced", "ssm_vr": "sliced_vr", "exact_sm": "exact", "dsm": "dsm",
              "fd_dsm": "dsm"}


@dataclass
class Config(TrainConfig):
    """DKEF settings; defaults are the paper's (500 epochs, batch 200, eps 0.1, M = 200, Adam 0.01)."""

    dataset: str = sweep("wine", "table: " + ", ".join(DATASETS) + " (wine: scikit-learn's, offline)")
    data_path: str = option("", "the UCI file of parkinsons / redwine / whitewine")
    epochs: int = option(500, "passes over the training split (sets steps when steps is 0)")
    steps: int = option(0, "optimizer steps; 0: epochs x (training rows // batch_size)")
    n_inducing: int = option(200, "M, inducing points")
    n_kernels: int = option(3, "Gaussian kernels")
    hidden: int = option(30, "feature MLP width")
    alpha_method: str = option("auto", "closed-form alpha: auto (per loss), " + ", ".join(ALPHA_METHODS))
    is_samples: int = option(100_000, "importance samples for log Z of the test NLL")
    batch_size: int = option(200, "global batch size, split in halves (alpha | loss)")
    lr: float = option(0.01, "Adam learning rate")
    grad_clip: float = option(1.0, "global gradient-norm clip (the authors' code)")

    min_steps = 0  # 0: resolved from epochs at run time

    def validate(self) -> None:
        super().validate()
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.alpha_method != "auto" and self.alpha_method not in ALPHA_METHODS:
            raise ConfigError(f"unknown alpha_method {self.alpha_method!r}; choose from auto, "
                              f"{', '.join(ALPHA_METHODS)}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be >= 2 (it is split into alpha and loss halves), "
                              f"got {self.batch_size}")
        for name in ("epochs", "n_inducing", "n_kernels", "hidden", "is_samples"):
            int_at_least(self, name, 1)

    @property
    def resolved_alpha_method(self) -> str:
        """The alpha solve this run uses."""
        return AUTO_ALPHA[self.loss] if self.alpha_method == "auto" else self.alpha_method


# scikit-learn's wine table has 145 training rows: a smaller batch and M than the paper's 200
PRESETS = {"dataset": {"wine": {"batch_size": 100, "n_inducing": 100}}}
SMOKE = {"epochs": 3, "batch_size": 40, "n_inducing": 20, "hidden": 8, "is_samples": 4000, "log_every": 1,
         "ckpt_every": 2}
SWEEP_ALL = {"dataset": DATASETS}
TABLE = ("test_nll", "test_exact_sm", "is_ess", "seconds_per_step")


def run(cfg: Config, run_dir: str, *, info, resume: bool = False, progress: bool = True) -> dict:
    """Train DKEF with ``cfg.loss`` on ``cfg.dataset`` and evaluate it; see the module docstring."""
    data = load_uci(cfg.dataset, cfg.data_path or None)
    train = data["train"]
    cfg = resolve_steps(cfg, train.shape[0])
    if cfg.n_inducing > train.shape[0]:
        raise ConfigError(f"`n_inducing` {cfg.n_inducing} exceeds the {train.shape[0]} training rows of "
                          f"{cfg.dataset}")
    seed_everything(cfg.seed)
    inducing = train[torch.randperm(train.shape[0])[: cfg.n_inducing]]
    model = DKEF(inducing, cfg.n_kernels, cfg.hidden)
    method = cfg.resolved_alpha_method

    def loss_fn(net, batch, generator):
        half = batch.shape[0] // 2
        alpha = net.fit_alpha(batch[:half], method, generator, cfg.dsm_sigma)
        return score_matching_loss(cfg.loss, lambda y: net(y, alpha), batch[half:], cfg, generator)

    result, metrics = train_model(cfg, model, train, loss_fn, run_dir, info=info, resume=resume, progress=progress,
                                  experiment="dkef", dataset=cfg.dataset, loss=cfg.loss, alpha_method=method,
                                  dim=train.shape[1], n_train=train.shape[0])
    if not info.is_main:
        return {}
    with EvalProgress(cfg, 4, progress) as stage:
        metrics.update(evaluate(cfg, result.eval_model, data, method, run_dir, info.device, stage))
    return save_metrics(metrics, cfg, run_dir)


def log_normalizer(model: DKEF, dim: int, n_samples: int, generator: torch.Generator, device,
                   chunk: int = 10_000) -> tuple[float, float]:
    """Importance-sampling estimate of ``log Z`` of ``model`` with proposal ``q0``, and the ESS fraction."""
    std = model.q0_std
    log_w = []
    for start in range(0, n_samples, chunk):
        n = min(chunk, n_samples - start)
        x = std * torch.randn(n, dim, generator=generator, device=device)
        log_q = -0.5 * x.square().sum(1) / std**2 - dim * math.log(std * math.sqrt(2 * math.pi))
        log_w.append(log_density_chunked(model, x).double() - log_q.double())
    log_w = torch.cat(log_w)
    log_z = float(torch.logsumexp(log_w, 0)) - math.log(n_samples)
    ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / n_samples
    return log_z, ess


def evaluate(cfg: Config, model: DKEF, data: dict, method: str, run_dir: str, device,
             stage=lambda name: None) -> dict:
    """Refit ``alpha`` on the training split, then test/val NLL, IS diagnostics, test exact SM; a figure.

    ``stage(name)`` is called as each of the 4 stages starts.
    """
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 99)
    train, val, test = (data[k].to(device) for k in ("train", "val", "test"))
    stage("alpha on the training split")
    model.fit_alpha_on(train, method, gen, cfg.dsm_sigma)
    stage(f"log Z from {cfg.is_samples} importance samples")
    log_z, ess = log_normalizer(model, train.shape[1], cfg.is_samples, gen, device)
    out = {
        "log_z": log_z,
        "is_ess": ess,
        "test_nll": float(log_z - log_density_chunked(model, test).double().mean()),
        "val_nll": float(log_z - log_density_chunked(model, val).double().mean()),
    }
    stage("test exact SM")
    out["test_exact_sm"] = heldout_exact_sm(model, test)
    stage("figure")
    _figure(os.path.join(run_dir, "dkef.png"), cfg, model, test.cpu(), run_dir)
    return out


def _figure(path: str, cfg: Config, model: DKEF, test: torch.Tensor, run_dir: str) -> None:
    """Training loss curve, and log p~ on the plane of the first two whitened coordinates with test points."""
    fig = Figure(figsize=(8, 3.5), dpi=100, layout="constrained")
    ax_loss, ax_slice = fig.subplots(1, 2)
    plot_loss_curve(ax_loss, os.path.join(run_dir, "scalars.csv"), f"{cfg.dataset} / {cfg.loss}: training loss")
    lim = 4.0
    g = torch.linspace(-lim, lim, 100)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    pts = torch.zeros(xx.numel(), test.shape[1])
    pts[:, 0], pts[:, 1] = xx.reshape(-1), yy.reshape(-1)
    dev = model.z.device
    logp = log_density_chunked(model, pts.to(dev)).cpu().reshape(100, 100)
    ax_slice.imshow(logp.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    ax_slice.scatter(test[:, 0], test[:, 1], s=3, c="white", alpha=0.6)
    ax_slice.set_title("log p~ on the x1-x2 plane (rest 0), test points", fontsize=9)
    fig.savefig(path)


def summarize(runs: list, out_dir: str) -> None:
    """``dkef.png`` in ``out_dir``: each run's training loss curve, a row per dataset, a column per loss."""

    def cell(ax, cfg, metrics):
        plot_loss_curve(ax, os.path.join(out_dir, *run_parts(cfg), "scalars.csv"), "")
        ax.set_xlabel(f"step; test NLL {metrics['test_nll']:.3g}", fontsize=8)

    summary_grid(runs, out_dir, "dkef", cell)
