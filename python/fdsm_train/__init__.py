"""fdsm_train: reference trainers for finite-difference score matching, built on fdsm_ext.

``fdsm-train <experiment>`` (see :mod:`fdsm_train.cli`) runs one of :data:`fdsm_train.experiments.EXPERIMENTS`;
the pieces are importable: :class:`~fdsm_train.trainer.Trainer` (the loop, checkpoints, DDP),
:mod:`~fdsm_train.config` (dataclass configs), :mod:`~fdsm_train.objectives` (``--loss`` names).
"""

__version__ = "0.1.0"
