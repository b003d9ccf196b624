"""Scalar logs: ``scalars.csv`` (always) and TensorBoard event files (when asked for and installed).

The CSV is long-format, one ``step,tag,value`` row per scalar, values written with ``repr`` so a float
reads back bit for bit (the resume test compares curves exactly).
"""

from __future__ import annotations

import csv
import os
import warnings


class ScalarWriter:
    """Appends scalars to ``<directory>/scalars.csv`` and optionally TensorBoard.

    Args:
        directory: the run directory.
        resume_step: when continuing a run, rows after this step (written after the checkpoint the
            run resumes from) are dropped so the file holds one curve; ``None`` starts a new file.
        tensorboard: also write TensorBoard events under ``<directory>/tensorboard``.
    """

    HEADER = ("step", "tag", "value")

    def __init__(self, directory: str, resume_step: int | None = None, tensorboard: bool = False):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "scalars.csv")
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            kept = [row for row in read_scalars(self.path) if row[0] <= resume_step]
        self._fh = open(self.path, "w", newline="", buffering=1)  # line-buffered: tail -f shows progress
        self._csv = csv.writer(self._fh)
        self._csv.writerow(self.HEADER)
        for step, tag, value in kept:
            self._csv.writerow((step, tag, repr(value)))
        self._fh.flush()
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
        self._csv.writerow((step, tag, repr(value)))
        if self._tb is not None:
            self._tb.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Push buffered rows to disk (called at checkpoints)."""
        self._fh.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files."""
        self.flush()
        self._fh.close()
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
