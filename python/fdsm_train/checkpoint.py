"""Atomic checkpoint files and the RNG states they carry.

A checkpoint is written to a temporary file in the target's directory, flushed to disk, then moved
over the target with ``os.replace`` (atomic on POSIX): a crash or SIGKILL mid-write leaves the previous
checkpoint whole. Everything stored is a tensor or a plain Python value, so files load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`atomic_save` (tensors land on ``map_location``)."""
    return torch.load(os.fspath(path), map_location=map_location, weights_only=True)


def rng_states(loss_generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step reads: torch (CPU and all CUDA devices), NumPy, Python, and
    the trainer's own generator for directions and noise."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
        "loss_generator": loss_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any], loss_generator: torch.Generator) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    loss_generator.set_state(state["loss_generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
