"""Checkpoint files that are never half-written, carry a checksum, and keep the previous good one.

Every file of a run that is replaced rather than appended (checkpoints, ``scalars.csv`` when a resume
drops rows, ``config.yaml``) goes through :func:`atomic_write`: a temporary file in the target's
directory, flushed and ``fsync``-ed, then moved over the target with ``os.replace`` (atomic on POSIX)
and the directory ``fsync``-ed. A crash, SIGKILL or full disk mid-write leaves the old file whole.

:func:`write_checkpoint` adds ``checksum``, a SHA-256 over every stored value (tensor bytes, dtypes,
shapes and plain values, in order), and moves the checkpoint it replaces to ``prev.pt`` first.
:func:`read_checkpoint` recomputes it and checks the keys and types the trainer relies on, so a file
that was truncated, zeroed, overwritten or had bits flipped inside a tensor record is refused by name
(:class:`CheckpointError`) instead of resumed. Everything stored is a tensor or a plain Python value:
files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import torch

from .config import ConfigError

#: the keys the trainer needs and their types (``ema`` may also be None)
REQUIRED_KEYS = {"step": int, "model": dict, "optimizer": dict, "ema": dict, "rng": list, "world_size": int,
                 "config": dict, "seconds_per_step": float, "last_loss": float}
_RNG_KEYS = ("torch", "numpy", "python", "loss_generator")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be resumed; the message names the file and what is wrong with it."""


def _fsync_directory(directory: str) -> None:
    # makes the rename itself durable; some file systems cannot open a directory, which is no error
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _WriteRecorder:
    """A binary file that remembers the ``OSError`` its ``write`` raised: ``torch.save`` reports a
    failed write (full disk) as a ``RuntimeError`` from its zip writer, which names no cause."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._fh.flush()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 previous: str | os.PathLike | None = None) -> None:
    """Replace ``path`` by what ``write(fh)`` writes, atomically and durably.

    ``path`` keeps its old content until the new one is completely on disk; an exception (``OSError``
    for a full disk or a read-only folder) leaves ``path`` as it was and removes the temporary file.
    With ``previous``, an existing ``path`` is first moved there (so a crash between the two renames
    leaves the old file as ``previous`` and no ``path``).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as exc:  # name the file the caller asked for, not the temporary one
        exc.filename = path
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            recorder = _WriteRecorder(fh)
            try:
                write(recorder)
            except Exception as exc:
                if recorder.error is not None and recorder.error is not exc:
                    raise recorder.error from exc
                raise
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
        if previous is not None and os.path.exists(path):
            os.replace(path, os.fspath(previous))
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = path  # a failed write() names no file; the caller's message should
        raise
    _fsync_directory(directory)


def remove_stale_temporaries(directory: str | os.PathLike, names: tuple[str, ...]) -> list[str]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` for ``names`` when a kill
    interrupted it (never the files themselves); returns the paths removed."""
    directory = os.fspath(directory)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    stale = [os.path.join(directory, e) for e in entries
             if e.endswith(".tmp") and any(e.startswith("." + name + ".") for name in names)]
    for path in stale:
        os.unlink(path)
    return stale


# --------------------------------------------------------------------------- checksums
def _digest_update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"{%d;" % len(obj))
        for key, value in obj.items():
            _digest_update(h, key)
            _digest_update(h, value)
    elif isinstance(obj, (list, tuple)):  # one tag for both: pickling may turn one into the other
        h.update(b"[%d;" % len(obj))
        for value in obj:
            _digest_update(h, value)
    else:  # int, float (repr round-trips exactly), str, bytes, bool, None
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def state_checksum(state: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of every value in ``state`` except its ``checksum`` entry."""
    h = hashlib.sha256()
    _digest_update(h, {k: v for k, v in state.items() if k != "checksum"})
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- trainer checkpoints
def write_checkpoint(state: dict[str, Any], path: str | os.PathLike, *,
                     previous: str | os.PathLike | None = None) -> None:
    """Write ``state`` plus its ``checksum`` to ``path`` atomically; an existing ``path`` becomes
    ``previous`` (pass it only when that file is known good: written by this run or verified)."""
    state = {**state, "checksum": state_checksum(state)}
    atomic_write(path, lambda fh: torch.save(state, fh), previous=previous)


def _check_structure(ckpt: dict[str, Any]) -> str | None:
    """Why ``ckpt`` cannot be a trainer checkpoint, or None."""
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for key, kind in REQUIRED_KEYS.items():
        value = ckpt[key]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else \
            (isinstance(value, kind) and not isinstance(value, bool))
        if not ok and not (key == "ema" and value is None):
            return f"`{key}` is a {type(value).__name__}, not a {kind.__name__}"
    if ckpt["step"] < 0:
        return f"`step` is {ckpt['step']}, not >= 0"
    if ckpt["world_size"] < 1 or len(ckpt["rng"]) != ckpt["world_size"]:
        return f"`world_size` {ckpt['world_size']} does not match its {len(ckpt['rng'])} RNG state(s)"
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        return "`model` holds values that are not tensors"
    if not all(isinstance(r, dict) and all(k in r for k in _RNG_KEYS) for r in ckpt["rng"]):
        return f"`rng` lacks one of {', '.join(_RNG_KEYS)}"
    if not {"state", "param_groups"} <= set(ckpt["optimizer"]):
        return "`optimizer` is not an optimizer state_dict"
    return None


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`write_checkpoint`, verified.

    Loads with ``torch.load(weights_only=True)`` (tensors land on ``map_location``), recomputes the
    checksum and checks the keys and types the trainer reads. A checkpoint without ``checksum`` (older
    fdsm_train) is accepted when its structure is right, with ``ckpt["checksum"] = None``.

    Raises:
        CheckpointError: the file is missing, empty, not a torch file (truncated or garbage), lacks
            keys, holds values of the wrong type (e.g. a negative step) or fails its checksum; the
            message names the file and the reason.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors of truncated or foreign files alike
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # torch's weights_only refusal puts its reason on a later line of a long text
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not written by torch.save: "
                              f"{reason[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    stored = ckpt.get("checksum")
    if stored is not None and stored != state_checksum(ckpt):
        raise CheckpointError(f"{path}: checksum mismatch (the file was changed or damaged after it was written)")
    problem = _check_structure(ckpt)
    if problem is not None:
        raise CheckpointError(f"{path}: not a fdsm_train checkpoint ({problem})")
    ckpt.setdefault("checksum", None)
    return ckpt


# --------------------------------------------------------------------------- RNG states
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
