"""``fdsm-train [EXPERIMENT] [options]``: train and evaluate one experiment (``toy`` when none is named).

Examples::

    fdsm-train                                  # toy: FD-SSM on a mixture of Gaussians, runs/toy/
    fdsm-train toy --loss all --density all     # every loss on every density, a comparison table
    fdsm-train dkef --smoke --out /tmp/dkef     # tiny offline run
    fdsm-train toy --out runs/a --resume        # continue runs/a from its last checkpoint
    torchrun --nproc_per_node 2 -m fdsm_train toy --loss fd_ssm   # DDP (gloo on CPU)

Every configuration field is a flag (``fdsm-train EXPERIMENT --help`` lists them with the paper's
defaults); ``--config FILE.yaml`` sets several at once (flags win). Every experiment writes one run per
combination to ``<out>/<density or dataset>/<loss>/`` (``metrics.json``, ``<experiment>.png``, images,
``scalars.csv``, ``config.yaml``, ``checkpoints/last.pt``), plus ``<out>/metrics.json`` (every run and the
command) and ``<out>/<experiment>.png`` (the runs side by side: a grid of datasets x losses).

Exit status: 0 done; 1 non-finite loss; 2 cannot run as asked (a bad flag or config file, an unusable
checkpoint, an output that cannot be written), with one line naming the flag or file; 143 stopped by
SIGTERM/SIGINT (during training after writing a checkpoint; elsewhere, e.g. during evaluation, with
every checkpoint written so far intact).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading

import yaml

from . import distributed, experiments
from .config import ConfigError, add_config_arguments, build_configs, config_fields, read_yaml, sweep_fields
from .experiments import write_json
from .trainer import NonFiniteLossError, TrainingInterrupted


class _Stopped(BaseException):
    """SIGTERM/SIGINT outside the training loop (which defers them to the end of its step); a
    ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it."""


def _raise_stopped(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def _read_config_file(path: str) -> dict:
    """:func:`read_yaml` with YAML syntax errors as one line naming ``--config`` and the position."""
    try:
        return read_yaml(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"--config {path!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path!r} is not a text file") from None


def check_out_directory(out: str) -> None:
    """Refuse an ``--out`` that cannot hold runs (a file, or in a folder this process cannot write)
    before anything is created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a file, not a directory")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--out {out!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r} cannot be written: {existing!r} is read-only for this process")


def check_backend(cfg, device) -> None:
    """Run the FD loss once on two points with ``cfg.backend`` (unless ``auto``), so a backend that
    cannot run here is refused before any run folder is made."""
    if cfg.backend == "auto":
        return
    import torch

    import fdsm_ext

    try:
        fdsm_ext.fd_ssm_loss(lambda y: -(y * y).sum(1), torch.zeros(2, 2, device=device), 0.1,
                             backend=cfg.backend)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--backend {cfg.backend} cannot run on {device}: {reason}") from None


def _role_text(match: re.Match) -> str:
    target = match.group(1)
    return target[1:].rsplit(".", 1)[-1] if target.startswith("~") else target


def plain_text(doc: str) -> str:
    """A docstring as ``--help`` prints it: reStructuredText roles and literals reduced to their text
    (``:class:`~a.B``` -> ``B``, double-backquoted ``x`` -> ``x``, ``Examples::`` -> ``Examples:``)."""
    doc = re.sub(r":[a-z]+:`([^`]+)`", _role_text, doc)
    doc = re.sub(r"``([^`]+)``", r"\1", doc)
    return doc.replace("::\n", ":\n")


def build_parser(name: str, module) -> argparse.ArgumentParser:
    """The argument parser of experiment ``name``: its options, parsed after the experiment's name.

    ``prog`` is ``fdsm-train NAME``, so the usage line shows the experiment first, where it must be.
    """
    summary = plain_text(__doc__.split("\n\n")[0]).split(": ", 1)[1]
    parser = argparse.ArgumentParser(
        prog=f"fdsm-train {name}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{summary}\nExperiments: {', '.join(experiments.EXPERIMENTS)} (the name comes first; "
                    f"default toy). This is {name}:\n\n{plain_text((module.__doc__ or '').strip())}",
        epilog=plain_text(__doc__.split("\n\n", 1)[1].strip()))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny offline configuration, end to end on CPU in well under a minute")
    parser.add_argument("--out", metavar="DIR", help=f"output directory (default: runs/{name}, runs/{name}-smoke)")
    parser.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    parser.add_argument("--config", metavar="YAML", help="a YAML mapping of config fields (flags override it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser, module.Config)
    return parser


def run_directory(out: str, cfg, cls) -> str:
    """``<out>/<density or dataset>/<loss>``: one directory per configuration of a sweep."""
    return os.path.join(out, *experiments.run_parts(cfg))


def format_table(module, runs: list, cls) -> str:
    """A plain-text table: the swept values, then the experiment's ``TABLE`` metrics, one row per run."""
    keys = [n for n in sweep_fields(cls) if n != "loss"] + ["loss"]
    header = keys + list(module.TABLE)
    rows = []
    for cfg, metrics in runs:
        cells = [str(getattr(cfg, k)) for k in keys]
        for m in module.TABLE:
            v = metrics.get(m)
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fdsm-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    named = bool(argv) and not argv[0].startswith("-")
    name = argv[0] if named else "toy"
    if name not in experiments.EXPERIMENTS:
        print(f"fdsm-train: error: unknown experiment {name!r}; choose from {', '.join(experiments.EXPERIMENTS)} "
              "(the experiment comes first: fdsm-train EXPERIMENT [options])", file=sys.stderr)
        return 2
    info = None
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        module = experiments.load(name)
        args = build_parser(name, module).parse_args(argv[1:] if named else argv)
        cli_values = {f.name: getattr(args, f.name) for f in config_fields(module.Config)}
        configs = build_configs(module.Config, smoke_overrides=module.SMOKE if args.smoke else None,
                                yaml_values=_read_config_file(args.config) if args.config else None,
                                cli_values=cli_values, all_values=module.SWEEP_ALL,
                                presets=getattr(module, "PRESETS", None))
        out = args.out or os.path.join("runs", name + ("-smoke" if args.smoke else ""))
        check_out_directory(out)
        info = distributed.setup(configs[0].device)
        for cfg in configs:
            check_backend(cfg, info.device)
        runs = []
        for cfg in configs:
            run_dir = run_directory(out, cfg, module.Config)
            metrics = module.run(cfg, run_dir, info=info, resume=args.resume, progress=not args.no_progress)
            runs.append((cfg, metrics))
            distributed.barrier(info)
        if info.is_main:
            command = "fdsm-train " + shlex.join(argv)
            write_json({"experiment": name, "command": command, "runs": [m for _, m in runs]},
                       os.path.join(out, "metrics.json"))
            if hasattr(module, "summarize"):
                module.summarize(runs, out)
            print(f"\n{name}: results in {out}/ ({command})")
            print(format_table(module, runs, module.Config))
        return 0
    except ConfigError as exc:
        print(f"fdsm-train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # outside the trainer, which names its last good checkpoint itself
        print(f"fdsm-train: error: {exc.filename or 'a file'}: {exc.strerror or exc}; every checkpoint written "
              "so far is intact (fix it, then run again with --resume)", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"fdsm-train: stopped: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"fdsm-train: {exc}", file=sys.stderr)
        return 143
    except _Stopped as exc:
        print(f"fdsm-train: {exc} outside the training loop (set-up or evaluation): every checkpoint written "
              "so far is intact; run again with --resume to continue (a finished run is evaluated again)",
              file=sys.stderr)
        return 143
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if info is not None:
            distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
