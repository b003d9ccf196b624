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
import warnings

import torch
from torch import Tensor

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
    return torch.finfo(dtype).eps / 2


def evaluation_dtype(x: Tensor, model=None) -> torch.dtype:
    """The dtype a model evaluates ``x`` in: the autocast dtype when autocast is on for ``x``'s device,
    else the dtype of the model's first floating parameter (for an ``nn.Module``), else ``x.dtype``."""
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
    flat = x.detach().reshape(x.shape[0], -1).double()
    if flat.shape[0] < 2:
        return 1.0
    scale = float(flat.std(0).square().mean().sqrt())
    return scale if scale > 0 and scale == scale and scale != float("inf") else 1.0


def auto_eps(x: Tensor, dtype: torch.dtype | None = None, model=None) -> float:
    """The FD step that balances truncation and round-off for ``x`` evaluated in ``dtype``:
    ``AUTO_EPS_KAPPA * u(dtype)^(1/4) * data_scale(x)``. ``dtype`` defaults to
    :func:`evaluation_dtype`. Reads ``x`` (one device sync); not traceable by torch.compile."""
    dtype = dtype or evaluation_dtype(x, model)
    return AUTO_EPS_KAPPA * unit_roundoff(dtype) ** 0.25 * data_scale(x)


def warn_if_unresolvable(eps: float, x: Tensor, model=None) -> None:
    """Warn when ``eps`` is more than RESOLUTION_FACTOR below :func:`auto_eps`. Checked on the first
    call per evaluation dtype only (it reads the batch), so it warns at most once per dtype."""
    dtype = evaluation_dtype(x, model)
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
