"""The ``--loss`` names, mapped onto fdsm_ext's public losses (the only place trainers get a loss from).

The energy-model experiments train a *log-density* model ``f: (N, *S) -> (N,)`` (an energy model is
``f = -E``): each name in :data:`LOSSES` is one call of an fdsm_ext loss with
``model_output="log_density"`` (:func:`score_matching_loss`). The NCSN experiment trains a
noise-conditional *score network* ``s(x, sigma)``: each name in :data:`SCORE_LOSSES` is one of
fdsm_ext's annealed losses (:func:`noise_conditional_loss`).
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
                        generator: torch.Generator | None = None, *, sigma: Tensor | None = None,
                        sigma_power: float = 0.0) -> Tensor:
    """The mean loss ``name`` of ``log_density`` on the batch ``x`` (shape ``(B, *S)``), a scalar.

    ``cfg`` supplies ``eps`` (FD step, or ``"auto"``), ``n_slices``, ``dsm_sigma`` and ``backend``; ``generator``
    draws the directions and the DSM noise (the trainer passes its own, checkpointed one). For dsm and
    fd_dsm, ``sigma`` (a ``(B,)`` tensor of per-sample noise levels) replaces ``cfg.dsm_sigma`` and each
    sample's loss is weighted by ``sigma ** sigma_power`` (2: NCSN's ``lambda(sigma) = sigma^2``).
    """
    noise = cfg.dsm_sigma if sigma is None else sigma
    if name == "fd_ssm":
        return fdsm_ext.fd_ssm_loss(log_density, x, cfg.eps, n_slices=cfg.n_slices, generator=generator,
                                    backend=cfg.backend)
    if name == "fd_dsm":
        return fdsm_ext.fd_dsm_loss(log_density, x, noise, cfg.eps, n_slices=cfg.n_slices, generator=generator,
                                    backend=cfg.backend, sigma_power=sigma_power)
    if name == "ssm":
        return fdsm_ext.ssm_loss(log_density, x, n_slices=cfg.n_slices, generator=generator)
    if name == "ssm_vr":
        return fdsm_ext.ssm_vr_loss(log_density, x, n_slices=cfg.n_slices, generator=generator)
    if name == "exact_sm":
        return fdsm_ext.exact_sm_loss(log_density, x)
    if name == "dsm":
        per_sample = fdsm_ext.dsm_loss(log_density, x, noise, generator=generator, reduction="none")
        if sigma_power != 0.0:
            per_sample = per_sample * torch.as_tensor(noise, dtype=per_sample.dtype) ** sigma_power
        return per_sample.mean()
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


#: the ``--loss`` names of noise-conditional score networks (the NCSN experiment), FD first
SCORE_LOSSES = ("fd_ssm_vr", "ssm_vr", "dsm")


def noise_conditional_loss(name: str, score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor, cfg,
                           generator: torch.Generator | None = None) -> Tensor:
    """The mean sigma^2-weighted multi-scale loss ``name`` of a score network on clean data ``x``.

    Each sample gets a noise level drawn uniformly from ``sigmas`` and is perturbed to ``x + sigma z``
    inside fdsm_ext's annealed losses (NCSN training, docs/math.md): ``fd_ssm_vr`` is
    :func:`fdsm_ext.annealed_fd_ssm_vr_loss`, ``ssm_vr`` :func:`fdsm_ext.annealed_ssm_vr_loss`, ``dsm``
    :func:`fdsm_ext.annealed_dsm_loss`. ``score(x, sigma)`` takes ``sigma`` of shape ``(N,)``; ``cfg``
    supplies ``eps``, ``n_slices`` and ``backend``.
    """
    if name == "fd_ssm_vr":
        return fdsm_ext.annealed_fd_ssm_vr_loss(score, x, sigmas, cfg.eps, n_slices=cfg.n_slices, generator=generator,
                                                backend=cfg.backend)
    if name == "ssm_vr":
        return fdsm_ext.annealed_ssm_vr_loss(score, x, sigmas, n_slices=cfg.n_slices, generator=generator)
    if name == "dsm":
        return fdsm_ext.annealed_dsm_loss(score, x, sigmas, generator=generator)
    raise ValueError(f"unknown loss {name!r} for a score network; choose from {', '.join(SCORE_LOSSES)}")
