"""Experiment configurations: dataclasses whose defaults are the paper's settings.

Every experiment's config subclasses :class:`TrainConfig` (the fields the trainer core reads). A value
comes from, in increasing precedence: the dataclass default, the experiment's ``--smoke`` overrides, a
YAML file (``--config FILE``, a flat mapping of field names), and command-line flags (one per field,
``--batch-size 64``). Fields marked ``sweep`` accept a comma-separated list (or ``all``) on the command
line; the CLI runs one training per combination.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

import torch
import yaml

from fdsm_ext import BACKENDS

from .objectives import FD_LOSSES, LOSSES

#: ``--precision``: the dtype autocast evaluates the model in during training (fp32: autocast off)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: defaults that follow from --precision: a fixed FD step of 0.1 is below what bf16/fp16 resolve for
#: unit-scale data, so there eps defaults to "auto", the step for the dtype (an explicit --eps wins)
PRECISION_PRESETS = {"precision": {"bf16": {"eps": "auto"}, "fp16": {"eps": "auto"}}}


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the field and the value."""


def sweep(default, help: str):
    """A field the command line may give as a list (``--loss fd_ssm,ssm`` or ``--loss all``)."""
    return field(default=default, metadata={"help": help, "sweep": True})


def option(default, help: str):
    """A plain configuration field with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


EPS_AUTO_HELP = ("or 'auto': the step that balances truncation and round-off in the dtype the model "
                 "evaluates in (--precision)")


def eps_option(default: float, help: str):
    """The FD step field: a float, or ``"auto"`` (:func:`fdsm_ext.numerics.auto_eps` at each call)."""
    return field(default=default, metadata={"help": f"{help}, {EPS_AUTO_HELP}", "auto": True})


@dataclass
class TrainConfig:
    """Settings every experiment shares (the trainer core reads only these)."""

    loss: str = sweep("fd_ssm", "score-matching objective: " + ", ".join(LOSSES))
    steps: int = option(2000, "optimizer steps in total (a resumed run continues up to this)")
    batch_size: int = option(256, "global batch size (split evenly over DDP processes)")
    lr: float = option(1e-3, "Adam learning rate")
    beta1: float = option(0.9, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    weight_decay: float = option(0.0, "Adam weight decay")
    grad_clip: float = option(0.0, "clip the global gradient norm to this (0: no clipping)")
    ema_decay: float = option(0.0, "EMA of the weights used for evaluation and sampling (0: off)")
    # a float or "auto" (eps_option's metadata lets the flag and validate() take the string)
    eps: float = eps_option(0.1, "finite-difference step: the norm of the FD directions (paper Sec. 6.1)")
    n_slices: int = option(1, "random directions per sample of the sliced and finite-difference losses")
    dsm_sigma: float = option(0.1, "noise level of dsm / fd_dsm")
    seed: int = option(0, "seed of the model init, the data order and the loss's random directions")
    log_every: int = option(10, "write the training loss to scalars.csv every this many steps")
    ckpt_every: int = option(500, "write checkpoints/last.pt every this many steps (and at the end)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    backend: str = option("auto", "fdsm_ext backend of the FD losses: " + ", ".join(BACKENDS))
    precision: str = option("fp32", "dtype the model runs in during training, under autocast: "
                            + ", ".join(PRECISIONS) + " (fp16 adds a GradScaler; FD quotients and losses "
                            "stay float32; evaluation runs in fp32; bf16 and fp16 make --eps default to auto)")
    compile: bool = option(False, "torch.compile the model for training (first-order losses only: "
                           "torch.compile has no double backward); metrics.json reports the compile time")
    tensorboard: bool = option(False, "also write TensorBoard scalars (needs the tensorboard package)")
    # these models are small for intra-op parallelism, and on a shared CPU extra threads cost up to 6x
    threads: int = option(1, "CPU threads of torch's intra-op pool (0: torch's default)")

    #: losses this experiment can train with (subclasses narrow it)
    allowed_losses = LOSSES
    #: losses that differentiate the model only once (no gradient of its gradient): what --compile can train
    first_order_losses = FD_LOSSES
    #: base fields this experiment never reads: no flag, and a config file may not set them
    unused_fields = ()
    #: the smallest valid ``steps`` (an experiment that derives steps from epochs allows 0)
    min_steps = 1
    #: fields that may change between a checkpoint and its --resume (they do not change the curve)
    resumable_changes = ("steps", "log_every", "ckpt_every", "tensorboard", "device", "threads")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot run."""
        if self.loss not in self.allowed_losses:
            raise ConfigError(f"unknown loss {self.loss!r} for this experiment; choose from "
                              f"{', '.join(self.allowed_losses)} (or 'all', or a comma-separated list)")
        int_at_least(self, "steps", self.min_steps)
        for name in ("batch_size", "n_slices", "log_every", "ckpt_every"):
            int_at_least(self, name, 1)
        _positive_float(self, "lr")
        if self.eps != "auto":
            _positive_float(self, "eps", "or 'auto': the step for the dtype the model evaluates in")
        _positive_float(self, "dsm_sigma")
        for name in ("beta1", "beta2", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{flag_name(name)} must be in [0, 1), got {value!r}")
        int_at_least(self, "threads", 0)
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile and self.loss not in self.first_order_losses:
            raise ConfigError(f"--compile cannot train loss {self.loss!r}: it differentiates the model's own "
                              "gradient, and torch.compile has no double backward; use it with "
                              f"{', '.join(self.first_order_losses)}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what checkpoints and metrics.json store)."""
        return dataclasses.asdict(self)


def int_at_least(cfg, name: str, minimum: int) -> None:
    """Raise :class:`ConfigError` unless ``cfg.<name>`` is an int ``>= minimum``."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag_name(name)} must be an integer >= {minimum}, got {value!r}")


def _positive_float(cfg, name: str, alternative: str = "") -> None:
    value = getattr(cfg, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag_name(name)} must be a finite number > 0, got {value!r}"
                          + (f" ({alternative})" if alternative else ""))


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> str:
    """``path`` if it is an existing file, else a :class:`ConfigError` naming it and what it should hold."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path!r} does not exist or is not a file{'; ' + hint if hint else ''}")
    return path


# --------------------------------------------------------------------------- building configs
def _field_types(cls) -> dict[str, type]:
    return get_type_hints(cls)


def flag_name(name: str) -> str:
    """The command-line flag of field ``name`` (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


_ARTICLE = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


def _coerce(cls, name: str, value, where: str = "flags"):
    """``value`` (from YAML or a flag string) converted to the field's declared type.

    ``where`` says where the value came from, so that the error names what the user typed: the flag
    (``--steps must be an int``) or the field of a config file.
    """
    kind = _field_types(cls)[name]
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    what = flag_name(name) if where == "flags" else f"`{name}` (from the {where})"

    def wrong():
        alternative = " or 'auto'" if meta.get("auto") else ""
        return ConfigError(f"{what} must be {_ARTICLE.get(kind, kind.__name__)}{alternative}, got {value!r}")

    if meta.get("auto") and value == "auto":
        return value
    if isinstance(value, str) and kind in (int, float):
        try:  # float() rather than YAML, which reads "3e-3" as a string
            return kind(value)
        except ValueError:
            raise wrong() from None
    if isinstance(value, str) and kind is not str:
        value = yaml.safe_load(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, bool, str) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise wrong()
    return value


def config_fields(cls) -> list:
    """The fields of ``cls`` an experiment reads (its ``unused_fields`` left out): one flag each."""
    return [f for f in fields(cls) if f.name not in cls.unused_fields]


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` flag per config field (strings, parsed to the field's type later)."""
    group = parser.add_argument_group("settings (defaults: the paper's)")
    types = _field_types(cls)
    for f in config_fields(cls):
        flag = flag_name(f.name)
        helptext = f.metadata.get("help", "")
        if f.metadata.get("sweep"):
            helptext += " (comma-separated list or 'all' to compare)"
        if types[f.name] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{helptext} [default: {f.default}]")
        else:
            metavar = "FLOAT|auto" if f.metadata.get("auto") else types[f.name].__name__.upper()
            group.add_argument(flag, dest=f.name, default=None, metavar=metavar,
                               help=f"{helptext} [default: {f.default}]")


def read_yaml(path: str) -> dict[str, Any]:
    """A flat mapping ``field: value`` from a YAML file (an error names the file if it is not one)."""
    require_file(path, "config file")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of field names to values")
    return data


def build_configs(cls, *, smoke_overrides: dict | None = None, yaml_values: dict | None = None,
                  cli_values: dict | None = None, all_values: dict[str, tuple] | None = None,
                  presets: dict[str, dict] | None = None) -> list:
    """Every configuration the command asks for: the product of the sweep fields' lists, validated.

    Args:
        cls: the experiment's config dataclass.
        smoke_overrides: values of ``--smoke`` (applied over the defaults and presets).
        yaml_values: values from ``--config`` (over the smoke values).
        cli_values: flag values as strings or typed values, ``None`` for flags not given (highest precedence).
        all_values: for each sweep field, what ``all`` expands to (default: ``cls.allowed_losses`` for loss).
        presets: ``{field: {value: overrides}}``: defaults that follow from a field's value (a dataset's
            own paper settings), applied over the dataclass defaults and under everything else;
            :data:`PRECISION_PRESETS` is applied first.
    """
    names = {f.name for f in config_fields(cls)}
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, label in ((smoke_overrides, "smoke settings"), (yaml_values, "config file"), (cli_values, "flags")):
        for key, value in (source or {}).items():
            if value is None:
                continue
            if key not in names:
                raise ConfigError(f"unknown field {key!r} in the {label}; known fields: {', '.join(sorted(names))}")
            merged[key] = value
            origin[key] = label
    all_values = dict(all_values or {})
    all_values.setdefault("loss", tuple(cls.allowed_losses))

    sweeps: list[tuple[str, list]] = []
    for f in fields(cls):
        if not f.metadata.get("sweep"):
            continue
        raw = merged.get(f.name, f.default)
        items = _split_list(raw)
        if items == ["all"]:
            items = list(all_values.get(f.name, ()))
            if not items:
                raise ConfigError(f"`{f.name}` has no 'all' list")
        sweeps.append((f.name, items))

    configs = [dict()]
    for name, items in sweeps:
        configs = [{**c, name: item} for c in configs for item in items]
    defaults = {f.name: f.default for f in fields(cls)}
    out = []
    for combo in configs:
        values = {**merged, **combo}
        for key, table in {**PRECISION_PRESETS, **(presets or {})}.items():
            chosen = values.get(key, defaults[key])
            values = {**table.get(chosen, {}), **values}
        cfg = cls(**{k: _coerce(cls, k, v, origin.get(k, "presets")) for k, v in values.items()})
        cfg.validate()
        out.append(cfg)
    return out


def _split_list(raw) -> list:
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.split(",")]
        if any(not p for p in parts):
            raise ConfigError(f"empty item in the list {raw!r}")
        return parts
    return [raw]


def sweep_fields(cls) -> list[str]:
    """Names of the fields a command line may sweep over, in declaration order."""
    return [f.name for f in fields(cls) if f.metadata.get("sweep")]


def resolve_steps(cfg, n_train: int):
    """``cfg`` with ``steps = epochs * (n_train // batch_size)`` when ``steps`` is 0 (configs with ``epochs``)."""
    if cfg.steps:
        return cfg
    return dataclasses.replace(cfg, steps=cfg.epochs * max(1, n_train // cfg.batch_size))
