"""The ``--loss`` names, mapped onto fdsm_ext's public losses (the only place trainers get a loss from).

Every experiment here trains a *log-density* model ``f: (N, *S) -> (N,)`` (an energy model is
``f = -E``), so each name is one call of an fdsm_ext loss with ``model_output="log_density"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import fdsm_ext

#: every loss a trainer may be asked for, FD methods first
LOSSES = ("fd_ssm", "ssm", "ssm_vr", "exact_sm", "dsm", "fd_dsm")
#: which losses are finite-difference (no autograd through the model's input)
FD_LOSSES = ("fd_ssm", "fd_dsm")


def score_matching_loss(name: str, log_density: Callable[[Tensor], Tensor], x: Tensor, cfg,
                        generator: torch.Generator | None = None) -> Tensor:
    """The mean loss ``name`` of ``log_density`` on the batch ``x`` (shape ``(B, *S)``), a scalar.

    ``cfg`` supplies ``eps`` (FD step), ``n_slices``, ``dsm_sigma`` and ``backend``; ``generator``
    draws the directions and the DSM noise (the trainer passes its own, checkpointed one).
    """
    if name == "fd_ssm":
        return fdsm_ext.fd_ssm_loss(log_density, x, cfg.eps, n_slices=cfg.n_slices, generator=generator,
                                    backend=cfg.backend)
    if name == "fd_dsm":
        return fdsm_ext.fd_dsm_loss(log_density, x, cfg.dsm_sigma, cfg.eps, n_slices=cfg.n_slices,
                                    generator=generator, backend=cfg.backend)
    if name == "ssm":
        return fdsm_ext.ssm_loss(log_density, x, n_slices=cfg.n_slices, generator=generator)
    if name == "ssm_vr":
        return fdsm_ext.ssm_vr_loss(log_density, x, n_slices=cfg.n_slices, generator=generator)
    if name == "exact_sm":
        return fdsm_ext.exact_sm_loss(log_density, x)
    if name == "dsm":
        return fdsm_ext.dsm_loss(log_density, x, cfg.dsm_sigma, generator=generator)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
