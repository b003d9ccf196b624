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
- ``summarize(runs, out_dir)``: optional, a combined figure over every ``(cfg, metrics)`` run.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from types import ModuleType

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


def train_model(cfg, model, train_data, loss_fn, run_dir: str, *, info, resume: bool, progress: bool, **header):
    """Fit ``model`` with the shared :class:`~fdsm_train.trainer.Trainer`; returns ``(result, metrics)``.

    ``metrics`` starts every run's ``metrics.json``: ``header`` (experiment, dataset, loss, ...), the
    step reached, the last training loss and the timing (median seconds per step and its 20/80 %
    quantiles, wall seconds of the whole fit including checkpoints).
    """
    from ..trainer import Trainer

    t0 = time.perf_counter()
    result = Trainer(cfg, model, train_data, loss_fn, run_dir, dist_info=info, resume=resume, progress=progress).fit()
    metrics = {**header, "steps": result.step, "final_train_loss": result.final_loss,
               "seconds_per_step": result.seconds_per_step, "seconds_per_step_q20": result.seconds_per_step_q20,
               "seconds_per_step_q80": result.seconds_per_step_q80, "train_seconds": time.perf_counter() - t0}
    return result, metrics


def save_metrics(metrics: dict, cfg, run_dir: str) -> dict:
    """Add the config to ``metrics``, write ``run_dir/metrics.json`` and return ``metrics``."""
    metrics["config"] = cfg.to_dict()
    write_json(metrics, os.path.join(run_dir, "metrics.json"))
    return metrics
