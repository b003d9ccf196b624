"""NCSN experiment: a NCSNv2 score network trained with FD-SSM-VR, SSM-VR or DSM, sampled by annealed Langevin
and/or the predictor-corrector sampler of the VE SDE.

The FD paper's image experiment (Sec. 6.4: NCSN on CIFAR-10, batch 128, FD-SSM-VR vs SSM-VR vs DSM)
with NCSNv2's network and recipe (Song & Ermon 2020). Each training sample gets a noise level drawn
uniformly from the ladder, is perturbed to ``x + sigma z``, and the loss is weighted by ``sigma^2``
(fdsm_ext's annealed losses, :func:`fdsm_train.objectives.noise_conditional_loss`).

``--recipe`` fixes what the fields left at 0 mean (docs/math.md):

- ``fd_paper``: 10 geometric levels 1 -> 0.01, 100 Langevin steps per level, step_lr 2e-5 (NCSN's
  value; the FD paper samples as NCSN does), uniform initial samples.
- ``ncsnv2``: sigma_1 = the largest distance between two training images (T1), the geometric ratio
  of T2 for the data dimension (so L follows from sigma_1 / sigma_L), 5 steps per level, and the
  step size of T4 for that ladder.
- ``ncsnv2_cifar10``: NCSNv2's published CIFAR-10 numbers: sigma_1 = 50, L = 232, T = 5, step_lr = 6.2e-6.

Every recipe trains with Adam (lr 1e-4, betas (0.9, 0.999), eps 1e-8) at batch 128, keeps an EMA of
the weights (0.999, T5) for sampling and FID (``--ema-decay 0``: the raw weights, as NCSN had), and
conditions the network on the noise level by ``s(x)/sigma`` (T3), also for ``fd_paper`` (NCSN's
conditional normalisations are not implemented). Data (``--dataset``): ``shapes`` (offline, drawn in code; the default),
``cifar10``, ``svhn``, ``mnist``, ``celeba`` from ``--data-root`` (never downloaded).

``--channels-last`` (auto: on CUDA) runs the network in the channels-last memory format, where cuDNN's
convolutions are fastest (NHWC, above all under ``--precision bf16|fp16``); on CPU it is off.

``--sampler`` picks the samplers evaluated after training (the net is trained once): ``ald``
(annealed Langevin from uniform noise, NCSN's; the default), ``pc`` (:func:`fdsm_ext.pc_sampler`,
``--pc-corrector`` Langevin corrector steps at ``--pc-snr`` per level, the reverse-diffusion predictor,
from the VE prior ``N(0, sigma_1^2 I)``), or several (``ald,pc`` or ``all``).

Outputs per run: ``samples.png`` (EMA weights, with the final denoising step) and
``samples_no_denoise.png`` (the same chains without it) when ``--denoise both``; ``ncsn.png`` (the loss curve);
``metrics.json`` with the loss curve, the resolved noise ladder and step size, the sampling time and,
when ``--inception FILE`` gives the FID Inception weights, FID on ``--fid-samples`` samples against as
many training images. Those are annealed Langevin's; the predictor-corrector sampler's files and metrics
carry ``_pc`` (``samples_pc.png``, ``sampling_seconds_pc``, ``fid_pc``, ...).

``--bpd-samples N`` (default 64; 0 in ``--smoke``) adds the test bits/dim of the EMA score model by
:func:`fdsm_ext.ode_likelihood` on the first N test images (uniformly dequantised, the ladder's
``sigma_L .. sigma_1`` as the ODE's noise range, ``--bpd-divergence`` fd by default with
``--bpd-probes`` probes, tolerances ``--bpd-rtol``/``--bpd-atol``): ``test_bpd`` and its estimator's
standard error ``test_bpd_se`` (:func:`bpd_metrics`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import fdsm_ext

from ..config import ConfigError, TrainConfig, flag_name, int_at_least, option, require_file, sweep
from ..data.image_datasets import IMAGE_DATASETS, load_images, random_hflip, to_unit_interval
from ..figures import draw_image_grid, plot_loss_curve, save_image_grid
from ..models import ncsnv2 as ncsnv2_net  # not `PRESETS` here: the CLI reads an experiment's PRESETS
from ..models.ncsnv2 import ncsnv2_score_model
from ..objectives import SCORE_LOSSES, noise_conditional_loss
from ..scalars import read_scalars
from ..trainer import seed_everything
from . import EvalProgress, save_metrics, summary_grid, train_model

RECIPES = ("fd_paper", "ncsnv2", "ncsnv2_cifar10")
DENOISE = ("on", "off", "both")
SAMPLERS = ("ald", "pc")  # annealed Langevin (NCSN, NCSNv2); predictor-corrector of the VE SDE (score_sde)
BPD_DIVERGENCES = ("fd", "hutchinson", "exact")
CHANNELS_LAST = ("auto", "on", "off")
# the recipes' fixed numbers; None = derived from the data (T1, T2, T4)
_RECIPE_VALUES = {
    "fd_paper": dict(sigma_max=1.0, n_levels=10, n_steps_each=100, step_lr=2e-5),
    "ncsnv2": dict(sigma_max=None, n_levels=None, n_steps_each=5, step_lr=None),
    "ncsnv2_cifar10": dict(sigma_max=50.0, n_levels=232, n_steps_each=5, step_lr=6.2e-6),
}
SAMPLE_SEED_OFFSET = 4242
BPD_SEED_OFFSET = 3 * SAMPLE_SEED_OFFSET


@dataclass
class Config(TrainConfig):
    """NCSN score network on images (FD paper Sec. 6.4 with NCSNv2's network and recipe)."""

    loss: str = sweep("fd_ssm_vr", "score-matching objective: " + ", ".join(SCORE_LOSSES))
    recipe: str = option("ncsnv2", "noise ladder and sampler settings: " + ", ".join(RECIPES)
                         + " (fields left at 0 take the recipe's value)")
    dataset: str = sweep("shapes", "training images: " + ", ".join(IMAGE_DATASETS)
                         + " ('shapes' is drawn in code; the others are read from --data-root)")
    data_root: str = option("", "directory holding the dataset in torchvision's layout (nothing is downloaded)")
    n_train: int = option(0, "training images (0: all; 'shapes' then draws 10000)")
    image_size: int = option(0, "side length for 'shapes' (0: 16) and 'celeba' (0: 64)")
    random_flip: bool = option(True, "flip training images left-right with probability 1/2 (NCSNv2)")
    net: str = option("cifar10", "score network size: " + ", ".join(ncsnv2_net.PRESETS)
                      + " (cifar10: the published 29.7M)")
    ngf: int = option(0, "base width of the network (0: the preset's)")
    sigma_max: float = option(0.0, "largest noise level sigma_1 (0: the recipe's; ncsnv2: T1 on the data)")
    sigma_min: float = option(0.01, "smallest noise level sigma_L")
    n_levels: int = option(0, "noise levels L (0: the recipe's; ncsnv2: from T2's ratio)")
    t1_images: int = option(0, "training images T1 takes the largest distance over (0: all)")
    n_steps_each: int = option(0, "Langevin steps per noise level T (0: the recipe's)")
    step_lr: float = option(0.0, "Langevin step size at sigma_L (0: the recipe's; ncsnv2: T4)")
    denoise: str = option("both", "final denoising x + sigma_L^2 s(x, sigma_L): on, off, or both (two grids)")
    n_grid: int = option(64, "samples in the figure grid")
    sample_batch: int = option(100, "Langevin chains run at once")
    inception: str = option("", "FID Inception weights (TorchScript inception-2015-12-05.pt); empty: no FID")
    fid_samples: int = option(1000, "samples (and training images) FID is computed on")
    sampler: str = option("ald", "samplers whose grids (and FID) the run reports: ald (annealed Langevin), pc "
                          "(predictor-corrector, fdsm_ext.pc_sampler), a comma-separated list, or all")
    pc_snr: float = option(0.16, "pc: the Langevin corrector's signal-to-noise ratio (score_sde's CIFAR-10 VE: 0.16)")
    pc_corrector: int = option(1, "pc: Langevin corrector steps per noise level (0: the predictor alone)")
    bpd_samples: int = option(64, "test images whose bits/dim fdsm_ext.ode_likelihood estimates (0: none)")
    bpd_divergence: str = option("fd", "divergence of the probability-flow drift for bits/dim: "
                                 + ", ".join(BPD_DIVERGENCES) + " (fd: no backward pass)")
    bpd_probes: int = option(2, "probes per image for the fd/hutchinson divergence (>= 2: a standard error)")
    bpd_rtol: float = option(1e-5, "relative tolerance of the bits/dim ODE solve (score_sde: 1e-5)")
    bpd_atol: float = option(1e-5, "absolute tolerance of the bits/dim ODE solve (score_sde: 1e-5)")
    channels_last: str = option("auto", "network in the channels-last memory format: on, off, or auto (on "
                                "for CUDA, whose NHWC convolutions are faster; off on CPU)")

    steps: int = option(300000, "optimizer steps (NCSNv2's CIFAR-10 run: 300k)")
    batch_size: int = option(128, "global batch size (FD paper and NCSNv2: 128)")
    lr: float = option(1e-4, "Adam learning rate (NCSNv2: 1e-4; betas 0.9, 0.999; eps 1e-8)")
    ema_decay: float = option(0.999, "EMA of the weights, used for sampling and FID (NCSNv2 T5: 0.999; 0: off)")
    ckpt_every: int = option(5000, "checkpoint every this many steps (NCSNv2's snapshot_freq)")

    allowed_losses = SCORE_LOSSES
    first_order_losses = ("fd_ssm_vr", "dsm")  # ssm_vr takes a vector-Jacobian product of the score
    unused_fields = ("dsm_sigma",)  # the noise levels are the ladder's
    resumable_changes = TrainConfig.resumable_changes + (
        "denoise", "n_grid", "sample_batch", "inception", "fid_samples", "sampler", "pc_snr", "pc_corrector",
        "bpd_samples", "bpd_divergence", "bpd_probes", "bpd_rtol", "bpd_atol")

    def validate(self) -> None:
        super().validate()
        choices = {"recipe": RECIPES, "dataset": IMAGE_DATASETS, "net": tuple(ncsnv2_net.PRESETS), "denoise": DENOISE,
                   "channels_last": CHANNELS_LAST, "bpd_divergence": BPD_DIVERGENCES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        samplers(self)  # raises on an unknown or repeated sampler
        for name in ("n_train", "image_size", "ngf", "n_levels", "t1_images", "n_steps_each"):
            int_at_least(self, name, 0)  # 0: the default
        for name in ("n_grid", "sample_batch", "fid_samples"):
            int_at_least(self, name, 1)
        int_at_least(self, "pc_corrector", 0)  # 0: the reverse-diffusion predictor alone
        int_at_least(self, "bpd_samples", 0)  # 0: no bits/dim
        int_at_least(self, "bpd_probes", 2)
        for name in ("pc_snr", "bpd_rtol", "bpd_atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                       and value > 0):
                raise ConfigError(f"{flag_name(name)} must be a finite number > 0, got {value!r}")
        if self.n_levels == 1:
            raise ConfigError("--n-levels must be >= 2 (or 0 for the recipe's)")
        for name in ("sigma_max", "step_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag_name(name)} must be a finite number >= 0 (0: the recipe's), got {value!r}")
        if not (math.isfinite(self.sigma_min) and self.sigma_min > 0):
            raise ConfigError(f"--sigma-min must be a finite number > 0, got {self.sigma_min!r}")
        sigma_max = self.sigma_max or _RECIPE_VALUES[self.recipe]["sigma_max"]
        if sigma_max is not None and sigma_max <= self.sigma_min:
            raise ConfigError(f"need sigma_max > sigma_min, got {sigma_max!r} and {self.sigma_min!r}")
        if self.dataset != "shapes" and not self.data_root:
            raise ConfigError(f"dataset {self.dataset!r} is read from disk: give its directory with --data-root")
        if self.inception:
            require_file(self.inception, "Inception weights (--inception)",
                         "give the FID Inception-v3 as a TorchScript file, e.g. inception-2015-12-05.pt")
        if self.fid_samples < 2 and self.inception:
            raise ConfigError("--fid-samples must be >= 2 to estimate a covariance")


def samplers(cfg: Config) -> tuple[str, ...]:
    """The samplers ``cfg.sampler`` names (``"ald"``, ``"ald,pc"``, ``"all"``; a list from code), in its order."""
    raw = cfg.sampler
    items = [str(p).strip() for p in raw] if isinstance(raw, (list, tuple)) else str(raw).split(",")
    items = [p.strip() for p in items]
    if items == ["all"]:
        return SAMPLERS
    for item in items:
        if item not in SAMPLERS:
            raise ConfigError(f"unknown sampler {item!r} in --sampler {raw!r}; choose from {', '.join(SAMPLERS)}, "
                              "a comma-separated list of them, or all")
    if len(set(items)) != len(items):
        raise ConfigError(f"--sampler {raw!r} names a sampler twice")
    return tuple(items)


# Tiny network, few steps, a short sampler; one intra-op thread (the tiny convolutions do not pay for
# more, and on a shared CPU extra threads cost up to 10x). No bits/dim: an ODE solve at score_sde's
# tolerance on even two images costs more than the whole smoke run (ask with --bpd-samples).
SMOKE = {"dataset": "shapes", "n_train": 512, "net": "tiny", "recipe": "fd_paper", "steps": 20, "batch_size": 16,
         "n_steps_each": 3, "n_grid": 16, "sample_batch": 16, "fid_samples": 32, "log_every": 2, "ckpt_every": 10,
         "lr": 1e-3, "threads": 1, "bpd_samples": 0}
SWEEP_ALL = {"dataset": IMAGE_DATASETS}
TABLE = ("final_train_loss", "seconds_per_step", "n_levels", "sampling_seconds", "fid", "sampling_seconds_pc",
         "fid_pc", "test_bpd", "test_bpd_se")


# --------------------------------------------------------------------------- the noise ladder
def noise_schedule(cfg: Config, images: torch.Tensor | None = None) -> dict:
    """The ladder and sampler settings of ``cfg`` (its recipe filling the fields left at 0).

    ``images`` (``uint8`` or ``[0, 1]`` floats, ``(N, C, H, W)``) are needed only where the recipe
    derives sigma_1 (T1) or the ratio (T2, from the data dimension). Returns ``sigmas`` (a decreasing
    float64 tensor), ``sigma_max``, ``n_levels``, ``gamma`` (the ladder's actual ratio),
    ``gamma_t2`` (T2's target ratio, or None), ``n_steps_each``, ``step_lr`` and where each came from.
    """
    recipe = _RECIPE_VALUES[cfg.recipe]
    source = {}

    def pick(name, derive):
        if getattr(cfg, name):
            source[name] = "config"
            return getattr(cfg, name)
        if recipe[name] is not None:
            source[name] = cfg.recipe
            return recipe[name]
        source[name] = derive.__doc__
        return derive()

    def need_images():
        if images is None:
            raise ValueError(f"recipe {cfg.recipe!r} derives the ladder from the training images; pass them")
        return images

    def t1():
        """T1: largest distance between training images"""
        x = need_images()
        x = x[: cfg.t1_images] if cfg.t1_images else x
        return fdsm_ext.max_pairwise_distance(to_unit_interval(x))

    sigma_max = float(pick("sigma_max", t1))
    if sigma_max <= cfg.sigma_min:
        raise ConfigError(f"sigma_max {sigma_max:.4g} must exceed sigma_min {cfg.sigma_min:.4g} (T1 on too few or "
                          "identical images?)")
    gamma_t2 = None

    def t2():
        """T2: geometric ratio for the data dimension"""
        nonlocal gamma_t2
        gamma_t2 = fdsm_ext.geometric_ratio(int(need_images()[0].numel()))
        return int(fdsm_ext.geometric_sigmas(sigma_max, cfg.sigma_min, gamma=gamma_t2).numel())

    n_levels = int(pick("n_levels", t2))
    sigmas = fdsm_ext.geometric_sigmas(sigma_max, cfg.sigma_min, n_levels)
    gamma = (sigma_max / cfg.sigma_min) ** (1.0 / (n_levels - 1))
    n_steps_each = int(pick("n_steps_each", None))

    def t4():
        """T4: step size for the ladder's ratio"""
        return fdsm_ext.solve_step_size(cfg.sigma_min, gamma, n_steps_each)

    step_lr = float(pick("step_lr", t4))
    return {"sigmas": sigmas, "sigma_max": sigma_max, "sigma_min": cfg.sigma_min, "n_levels": n_levels,
            "gamma": gamma, "gamma_t2": gamma_t2, "n_steps_each": n_steps_each, "step_lr": step_lr,
            "source": source}


# --------------------------------------------------------------------------- data and model
def training_images(cfg: Config, split: str = "train", limit: int | None = None) -> torch.Tensor:
    """``uint8`` images ``(N, C, H, W)`` of ``cfg.dataset``'s ``split`` (at most ``limit``, default
    ``cfg.n_train``); a missing dataset is a :class:`ConfigError`."""
    limit = limit or cfg.n_train or None
    try:
        return load_images(cfg.dataset, cfg.data_root or None, split=split, limit=limit,
                           shapes_count=limit or 10000, image_size=cfg.image_size or None, seed=cfg.seed)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def build_model(cfg: Config, channels: int, image_size: int) -> torch.nn.Module:
    """The noise-conditional NCSNv2 network of ``cfg.net`` for ``channels``-channel images."""
    overrides = {"channels": channels}
    if cfg.ngf:
        overrides["ngf"] = cfg.ngf
    model = ncsnv2_score_model(cfg.net, **overrides)
    if image_size < model.net.config.min_image_size:
        raise ConfigError(f"network {cfg.net!r} downsamples to below one pixel on {image_size}x{image_size} images "
                          f"(needs at least {model.net.config.min_image_size})")
    return model


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """Whether the network runs in channels-last: ``cfg.channels_last``, ``auto`` meaning on CUDA."""
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and torch.device(device).type == "cuda")


# --------------------------------------------------------------------------- the experiment
def run(cfg: Config, run_dir: str, *, info, resume: bool = False, progress: bool = True) -> dict:
    """Train one configuration, then sample (and score FID) with the EMA weights; see the module docstring."""
    seed_everything(cfg.seed)
    train = training_images(cfg)
    if train.shape[0] < cfg.batch_size:
        raise ConfigError(f"`batch_size` {cfg.batch_size} is larger than the training set ({train.shape[0]} images)")
    # read before training, so a missing test split is an error now, not after the run
    test = training_images(cfg, "test", cfg.bpd_samples) if cfg.bpd_samples else None
    schedule = noise_schedule(cfg, train)
    model = build_model(cfg, train.shape[1], min(train.shape[-2:]))
    memory_format = torch.channels_last if uses_channels_last(cfg, info.device) else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    sigmas = schedule["sigmas"].to(device=info.device, dtype=torch.float32)

    def loss_fn(net, batch, generator):
        x = to_unit_interval(batch)
        if cfg.random_flip:
            x = random_hflip(x, generator)
        return noise_conditional_loss(cfg.loss, net, x.contiguous(memory_format=memory_format), sigmas, cfg,
                                      generator)

    result, metrics = train_model(cfg, model, train, loss_fn, run_dir, info=info, resume=resume, progress=progress,
                                  experiment="ncsn", dataset=cfg.dataset, loss=cfg.loss, recipe=cfg.recipe,
                                  n_params=sum(p.numel() for p in model.parameters()),
                                  image_shape=list(train.shape[1:]),
                                  channels_last=memory_format is torch.channels_last)
    if not info.is_main:
        return {}
    curve = read_scalars(os.path.join(run_dir, "scalars.csv"), "train/loss")
    metrics["loss_curve"] = [[s, v] for s, v in curve]
    metrics.update({k: schedule[k] for k in ("sigma_max", "sigma_min", "n_levels", "gamma", "gamma_t2",
                                             "n_steps_each", "step_lr", "source")})
    metrics["sigmas"] = schedule["sigmas"].tolist()
    fig = Figure(figsize=(5, 3.2), dpi=100, layout="constrained")
    plot_loss_curve(fig.subplots(), os.path.join(run_dir, "scalars.csv"), f"{cfg.dataset} / {cfg.loss}")
    fig.savefig(os.path.join(run_dir, "ncsn.png"))
    chosen = samplers(cfg)
    stages = len(chosen) * ((2 if cfg.denoise == "both" else 1) + bool(cfg.inception)) + bool(cfg.bpd_samples)
    with EvalProgress(cfg, stages, progress) as stage:
        metrics.update(evaluate(cfg, result.eval_model, train, schedule, run_dir, info.device, progress=progress,
                                stage=stage))
        if cfg.bpd_samples:
            stage(f"bits/dim on {cfg.bpd_samples} test images")
            metrics.update(bpd_metrics(cfg, result.eval_model, test, schedule, info.device, progress=progress))
    return save_metrics(metrics, cfg, run_dir)


def sample(model: torch.nn.Module, n: int, shape, schedule: dict, cfg: Config, device, *, denoise: bool,
           seed: int, progress: bool = False, sampler: str = "ald") -> torch.Tensor:
    """``n`` samples ``(n, *shape)`` by ``sampler``, ``cfg.sample_batch`` chains at once.

    ``"ald"``: :func:`fdsm_ext.annealed_langevin` from uniform noise on [0, 1] (NCSN, NCSNv2).
    ``"pc"``: :func:`fdsm_ext.pc_sampler` (reverse-diffusion predictor, ``cfg.pc_corrector`` Langevin
    corrector steps at ``cfg.pc_snr``) from the VE prior ``N(0, sigma_1^2 I)``, as score_sde's
    ``prior_sampling`` draws it for [0, 1] data. The chains are a function of ``seed`` alone, so
    ``denoise=True`` and ``False`` differ only by the final step. ``progress``: a tqdm bar over the
    batches of chains.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    sigmas = schedule["sigmas"].tolist()
    out = []
    starts = range(0, n, cfg.sample_batch)
    for start in tqdm(starts, desc=f"sampling {n} ({sampler})", disable=not progress or len(starts) < 2, leave=False):
        b = min(cfg.sample_batch, n - start)
        with torch.no_grad():
            if sampler == "pc":
                x0 = sigmas[0] * torch.randn(b, *shape, generator=gen, device=device)
                x = fdsm_ext.pc_sampler(model, x0, sigmas, n_corrector=cfg.pc_corrector, snr=cfg.pc_snr,
                                        denoise=denoise, generator=gen)
            else:
                x0 = torch.rand(b, *shape, generator=gen, device=device)
                x = fdsm_ext.annealed_langevin(model, x0, sigmas, schedule["n_steps_each"], schedule["step_lr"],
                                               denoise=denoise, generator=gen)
        out.append(x.cpu())
    return torch.cat(out)


def _suffix(sampler: str) -> str:
    """What a sampler's file and metric names end with: nothing for ``ald`` (the names runs always had)."""
    return "" if sampler == "ald" else f"_{sampler}"


def evaluate(cfg: Config, model: torch.nn.Module, train: torch.Tensor, schedule: dict, run_dir: str, device, *,
             progress: bool = False, stage=lambda name: None) -> dict:
    """Per sampler of ``cfg.sampler``: grids (with and/or without the final denoising step), their
    sampling time, and FID if asked for.

    Annealed Langevin writes ``samples.png`` (``samples_no_denoise.png``) and the metrics
    ``sampling_seconds``, ``fid``, ...; the predictor-corrector sampler the same names with ``_pc``
    (``samples_pc.png``, ``sampling_seconds_pc``, ``fid_pc``, ...). ``stage(name)`` is called as each
    grid and FID starts.
    """
    model.eval()
    shape = tuple(train.shape[1:])
    chosen = samplers(cfg)
    out = {"denoise": cfg.denoise, "n_grid": cfg.n_grid, "samplers": list(chosen)}
    variants = {"on": [True], "off": [False], "both": [True, False]}[cfg.denoise]
    for sampler in chosen:
        sfx = _suffix(sampler)
        for denoise in variants:
            stage(f"{cfg.n_grid} samples ({sampler}), {'with' if denoise else 'without'} denoising")
            t0 = time.perf_counter()
            x = sample(model, cfg.n_grid, shape, schedule, cfg, device, denoise=denoise,
                       seed=cfg.seed + SAMPLE_SEED_OFFSET, progress=progress, sampler=sampler)
            seconds = time.perf_counter() - t0
            main_grid = denoise or cfg.denoise == "off"
            name = f"samples{sfx}.png" if main_grid else f"samples{sfx}_no_denoise.png"
            save_image_grid(x.clamp(0, 1), os.path.join(run_dir, name), nrow=math.ceil(math.sqrt(cfg.n_grid)))
            out[f"sampling_seconds{sfx}" if main_grid else f"sampling_seconds{sfx}_no_denoise"] = seconds
            out.setdefault("_grid", x.clamp(0, 1))
        out[f"sampling_seconds_per_image{sfx}"] = out[f"sampling_seconds{sfx}"] / cfg.n_grid
        if cfg.inception:
            stage(f"FID on {cfg.fid_samples} samples ({sampler})")
        out.update({f"{k}{sfx}" if k.startswith("fid") else k: v
                    for k, v in fid_metrics(cfg, model, train, schedule, device, progress=progress,
                                            sampler=sampler).items()})
    return out


def fid_metrics(cfg: Config, model: torch.nn.Module, train: torch.Tensor, schedule: dict, device, *,
                progress: bool = False, sampler: str = "ald") -> dict:
    """FID of ``cfg.fid_samples`` samples of ``sampler`` against as many training images, or ``fid: None``
    without ``--inception``."""
    if not cfg.inception:
        return {"fid": None}
    from ..fid import FeatureExtractor, FIDMeter

    meter = FIDMeter(FeatureExtractor.from_path(cfg.inception, device), batch_size=cfg.sample_batch)
    n = min(cfg.fid_samples, train.shape[0])
    meter.add_real(to_unit_interval(batch) for batch in train[:n].split(cfg.sample_batch))
    t0 = time.perf_counter()
    fake = sample(model, cfg.fid_samples, tuple(train.shape[1:]), schedule, cfg, device,
                  denoise=cfg.denoise != "off", seed=cfg.seed + 2 * SAMPLE_SEED_OFFSET, progress=progress,
                  sampler=sampler)
    seconds = time.perf_counter() - t0
    meter.add_fake(fake.clamp(0, 1))
    return {"fid": meter.compute(), "fid_samples": cfg.fid_samples, "fid_real_images": n,
            "fid_denoised": cfg.denoise != "off", "fid_sampling_seconds": seconds}


def bpd_metrics(cfg: Config, model: torch.nn.Module, test: torch.Tensor, schedule: dict, device, *,
                progress: bool = False) -> dict:
    """Test bits/dim of the score model on the first ``cfg.bpd_samples`` of the ``uint8`` ``test`` images
    ``(N, C, H, W)``, by :func:`fdsm_ext.ode_likelihood`.

    The model's density is ``p_0`` of the VE probability-flow ODE from ``sigma_min`` (the ladder's last
    level) to ``sigma_max`` (its first), with the score ``s(x, sigma) = net(x) / sigma`` the model
    already is (T3); the 8-bit images are uniformly dequantised in the trainer's [0, 1] range, so the
    numbers are bits/dim on the 256-level scale as score_sde reports them (docs/likelihood.md).
    ``cfg.sample_batch`` images per ODE solve.

    Returns ``test_bpd`` (mean over the images), ``test_bpd_se`` (the divergence estimator's standard
    error of that mean, over the probes: ``sqrt(sum_i se_i^2) / N``; 0 for ``exact``),
    ``test_bpd_image_se`` (the spread over the images, ``std / sqrt(N)``; None for one image),
    ``test_bpd_nfe`` (drift evaluations, summed over the solves), ``test_bpd_seconds`` and the settings.
    A score that turns NaN or inf on the ODE path gives ``test_bpd: None`` and ``test_bpd_error`` (and
    a warning) rather than losing the run's other metrics.
    """
    n = min(cfg.bpd_samples, test.shape[0])
    x = to_unit_interval(test[:n])
    gen = torch.Generator(device=device).manual_seed(cfg.seed + BPD_SEED_OFFSET)
    sigmas = schedule["sigmas"]
    n_probes = 1 if cfg.bpd_divergence == "exact" else cfg.bpd_probes
    model.eval()
    bpd, bpd_se, nfe = [], [], 0
    t0 = time.perf_counter()
    starts = range(0, n, cfg.sample_batch)
    for start in tqdm(starts, desc=f"bits/dim on {n}", disable=not progress or len(starts) < 2, leave=False):
        batch = x[start:start + cfg.sample_batch].to(device)
        try:
            res = fdsm_ext.ode_likelihood(model, batch, float(sigmas[-1]), float(sigmas[0]),
                                          divergence=cfg.bpd_divergence, n_probes=n_probes, rtol=cfg.bpd_rtol,
                                          atol=cfg.bpd_atol, dequantize="uniform", data_range=(0.0, 1.0),
                                          generator=gen)
        except FloatingPointError as exc:
            warnings.warn(f"ncsn: no test bits/dim: {exc}", RuntimeWarning, stacklevel=2)
            return {"test_bpd": None, "test_bpd_se": None, "test_bpd_error": str(exc)}
        bpd.append(res.bpd.double().cpu())
        bpd_se.append(res.bpd_se.double().cpu())
        nfe += res.nfe
    seconds = time.perf_counter() - t0
    bpd, bpd_se = torch.cat(bpd), torch.cat(bpd_se)
    return {"test_bpd": float(bpd.mean()), "test_bpd_se": float(bpd_se.square().sum().sqrt() / n),
            "test_bpd_image_se": float(bpd.std() / math.sqrt(n)) if n > 1 else None,
            "test_bpd_nfe": nfe, "test_bpd_seconds": seconds, "bpd_images": n,
            "bpd_divergence": cfg.bpd_divergence, "bpd_probes": n_probes}


# --------------------------------------------------------------------------- figures
def summarize(runs: list, out_dir: str) -> None:
    """``ncsn.png`` in ``out_dir``: each run's denoised sample grid of its first sampler (with that
    sampler's FID), a row per dataset, a column per loss."""

    def cell(ax, cfg, metrics):
        draw_image_grid(ax, metrics["_grid"])
        first = metrics.get("samplers", ["ald"])[0]
        fid = metrics.get(f"fid{_suffix(first)}")
        ax.set_xlabel(f"final loss {metrics['final_train_loss']:.3g}" + (f", FID {fid:.3g}" if fid else "")
                      + ("" if first == "ald" else f" ({first})"), fontsize=8)

    summary_grid(runs, out_dir, "ncsn", cell)
