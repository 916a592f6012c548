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
        indicator = np.all((x == 0) | (x == 1), axis=0)
        mean = np.where(indicator, 0.0, x.mean(axis=0))
        std = x.std(axis=0)
        scale = np.where(indicator | (std < 1e-12), 1.0, std)
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)


def one_hot(values: pd.Series, column: str, levels: Sequence[str]) -> pd.DataFrame:
    """One indicator column per agreed level, in the agreed order; NaN stays NaN."""
    out = pd.DataFrame(
        {f"{column}={level}": (values == level).astype(float) for level in levels},
        index=values.index,
    )
    out[values.isna().to_numpy()] = np.nan
    return out
