"""Several tables per patient: join semantics, their errors, orientations, Parquet and AnnData (.h5ad)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.config import load_site
from shared.contract import load_site_data
from shared.errors import ConfigError, DataContractError

GENES = [f"g{i}" for i in range(6)]


def clinical(ids: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"pid": ids, "age": rng.normal(60, 8, len(ids)).round(1), "y": np.arange(len(ids)) % 2})


def expression(ids: list[str], seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.poisson(20, (len(ids), len(GENES))).astype(float), columns=GENES)
    frame.insert(0, "pid", ids)
    return frame


def site_file(tmp_path: Path, tables: list[dict], data: str = "", name: str = "s1") -> Path:
    lines = [f'[site]\nname = "{name}"\n', f'[data]\nid = "pid"\nlabel = "y"\nnormalize = "none"\nsplit_seed = 1\n{data}\n']
    for table in tables:
        lines.append("[[tables]]")
        for key, value in table.items():
            lines.append(f"{key} = {value!r}".replace("'", '"') if not isinstance(value, list) else f"{key} = {value!r}".replace("'", '"'))
        lines.append("")
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def load(path: Path, **kw):
    return load_site_data(load_site(path), "binary", **kw)


def ids(n: int, start: int = 0) -> list[str]:
    return [f"P{i:03d}" for i in range(start, start + n)]


def test_inner_join_aligns_rows_by_id_and_reports_the_dropped_patients(tmp_path):
    # clinical has P000..P039, expression P005..P044 in reverse order: 35 shared patients.
    clinical(ids(40)).to_csv(tmp_path / "clin.csv", index=False)
    expr = expression(ids(40, start=5)).iloc[::-1]
    expr.to_csv(tmp_path / "expr.csv", index=False)
    site = site_file(tmp_path, [{"path": "clin.csv", "role": "clinical"}, {"path": "expr.csv", "role": "expression"}])
    data = load(site)
    assert data.n_train + data.n_test == 35
    assert data.join_dropped == 10
    assert any("join dropped 5 patient(s) of expr.csv" in w for w in data.warnings)
    assert any("join dropped 5 patient(s) of clin.csv" in w for w in data.warnings)
    assert data.feature_names == ("age", *GENES)
    assert data.omics_features == tuple(GENES)
    # Every joined row carries the expression of the same patient: match rows on (age, genes).
    clin = clinical(ids(40)).set_index("pid")
    ref = expr.set_index("pid").join(clin, how="inner")[["age", *GENES]].to_numpy(np.float32)
    rows = {tuple(r) for r in ref}
    assert all(tuple(r) in rows for r in np.concatenate([data.x_train, data.x_test]))


def test_left_join_keeps_the_first_tables_patients_and_imputes_their_omics(tmp_path):
    clinical(ids(30)).to_csv(tmp_path / "clin.csv", index=False)
    expression(ids(25)).to_csv(tmp_path / "expr.csv", index=False)
    site = site_file(tmp_path, [{"path": "clin.csv"}, {"path": "expr.csv", "role": "expression"}], data='join = "left"')
    data = load(site)
    assert data.n_train + data.n_test == 30
    assert not np.isnan(data.x_train).any() and not np.isnan(data.x_test).any()
    assert any("5 patient(s) of clin.csv have no row in expr.csv" in w for w in data.warnings)


def test_duplicate_ids_are_an_error_naming_the_table_and_column(tmp_path):
    frame = expression(ids(20))
    frame.loc[3, "pid"] = "P001"
    clinical(ids(20)).to_csv(tmp_path / "clin.csv", index=False)
    frame.to_csv(tmp_path / "expr.csv", index=False)
    site = site_file(tmp_path, [{"path": "clin.csv"}, {"path": "expr.csv", "role": "expression"}])
    with pytest.raises(DataContractError, match=r"expr\.csv, column 'pid': 1 duplicate patient id\(s\), e\.g\. 'P001'"):
        load(site)


def test_ids_that_match_nothing_are_an_error(tmp_path):
    clinical(ids(20)).to_csv(tmp_path / "clin.csv", index=False)
    expr = expression(ids(20))
    expr["pid"] = expr["pid"].str.lower()  # p000 vs P000: a different id scheme
    expr.to_csv(tmp_path / "expr.csv", index=False)
    site = site_file(tmp_path, [{"path": "clin.csv"}, {"path": "expr.csv", "role": "expression"}])
    with pytest.raises(DataContractError, match=r"none of its 20 patient ids match the 20 ids of clin\.csv \(e\.g\. 'p000'"):
        load(site)


def test_conflicting_column_names_are_an_error_and_a_prefix_resolves_them(tmp_path):
    clinical(ids(20)).to_csv(tmp_path / "clin.csv", index=False)
    expr = expression(ids(20)).rename(columns={"g0": "age"})
    expr.to_csv(tmp_path / "expr.csv", index=False)
    tables = [{"path": "clin.csv"}, {"path": "expr.csv", "role": "expression"}]
    with pytest.raises(DataContractError, match=r"column 'age': 1 column name\(s\) also in clin\.csv"):
        load(site_file(tmp_path, tables))
    tables[1]["prefix"] = "rna:"
    data = load(site_file(tmp_path, tables))
    assert "age" in data.feature_names and "rna:age" in data.feature_names and "rna:g1" in data.omics_features


def test_missing_id_column_and_rows_without_id(tmp_path):
    clinical(ids(20)).to_csv(tmp_path / "clin.csv", index=False)
    expression(ids(20)).rename(columns={"pid": "sample"}).to_csv(tmp_path / "expr.csv", index=False)
    tables = [{"path": "clin.csv"}, {"path": "expr.csv", "role": "expression"}]
    with pytest.raises(DataContractError, match=r"expr\.csv, column 'pid': id column not found"):
        load(site_file(tmp_path, tables))
    tables[1]["id"] = "sample"  # a table may name its own id column
    assert load(site_file(tmp_path, tables)).n_train > 0
    frame = clinical(ids(20))
    frame.loc[2, "pid"] = np.nan
    frame.to_csv(tmp_path / "clin.csv", index=False)
    with pytest.raises(DataContractError, match=r"clin\.csv, column 'pid': 1 row\(s\) without a patient id"):
        load(site_file(tmp_path, tables))


def test_genes_by_samples_and_parquet_load_like_samples_by_genes_csv(tmp_path):
    clinical(ids(24)).to_csv(tmp_path / "clin.csv", index=False)
    expr = expression(ids(24))
    expr.to_csv(tmp_path / "expr.csv", index=False)
    expr.set_index("pid").T.rename_axis("gene").reset_index().to_csv(tmp_path / "expr_t.tsv", sep="\t", index=False)
    expr.astype({g: np.float32 for g in GENES}).to_parquet(tmp_path / "expr.parquet", index=False)
    base = load(site_file(tmp_path, [{"path": "clin.csv"}, {"path": "expr.csv", "role": "expression"}], name="a"))
    wide = load(site_file(tmp_path, [{"path": "clin.csv"}, {"path": "expr_t.tsv", "role": "expression", "orientation": "genes_by_samples"}], name="b"))
    pq = load(site_file(tmp_path, [{"path": "clin.csv"}, {"path": "expr.parquet", "role": "expression"}], name="c"))
    for other in (wide, pq):
        assert other.feature_names == base.feature_names
        np.testing.assert_allclose(other.x_train, base.x_train)
        np.testing.assert_allclose(other.x_test, base.x_test)


def test_h5ad_round_trip_x_as_omics_and_obs_as_clinical(tmp_path):
    anndata = pytest.importorskip("anndata")
    rng = np.random.default_rng(3)
    n = 30
    obs = pd.DataFrame(
        {"age": rng.normal(60, 5, n), "y": np.arange(n) % 2, "batch": pd.Categorical(["b1", "b2"] * (n // 2))},
        index=pd.Index(ids(n)),
    )
    x = rng.poisson(10, (n, len(GENES))).astype(np.float32)
    adata = anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=GENES))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    site = site_file(tmp_path, [{"path": "cells.h5ad", "role": "expression", "obs": ["age", "y"], "transforms": ["log1p"]}])
    data = load(site)
    assert data.feature_names == ("age", *GENES)
    assert data.omics_features == tuple(GENES)
    loaded = np.concatenate([data.x_train, data.x_test])
    expected = np.column_stack([obs["age"].to_numpy(np.float32), np.log1p(x)])
    # Same patients, same values (rows compared as a set: the split shuffles them).
    assert sorted(map(tuple, np.round(loaded, 4))) == sorted(map(tuple, np.round(expected, 4)))
    # A categorical obs column comes back as its values (declared categorical with study levels).
    site = site_file(tmp_path, [{"path": "cells.h5ad", "role": "expression", "obs": ["y", "batch"]}], data='categorical = ["batch"]', name="s2")
    data = load_site_data(load_site(site), "binary", categories={"batch": ["b1", "b2"]})
    assert data.feature_names[:2] == ("batch=b1", "batch=b2")


@pytest.mark.parametrize(
    ("tables", "data", "message"),
    [
        ([{"path": "a.csv"}, {"path": "b.csv", "transforms": ["log1p"]}], "", "transforms apply to omics tables only"),
        ([{"path": "a.csv"}, {"path": "b.csv", "role": "expression", "transforms": ["vst"]}], "", "unknown 'vst'"),
        ([{"path": "a.csv"}, {"path": "b.csv", "role": "expression", "orientation": "rows"}], "", "orientation: must be one of"),
        ([{"path": "a.csv"}, {"path": "a.csv", "role": "expression"}], "", "the same file twice"),
        ([{"path": "a.csv"}], 'path = "x.csv"', "either \\[data\\] path"),
    ],
)
def test_table_config_errors(tmp_path, tables, data, message):
    with pytest.raises(ConfigError, match=message):
        load_site(site_file(tmp_path, tables, data=data))


def test_several_tables_need_an_id(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[site]\nname = "s"\n[data]\nlabel = "y"\n[[tables]]\npath = "a.csv"\n[[tables]]\npath = "b.csv"\nrole = "expression"\n')
    with pytest.raises(ConfigError, match=r"\[tables #1\] has no id column"):
        load_site(path)


def test_a_single_table_with_an_id_keeps_the_id_out_of_the_features_and_checks_duplicates(tmp_path):
    frame = clinical(ids(20))
    frame.to_csv(tmp_path / "one.csv", index=False)
    path = tmp_path / "one.toml"
    path.write_text('[site]\nname = "one"\n[data]\npath = "one.csv"\nid = "pid"\nlabel = "y"\ndrop = ["pid"]\n')
    assert load(path).feature_names == ("age",)
    frame.loc[5, "pid"] = "P000"
    frame.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(DataContractError, match=r"one\.csv, column 'pid': 1 duplicate patient id"):
        load(path)
