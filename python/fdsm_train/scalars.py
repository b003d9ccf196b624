"""Scalar logs: ``scalars.csv`` (always) and TensorBoard event files (when asked for and installed).

The CSV is long-format, one ``step,tag,value`` row per scalar, values written with ``repr`` so a float
reads back bit for bit (the resume test compares curves exactly).

Rows already on disk are never shortened or rewritten in place. A new run replaces the file atomically;
a resumed run (constructed only after its checkpoint has been loaded and verified) appends to it, and
when the file holds rows past the checkpoint's step (logged after it, before a crash) or a torn last
line (a write cut by a full disk or a kill), it first writes the rows it keeps, byte for byte, to a new
file that replaces the old one atomically (:func:`fdsm_train.checkpoint.atomic_write`). A failing
write therefore leaves the old file whole.
"""

from __future__ import annotations

import csv
import os
import warnings

from .checkpoint import atomic_write
from .config import ConfigError


def _kept_lines(path: str, resume_step: int) -> tuple[list[bytes], bool]:
    """The complete rows of ``path`` (raw lines, newline included) with step <= ``resume_step``, and
    whether the file is exactly header + those rows (so appending continues it)."""
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.splitlines(keepends=True)
    if not lines:
        return [], False
    header, *rows = lines
    if header.rstrip(b"\r\n") != b"step,tag,value":
        raise ConfigError(f"{path}: does not start with the header 'step,tag,value'; move it away to resume")
    exact = header.endswith(b"\n")
    kept = []
    for number, line in enumerate(rows, start=2):
        if not line.endswith(b"\n"):  # torn by an interrupted write: never a complete row
            exact = False
            continue
        try:
            step = int(line.split(b",", 1)[0])
        except ValueError:
            raise ConfigError(f"{path} line {number}: {line[:60]!r} is not a step,tag,value row; "
                              "fix or move the file to resume") from None
        if step <= resume_step:
            kept.append(line)
        else:
            exact = False
    return [header if header.endswith(b"\n") else header + b"\n", *kept], exact


class ScalarWriter:
    """Appends scalars to ``<directory>/scalars.csv`` and optionally TensorBoard.

    Args:
        directory: the run directory.
        resume_step: when continuing a run from a verified checkpoint at this step: rows up to it are
            kept as written, rows after it (logged after that checkpoint) are dropped, atomically;
            ``None`` starts a new file (rows an old file holds, from an attempt that wrote no
            checkpoint, are kept as ``scalars.csv.old``).
        tensorboard: also write TensorBoard events under ``<directory>/tensorboard``.

    Raises:
        OSError: the file cannot be written (the old file is then unchanged).
        ConfigError: when resuming, the existing file is not a scalars file.
    """

    HEADER = ("step", "tag", "value")

    def __init__(self, directory: str, resume_step: int | None = None, tensorboard: bool = False):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "scalars.csv")
        header = (",".join(self.HEADER) + "\r\n").encode()  # csv.writer's line ending
        if resume_step is not None and os.path.exists(self.path):
            lines, exact = _kept_lines(self.path, resume_step)
            if not exact:
                lines = lines or [header]
                atomic_write(self.path, lambda fh: fh.writelines(lines))
        else:
            if os.path.exists(self.path) and os.path.getsize(self.path) > len(header):
                # rows of an earlier attempt that left no checkpoint: kept aside, not overwritten
                os.replace(self.path, self.path + ".old")
            atomic_write(self.path, lambda fh: fh.write(header))
        self._fh = open(self.path, "a", newline="", buffering=1)  # line-buffered: tail -f shows progress
        self._csv = csv.writer(self._fh)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard=True but the tensorboard package is not installed; writing CSV only",
                              stacklevel=2)
            else:
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=resume_step)

    def add(self, step: int, tag: str, value: float) -> None:
        """Record ``value`` of ``tag`` at ``step``."""
        value = float(value)
        try:
            self._csv.writerow((step, tag, repr(value)))
        except OSError as exc:
            exc.filename = exc.filename or self.path  # a failed write() names no file
            raise
        if self._tb is not None:
            self._tb.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Push buffered rows to disk and ``fsync`` them (called before each checkpoint, so every row
        up to a checkpoint's step is durable before the checkpoint is)."""
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            exc.filename = exc.filename or self.path
            raise
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (closed even when the flush fails, e.g. on a full disk)."""
        try:
            self.flush()
        finally:
            try:
                self._fh.close()
            except OSError:  # the buffered tail could not be written; the rows before it are on disk
                pass
            if self._tb is not None:
                self._tb.close()


def read_scalars(path: str, tag: str | None = None) -> list:
    """Rows ``(step, tag, value)`` of a ``scalars.csv`` (only ``tag``'s values as ``(step, value)`` if given)."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        rows = [(int(s), t, float(v)) for s, t, v in reader]
    if tag is None:
        return rows
    return [(s, v) for s, t, v in rows if t == tag]
