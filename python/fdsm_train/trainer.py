"""The training loop every experiment shares.

:class:`Trainer` runs Adam on ``loss_fn(model, batch, generator)`` over an in-memory training tensor
and owns everything that is not the experiment's business:

- data order from :class:`torch.utils.data.DistributedSampler` (seeded, reshuffled per epoch, each
  process taking its share of every global batch), so the batch of step ``s`` depends only on the seed
  and ``s``;
- a dedicated :class:`torch.Generator` for the loss's random directions and noise, saved in checkpoints;
- an EMA of the weights (:func:`fdsm_ext.ema_model`, an ``AveragedModel``) used for evaluation;
- ``scalars.csv`` (and TensorBoard), a tqdm bar on rank 0;
- atomic, checksummed checkpoints every ``ckpt_every`` steps and at the end, holding the model, the
  optimizer, the EMA, every RNG state and the step; the one it replaces is kept as ``prev.pt``.
  ``resume=True`` verifies ``last.pt`` (falling back to ``prev.pt`` if it is damaged) and continues from
  it so that the loss curve is bitwise the curve of an uninterrupted run with the same threads, device,
  torch build and CPU kernels (a resume that changes one of them says so);
- nothing already written is shortened or rewritten before the checkpoint is verified, and then only
  atomically (:mod:`fdsm_train.scalars`); a file that cannot be written stops the run with
  :class:`RunWriteError` naming it, the last good checkpoint intact;
- a non-finite loss, or a FD loss refusing non-finite model outputs (``FloatingPointError``), stops
  the run before the weights are touched (:class:`NonFiniteLossError` names the step; the last
  checkpoint stays as it was); SIGTERM/SIGINT finish the current step, write a
  checkpoint and raise :class:`TrainingInterrupted`;
- the training step's options: ``precision`` (autocast of the model in bf16/fp16, with a
  :class:`torch.amp.GradScaler` for fp16), ``compile`` (:func:`torch.compile` of the model the loss
  calls), and the training tensor copied to a CUDA device once, from pinned memory without blocking;
- data-parallel training under torchrun: each process takes its share of every global batch and the
  gradients are averaged over processes after ``backward()`` (:func:`fdsm_train.distributed.average_gradients`
  says why not inside it, as DistributedDataParallel would), so N processes with batch B/N each follow
  the single-process run with batch B.
"""

from __future__ import annotations

import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

import fdsm_ext

from . import distributed
from .checkpoint import (CheckpointError, atomic_write, read_checkpoint, remove_stale_temporaries, rng_states,
                         set_rng_states, write_checkpoint)
from .config import PRECISIONS, ConfigError
from .scalars import ScalarWriter

LossFn = Callable[[nn.Module, Tensor, torch.Generator], Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class RunWriteError(ConfigError):
    """A file of the run could not be written (full disk, read-only folder); the message names it and
    the last good checkpoint, which is intact, as is everything written before."""


class TrainingInterrupted(RuntimeError):
    """A signal stopped training after a checkpoint was written (``.step``, ``.checkpoint``)."""

    def __init__(self, message: str, step: int, checkpoint: str):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    """What a finished :meth:`Trainer.fit` hands to the experiment's evaluation."""

    model: nn.Module
    eval_model: nn.Module
    step: int
    final_loss: float
    seconds_per_step: float
    resumed_from: int
    #: 20 % and 80 % quantiles of the step time (its spread on a loaded machine)
    seconds_per_step_q20: float = float("nan")
    seconds_per_step_q80: float = float("nan")
    #: with ``compile``: seconds of this process's first step (tracing and compiling included), else NaN
    first_step_seconds: float = float("nan")


def _nonfinite_as_nan(loss_fn: LossFn, device: torch.device) -> LossFn:
    """``loss_fn`` returning NaN where it raises ``FloatingPointError`` (the FD losses' refusal of
    non-finite model outputs), so a diverging FD loss stops like any other (every process still joins
    the loss's all-reduce)."""
    def wrapped(model, batch, generator):
        try:
            return loss_fn(model, batch, generator)
        except FloatingPointError:
            return torch.tensor(float("nan"), device=device)
    return wrapped


def run_environment() -> dict:
    """What, besides the checkpoint, decides the exact floats of a step on this machine: torch's
    version, its intra-op thread count (the order of its reductions) and the CPU kernels it picked."""
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


_SELF_CHECKED: set[str] = set()


def startup_selfcheck(device: torch.device, backend: str, is_main: bool = True) -> None:
    """Run :func:`fdsm_ext.selfcheck` once per device and process (the trainers do it on CUDA, where a
    user's GPU may be the first to run the kernels). A disagreeing backend that ``--backend`` names
    stops the run (:class:`ConfigError`); with ``--backend auto`` the losses pass over it, with a warning."""
    if str(device) in _SELF_CHECKED:
        return
    _SELF_CHECKED.add(str(device))
    report = fdsm_ext.selfcheck(device, raise_on_failure=False)
    failed = sorted({row.backend for row in report.failures})
    if failed and backend in failed:
        raise ConfigError(f"--backend {backend}: fdsm_ext's self-check on {device} found its kernels disagreeing "
                          f"with the reference ({report.failures[0].op}); use --backend auto or torch, and "
                          "please report it")
    if failed and is_main:
        print(f"fdsm-train: warning: fdsm_ext's self-check on {device} found backend(s) {', '.join(failed)} "
              f"disagreeing with the reference; backend='auto' passes over them:\n{report}", file=sys.stderr)


def seed_everything(seed: int) -> None:
    """Seed torch (every device), NumPy and Python's ``random`` (call before building the model)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``; to CUDA through pinned host memory and a non-blocking copy (the host does
    not wait for the transfer; later work on the device's stream is ordered after it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def epoch_batches(n: int, global_batch: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Indices ``(batches, global_batch // world_size)`` of this process's share of epoch ``epoch``.

    A seeded :class:`DistributedSampler` permutes ``range(n)`` (the same permutation on every process)
    and hands rank ``r`` the positions ``r, r + W, ...``; global batch ``b`` is positions
    ``[b B, (b + 1) B)`` of the permutation whatever ``W`` is. The incomplete last batch is dropped.
    """
    per_rank = global_batch // world_size
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.long)
    count = len(idx) // per_rank
    return idx[: count * per_rank].view(count, per_rank)


class Trainer:
    """Trains ``model`` on ``train_data`` with ``loss_fn``; see the module docstring.

    Args:
        cfg: a :class:`~fdsm_train.config.TrainConfig` (validated).
        model: the module to train (already seeded and built; moved to the training device here).
        train_data: the training set, a tensor ``(N, *S)`` (moved to the device once).
        loss_fn: ``loss_fn(model, batch, generator) -> scalar``, the mean over this process's share;
            ``generator`` is the only randomness it should use, so that resuming is exact.
        run_dir: where ``checkpoints/last.pt`` (and ``prev.pt``), ``scalars.csv`` and ``config.yaml`` go.
        dist_info: from :func:`fdsm_train.distributed.setup` (single CPU/auto process if None).
        resume: continue from ``run_dir/checkpoints/last.pt`` (or ``prev.pt`` when ``last.pt`` is
            damaged) if one exists.
        progress: show a tqdm bar (rank 0 only).
        run_name: what the bar and messages call this run (e.g. ``mog/fd_ssm``; default: the loss).
        after_backward: called as ``after_backward(step, model)`` after each backward, before the
            optimizer step (tests read gradients there).
    """

    def __init__(self, cfg, model: nn.Module, train_data: Tensor, loss_fn: LossFn, run_dir: str, *,
                 dist_info: distributed.DistInfo | None = None, resume: bool = False, progress: bool = True,
                 after_backward: Callable[[int, nn.Module], None] | None = None, run_name: str | None = None):
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.info = dist_info or distributed.DistInfo(0, 1, 0, distributed.resolve_device(cfg.device))
        if cfg.batch_size % self.info.world_size:
            raise ConfigError(f"`batch_size` {cfg.batch_size} must be divisible by the number of processes "
                              f"({self.info.world_size})")
        if train_data.shape[0] < cfg.batch_size:
            raise ConfigError(f"`batch_size` {cfg.batch_size} is larger than the training set "
                              f"({train_data.shape[0]} examples)")
        self.device = self.info.device
        if self.device.type == "cuda":
            startup_selfcheck(self.device, cfg.backend, self.info.is_main)
        self.model = model.to(self.device)
        # the whole training set lives on the device: a step gathers its batch there, with no copy
        self.data = to_device(train_data, self.device)
        self.loss_fn = _nonfinite_as_nan(loss_fn, self.device)
        self.run_name = run_name or cfg.loss
        self._setup_step_options()
        self.run_dir = run_dir
        self.ckpt_path = os.path.join(run_dir, "checkpoints", "last.pt")
        self.prev_ckpt_path = os.path.join(run_dir, "checkpoints", "prev.pt")
        self._last_pt_good = False  # whether last.pt was written or verified by this run (may become prev.pt)
        self.resume = resume
        self.progress = progress
        self.after_backward = after_backward
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                          weight_decay=cfg.weight_decay)
        self.ema = fdsm_ext.ema_model(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + 7919 * self.info.rank + 1)
        self.step = 0
        self._last_ckpt_step: int | None = None
        self._stop_signal: str | None = None
        self._seconds_per_step = float("nan")
        self._step_time_q20 = self._step_time_q80 = float("nan")
        self._step_times: list[float] = []  # this process's step times since it started (or resumed)
        self._last_loss = float("nan")

    # ------------------------------------------------------------------ the step's options
    def _setup_step_options(self) -> None:
        """Autocast dtype, GradScaler and compiled model of ``cfg.precision`` / ``cfg.compile``."""
        cfg = self.cfg
        precision = getattr(cfg, "precision", "fp32")
        self.autocast_dtype = PRECISIONS[precision]
        # fp16's 5 exponent bits underflow small gradients; bf16 has float32's range and needs no scaling
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        # the loss calls the compiled module; checkpoints, the EMA and evaluation use the module itself
        # (same parameters), so state_dict keys and evaluation shapes are those of an eager run
        self.step_model = torch.compile(self.model) if getattr(cfg, "compile", False) else self.model
        self._first_step_seconds = float("nan")

    def _loss(self, batch: Tensor) -> Tensor:
        """The loss of one batch, the model under autocast when ``precision`` is bf16 or fp16."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.loss_fn(self.step_model, batch, self.generator)

    # ------------------------------------------------------------------ checkpoints
    def _summarize_step_times(self) -> None:
        """Median and 20/80 % quantiles of this run's step times so far (kept from the checkpoint when
        none ran since).

        Computed when a checkpoint or the result needs it, not after every step: the median sorts the
        whole history, which at 10^5 steps costs tens of milliseconds, as much as a GPU step.
        """
        times = self._step_times
        if times:
            self._seconds_per_step = statistics.median(times)
            q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
            self._step_time_q20, self._step_time_q80 = q[0], q[3]

    def _checkpoint_state(self) -> dict:
        self._summarize_step_times()
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": distributed.gather_objects(rng_states(self.generator), self.info),
            "world_size": self.info.world_size,
            "config": self.cfg.to_dict(),
            "seconds_per_step": self._seconds_per_step,
            "seconds_per_step_q20": self._step_time_q20,
            "seconds_per_step_q80": self._step_time_q80,
            "last_loss": self._last_loss,
            "environment": {**run_environment(), "device": self.device.type},
            "grad_scaler": self.scaler.state_dict(),
        }

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/last.pt`` atomically with its checksum, the one it replaces becoming
        ``prev.pt`` (rank 0 writes; every rank must call)."""
        state = self._checkpoint_state()
        if self.info.is_main:
            write_checkpoint(state, self.ckpt_path, previous=self.prev_ckpt_path if self._last_pt_good else None)
            self._last_pt_good = True
        distributed.barrier(self.info)
        self._last_ckpt_step = self.step

    def _load_checkpoint(self) -> None:
        """Resume from ``last.pt``, or from ``prev.pt`` when ``last.pt`` is missing or damaged (saying
        so, naming both); :class:`CheckpointError` when neither is usable."""
        problems = []
        for path in (self.ckpt_path, self.prev_ckpt_path):
            try:
                ckpt = read_checkpoint(path)
                self._check_resumable(ckpt, path)
                self._apply_checkpoint(ckpt, path)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            if problems and self.info.is_main:
                print(f"fdsm-train: warning: {problems[0]}; resuming from the previous checkpoint {path} "
                      f"(step {self.step}) instead", file=sys.stderr)
            self._last_pt_good = path == self.ckpt_path
            self._warn_if_not_bitwise(ckpt, path)
            return
        raise CheckpointError(f"no usable checkpoint to resume ({'; '.join(problems)}); move the damaged "
                              f"file(s) away to start {self.run_dir} afresh, or choose another --out")

    def _check_resumable(self, ckpt: dict, path: str) -> None:
        """Configuration errors (the user's to fix, not a damaged file: no fallback to ``prev.pt``)."""
        if ckpt["world_size"] != self.info.world_size:
            raise ConfigError(f"{path} was written by {ckpt['world_size']} process(es); resume it with "
                              f"the same number (this run has {self.info.world_size}) so the data order matches")
        changed = {k: (v, getattr(self.cfg, k, None)) for k, v in ckpt["config"].items()
                   if k not in self.cfg.resumable_changes and getattr(self.cfg, k, None) != v}
        if changed:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"cannot resume {path} with a different configuration ({detail})")
        if ckpt["step"] > self.cfg.steps:
            raise ConfigError(f"{path} is at step {ckpt['step']}, past --steps {self.cfg.steps}; "
                              f"pass --steps {ckpt['step']} or more to continue it")

    def _apply_checkpoint(self, ckpt: dict, path: str) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.ema is not None:
                if ckpt["ema"] is None:
                    raise KeyError("ema")
                self.ema.load_state_dict(ckpt["ema"])
            set_rng_states(ckpt["rng"][self.info.rank], self.generator)
            if ckpt.get("grad_scaler"):  # fp16: the loss scale and its growth counter continue
                self.scaler.load_state_dict(ckpt["grad_scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: does not fit this model and optimizer ({reason})") from None
        self.step = self._last_ckpt_step = ckpt["step"]
        self._seconds_per_step = ckpt["seconds_per_step"]
        self._step_time_q20 = ckpt.get("seconds_per_step_q20", float("nan"))  # older checkpoints lack them
        self._step_time_q80 = ckpt.get("seconds_per_step_q80", float("nan"))
        self._last_loss = ckpt["last_loss"]

    def _warn_if_not_bitwise(self, ckpt: dict, path: str) -> None:
        """Say when the resumed curve cannot be bit-identical to an uninterrupted run (see README)."""
        if not self.info.is_main:
            return
        if ckpt["checksum"] is None:
            print(f"fdsm-train: warning: {path} has no checksum (an older fdsm_train wrote it); resuming it "
                  "unverified", file=sys.stderr)
        before = ckpt.get("environment") or {}
        now = {**run_environment(), "device": self.device.type}
        changed = [f"{k} {now[k]} (checkpoint: {before[k]})" for k in now
                   if before.get(k) is not None and before[k] != now[k]]
        if changed:
            print(f"fdsm-train: warning: resuming {path} with {', '.join(changed)}: the run continues, but "
                  "its loss curve is no longer bit-identical to an uninterrupted run (reductions run in "
                  "another order, amplified by 1/eps^2 in the FD losses)", file=sys.stderr)

    def _write_error(self, exc: OSError) -> RunWriteError:
        where = (f"the last good checkpoint is {self.ckpt_path} (step {self._last_ckpt_step})"
                 if self._last_ckpt_step is not None else "no checkpoint had been written yet")
        return RunWriteError(f"cannot write {exc.filename or self.run_dir}: {exc.strerror or exc}; everything "
                             f"written before is intact and {where}; free space or fix permissions, then run "
                             "again with --resume")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum).name

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Train up to ``cfg.steps`` steps (from the checkpoint if resuming) and return the result."""
        cfg, info = self.cfg, self.info
        exists = os.path.exists(self.ckpt_path) or os.path.exists(self.prev_ckpt_path)
        if exists and not self.resume:
            raise ConfigError(f"{self.run_dir} already holds a run ({self.ckpt_path}); pass --resume to continue "
                              "it or choose another --out")
        if exists:
            self._load_checkpoint()  # verified before any file of the run is touched
            if info.is_main:
                used = self.ckpt_path if self._last_pt_good else self.prev_ckpt_path
                print(f"{self.run_name}: resumed from step {self.step} of {cfg.steps} ({used})")
        elif self.resume and info.is_main:
            print(f"--resume: no checkpoint at {self.ckpt_path}; starting from step 0")
        resumed_from = self.step

        writer = None
        if info.is_main:
            try:
                os.makedirs(self.run_dir, exist_ok=True)
                remove_stale_temporaries(os.path.dirname(self.ckpt_path), ("last.pt",))
                remove_stale_temporaries(self.run_dir, ("config.yaml", "scalars.csv", "metrics.json"))
                config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
                atomic_write(os.path.join(self.run_dir, "config.yaml"), lambda fh: fh.write(config_text))
                writer = ScalarWriter(self.run_dir, resume_step=self.step if exists else None,
                                      tensorboard=cfg.tensorboard)
            except OSError as exc:
                raise self._write_error(exc) from None
        distributed.broadcast_module(self.model, info)
        old_handlers = self._install_signal_handlers()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.progress and info.is_main),
                   desc=f"{self.run_name} training", dynamic_ncols=True, leave=False)
        n = self.data.shape[0]
        per_epoch = n // cfg.batch_size
        batches, batches_epoch = None, -1
        self._step_times = []
        loss_value = self._last_loss
        finished = False
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                epoch, k = divmod(self.step, per_epoch)
                if epoch != batches_epoch:
                    # one host-to-device copy of the epoch's indices, instead of one per step
                    batches = to_device(epoch_batches(n, cfg.batch_size, epoch, cfg.seed, info.rank,
                                                      info.world_size), self.device)
                    batches_epoch = epoch
                batch = self.data[batches[k]]
                loss = self._loss(batch)
                loss_value = float(distributed.mean_across(loss.detach(), info))
                try:  # on a GPU the FD losses report non-finite model outputs when their flags land
                    fdsm_ext.check_finite()
                except FloatingPointError:
                    loss_value = float("nan")
                if not math.isfinite(loss_value):
                    where = (f"the last good checkpoint is {self.ckpt_path} (step {self._last_ckpt_step})"
                             if self._last_ckpt_step is not None else "no checkpoint had been written yet")
                    raise NonFiniteLossError(f"loss {cfg.loss} is {loss_value} at step {self.step + 1}; stopped "
                                             f"before updating the weights; {where}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                distributed.average_gradients(self.model, info)
                self.scaler.unscale_(self.optimizer)  # the hook and the clip see the true gradients
                if self.after_backward is not None:
                    self.after_backward(self.step + 1, self.model)
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed
                self.scaler.update()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                self.step += 1
                self._last_loss = loss_value
                self._step_times.append(time.perf_counter() - t0)
                if self.step_model is not self.model and math.isnan(self._first_step_seconds):
                    self._first_step_seconds = self._step_times[-1]
                bar.update(1)
                if writer is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    writer.add(self.step, "train/loss", loss_value)
                    bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                stop = distributed.any_across(self._stop_signal is not None, info)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop:
                    if writer is not None:
                        writer.flush()
                    self.save_checkpoint()
                if stop:
                    raise TrainingInterrupted(
                        f"{self._stop_signal or 'a signal'} at step {self.step}: checkpoint written to "
                        f"{self.ckpt_path}; run again with --resume to continue", self.step, self.ckpt_path)
            if self._last_ckpt_step != self.step:
                self.save_checkpoint()
            finished = True
        except OSError as exc:
            raise self._write_error(exc) from None
        finally:
            bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if writer is not None:
                try:
                    writer.close()
                except OSError as exc:
                    if finished:  # else an error is already on its way out; this one would hide it
                        raise self._write_error(exc) from None
        if self._stop_signal is not None:  # came after the loop's last look; the final checkpoint is written
            raise TrainingInterrupted(f"{self._stop_signal} at step {self.step}: checkpoint written to "
                                      f"{self.ckpt_path}; run again with --resume to evaluate", self.step,
                                      self.ckpt_path)
        self._summarize_step_times()
        eval_model = self.ema.module if self.ema is not None else self.model
        return TrainResult(self.model, eval_model, self.step, loss_value, self._seconds_per_step, resumed_from,
                           self._step_time_q20, self._step_time_q80, self._first_step_seconds)
