"""Precision rules of the FD losses: which dtype a model evaluates in, and the step size it can resolve.

A central second difference ``f(x+v) + f(x-v) - 2 f(x)`` with ``||v|| = eps`` has two errors:
truncation, relative size ``~ (eps / L)^2`` for a model that varies on a length scale ``L``, and
round-off, relative size ``~ u / (eps / L)^2`` for unit round-off ``u`` of the evaluation dtype
(``|f|`` comparable to its variation over ``L``). They balance at

    eps* = kappa * u^(1/4) * L,

which :func:`auto_eps` returns with ``L`` the data's per-coordinate standard deviation (the scale of
the batch, a proxy for the length scale of a model fitted to it) and ``kappa`` calibrated on the
measured table in docs/numerics.md (``benchmarks/numerics_table.py`` regenerates it). For
float32 and unit-scale data that is eps ~ 0.06; for bfloat16 ~ 1.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _checks

#: eps* = AUTO_EPS_KAPPA * u^(1/4) * scale; see docs/numerics.md for the measurement it comes from.
AUTO_EPS_KAPPA = 4.0
#: An eps this many times below eps* makes round-off dominate: warn (once per dtype).
RESOLUTION_FACTOR = 8.0


class FDPrecisionWarning(UserWarning):
    """eps is too small for the dtype the model evaluates in: round-off dominates the FD quotient."""


#: Batches skipped by the FD losses' ``on_nonfinite="skip"``, per loss name.
nonfinite_skips: collections.Counter = collections.Counter()

_checked: set = set()


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps_machine / 2`` of a floating dtype (2^-53 for float64, 2^-24 for float32, ...)."""
    return torch.finfo(_checks.check_float_dtype(dtype)).eps / 2


def usable_eps_range(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """The range of eps in which an FD quotient evaluated in ``dtype`` means anything, for data of
    per-coordinate scale ``scale``: ``[sqrt(u), 1] * scale``. At the lower end the round-off error
    ``u / (eps / L)^2`` reaches 100 % of the quotient, at the upper end the truncation error
    ``(eps / L)^2`` does (see the module docstring); :func:`auto_eps` lies in between."""
    scale = _checks.check_positive(scale, "scale")
    return unit_roundoff(dtype) ** 0.5 * scale, scale


def evaluation_dtype(x: Tensor, model=None) -> torch.dtype:
    """The dtype a model evaluates ``x`` in: the autocast dtype when autocast is on for ``x``'s device,
    else the dtype of the model's first floating parameter (for an ``nn.Module``), else ``x.dtype``."""
    _checks.check_tensor(x, "x")
    return _evaluation_dtype(x, model)


def _evaluation_dtype(x: Tensor, model) -> torch.dtype:
    """:func:`evaluation_dtype` of a checked ``x``."""
    if torch._C._is_any_autocast_enabled():  # (one call; x's device is looked up only under autocast)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return x.dtype


def data_scale(x: Tensor) -> float:
    """Per-coordinate standard deviation of the batch ``(B, *S)`` (1.0 when it is 0 or undefined)."""
    _checks.check_tensor(x, "x")
    if x.numel() == 0:
        return 1.0
    flat = x.detach().reshape(x.shape[0], -1).double()
    if flat.shape[0] < 2:
        return 1.0
    scale = float(flat.std(0).square().mean().sqrt())
    return scale if scale > 0 and scale == scale and scale != float("inf") else 1.0


def auto_eps(x: Tensor, dtype: torch.dtype | None = None, model=None) -> float:
    """The FD step that balances truncation and round-off for ``x`` evaluated in ``dtype``:
    ``AUTO_EPS_KAPPA * u(dtype)^(1/4) * data_scale(x)``. ``dtype`` defaults to
    :func:`evaluation_dtype`. Reads ``x`` (one device sync); not traceable by torch.compile."""
    _checks.check_tensor(x, "x")
    dtype = evaluation_dtype(x, model) if dtype is None else _checks.check_float_dtype(dtype)
    return AUTO_EPS_KAPPA * unit_roundoff(dtype) ** 0.25 * data_scale(x)


def warn_if_unresolvable(eps: float, x: Tensor, model=None) -> None:
    """Warn when ``eps`` is more than RESOLUTION_FACTOR below :func:`auto_eps`. Checked on the first
    call per evaluation dtype only (it reads the batch), so it warns at most once per dtype."""
    _checks.check_eps(eps)
    _checks.check_tensor(x, "x")
    _warn_if_unresolvable(eps, x, model)


def _warn_if_unresolvable(eps: float, x: Tensor, model=None) -> None:
    """:func:`warn_if_unresolvable` of an ``eps`` and an ``x`` the caller has checked (the losses'
    hot path: after the first call per dtype, one autocast query and a set lookup)."""
    dtype = _evaluation_dtype(x, model)
    if dtype in _checked:
        return
    _checked.add(dtype)
    best = auto_eps(x, dtype)
    if eps * RESOLUTION_FACTOR < best:
        warnings.warn(
            f"eps={eps:g} is far below what {dtype} can resolve for data of this scale (about {best:.3g}): "
            "round-off will dominate the finite-difference quotient. Use eps='auto', a larger eps, or "
            "evaluate the model in float32 (fp32_eval=True under autocast).",
            FDPrecisionWarning,
            stacklevel=3,
        )


# =========================================================================== the non-finite contract
# Every loss (FD and gradient-based) follows one contract, ``on_nonfinite``:
#   "raise"  (default): a FloatingPointError naming the evaluation (x, x+v, x-v, x~, ...) whose model
#            outputs were NaN or inf, or, with finite outputs, naming the loss's quotient/objective that
#            overflowed (with the usable eps range for the dtype);
#   "skip":  a batch whose model outputs are not finite gives a zero loss without gradient, a warning
#            and a count in ``nonfinite_skips`` (this reads the flags on the host: one sync per call);
#   "ignore": no check.
# "raise" never synchronises with the device. The flags are computed on the device; on the CPU they
# are read through numpy (no aten op) and the error is raised by the call itself. On other devices
# they are copied into pinned host memory without blocking, behind an event, and judged at the first
# of: the start of the next loss call whose event has completed by then, or check_finite(), which
# waits for them (a training loop calls it where it syncs anyway, e.g. at its logging step).
@dataclass
class _PendingCheck:
    flags: Tensor | np.ndarray  # (N + 1,) bool: per-row finiteness of the outputs, then the loss's
    event: object               # torch.cuda.Event, or None once (or when) the host copy is complete
    describe: Callable[[np.ndarray, bool], str | None]


_pending: list[_PendingCheck] = []

#: Dtypes numpy has no type for (read through a float32 copy).
_NUMPY_LESS = (torch.bfloat16,)


def _deferred(t: Tensor) -> bool:
    """Whether checks of tensors on ``t``'s device are judged later (without a sync) rather than at once."""
    return not t.is_cpu


def _judge(check: _PendingCheck, deferred: bool) -> None:
    flags = check.flags.numpy() if isinstance(check.flags, Tensor) else check.flags
    if flags.all():
        return
    msg = check.describe(flags, deferred)
    if msg is not None:
        raise FloatingPointError(msg)


def _drain(wait: bool) -> None:
    """Judge the pending checks whose host copy has landed (all of them, waiting, if ``wait``)."""
    while _pending:
        check = _pending[0]
        if check.event is not None:
            if wait:
                check.event.synchronize()
            elif not check.event.query():
                return
        _pending.pop(0)
        _judge(check, True)


def check_finite() -> None:
    """Raise the FloatingPointError of any earlier loss call whose ``on_nonfinite="raise"`` check is
    still pending (calls on a GPU are judged without a host sync, so later), waiting for the
    device to finish those calls. A no-op on the CPU, where every call is judged before it returns.
    Call it where the training loop syncs anyway (logging a loss value, saving a checkpoint)."""
    _drain(wait=True)


def guard_nonfinite(loss_name: str, outputs: Tensor, blocks, loss: Tensor | None, policy: str,
                    loss_hint: Callable[[], str] | None = None) -> bool:
    """The ``on_nonfinite`` contract for one loss call (see above); returns whether to skip the batch.

    ``outputs``: the model's outputs, ``(N, ...)`` with ``N`` = the sum of the row counts of
    ``blocks`` (``[("x+v", rows), ...]``, naming consecutive row blocks); ``loss``: the loss computed
    from them, per sample or reduced (a finite sum or mean has only finite terms); None to check only
    the outputs, as ``"skip"`` does before the loss.
    ``loss_hint()`` says why a loss from finite outputs may be non-finite (the quotient, eps range).
    Skipped under torch.compile.
    """
    if policy == "ignore" or not _checks.eager():
        return False
    if _pending:
        _drain(wait=False)
    deferred = _deferred(outputs)
    if loss is not None and not deferred and policy != "skip":
        # Fast path: a non-finite output makes its samples' loss non-finite (every loss sums squares
        # or differences of all its evaluations), so one finite loss vouches for all outputs; the
        # per-row flags are computed only to describe a failure. The loss (B,) is read through numpy
        # (one aten op, a detach, instead of isfinite's four and an all; not a sum, whose overflow
        # numpy would warn about; a reduced loss's one value through math.isfinite, cheaper than a ufunc).
        values = loss.numpy(force=True) if loss.dtype not in _NUMPY_LESS else _checks.host_values(loss)
        if math.isfinite(values) if values.ndim == 0 else np.logical_and.reduce(np.isfinite(values), axis=None):
            return False
    rows_ok = torch.isfinite(outputs.detach().reshape(outputs.shape[0], -1)).all(1)
    parts = [rows_ok] if loss is None else [rows_ok, torch.isfinite(loss.detach()).all().reshape(1)]
    flags = torch.cat(parts)
    blocks, has_loss = list(blocks), loss is not None  # a pending check must not keep the loss's graph alive

    def describe(values: np.ndarray, deferred: bool) -> str | None:
        where, start = [], 0
        for name, rows in blocks:
            bad = np.flatnonzero(~values[start:start + rows])
            if bad.size:
                where.append(f"{name} ({bad.size} of {rows} rows, first at row {int(bad[0])})")
            start += rows
        when = (" (found after the call returned, as checks on this device are judged without a host sync; "
                "the loss it returned is not usable)") if deferred else ""
        if where:
            msg = f"{loss_name}: the model returned non-finite values at " + ", ".join(where) + when
            if policy == "skip":
                return msg
            return msg + ("; nothing was averaged" if not deferred else "") + \
                ". Pass on_nonfinite='skip' to skip such batches."
        if has_loss and not values[-1]:
            hint = loss_hint() if loss_hint is not None else "the objective overflowed"
            return f"{loss_name}: the model's outputs were finite but the loss is not: {hint}{when}"
        return None

    if policy == "skip":  # the outputs only (``loss`` None); reads the flags on the host
        values = _checks.host_values(flags)
        if values.all():
            return False
        nonfinite_skips[loss_name] += 1
        warnings.warn(describe(values, False) + "; batch skipped (zero loss, no gradient)", RuntimeWarning,
                      stacklevel=4)
        return True
    if not deferred:
        _judge(_PendingCheck(flags, None, describe), False)
        return False
    host, event = _checks.host_copy(flags)
    _pending.append(_PendingCheck(host, event, describe))
    return False


def quotient_hint(quotient: str, eps: float, eval_dtype: torch.dtype, out_dtype: torch.dtype) -> Callable[[], str]:
    """The ``loss_hint`` of an FD loss: names the quotient and the usable eps range for the dtype."""

    def hint() -> str:
        lo, hi = usable_eps_range(eval_dtype)
        return (f"the FD quotient {quotient} is not finite in {out_dtype} with eps={eps:g}. For a model "
                f"evaluated in {eval_dtype}, eps must lie in about [{lo:.2g}, {hi:.2g}] times the data's "
                f"per-coordinate scale (eps='auto' picks {AUTO_EPS_KAPPA:g} u^(1/4) = "
                f"{AUTO_EPS_KAPPA * unit_roundoff(eval_dtype) ** 0.25:.2g} times it), and the model's outputs "
                f"small enough that their squares stay below {torch.finfo(out_dtype).max:.3g}")

    return hint
