"""Tabular data of the DKEF experiment (paper Table 1), preprocessed as in the DKEF papers' code.

Datasets (the three UCI files are the user's, nothing is downloaded):

- ``parkinsons``: ``parkinsons_updrs.data`` (UCI "Parkinsons Telemonitoring", comma-separated with a
  header row). Columns 0-2 (subject, age, sex) are dropped, then, repeatedly, the first column that
  has an absolute correlation above 0.98 with another one, until none has.
- ``redwine`` / ``whitewine``: ``winequality-red.csv`` / ``winequality-white.csv`` (UCI "Wine Quality",
  ``;``-separated with a header row). The last column (the quality grade) is dropped.
- ``wine`` (offline default): scikit-learn's bundled ``load_wine`` table (178 x 13), no file needed.

The wine tables are recorded at a fixed precision, so each column is dequantized: uniform noise on
``[-q, q]`` is added, ``q`` the median gap between its sorted distinct values. Then, for every dataset:
rows are shuffled with seed 2019; the test split is the last ``min(1000, N // 10)`` rows and the
validation split the ``min(1000, (N - test) // 10)`` rows before it; all rows are PCA-whitened with the
mean and whitening matrix of the *whole* table (as the DKEF paper does); finally N(0, 0.05^2) noise is
added to every split. All randomness is seeded (``seed``), so a dataset is the same in every run.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ConfigError, require_file

DATASETS = ("wine", "parkinsons", "redwine", "whitewine")
FILES = {"parkinsons": "parkinsons_updrs.data", "redwine": "winequality-red.csv",
         "whitewine": "winequality-white.csv"}


def _drop_correlated(data: np.ndarray, threshold: float = 0.98) -> np.ndarray:
    while True:
        corr = np.abs(np.corrcoef(data.T))
        count = (corr > threshold).sum(1)  # the diagonal counts once
        if not (count > 1).any():
            return data
        data = np.delete(data, np.flatnonzero(count > 1)[0], axis=1)


def _dequantize(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    data = data.copy()
    for j in range(data.shape[1]):
        gaps = np.diff(np.unique(data[:, j]))
        q = np.median(gaps) if gaps.size else 0.0
        data[:, j] += rng.uniform(-q, q, size=data.shape[0])
    return data


def read_table(name: str, path: str | None) -> np.ndarray:
    """The raw feature table of ``name`` (``path`` is the UCI file; ignored for ``wine``)."""
    if name == "wine":
        from sklearn.datasets import load_wine

        return load_wine().data.astype(np.float64)
    if name not in FILES:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if not path:
        raise ConfigError(f"dataset {name!r} needs --data-path pointing to the UCI file {FILES[name]}")
    require_file(path, f"{name} data file", f"expected the UCI file {FILES[name]}")
    if name == "parkinsons":
        return _drop_correlated(np.loadtxt(path, delimiter=",", skiprows=1)[:, 3:])
    return np.loadtxt(path, delimiter=";", skiprows=1)[:, :-1]


def load_uci(name: str, path: str | None = None, seed: int = 2019) -> dict[str, torch.Tensor]:
    """``{"train", "val", "test"}`` float32 tensors of ``name``, preprocessed as the module docstring says."""
    rng = np.random.default_rng(seed)
    data = read_table(name, path)
    if name != "parkinsons":
        data = _dequantize(data, rng)
    data = data[rng.permutation(data.shape[0])]
    n = data.shape[0]
    n_test = min(1000, n // 10)
    n_val = min(1000, (n - n_test) // 10)
    mean = data.mean(0)
    _, s, vt = np.linalg.svd(data - mean, full_matrices=False)
    white = (data - mean) @ (vt.T / s * np.sqrt(n))
    white = white + 0.05 * rng.standard_normal(white.shape)
    splits = {"train": white[: n - n_test - n_val], "val": white[n - n_test - n_val: n - n_test],
              "test": white[n - n_test:]}
    return {k: torch.from_numpy(v).to(torch.float32) for k, v in splits.items()}
