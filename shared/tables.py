"""Several tables per patient (clinical, expression, mutation, ...), joined at the site on the patient id.

A site file's ``[[tables]]`` each name a file, an id column and a role. Each
table is read (CSV/TSV/Parquet in either orientation, or AnnData ``.h5ad``),
its omics transforms applied, and the tables are joined on the id before the
data contract sees one flat frame. Duplicate ids, ids that match nothing and
column names two tables share are errors; patients the join drops are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import SiteConfig, TableSpec
from shared.errors import site_error
from shared.omics import TransformError, apply_transforms

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet", ".pq": "parquet", ".h5ad": "h5ad"}


@dataclass(frozen=True)
class JoinedTables:
    """One row per patient (index: the patient id as text), every table's columns side by side."""

    frame: pd.DataFrame
    omics_columns: tuple[str, ...]  # columns from omics tables: the candidates of feature selection
    dropped: int  # patients present in some table but not in the joined frame
    messages: tuple[str, ...]  # what the join dropped, per table, for the site's warnings


def site_tables(site: SiteConfig) -> tuple[TableSpec, ...]:
    """The site's tables; a single ``[data] path`` with an ``id`` is one clinical table."""
    if site.data.tables:
        return site.data.tables
    return (TableSpec(path=site.data.path, id=site.data.id),)


def _shown(values, n: int = 3) -> str:
    return ", ".join(repr(str(v)) for v in list(values)[:n])


def read_frame(site: SiteConfig, path: Path, kind: str) -> pd.DataFrame:
    """One CSV/TSV/Parquet file into a frame, or one clear line naming the site and file."""
    err = lambda problem, fix: site_error(site.name, str(path), None, problem, fix)  # noqa: E731
    try:
        if kind == "parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, sep="," if kind == "csv" else "\t")
    except pd.errors.EmptyDataError:
        raise err("the file is empty", "export the table again with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise err(f"cannot be parsed ({first})", "export it again as a well-formed table with one header row") from None
    if frame.columns.duplicated().any():
        raise err(f"duplicate column name '{frame.columns[frame.columns.duplicated()][0]}'", "give every column a unique name")
    return frame


def _read_h5ad(site: SiteConfig, table: TableSpec) -> tuple[pd.DataFrame, list[str]]:
    """AnnData: ``X`` as omics columns (var names), ``obs`` columns as clinical variables; index = obs names."""
    import anndata  # only sites with .h5ad files pay for the import

    err = lambda column, problem, fix: site_error(site.name, str(table.path), column, problem, fix)  # noqa: E731
    try:
        adata = anndata.read_h5ad(table.path)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for a bad file
        raise err(None, f"cannot be read as AnnData ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", "write it again with anndata's write_h5ad") from None
    x = adata.X
    if x is None:
        raise err(None, "the AnnData object has no X matrix", "store the expression matrix in X")
    if hasattr(x, "toarray"):  # sparse counts
        x = x.toarray()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise err(None, f"X holds {x.dtype} values, not numbers", "store numeric expression values in X")
    omics = pd.DataFrame(x, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    obs = adata.obs
    wanted = list(obs.columns) if table.obs is None else list(table.obs)
    for column in wanted:
        if column not in obs.columns:
            raise err(column, f"obs column not found (obs columns: {_shown(obs.columns, 8)})", "fix obs in the table's entry")
    clinical = obs[wanted].copy()
    for column in clinical.columns[[isinstance(d, pd.CategoricalDtype) for d in clinical.dtypes]]:  # obs is narrow
        clinical[column] = clinical[column].astype(clinical[column].cat.categories.dtype)
    clinical.index = omics.index
    return clinical, omics


def read_one(site: SiteConfig, table: TableSpec, single: bool) -> tuple[pd.DataFrame, list[str]]:
    """One table, indexed by patient id (text), with its drop/prefix/transforms applied; returns its omics columns."""
    path = table.path
    kind = SUFFIXES.get(path.suffix.lower())

    def err(column: str | None, problem: str, fix: str):
        return site_error(site.name, str(path), column, problem, fix)

    if kind is None:
        raise err(None, f"unsupported file type '{path.suffix}'", "use .csv, .tsv, .parquet or .h5ad")
    if not path.is_file():
        raise err(None, "file not found", "check the table's path in the site file (relative paths start at the site file)")
    id_column = table.id or site.data.id
    if kind == "h5ad":
        clinical, omics = _read_h5ad(site, table)
    else:
        frame = read_frame(site, table.path, kind)
        if table.orientation == "genes_by_samples":
            # First column: feature names; every other column: one patient.
            features = frame.iloc[:, 0].astype(str)
            if features.duplicated().any():
                raise err(str(frame.columns[0]), f"feature '{features[features.duplicated()].iloc[0]}' appears twice", "keep one row per feature")
            frame = frame.iloc[:, 1:]
            frame.index = pd.Index(features, name=None)
            frame = frame.T
            frame.index = frame.index.astype(str).str.strip()
        elif id_column is not None:
            if id_column not in frame.columns:
                raise err(id_column, f"id column not found (columns: {_shown(frame.columns, 8)})", "set the table's id (or [data] id) to the patient-id column")
            ids = frame[id_column]
            if ids.isna().any():
                raise err(id_column, f"{int(ids.isna().sum())} row(s) without a patient id", "fill in or remove those rows")
            frame = frame.drop(columns=[id_column])
            frame.index = pd.Index(ids.astype(str).str.strip(), name=None)
        elif not single:
            raise err(None, "no id column to join on", "set [data] id or the table's id")
        if frame.empty or len(frame.columns) == 0:
            raise err(None, "the table has no rows" if frame.empty else "the table has no columns besides the id", "point the site file at the table holding the patients")
        if table.is_omics:
            clinical, omics = frame.iloc[:, :0], frame
        else:
            clinical, omics = frame, frame.iloc[:, :0]
    index = clinical.index if len(clinical.columns) else omics.index
    if index.duplicated().any():
        dup = index[index.duplicated()].unique()
        raise err(id_column, f"{len(dup)} duplicate patient id(s), e.g. {_shown(dup)}", "keep one row per patient (aggregate or remove repeats)")
    for column in table.drop:
        if column not in clinical.columns and column not in omics.columns:
            raise err(column, "drop column not found", "fix the table's drop list")
    if table.drop:
        clinical = clinical.drop(columns=[c for c in table.drop if c in clinical.columns])
        omics = omics.drop(columns=[c for c in table.drop if c in omics.columns])
    if len(omics.columns):
        nonnumeric = omics.select_dtypes(exclude=["number", "bool"]).columns
        if len(nonnumeric):
            example = omics[nonnumeric[0]].dropna().astype(str).head(1).tolist()
            raise err(str(nonnumeric[0]), f"omics column is not numeric (e.g. {example[0]!r})" if example else "omics column is not numeric", "export numbers only, or set role = \"clinical\"")
        if table.transforms:
            values = omics.to_numpy(dtype=np.float32 if all(d == np.float32 for d in set(omics.dtypes)) else np.float64)
            try:
                values = apply_transforms(values, table.transforms)
            except TransformError as exc:
                column = str(omics.columns[exc.column]) if exc.column is not None else None
                row = f"patient '{omics.index[exc.row]}': " if exc.row is not None else ""
                raise err(column, row + exc.problem, exc.fix) from None
            omics = pd.DataFrame(values, index=omics.index, columns=omics.columns)
    if table.prefix:
        clinical, omics = clinical.add_prefix(table.prefix), omics.add_prefix(table.prefix)
    frame = pd.concat([clinical, omics], axis=1) if len(clinical.columns) and len(omics.columns) else (omics if len(omics.columns) else clinical)
    return frame, [str(c) for c in omics.columns]


def read_tables(site: SiteConfig) -> JoinedTables:
    """Read and join the site's tables on the patient id (inner by default; ``left`` keeps the first table's patients)."""
    tables = site_tables(site)
    single = len(tables) == 1
    frames, omics = [], []
    for table in tables:
        frame, omics_columns = read_one(site, table, single)
        frames.append(frame)
        omics.extend(omics_columns)
    joined, messages = frames[0], []
    all_ids = frames[0].index
    first = tables[0]
    for i, (table, frame) in enumerate(zip(tables[1:], frames[1:]), start=1):
        for earlier, other in zip(tables[:i], frames[:i]):
            clash = other.columns.intersection(frame.columns)
            if len(clash):
                raise site_error(
                    site.name, str(table.path), str(clash[0]),
                    f"{len(clash)} column name(s) also in {earlier.path.name}",
                    "drop the column from one table (drop = [...]) or give one table a prefix",
                )  # fmt: skip
        common = joined.index.intersection(frame.index)
        if len(common) == 0:
            raise site_error(
                site.name, str(table.path), table.id or site.data.id,
                f"none of its {len(frame)} patient ids match the {len(joined)} ids of {first.path.name} "
                f"(e.g. {_shown(frame.index, 2)} vs {_shown(joined.index, 2)})",
                "check that both tables use the same patient identifiers and the right id column",
            )  # fmt: skip
        only_here = len(frame.index.difference(joined.index))
        only_there = len(joined.index.difference(frame.index))
        if only_here:
            messages.append(f"join dropped {only_here} patient(s) of {table.path.name} with no row in {first.path.name}")
        if only_there and site.data.join == "inner":
            messages.append(f"join dropped {only_there} patient(s) of {first.path.name} with no row in {table.path.name}")
        elif only_there:
            messages.append(f"{only_there} patient(s) of {first.path.name} have no row in {table.path.name} (left join: their values are missing)")
        all_ids = all_ids.union(frame.index)
        joined = joined.join(frame, how=site.data.join)
    if joined.empty:
        raise site_error(site.name, str(tables[0].path), None, "the joined table has no rows", "check the tables' patient ids")
    return JoinedTables(frame=joined, omics_columns=tuple(omics), dropped=int(len(all_ids) - len(joined)), messages=tuple(messages))
