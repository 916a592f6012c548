"""Feature transforms fitted on a site's train split only (never on its test split)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Standardizer:
    """Z-score the non-binary columns; 0/1 indicator columns are left as they are.

    Indicators keep their meaning (and their zero when absent at a site), and a
    column that is constant at a site gets scale 1 instead of a division by zero.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Statistics of this site's own train split."""
        m = moments(x)
        return cls.from_moments(m[: x.shape[1]], m[x.shape[1] :], is_indicator(x))

    def transform(self, x: np.ndarray) -> np.ndarray:
        out = np.subtract(x, self.mean, dtype=np.float32)
        out /= self.scale  # in place: one copy of a wide matrix, not three
        return out

    @classmethod
    def from_moments(cls, mean: np.ndarray, mean_sq: np.ndarray, indicator: np.ndarray) -> Standardizer:
        """Pooled standardisation from pooled first and second moments (secure statistics round)."""
        var = np.maximum(np.asarray(mean_sq) - np.square(mean), 0.0)
        std = np.sqrt(var)
        scale = np.where(indicator | (std < 1e-12), 1.0, std)
        return cls(np.where(indicator, 0.0, mean).astype(np.float32), scale.astype(np.float32))


def is_indicator(x: np.ndarray) -> np.ndarray:
    """Per column: are all values 0 or 1 (left unscaled by every standardiser)?"""
    return np.all((x == 0) | (x == 1), axis=0)


def moments(x: np.ndarray) -> np.ndarray:
    """Per-feature mean and mean of squares, concatenated: what a site adds to the secure sum."""
    x = np.asarray(x)
    total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), 1024):  # float64 sums in row blocks: no float64 copy of a wide matrix
        block = x[start : start + 1024].astype(np.float64)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
    return np.concatenate([total / len(x), total_sq / len(x)])


def one_hot(values: pd.Series, column: str, levels: Sequence[str]) -> pd.DataFrame:
    """One indicator column per agreed level, in the agreed order; NaN stays NaN."""
    out = pd.DataFrame(
        {f"{column}={level}": (values == level).astype(float) for level in levels},
        index=values.index,
    )
    out[values.isna().to_numpy()] = np.nan
    return out
