"""Omics transforms and federated feature selection, on whole matrices (never column by column).

Per-patient transforms (counts per million, ``log1p``) run at the site on each
omics table as it is read: they use one patient's row only, so they cannot leak
between the train and test splits. Feature selection needs every site's data,
so each site reports per-feature statistics of its train split through the
secure sum (:func:`selection_moments`), and the coordinator applies the study's
rules to the pooled result (:func:`select_features`); every site then uses the
same list, in the study's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.config import OmicsSelection


class TransformError(ValueError):
    """A transform cannot be applied: ``row`` is the offending patient's position, ``column`` the feature's."""

    def __init__(self, problem: str, fix: str, row: int | None = None, column: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.fix, self.row, self.column = problem, fix, row, column


def counts_per_million(x: np.ndarray) -> np.ndarray:
    """Library-size normalisation: each patient's counts scaled to sum to one million (NaN ignored)."""
    library = np.nansum(x, axis=1, dtype=np.float64)
    empty = np.flatnonzero(~(library > 0))
    if len(empty):
        raise TransformError("library size is 0 (no counts)", "remove that patient or drop the cpm transform", row=int(empty[0]))
    return (x * (1e6 / library)[:, None]).astype(x.dtype, copy=False)


def log1p(x: np.ndarray) -> np.ndarray:
    """``log(1 + x)`` for counts (or CPM): compresses the long right tail of expression values."""
    return np.log1p(x)


TRANSFORMS = {"cpm": counts_per_million, "log1p": log1p}


def apply_transforms(x: np.ndarray, transforms: Sequence[str]) -> np.ndarray:
    """Apply the table's transforms in order; counts must be >= 0 (NaN stays NaN)."""
    if not transforms:
        return x
    with np.errstate(invalid="ignore"):
        negative = x < 0
    if negative.any():
        row, column = np.argwhere(negative)[0]
        raise TransformError(
            f"negative value {x[row, column]:g}, but {', '.join(transforms)} expect counts",
            "remove the transform if the data are already normalised (e.g. log-scale microarray values)",
            row=int(row),
            column=int(column),
        )
    for name in transforms:
        x = TRANSFORMS[name](x)
    return x


def selection_moments(x: np.ndarray, missing_rate: np.ndarray) -> np.ndarray:
    """What a site adds to the secure sum for feature selection, per feature: [present, sum, sum of squares] / n.

    ``x`` is the site's train split after mean imputation (a missing value holds
    the site's mean of the present ones) and ``missing_rate`` the fraction that
    was missing, so the present values' sums follow exactly without the raw
    NaN matrix. Weighted by n_train, the secure mean over sites is the pooled
    fraction present and the pooled sums over present values, divided by N.
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.asarray(missing_rate, dtype=np.float64)
    mean = x.mean(axis=0)  # = the mean of the present values (imputed with it)
    present = 1.0 - m
    total = present * mean
    total_sq = np.square(x).mean(axis=0) - m * np.square(mean)
    return np.concatenate([present, total, total_sq])


@dataclass(frozen=True)
class PooledFeatureStats:
    """Pooled per-feature missing rate and variance of the present values (population variance)."""

    missing_rate: np.ndarray
    variance: np.ndarray

    @classmethod
    def from_moments(cls, moments: np.ndarray) -> PooledFeatureStats:
        present, total, total_sq = np.split(np.asarray(moments, dtype=np.float64), 3)
        safe = np.where(present > 0, present, 1.0)
        mean = total / safe
        variance = np.where(present > 0, np.maximum(total_sq / safe - np.square(mean), 0.0), 0.0)
        return cls(np.clip(1.0 - present, 0.0, 1.0), variance)


def select_features(candidates: Sequence[str], stats: PooledFeatureStats, rule: OmicsSelection) -> list[str]:
    """The features that pass the study's rules, in the candidates' (the study's) order.

    Missing-rate filter, then variance filter, then the ``top_k`` most variable
    (ties broken by the study's order, so every run picks the same list).
    """
    keep = (stats.missing_rate <= rule.max_missing_rate + 1e-9) & (stats.variance > rule.min_variance)
    index = np.flatnonzero(keep)
    if rule.top_k and len(index) > rule.top_k:
        ranked = index[np.argsort(-stats.variance[index], kind="stable")]
        index = np.sort(ranked[: rule.top_k])
    return [candidates[i] for i in index]


def candidate_order(per_site: Sequence[Sequence[str]], rule: OmicsSelection) -> list[str]:
    """Omics features every site has, in the study's order (its list, else sorted by name).

    A feature one site lacks cannot be used by the shared model, so it is never a candidate.
    """
    common = set(per_site[0]).intersection(*map(set, per_site[1:])) if per_site else set()
    if rule.features:
        return [f for f in rule.features if f in common]
    return sorted(common)
