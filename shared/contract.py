"""The site data contract: read a site's table, check it, split it, encode it.

Everything a hospital's table must satisfy before a single number leaves the
site is checked here, and every violation ends in one line naming the site, the
file, the column and the fix (see :func:`shared.errors.site_error`). Nothing in
this module talks to the network: a site that fails the contract sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from shared.config import SiteConfig
from shared.errors import site_error
from shared.preprocess import Standardizer, one_hot
from shared.tables import read_frame, read_tables

log = logging.getLogger("fedhelix.data")

READERS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class SiteData:
    """A site's data after the contract: float32 features, task targets, fixed split.

    ``y_*`` is the label for binary/regression and ``(time, event)`` columns for survival.
    """

    site: str
    feature_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    rows_dropped: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)
    omics_features: tuple[str, ...] = ()  # features from omics tables (candidates of federated selection)
    missing_rate: np.ndarray | None = None  # per feature, train split, before imputation
    join_dropped: int = 0  # patients the join of the site's tables dropped

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def read_table(site: SiteConfig) -> pd.DataFrame:
    """Read the site's CSV/TSV/Parquet file into a frame, or fail with one clear line."""
    path = site.data.path
    err = lambda problem, fix: site_error(site.name, str(path), None, problem, fix)  # noqa: E731
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise err(f"unsupported file type '{path.suffix}'", "use .csv, .tsv or .parquet")
    if not path.is_file():
        raise err("file not found", "check [data] path in the site file (relative paths start at the site file)")
    frame = read_frame(site, path, kind)
    if frame.empty:
        raise err("the table has no rows", "point the site file at the table holding the patients")
    return frame


def _binary(values: pd.Series) -> bool:
    present = pd.unique(values.dropna())
    return len(present) > 0 and set(np.asarray(present, dtype=float).tolist()) <= {0.0, 1.0}


def load_site_data(
    site: SiteConfig,
    task: str | None,
    categories: Mapping[str, Sequence[str]] | None = None,
    feature_order: Sequence[str] | None = None,
    pooled: Standardizer | None = None,
    select: bool = False,
    scale: bool = True,
) -> SiteData:
    """Apply the whole contract to a site: read, check, split, impute, encode, normalise.

    ``categories`` are the study's agreed levels for categorical columns (never
    learned from a site, so no site's vocabulary leaks). ``feature_order`` is the
    study's agreed order of encoded features; when given, the site's columns are
    put in that order and any difference is an error. ``pooled`` is the
    standardisation agreed through the secure statistics round; a site with
    ``normalize = "federated"`` stays unscaled until it has one.

    With several tables (or an id), they are joined on the patient id first
    (:mod:`shared.tables`). ``select`` (federated feature selection) keeps only
    the omics features ``feature_order`` names; a site's extra omics columns are
    dropped, missing omics values are imputed with the train mean instead of
    dropping the patient. ``scale = False`` skips standardisation (the raw
    values the selection statistics are computed on).

    ``task = None`` applies only the task-independent part of the contract (files,
    columns, types, missing values, split, join, SMILES), for a site that has no
    study to check against yet (``fedhelix check-site`` without ``--study``): no
    label rule of any task, a declared time column checked as survival times, and
    categorical columns without agreed levels encoded with the site's own levels
    (a local check; nothing leaves the site).
    """
    spec = site.data
    categories = categories or {}
    source = str(spec.path) if len(spec.tables) < 2 else " + ".join(t.path.name for t in spec.tables)  # joined: name them all
    if spec.format == "smiles":  # molecules become graphs (RDKit/PyG imported only for them)
        from shared.molecule_data import load_molecule_data

        return load_molecule_data(site, task, read_table(site))  # type: ignore[return-value]
    if len(spec.labels) > 1:
        raise site_error(site.name, source, None, f"{len(spec.labels)} label columns in a table site", 'give one label; several labels need format = "smiles" and task = "multitask"')
    joined = read_tables(site) if spec.tables or spec.id else None
    frame = joined.frame if joined is not None else read_table(site)
    omics = set(joined.omics_columns) if joined is not None else set()
    id_columns = {spec.id, *(t.id for t in spec.tables)} - {None}

    def err(column: str | None, problem: str, fix: str):
        return site_error(site.name, source, column, problem, fix)

    def need(column: str, role: str) -> None:
        if column not in frame.columns:
            shown = ", ".join(map(str, frame.columns[:8])) + (", ..." if frame.shape[1] > 8 else "")
            raise err(column, f"{role} column not found (columns: {shown})", f"set [data] {role} to an existing column")

    targets = [spec.label]
    need(spec.label, "label")
    survival = task == "survival" or (task is None and bool(spec.time))  # a declared time is checked as one
    if survival:
        if not spec.time:
            raise err(None, "a survival study needs a time column", 'set [data] time = "..." in the site file')
        need(spec.time, "time")
        targets.append(spec.time)
    if spec.split_column:
        need(spec.split_column, "split_column")
    for column in spec.drop:
        if column not in id_columns:  # an id is the join key, no longer a column
            need(column, "drop")

    reserved = set(targets) | set(spec.drop) | ({spec.split_column} if spec.split_column else set())
    if spec.features:
        for column in spec.features:
            need(column, "features")
        features = list(spec.features)
    else:
        features = [c for c in frame.columns if c not in reserved]
    if select and feature_order is not None and omics:
        wanted = set(feature_order)
        features = [c for c in features if c in wanted or c not in omics]
    if not features:
        raise err(None, "no feature columns left", "list [data] features or stop dropping every column")
    for column in spec.categorical:
        if column not in features:
            raise err(column, "declared categorical but not a feature column", "fix [data] categorical")

    # ---- types -------------------------------------------------------------
    dtypes = frame.dtypes  # checked per dtype object, never by extracting columns (wide tables)

    def is_number(column: str) -> bool:
        return pd.api.types.is_numeric_dtype(dtypes[column]) or pd.api.types.is_bool_dtype(dtypes[column])

    for column in features:
        if column in spec.categorical:
            if column not in categories and task is not None:
                raise err(
                    column,
                    "categorical column has no agreed levels",
                    f"the study file must list them under [data.categories] {column} = [...]",
                )
            continue
        if not is_number(column):
            example = frame[column].dropna().astype(str).head(1).tolist()
            raise err(
                column,
                f"is not numeric (e.g. {example[0]!r})" if example else "is not numeric",
                "clean the values or declare it in [data] categorical",
            )
    for column in targets:
        if not is_number(column):
            raise err(column, "target column is not numeric", "encode it as numbers (event/label 0 or 1)")
    if task in ("binary", "survival") and not _binary(frame[spec.label]):
        seen = sorted(map(str, pd.unique(frame[spec.label].dropna())))[:5]
        role = "event" if task == "survival" else "label"
        raise err(spec.label, f"{role} must be 0/1, found {', '.join(seen) or 'no values'}", f"recode the {role} as 0 and 1")
    numeric = [c for c in features if c not in spec.categorical] + targets
    floats = frame[numeric].select_dtypes(include="floating")  # ints and bools cannot be infinite
    infinite = floats.columns[np.isinf(floats).any(axis=0).to_numpy()]  # per dtype block: no float64 copy of a wide matrix
    del floats
    if len(infinite):
        raise err(str(infinite[0]), "contains infinite values", "replace them or remove those rows")
    if survival:
        negative = int((frame[spec.time].astype(float) < 0).sum())
        if negative:
            raise err(spec.time, f"{negative} negative survival time(s)", "times must be >= 0 (days since diagnosis)")

    # ---- missing values ----------------------------------------------------
    used = features + targets
    missing = frame.isna()[used]
    warnings: list[str] = []
    dropped = 0
    if spec.missing == "none" and missing.to_numpy().any():
        column = missing.any()[lambda s: s].index[0]
        raise err(
            column,
            f"{int(missing[column].sum())} missing value(s) while missing = \"none\"",
            'fill them, or set [data] missing = "drop" or "mean"',
        )
    if spec.missing == "mean":
        drop_mask = missing[targets].any(axis=1)
    else:  # a missing omics value is imputed, never a reason to drop the patient
        drop_mask = missing[[c for c in used if c not in omics]].any(axis=1) if omics else missing.any(axis=1)
    if drop_mask.any():
        dropped = int(drop_mask.sum())
        frame = frame.loc[~drop_mask]
        warnings.append(f"dropped {dropped} row(s) with missing values")

    # ---- split ---------------------------------------------------------------
    if spec.split_column:
        fold = frame[spec.split_column].astype(str).str.strip().str.lower()
        bad = sorted(set(fold) - {"train", "test"})
        if bad:
            raise err(spec.split_column, f"split values must be 'train' or 'test', found {bad[:3]}", "recode the split column")
        train, test = frame[fold == "train"], frame[fold == "test"]
    else:
        stratify = frame[spec.label] if task in ("binary", "survival") else None
        if stratify is not None and stratify.value_counts().min() < 2:
            stratify = None
        try:
            train, test = train_test_split(
                frame, test_size=spec.test_fraction, random_state=spec.split_seed, stratify=stratify
            )
        except ValueError:  # too few rows per class to stratify: split without it
            try:
                train, test = train_test_split(frame, test_size=spec.test_fraction, random_state=spec.split_seed)
            except ValueError:
                train, test = frame.iloc[:0], frame.iloc[:0]
    for name, part in (("train", train), ("test", test)):
        if part.empty:
            raise err(
                spec.split_column,
                f"the {name} split is empty ({len(frame)} usable rows)",
                "add rows, change test_fraction, or fix the split column",
            )
    if task in ("binary", "survival") and train[spec.label].nunique() < 2:
        role = "events" if task == "survival" else "label values"
        warnings.append(f"only one class of {role} in the train split; training continues but learns little here")

    # ---- encode ----------------------------------------------------------------
    if task is None:  # no study yet: the site's own levels stand in for the agreed ones
        own = {c: sorted(map(str, _codes(frame[c]).dropna().unique())) for c in spec.categorical if c not in categories}
        categories = {**categories, **own}
    x_train_frame, names = _encode(train, features, spec.categorical, categories, err)
    x_test_frame, _ = _encode(test, features, spec.categorical, categories, err)
    if feature_order is not None:
        have, want = set(names), set(feature_order)
        missing_here = [f for f in feature_order if f not in have]
        extra_here = [f for f in names if f not in want]
        if missing_here or extra_here:
            detail = f"missing {missing_here[:3]}" if missing_here else f"unexpected {extra_here[:3]}"
            raise err(None, f"features differ from the study's agreed list ({detail})", "align the site's columns with the study")
        x_train_frame, x_test_frame, names = x_train_frame[list(feature_order)], x_test_frame[list(feature_order)], list(feature_order)
    x_train = x_train_frame.to_numpy(dtype=np.float32)
    x_test = x_test_frame.to_numpy(dtype=np.float32)
    del x_train_frame, x_test_frame
    missing_rate = np.isnan(x_train).mean(axis=0)
    if missing_rate.any() or np.isnan(x_test).any():  # missing = "mean", or omics values: train-split means
        with np.errstate(all="ignore"):
            means = np.nan_to_num(np.nanmean(x_train, axis=0), nan=0.0)
        x_train = np.where(np.isnan(x_train), means, x_train).astype(np.float32, copy=False)
        x_test = np.where(np.isnan(x_test), means, x_test).astype(np.float32, copy=False)
    scaler = Standardizer.fit(x_train) if spec.normalize == "site" else pooled if spec.normalize == "federated" else None
    if not scale:
        scaler = None
    if scaler is not None:
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    if joined is not None:
        warnings[:0] = joined.messages
    for message in warnings:
        log.warning("site '%s': %s", site.name, message)
    return SiteData(
        site=site.name,
        feature_names=tuple(names),
        x_train=x_train,
        y_train=_targets(train, "survival" if survival else task, spec.label, spec.time),
        x_test=x_test,
        y_test=_targets(test, "survival" if survival else task, spec.label, spec.time),
        rows_dropped=dropped,
        warnings=tuple(warnings),
        omics_features=tuple(n for n in names if n in omics),
        missing_rate=missing_rate,
        join_dropped=joined.dropped if joined is not None else 0,
    )


def _encode(part: pd.DataFrame, features, categorical, categories, err) -> tuple[pd.DataFrame, list[str]]:
    """Numeric columns as floats, categorical ones one-hot, in the feature order.

    Runs of numeric columns are converted as one block, so a wide expression
    matrix (thousands of columns) costs no per-column Python work.
    """
    blocks: list[pd.DataFrame] = []
    run: list[str] = []
    for column in [*features, None]:
        if column is not None and column not in categorical:
            run.append(column)
            continue
        if run:
            blocks.append(part[run].astype(np.float32))  # float32 like the model; half the memory of a wide matrix
            run = []
        if column is not None:
            levels = list(categories[column])
            values = _codes(part[column])
            unknown = sorted(set(values.dropna()) - set(levels))
            if unknown:
                raise err(column, f"value(s) {unknown[:3]} not among the study's levels {levels}", "recode them or ask the admin to add the level")
            blocks.append(one_hot(values, column, levels))
    encoded = pd.concat(blocks, axis=1)
    return encoded, [str(c) for c in encoded.columns]


def _codes(values: pd.Series) -> pd.Series:
    """A categorical column as strings ("2", not "2.0", for integer codes read as floats because of a NaN)."""
    if pd.api.types.is_float_dtype(values) and bool((values.dropna() % 1 == 0).all()):
        values = values.astype("Int64")
    return values.astype("string")


def _targets(part: pd.DataFrame, task: str | None, label: str, time: str | None) -> np.ndarray:
    if task == "survival":
        return part[[time, label]].to_numpy(dtype=np.float32)
    return part[label].to_numpy(dtype=np.float32)
