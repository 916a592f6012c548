"""A validation split carved from a site's *training* rows, for best-round model selection.

Choosing the round by the test split would make the reported test metric optimistic;
the validation rows come from the train split only, so test rows are never looked
at before the final model is fixed. The carve is a pure function of the site's data
and the study seed, so every request of a run sees the same rows (the training
of round 1 and the validation of round 7 agree), and it is stratified on a binary
label so a rare positive class is present in both parts where it can be.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TypeVar

import numpy as np

D = TypeVar("D")


def validation_indices(y_train: np.ndarray, fraction: float, seed: int, site: str) -> np.ndarray:
    """Sorted positions (in the train split) of the validation rows: at least one, never all."""
    n = len(y_train)
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    digest = hashlib.sha256(f"{seed}|{site}|validation".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    size = min(n - 1, max(1, round(fraction * n)))
    y = np.asarray(y_train)
    if y.ndim == 1 and set(np.unique(y).tolist()) <= {0.0, 1.0}:
        chosen = []
        for value in (0, 1):  # stratified: each class contributes its share (and one row if it has two)
            members = rng.permutation(np.flatnonzero(y == value))
            take = min(len(members) - 1, max(1 if len(members) >= 2 else 0, round(fraction * len(members))))
            chosen.extend(members[: max(take, 0)].tolist())
        if chosen:
            return np.sort(np.asarray(chosen, dtype=np.int64))
    return np.sort(rng.permutation(n)[:size])


def carve_validation(data: D, fraction: float, seed: int) -> tuple[D, D]:
    """(training view, validation view) of a site's data.

    The training view keeps the test split and the remaining train rows; the
    validation view holds the carved rows as its *test* arrays (so the evaluation
    code scores them unchanged) and the remaining train rows as its train arrays.
    Works for tabular (``x_*``) and molecule (``graphs_*``) data alike.
    """
    y_train = np.asarray(data.y_train)
    held = validation_indices(y_train, fraction, seed, data.site)
    keep = np.setdiff1d(np.arange(len(y_train)), held)
    if hasattr(data, "graphs_train"):
        graphs = data.graphs_train
        rest, val = tuple(graphs[i] for i in keep), tuple(graphs[i] for i in held)
        train_view = dataclasses.replace(data, graphs_train=rest, y_train=y_train[keep])
        return train_view, dataclasses.replace(data, graphs_train=rest, y_train=y_train[keep], graphs_test=val, y_test=y_train[held])
    x = data.x_train
    train_view = dataclasses.replace(data, x_train=x[keep], y_train=y_train[keep])
    return train_view, dataclasses.replace(data, x_train=x[keep], y_train=y_train[keep], x_test=x[held], y_test=y_train[held])
