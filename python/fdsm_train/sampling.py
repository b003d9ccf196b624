"""Sampling from trained models: the one place the trainers call fdsm_ext's Langevin sampler.

The Langevin update itself lives in fdsm_ext (``fdsm_ext.annealed_langevin``, shared/MATH.md
"Langevin dynamics"); this module only turns a log-density model into the ``score_fn(x, sigma)`` it
expects. With an fdsm_ext built before the sampler landed, :func:`langevin_samples` raises
:class:`SamplerUnavailable` and the experiments skip their sample-based numbers and panels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import fdsm_ext


class SamplerUnavailable(RuntimeError):
    """This fdsm_ext has no ``annealed_langevin`` (an older build)."""


def log_density_score(log_density: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``score_fn(x, sigma) = grad_x log_density(x)`` by autograd, ignoring ``sigma``.

    For a model trained on clean data the annealing ladder only scales the step size; the score does
    not depend on the noise level.
    """

    def score_fn(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_density(leaf).sum(), leaf)
        return grad.detach()

    return score_fn


def sampler_available() -> bool:
    """Whether this fdsm_ext provides ``annealed_langevin``."""
    return hasattr(fdsm_ext, "annealed_langevin")


def langevin_samples(score_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, sigmas: Sequence[float], *,
                     n_steps_each: int, step_lr: float, generator: torch.Generator | None = None,
                     clamp: tuple[float, float] | None = None, denoise: bool = False,
                     progress: bool = False) -> Tensor:
    """Annealed Langevin dynamics from ``x0`` with fdsm_ext's sampler (NCSN Algorithm 1).

    ``n_steps_each`` steps per level of ``sigmas`` with step ``step_lr * sigma_i^2 / sigma_L^2``;
    ``score_fn(x, sigma)`` receives ``sigma`` of shape ``(N,)``. Returns the final samples, detached.

    Raises:
        SamplerUnavailable: this fdsm_ext has no ``annealed_langevin``.
    """
    if not sampler_available():
        raise SamplerUnavailable("fdsm_ext.annealed_langevin is not in this build of fdsm_ext; "
                                 "sample-based metrics and figures are skipped")
    with torch.no_grad():
        out = fdsm_ext.annealed_langevin(score_fn, x0, torch.as_tensor(list(sigmas), dtype=x0.dtype),
                                         n_steps_each, step_lr, denoise=denoise, clamp=clamp,
                                         generator=generator, progress=progress)
    return out.detach()
