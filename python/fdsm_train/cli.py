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

Exit status: 0 done, 1 non-finite loss, 2 bad configuration, 143 stopped by SIGTERM/SIGINT after
writing a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

from . import distributed, experiments
from .config import ConfigError, add_config_arguments, build_configs, config_fields, read_yaml, sweep_fields
from .experiments import write_json
from .trainer import NonFiniteLossError, TrainingInterrupted


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
    module = experiments.load(name)
    args = build_parser(name, module).parse_args(argv[1:] if named else argv)
    info = None
    try:
        cli_values = {f.name: getattr(args, f.name) for f in config_fields(module.Config)}
        configs = build_configs(module.Config, smoke_overrides=module.SMOKE if args.smoke else None,
                                yaml_values=read_yaml(args.config) if args.config else None,
                                cli_values=cli_values, all_values=module.SWEEP_ALL,
                                presets=getattr(module, "PRESETS", None))
        info = distributed.setup(configs[0].device)
        out = args.out or os.path.join("runs", name + ("-smoke" if args.smoke else ""))
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
    except NonFiniteLossError as exc:
        print(f"fdsm-train: stopped: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"fdsm-train: {exc}", file=sys.stderr)
        return 143
    finally:
        if info is not None:
            distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
