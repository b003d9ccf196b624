"""fdsm_ext: fused finite-difference score matching for PyTorch.

Losses (``fdsm_ext.losses.__all__``, all exported here): :func:`fd_ssm_loss`, :func:`fd_ssm_vr_loss`,
:func:`fd_dsm_loss`, :func:`annealed_fd_ssm_vr_loss`, :func:`fd_directional_derivative`, and the
gradient-based baselines :func:`exact_sm_loss`, :func:`ssm_loss`, :func:`ssm_vr_loss`, :func:`dsm_loss`,
:func:`annealed_dsm_loss`, :func:`annealed_ssm_vr_loss`. Fused ops: :mod:`fdsm_ext.ops`;
their pure-PyTorch references: :mod:`fdsm_ext.reference`.

Sampling (see :mod:`fdsm_ext.sampling`): :func:`annealed_langevin` and :func:`langevin_dynamics` on the
fused :func:`fdsm_ext.ops.langevin_step_`, and the NCSNv2 recipe: :func:`max_pairwise_distance` (T1),
:func:`geometric_ratio` and :func:`geometric_sigmas` (T2), :class:`NoiseConditionalScore` (T3),
:func:`solve_step_size` (T4), :func:`ema_model` (T5); :func:`pc_sampler`, the predictor-corrector
sampler of the variance-exploding SDE (see :mod:`fdsm_ext.pc_sampling`).

Likelihood (see :mod:`fdsm_ext.likelihood`): :func:`ode_likelihood`, per-sample negative
log-likelihood and bits/dim through the probability-flow ODE, with a finite-difference divergence.

:func:`selfcheck` runs every op of every available backend on a device against the references.

``BACKENDS`` lists the ``backend=`` values every loss and sampler accepts; :func:`check_finite`
raises any pending non-finite error of an earlier loss call on a GPU (see :mod:`fdsm_ext.numerics`).
"""

from . import likelihood, losses, numerics, ops, pc_sampling, reference, sampling
from ._checks import BACKENDS
from ._ext import has_cuda_kernels
from .likelihood import LikelihoodResult, ode_likelihood
from .numerics import check_finite
from .pc_sampling import PCStepInfo, pc_sampler
from .selfcheck import selfcheck  # the function; the module stays importable as fdsm_ext.selfcheck
from .sampling import (
    LangevinStepInfo,
    NoiseConditionalScore,
    annealed_langevin,
    ema_model,
    geometric_ratio,
    geometric_sigmas,
    langevin_dynamics,
    max_pairwise_distance,
    score_from_energy,
    score_from_log_density,
    solve_step_size,
    step_size_objective,
)
from .losses import *  # noqa: F403  (losses.__all__, the public losses)

__version__ = "0.1.0"

__all__ = [
    *losses.__all__,
    *sampling.__all__,
    "BACKENDS",
    "LikelihoodResult",
    "PCStepInfo",
    "check_finite",
    "has_cuda_kernels",
    "ode_likelihood",
    "ops",
    "pc_sampler",
    "reference",
    "selfcheck",
]
