"""The experiments ``fdsm-train`` runs; each is a module with the same small interface.

An experiment module defines:

- ``Config``: a :class:`~fdsm_train.config.TrainConfig` subclass whose defaults are the paper's settings;
- ``SMOKE``: field overrides of ``--smoke`` (tiny, offline, end to end on CPU in well under a minute);
- ``SWEEP_ALL``: what ``all`` means for its sweep fields other than ``loss``;
- ``PRESETS`` (optional): ``{field: {value: overrides}}``, settings that follow from a field's value
  (each dataset's own paper settings), under ``--smoke``, ``--config`` and flags;
- ``TABLE``: the metric names printed in the result table;
- ``run(cfg, run_dir, *, info, resume, progress) -> dict``: train and evaluate one configuration,
  writing ``metrics.json``, figures and checkpoints under ``run_dir`` (metrics on rank 0, ``{}`` elsewhere);
- ``summarize(runs, out_dir)``: ``<out_dir>/<experiment>.png``, every ``(cfg, metrics)`` run in one grid
  (:func:`summary_grid`).

Every experiment has one data sweep field (``density`` or ``dataset``) besides ``loss``, so every run
lives in ``<out>/<density or dataset>/<loss>/`` (:func:`run_parts`) and writes there ``metrics.json``,
``<experiment>.png`` (its own figure), ``scalars.csv``, ``config.yaml`` and ``checkpoints/last.pt``
(and ``samples.png`` where it samples images); ``<out>/`` holds only what spans the runs:
``metrics.json`` and ``<experiment>.png``. :func:`train_model` trains, :func:`save_metrics` finishes
every experiment's ``run``; :class:`EvalProgress` shows its evaluation on the progress bar.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Callable
from types import ModuleType

from tqdm.auto import tqdm

EXPERIMENTS = ("toy", "dkef", "nice", "ebm", "ncsn")


def load(name: str) -> ModuleType:
    """The module of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(obj, path: str) -> None:
    """``obj`` as indented JSON (keys starting with ``_`` dropped, NaN/inf written as null), replacing
    ``path`` atomically (a kill mid-write leaves the previous file)."""
    from ..checkpoint import atomic_write

    text = (json.dumps(_json_safe(obj), indent=2) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(text))


def run_parts(cfg) -> list[str]:
    """The values naming a run of a sweep, data first and loss last: ``["mog", "fd_ssm"]``.

    A run's directory is ``<out>/<part>/<part>/...`` and its name on progress bars ``part/part``.
    """
    from ..config import sweep_fields

    names = [n for n in sweep_fields(type(cfg)) if n != "loss"] + ["loss"]
    return [str(getattr(cfg, n)) for n in names]


def run_name(cfg) -> str:
    """``density/loss`` or ``dataset/loss``: how bars and messages call a run."""
    return "/".join(run_parts(cfg))


class EvalProgress:
    """A progress bar over an evaluation's named stages: ``eval = EvalProgress(cfg, 3, on); eval("NLL")``.

    Each call ends the previous stage and names the next (shown after the bar's count), so the seconds
    an evaluation takes after training are never silent. Rank 0 only, like the training bar.
    """

    def __init__(self, cfg, stages: int, enabled: bool):
        self._bar = tqdm(total=stages, desc=f"{run_name(cfg)} evaluating", disable=not enabled, leave=False,
                         dynamic_ncols=True, bar_format="{desc}: {n}/{total} |{bar}| {elapsed} {postfix}")
        self._started = False

    def __call__(self, stage: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_postfix_str(stage)

    def close(self) -> None:
        self._bar.update(self._bar.total - self._bar.n)
        self._bar.close()

    def __enter__(self) -> "EvalProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_model(cfg, model, train_data, loss_fn, run_dir: str, *, info, resume: bool, progress: bool, **header):
    """Fit ``model`` with the shared :class:`~fdsm_train.trainer.Trainer`; returns ``(result, metrics)``.

    ``metrics`` starts every run's ``metrics.json``: ``header`` (experiment, dataset, loss, ...), the
    step reached, the last training loss, the precision, and the timing (median seconds per step and
    its 20/80 % quantiles, wall seconds of the whole fit including checkpoints; with ``--compile``,
    ``compile_seconds``: the first step's time beyond the median step, i.e. tracing and compiling).
    """
    from ..trainer import Trainer

    t0 = time.perf_counter()
    result = Trainer(cfg, model, train_data, loss_fn, run_dir, dist_info=info, resume=resume, progress=progress,
                     run_name=run_name(cfg)).fit()
    metrics = {**header, "steps": result.step, "final_train_loss": result.final_loss, "precision": cfg.precision,
               "compile": cfg.compile, "seconds_per_step": result.seconds_per_step,
               "seconds_per_step_q20": result.seconds_per_step_q20,
               "seconds_per_step_q80": result.seconds_per_step_q80, "train_seconds": time.perf_counter() - t0}
    if cfg.compile:
        metrics["compile_seconds"] = result.first_step_seconds - result.seconds_per_step
    return result, metrics


def save_metrics(metrics: dict, cfg, run_dir: str) -> dict:
    """Add the config to ``metrics``, write ``run_dir/metrics.json`` and return ``metrics``."""
    metrics["config"] = cfg.to_dict()
    write_json(metrics, os.path.join(run_dir, "metrics.json"))
    return metrics


def summary_grid(runs: list, out_dir: str, experiment: str, draw: Callable, *, cell_inches: float = 2.6,
                 first_column: tuple[str, Callable] | None = None) -> None:
    """``<out_dir>/<experiment>.png``: the runs of a sweep in a grid, a row per dataset (or density) and
    a column per loss.

    ``draw(ax, cfg, metrics)`` fills a run's cell; ``first_column = (title, draw_row(ax, cfg, metrics))``
    adds a leading column drawn once per row (the toy's training data).
    """
    from ..figures import grid_figure

    cells = {}
    for cfg, metrics in runs:
        if metrics:
            data, *rest = run_parts(cfg)
            cells[(data, "/".join(rest))] = (cfg, metrics)
    if not cells:
        return
    grid_figure(os.path.join(out_dir, f"{experiment}.png"), cells, draw, cell_inches=cell_inches,
                first_column=first_column)
