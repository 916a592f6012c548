"""The data contract for molecule sites (``format = "smiles"``): SMILES and labels to graphs.

A site's table holds one molecule per row: a SMILES column and one or more
label columns. An empty label cell means "unknown" (multi-task data such as
Tox21 measure each molecule on some assays only); the masked loss skips it.
Every SMILES RDKit cannot parse (or that has no atoms) is found before anything
is trained, reported in one line with the first rows, and either stops the
site (``invalid_smiles = "error"``, the default) or is skipped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from torch_geometric.data import Data

from shared.config import SiteConfig
from shared.errors import site_error
from shared.molecules import ATOM_FEATURES, featurise

log = logging.getLogger("fedhelix.data")

LABEL_TASKS = ("binary", "regression", "multitask")


@dataclass(frozen=True)
class MoleculeData:
    """A molecule site after the contract: graphs, targets (NaN = unknown), fixed split.

    ``y_*`` is ``[n]`` for binary/regression and ``[n, tasks]`` for multitask.
    """

    site: str
    feature_names: tuple[str, ...]
    labels: tuple[str, ...]
    graphs_train: tuple[Data, ...]
    y_train: np.ndarray
    graphs_test: tuple[Data, ...]
    y_test: np.ndarray
    rows_dropped: int = 0
    invalid_smiles: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_train(self) -> int:
        return len(self.graphs_train)

    @property
    def n_test(self) -> int:
        return len(self.graphs_test)


def _rows(positions: list[int], frame: pd.DataFrame, column: str, limit: int = 3) -> str:
    """'row 12 ('C1CC'), row 40 ('xyz')': 1-based data rows (after the header) with their SMILES."""
    shown = []
    for i in positions[:limit]:
        text = str(frame[column].iloc[i])
        shown.append(f"row {i + 1} ({text[:30]!r})")
    return ", ".join(shown) + (", ..." if len(positions) > limit else "")


def load_molecule_data(site: SiteConfig, task: str | None, frame: pd.DataFrame) -> MoleculeData:
    """Check, featurise and split a site's molecule table (already read by the contract).

    ``task = None``: no study's label rules (0/1, one label); several labels are shaped as multitask.
    """
    spec = site.data
    source = str(spec.path)

    def err(column: str | None, problem: str, fix: str):
        return site_error(site.name, source, column, problem, fix)

    if task is not None and task not in LABEL_TASKS:
        raise err(None, f"molecule data cannot serve a {task} study", f"use task {', '.join(LABEL_TASKS)}")
    labels = list(spec.labels or (spec.label,))
    multi = task == "multitask" or (task is None and len(labels) > 1)  # one label column per task
    if task is not None and not multi and len(labels) != 1:
        raise err(None, f"{len(labels)} label columns for a {task} study", 'give one label, or use task = "multitask"')
    for column in [spec.smiles, *labels]:
        if column not in frame.columns:
            shown = ", ".join(map(str, frame.columns[:8])) + (", ..." if frame.shape[1] > 8 else "")
            role = "smiles" if column == spec.smiles else "label"
            raise err(column, f"{role} column not found (columns: {shown})", f"set [data] {role} to an existing column")
    for column in labels:
        if not pd.api.types.is_numeric_dtype(frame[column].dtype):
            example = frame[column].dropna().astype(str).head(1).tolist()
            raise err(column, f"label is not numeric (e.g. {example[0]!r})" if example else "label is not numeric", "encode labels as numbers (0/1 for classification); leave unknown cells empty")
        values = frame[column].astype(float)
        if np.isinf(values).any():
            raise err(column, "contains infinite values", "replace them or leave the cells empty")
        if task in ("binary", "multitask"):
            seen = sorted(set(values.dropna().tolist()) - {0.0, 1.0})
            if seen:
                raise err(column, f"label must be 0/1 (empty = unknown), found {', '.join(map(str, seen[:5]))}", "recode the label as 0 and 1")

    # ---- molecules ---------------------------------------------------------------
    graphs, invalid = featurise(frame[spec.smiles].tolist())
    warnings: list[str] = []
    if invalid:
        what = f"{len(invalid)} of {len(frame)} SMILES are invalid or empty: {_rows(invalid, frame, spec.smiles)}"
        if spec.invalid_smiles == "error":
            raise err(spec.smiles, what, 'correct or remove those rows, or set [data] invalid_smiles = "skip" to leave them out')
        warnings.append(f"skipped {what}")
    keep = np.array([g is not None for g in graphs])

    # ---- labels: unknown cells ------------------------------------------------------
    y = frame[labels].to_numpy(dtype=np.float32)
    unknown = np.isnan(y).all(axis=1) if multi else np.isnan(y[:, 0])
    dropped = int((unknown & keep).sum())
    if dropped:
        warnings.append(f"dropped {dropped} row(s) without any known label")
    keep &= ~unknown
    if not keep.any():
        raise err(None, "no molecule with a valid SMILES and a known label is left", "check the smiles and label columns")
    index = np.flatnonzero(keep)

    # ---- split -----------------------------------------------------------------------
    if spec.split_column:
        if spec.split_column not in frame.columns:
            raise err(spec.split_column, "split_column not found", "set [data] split_column to an existing column")
        fold = frame[spec.split_column].astype(str).str.strip().str.lower().to_numpy()[index]
        bad = sorted(set(fold) - {"train", "test"})
        if bad:
            raise err(spec.split_column, f"values must be 'train' or 'test', found {bad[:3]}", "recode the split column")
        train_idx, test_idx = index[fold == "train"], index[fold == "test"]
    else:
        stratify = None
        if task == "binary":
            counts = np.bincount(y[index, 0].astype(int), minlength=2)
            stratify = y[index, 0] if counts.min() >= 2 else None
        train_idx, test_idx = train_test_split(index, test_size=spec.test_fraction, random_state=spec.split_seed, stratify=stratify)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise err(None, f"the split leaves {len(train_idx)} train and {len(test_idx)} test molecules", "use more molecules or another test_fraction")
    target = (lambda idx: y[idx]) if multi else (lambda idx: y[idx, 0])

    for message in warnings:
        log.warning("site '%s': %s", site.name, message)
    return MoleculeData(
        site=site.name,
        feature_names=ATOM_FEATURES,
        labels=tuple(labels),
        graphs_train=tuple(graphs[i] for i in train_idx),
        y_train=target(train_idx),
        graphs_test=tuple(graphs[i] for i in test_idx),
        y_test=target(test_idx),
        rows_dropped=dropped + (len(invalid) if invalid else 0),
        invalid_smiles=len(invalid),
        warnings=tuple(warnings),
    )
