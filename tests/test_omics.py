"""Omics transforms against numpy / scikit-learn, and federated feature selection against pooled numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler, normalize

from shared.config import OmicsSelection, load_site
from shared.contract import load_site_data
from shared.errors import DataContractError
from shared.omics import PooledFeatureStats, apply_transforms, candidate_order, select_features, selection_moments


def write_site(tmp_path: Path, name: str, expr: pd.DataFrame, clin: pd.DataFrame, table: str = "", data: str = "") -> Path:
    expr.to_csv(tmp_path / f"{name}_expr.csv", index=False)
    clin.to_csv(tmp_path / f"{name}_clin.csv", index=False)
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[site]\nname = "{name}"\n[data]\nid = "pid"\nlabel = "y"\nsplit_seed = 3\n{data}\n'
        f'[[tables]]\npath = "{name}_clin.csv"\n[[tables]]\npath = "{name}_expr.csv"\nrole = "expression"\n{table}\n'
    )
    return path


def counts(n: int, genes: list[str], seed: int) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 3.0, (n, 1))  # library sizes differ by patient
    x = rng.poisson(depth * rng.uniform(1, 200, len(genes))).astype(float)
    pid = [f"P{seed}_{i}" for i in range(n)]
    expr = pd.DataFrame(x, columns=genes)
    expr.insert(0, "pid", pid)
    clin = pd.DataFrame({"pid": pid, "age": rng.normal(60, 9, n), "y": np.arange(n) % 2})
    return expr, clin, x


def rows(data) -> np.ndarray:
    return np.concatenate([data.x_train, data.x_test])


def assert_same_rows(got: np.ndarray, want: np.ndarray, **tol) -> None:
    """Equal as sets of rows (the split shuffles patients): sort both rows lexicographically first."""
    order = lambda a: np.lexsort(np.round(a, 3).T[::-1])  # noqa: E731
    np.testing.assert_allclose(got[order(got)], want[order(want)], **tol)


def test_cpm_then_log1p_matches_scikit_learn_and_numpy(tmp_path):
    genes = [f"g{i}" for i in range(40)]
    expr, clin, x = counts(50, genes, seed=0)
    site = write_site(tmp_path, "s", expr, clin, table='transforms = ["cpm", "log1p"]', data='normalize = "none"')
    data = load_site_data(load_site(site), "binary")
    reference = np.log1p(normalize(x, norm="l1") * 1e6)  # scikit-learn's row-wise L1 scaling = library size
    reference = np.column_stack([clin["age"], reference]).astype(np.float32)
    assert_same_rows(rows(data), reference, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(apply_transforms(x, ["cpm"]).sum(axis=1), 1e6)


def test_site_standardisation_matches_standard_scaler_on_the_train_split(tmp_path):
    genes = [f"g{i}" for i in range(30)]
    expr, clin, _ = counts(60, genes, seed=1)
    raw = load_site_data(load_site(write_site(tmp_path, "r", expr, clin, table='transforms = ["log1p"]', data='normalize = "none"')), "binary")
    scaled = load_site_data(load_site(write_site(tmp_path, "z", expr, clin, table='transforms = ["log1p"]', data='normalize = "site"')), "binary")
    scaler = StandardScaler().fit(raw.x_train)
    np.testing.assert_allclose(scaled.x_train, scaler.transform(raw.x_train), atol=1e-4)
    np.testing.assert_allclose(scaled.x_test, scaler.transform(raw.x_test), atol=1e-4)


def test_transform_errors_name_the_patient_and_column(tmp_path):
    genes = ["a", "b", "c"]
    expr, clin, _ = counts(20, genes, seed=2)
    expr.loc[4, genes] = 0.0
    with pytest.raises(DataContractError, match=r"patient 'P2_4': library size is 0"):
        load_site_data(load_site(write_site(tmp_path, "s", expr, clin, table='transforms = ["cpm"]')), "binary")
    expr.loc[4, genes] = [1.0, -2.5, 3.0]
    with pytest.raises(DataContractError, match=r"column 'b': patient 'P2_4': negative value -2.5"):
        load_site_data(load_site(write_site(tmp_path, "s", expr, clin, table='transforms = ["log1p"]')), "binary")


def test_selection_moments_pooled_over_sites_equal_nan_aware_numpy():
    rng = np.random.default_rng(4)
    parts = [rng.normal(rng.uniform(0, 5, 12), rng.uniform(0.1, 3, 12), (n, 12)) for n in (40, 25, 70)]
    for part in parts:
        part[rng.random(part.shape) < 0.15] = np.nan
    pooled = np.concatenate(parts)
    weighted = []
    for part in parts:  # what each site sends: moments of its mean-imputed values, weighted by its n
        missing = np.isnan(part).mean(axis=0)
        imputed = np.where(np.isnan(part), np.nanmean(part, axis=0), part)
        weighted.append(selection_moments(imputed, missing) * len(part))
    stats = PooledFeatureStats.from_moments(np.sum(weighted, axis=0) / len(pooled))  # the secure weighted mean
    np.testing.assert_allclose(stats.missing_rate, np.isnan(pooled).mean(axis=0))
    np.testing.assert_allclose(stats.variance, np.nanvar(pooled, axis=0), rtol=1e-9)


def test_select_features_applies_missing_variance_and_top_k_rules():
    names = [f"g{i}" for i in range(8)]
    stats = PooledFeatureStats(
        missing_rate=np.array([0.0, 0.5, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0]),
        variance=np.array([1.0, 9.0, 0.0, 4.0, 2.0, 2.0, 8.0, 0.5]),
    )
    assert select_features(names, stats, OmicsSelection()) == ["g0", "g1", "g3", "g4", "g5", "g6", "g7"]  # zero variance out
    assert select_features(names, stats, OmicsSelection(max_missing_rate=0.2)) == ["g0", "g3", "g4", "g5", "g6", "g7"]
    assert select_features(names, stats, OmicsSelection(max_missing_rate=0.2, min_variance=1.0)) == ["g3", "g4", "g5", "g6"]
    # top 3 by variance among those passing: g6 (8), g3 (4), then g4 before g5 (tie: the study's order), kept in study order
    assert select_features(names, stats, OmicsSelection(max_missing_rate=0.2, top_k=3)) == ["g3", "g4", "g6"]
    top = np.argsort(-stats.variance, kind="stable")[:2]
    assert select_features(names, stats, OmicsSelection(top_k=2)) == [names[i] for i in sorted(top)]


def test_candidates_are_the_features_every_site_has_in_the_studys_order():
    sites = [["b", "a", "x", "c"], ["c", "a", "b"], ["a", "c", "b", "y"]]
    assert candidate_order(sites, OmicsSelection()) == ["a", "b", "c"]
    assert candidate_order(sites, OmicsSelection(features=("c", "x", "a"))) == ["c", "a"]


def test_sites_with_different_column_orders_and_extra_columns_agree_on_the_selected_features(tmp_path):
    genes = [f"g{i:02d}" for i in range(20)]
    rng = np.random.default_rng(5)
    loaded = []
    for k, extra in enumerate(([], ["extra_1"], ["extra_2", "extra_3"])):
        expr, clin, _ = counts(30, genes + extra, seed=10 + k)
        shuffled = ["pid", *rng.permutation(genes + extra)]
        clin = clin[["y", "pid", "age"]] if k == 1 else clin  # clinical columns in another order too
        site = write_site(tmp_path, f"s{k}", expr[shuffled], clin, table='transforms = ["log1p"]')
        loaded.append((load_site(site), expr.set_index("pid")))
    agreed = ["age", "g17", "g03", "g09"]  # the study's order, not any file's
    views = [load_site_data(site, "binary", feature_order=agreed, select=True, scale=False) for site, _ in loaded]
    for data, (site, expr) in zip(views, loaded):
        assert data.feature_names == tuple(agreed)
        # column j really is gene agreed[j] of this site (values match the site's raw file after log1p)
        values = np.log1p(expr[agreed[1:]].to_numpy())
        assert_same_rows(rows(data)[:, 1:], values, rtol=1e-6)
    # A clinical column the study does not know is still an error (only omics extras are dropped).
    with pytest.raises(DataContractError, match="features differ from the study's agreed list"):
        load_site_data(loaded[0][0], "binary", feature_order=["g17", "g03"], select=True)


def test_study_omics_section_is_parsed_strictly_and_travels_in_the_plan(tmp_path):
    from shared.config import load_study
    from shared.errors import ConfigError
    from shared.plan import TrainingPlan

    def study(omics: str) -> Path:
        path = tmp_path / "study.toml"
        path.write_text(f'[study]\nname = "s"\ntask = "binary"\nmodel = "logistic"\n\n[omics]\n{omics}\n\n[[sites]]\nname = "a"\nconfig = "a.toml"\n')
        return path

    parsed = load_study(study('top_k = 5\nmax_missing_rate = 0.2\nfeatures = ["b", "a"]'))
    assert parsed.omics == OmicsSelection(max_missing_rate=0.2, top_k=5, features=("b", "a"))
    plan = TrainingPlan.from_json(TrainingPlan.from_study(parsed).to_json())
    assert plan.selection == {"max_missing_rate": 0.2, "min_variance": 0.0, "top_k": 5, "features": ["b", "a"]}
    path = study("top_k = 5")
    path.write_text(path.read_text().replace('model = "logistic"', 'model = "logistic"\nsecure_aggregation = false'))
    with pytest.raises(ConfigError, match=r"\[omics\] feature selection needs secure_aggregation = true"):
        load_study(path)
    for bad, message in (("top_k = -1", "must be >= 0"), ("max_missing_rate = 1.5", "between 0 and 1"), ("topk = 3", "unknown key"), ('features = ["a", "a"]', "twice")):
        with pytest.raises(ConfigError, match=message):
            load_study(study(bad))
