"""The site data contract: every bad input ends in one line naming site, file, column and fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.config import load_site, load_study, parse_site
from shared.contract import SiteData, load_site_data
from shared.errors import DataContractError, FedhelixError

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "tcga-brca" / "study.toml"
SITE = "st-mary"

# ----------------------------------------------------------------------------- helpers


def make_site(path: Path, name: str = SITE, **data) -> object:
    """A SiteConfig for ``path`` built through the real parser (so defaults are the real ones)."""
    data.setdefault("label", "y")
    return parse_site({"site": {"name": name}, "data": {"path": str(path), **data}}, source="site.toml")


def write_csv(tmp_path: Path, frame: pd.DataFrame, name: str = "data.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def binary_frame(n: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(60, 10, n).round(1),
            "bmi": rng.normal(25, 4, n).round(1),
            "smoker": np.arange(n) % 2,  # 0/1 indicator
            "y": (np.arange(n) // 2) % 2,  # both classes, balanced
        }
    )


def survival_frame(n: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(60, 10, n).round(1),
            "grade": rng.integers(1, 4, n),
            "T": rng.uniform(10, 2000, n).round(0),
            "E": np.arange(n) % 2,
        }
    )


def contract_error(site, task: str = "binary", categories=None, feature_order=None) -> str:
    """Run the contract expecting a DataContractError; return its one-line message."""
    with pytest.raises(DataContractError) as info:
        load_site_data(site, task, categories, feature_order)
    message = str(info.value)
    assert isinstance(info.value, FedhelixError)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith("fedhelix:"), message
    assert "Fix:" in message, message
    return message


def assert_names(message: str, path: Path, column: str | None = None, site: str = SITE) -> str:
    """Check site, file and column are named; return the message without the file path.

    Keyword checks run on what is returned, since tmp_path holds the test's own name.
    """
    assert f"site '{site}'" in message, message
    assert str(path) in message, message
    if column is not None:
        assert f"column '{column}'" in message, message
    return message.replace(str(path), "<file>")


# ----------------------------------------------------------------------------- reading the file


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.csv"
    message = contract_error(make_site(path))
    rest = assert_names(message, path)
    assert "not found" in rest


@pytest.mark.parametrize(
    "content",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd" * 20,  # binary garbage
        b"age,y\n61,0\n55,1,3,4\n70,0\n",  # ragged rows
    ],
    ids=["binary-garbage", "ragged-rows"],
)
def test_malformed_csv(tmp_path, content):
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    message = contract_error(make_site(path))
    rest = assert_names(message, path)
    assert "cannot be parsed" in rest


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    message = contract_error(make_site(path))
    rest = assert_names(message, path)
    assert "empty" in rest


def test_header_only_file_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("age,y\n")
    message = contract_error(make_site(path))
    rest = assert_names(message, path)
    assert "no rows" in rest


# ----------------------------------------------------------------------------- columns and types


def test_label_column_missing(tmp_path):
    path = write_csv(tmp_path, binary_frame().drop(columns="y"))
    message = contract_error(make_site(path))
    rest = assert_names(message, path, "y")
    assert "label column not found" in rest


def test_time_column_missing_for_survival(tmp_path):
    path = write_csv(tmp_path, survival_frame().drop(columns="T"))
    message = contract_error(make_site(path, label="E", time="T"), task="survival")
    rest = assert_names(message, path, "T")
    assert "time column not found" in rest


def test_time_column_not_configured_for_survival(tmp_path):
    path = write_csv(tmp_path, survival_frame())
    message = contract_error(make_site(path, label="E"), task="survival")
    rest = assert_names(message, path)
    assert "time" in rest


def test_non_numeric_feature_not_declared_categorical(tmp_path):
    frame = binary_frame()
    frame["stage"] = np.where(frame.index % 3 == 0, "II", "I")
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path))
    rest = assert_names(message, path, "stage")
    assert "not numeric" in rest
    assert "categorical" in rest  # the fix says how to declare it


def test_nan_with_missing_none(tmp_path):
    frame = binary_frame().astype({"bmi": float})
    frame.loc[3, "bmi"] = np.nan
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, missing="none"))
    rest = assert_names(message, path, "bmi")
    assert "missing" in rest


def test_empty_train_split(tmp_path):
    frame = binary_frame()
    frame["fold"] = "test"
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, split_column="fold"))
    rest = assert_names(message, path, "fold")
    assert "train split is empty" in rest


def test_empty_test_split(tmp_path):
    frame = binary_frame()
    frame["fold"] = "train"
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, split_column="fold"))
    rest = assert_names(message, path, "fold")
    assert "test split is empty" in rest


def test_bad_split_values(tmp_path):
    frame = binary_frame()
    frame["fold"] = np.where(frame.index % 2 == 0, "train", "validation")
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, split_column="fold"))
    rest = assert_names(message, path, "fold")
    assert "validation" in rest


def test_single_class_label_warns_but_loads(tmp_path):
    frame = binary_frame()
    frame["y"] = 1
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path), "binary")
    assert isinstance(data, SiteData)
    assert data.n_train + data.n_test == len(frame)
    assert data.n_train > 0 and data.n_test > 0
    assert any("only one class" in w for w in data.warnings), data.warnings
    assert set(np.unique(data.y_train)) == {1.0}


def test_survival_without_events_warns_but_loads(tmp_path):
    frame = survival_frame()
    frame["E"] = 0
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, label="E", time="T"), "survival")
    assert any("only one class" in w for w in data.warnings), data.warnings
    assert data.y_train.shape == (data.n_train, 2)


def test_negative_survival_times(tmp_path):
    frame = survival_frame().astype({"T": float})
    frame.loc[[2, 5], "T"] = -3.0
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, label="E", time="T"), task="survival")
    rest = assert_names(message, path, "T")
    assert "2 negative" in rest


def test_event_column_not_zero_one(tmp_path):
    frame = survival_frame()
    frame.loc[4, "E"] = 2
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, label="E", time="T"), task="survival")
    rest = assert_names(message, path, "E")
    assert "0/1" in rest


def test_event_column_text(tmp_path):
    frame = survival_frame()
    frame["E"] = np.where(frame["E"] == 1, "dead", "alive")
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, label="E", time="T"), task="survival")
    assert_names(message, path, "E")


def test_binary_label_not_zero_one(tmp_path):
    frame = binary_frame()
    frame["y"] = frame["y"] + 1  # coded 1/2
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path))
    rest = assert_names(message, path, "y")
    assert "0/1" in rest


def test_infinite_values(tmp_path):
    path = tmp_path / "inf.csv"
    frame = binary_frame()
    frame.to_csv(path, index=False)
    text = path.read_text().splitlines()
    cells = text[3].split(",")
    cells[1] = "inf"  # bmi
    text[3] = ",".join(cells)
    path.write_text("\n".join(text) + "\n")
    message = contract_error(make_site(path))
    rest = assert_names(message, path, "bmi")
    assert "infinite" in rest


def test_categorical_column_without_study_levels(tmp_path):
    frame = binary_frame()
    frame["stage"] = np.where(frame.index % 3 == 0, "II", "I")
    path = write_csv(tmp_path, frame)
    message = contract_error(make_site(path, categorical=["stage"]), categories={"other": ["a"]})
    rest = assert_names(message, path, "stage")
    assert "levels" in rest


def test_categorical_value_outside_study_levels(tmp_path):
    frame = binary_frame()
    frame["stage"] = np.where(frame.index % 3 == 0, "II", "I")
    frame.loc[7, "stage"] = "IV"
    path = write_csv(tmp_path, frame)
    # Both splits go through the encoder, so the bad row is caught whichever part it lands in.
    message = contract_error(make_site(path, categorical=["stage"]), categories={"stage": ["I", "II", "III"]})
    rest = assert_names(message, path, "stage")
    assert "IV" in rest


def test_categorical_declared_but_not_a_feature(tmp_path):
    path = write_csv(tmp_path, binary_frame())
    message = contract_error(make_site(path, features=["age"], categorical=["bmi"]), categories={"bmi": ["x"]})
    assert_names(message, path, "bmi")


def test_feature_order_mismatch(tmp_path):
    path = write_csv(tmp_path, binary_frame())
    message = contract_error(make_site(path), feature_order=["age", "bmi", "smoker", "weight"])
    rest = assert_names(message, path)
    assert "weight" in rest


def test_feature_order_mismatch_extra_column(tmp_path):
    path = write_csv(tmp_path, binary_frame())
    message = contract_error(make_site(path), feature_order=["age", "bmi"])
    rest = assert_names(message, path)
    assert "smoker" in rest


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    message = contract_error(make_site(path))
    rest = assert_names(message, path)
    assert ".xlsx" in rest


# ----------------------------------------------------------------------------- what the contract does


def test_missing_drop_drops_rows_and_reports(tmp_path):
    frame = binary_frame().astype({"age": float, "bmi": float})
    frame.loc[[1, 6], "age"] = np.nan
    frame.loc[9, "bmi"] = np.nan
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, missing="drop"), "binary")
    assert data.rows_dropped == 3
    assert data.n_train + data.n_test == len(frame) - 3
    assert any("dropped 3" in w for w in data.warnings)
    assert not np.isnan(data.x_train).any() and not np.isnan(data.x_test).any()


def test_missing_mean_imputes_train_mean(tmp_path):
    frame = pd.DataFrame(
        {
            "a": [1.0, 2.0, np.nan, 4.0, 100.0, 200.0, np.nan],
            "b": [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0],
            "y": [0, 1, 0, 1, 0, 1, 1],
            "fold": ["train", "train", "train", "train", "test", "test", "test"],
        }
    )
    path = write_csv(tmp_path, frame)
    site = make_site(path, missing="mean", normalize="none", split_column="fold")
    data = load_site_data(site, "binary")
    assert data.rows_dropped == 0
    assert data.feature_names == ("a", "b")
    train_mean = (1.0 + 2.0 + 4.0) / 3  # test rows (100, 200) must not leak into the mean
    np.testing.assert_allclose(data.x_train[:, 0], [1.0, 2.0, train_mean, 4.0], rtol=1e-6)
    np.testing.assert_allclose(data.x_test[:, 0], [100.0, 200.0, train_mean], rtol=1e-6)
    np.testing.assert_allclose(data.x_train[:, 1], [5.0, 6.0, 7.0, 8.0])


def test_missing_mean_still_drops_rows_without_target(tmp_path):
    frame = binary_frame().astype({"y": float, "age": float})
    frame.loc[2, "y"] = np.nan
    frame.loc[5, "age"] = np.nan
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, missing="mean"), "binary")
    assert data.rows_dropped == 1
    assert data.n_train + data.n_test == len(frame) - 1
    assert not np.isnan(data.x_train).any()


def test_normalize_site_standardizes_train_and_keeps_indicators(tmp_path):
    frame = binary_frame(n=40)
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, normalize="site"), "binary")
    names = list(data.feature_names)
    assert names == ["age", "bmi", "smoker"]
    for column in ("age", "bmi"):
        values = data.x_train[:, names.index(column)].astype(float)
        assert abs(values.mean()) < 1e-5
        assert abs(values.std() - 1.0) < 1e-4
    smoker = names.index("smoker")
    assert set(np.unique(data.x_train[:, smoker])) == {0.0, 1.0}
    assert set(np.unique(data.x_test[:, smoker])) <= {0.0, 1.0}
    # The test split uses the train statistics, so it is not exactly standardised itself.
    raw = load_site_data(make_site(path, normalize="none"), "binary")
    age = names.index("age")
    mu, sd = raw.x_train[:, age].mean(), raw.x_train[:, age].std()
    np.testing.assert_allclose(data.x_test[:, age], (raw.x_test[:, age] - mu) / sd, rtol=1e-4, atol=1e-5)


def test_normalize_none_keeps_raw_values(tmp_path):
    frame = binary_frame()
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, normalize="none"), "binary")
    all_x = np.vstack([data.x_train, data.x_test])
    expected = frame[["age", "bmi", "smoker"]].to_numpy(dtype=np.float32)
    np.testing.assert_allclose(np.sort(all_x, axis=0), np.sort(expected, axis=0))


def test_split_column_respected(tmp_path):
    frame = binary_frame(n=12)
    frame["id"] = np.arange(100, 112)
    frame["fold"] = ["train"] * 8 + [" Test "] * 4  # case and blanks are forgiven
    path = write_csv(tmp_path, frame)
    site = make_site(path, split_column="fold", normalize="none", features=["id", "age"])
    data = load_site_data(site, "binary")
    assert data.n_train == 8 and data.n_test == 4
    assert data.feature_names == ("id", "age")
    assert data.x_train[:, 0].tolist() == list(range(100, 108))
    assert data.x_test[:, 0].tolist() == list(range(108, 112))
    np.testing.assert_array_equal(data.y_train, frame["y"].to_numpy()[:8])
    np.testing.assert_array_equal(data.y_test, frame["y"].to_numpy()[8:])


def test_split_column_and_drop_are_not_features(tmp_path):
    frame = binary_frame()
    frame["pid"] = [f"P{i}" for i in range(len(frame))]
    frame["fold"] = np.where(frame.index < 15, "train", "test")
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, split_column="fold", drop=["pid"]), "binary")
    assert data.feature_names == ("age", "bmi", "smoker")


def test_random_split_is_reproducible(tmp_path):
    path = write_csv(tmp_path, binary_frame(n=50))
    site = make_site(path, test_fraction=0.3, split_seed=7)
    a, b = load_site_data(site, "binary"), load_site_data(site, "binary")
    assert a.n_test == 15 and a.n_train == 35
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)


def test_survival_targets_are_time_event(tmp_path):
    frame = survival_frame()
    frame["fold"] = np.where(frame.index < 15, "train", "test")
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, label="E", time="T", split_column="fold"), "survival")
    assert data.y_train.shape == (15, 2) and data.y_test.shape == (5, 2)
    np.testing.assert_allclose(data.y_train[:, 0], frame["T"].to_numpy()[:15])
    np.testing.assert_allclose(data.y_train[:, 1], frame["E"].to_numpy()[:15])
    assert data.feature_names == ("age", "grade")
    assert data.x_train.dtype == np.float32


def test_parquet_loads_same_as_csv(tmp_path):
    frame = binary_frame(n=30)
    frame["stage"] = np.where(frame.index % 3 == 0, "II", "I")
    csv = write_csv(tmp_path, frame)
    parquet = tmp_path / "data.parquet"
    frame.to_parquet(parquet, index=False)
    categories = {"stage": ["I", "II"]}
    from_csv = load_site_data(make_site(csv, categorical=["stage"]), "binary", categories)
    from_parquet = load_site_data(make_site(parquet, categorical=["stage"]), "binary", categories)
    assert from_csv.feature_names == from_parquet.feature_names
    for field in ("x_train", "x_test", "y_train", "y_test"):
        np.testing.assert_array_equal(getattr(from_csv, field), getattr(from_parquet, field))


def test_parquet_duplicate_columns_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table([pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array([0, 1])], names=["age", "age", "y"])
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path)
    try:
        load_site_data(make_site(path), "binary")
    except FedhelixError as err:
        assert "\n" not in str(err)
        assert_names(str(err), path)
    else:  # pragma: no cover - reaching here means duplicates were silently accepted
        pytest.fail("a table with duplicate column names was accepted")


def test_one_hot_in_study_order(tmp_path):
    frame = pd.DataFrame(
        {
            "age": [50.0, 60.0, 70.0, 40.0, 55.0, 65.0],
            "stage": ["I", "III", "II", "I", "II", "III"],
            "y": [0, 1, 0, 1, 0, 1],
            "fold": ["train", "train", "train", "train", "test", "test"],
        }
    )
    path = write_csv(tmp_path, frame)
    categories = {"stage": ["III", "I", "II", "IV"]}  # deliberately not alphabetical; IV absent here
    site = make_site(path, categorical=["stage"], split_column="fold", normalize="none")
    data = load_site_data(site, "binary", categories)
    assert data.feature_names == ("age", "stage=III", "stage=I", "stage=II", "stage=IV")
    np.testing.assert_array_equal(
        data.x_train[:, 1:],
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]],
    )
    np.testing.assert_array_equal(data.x_test[:, 1:], [[0, 0, 1, 0], [1, 0, 0, 0]])


def test_one_hot_indicators_survive_site_normalisation(tmp_path):
    frame = binary_frame(n=30)
    frame["stage"] = np.where(frame.index % 3 == 0, "II", "I")
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path, categorical=["stage"]), "binary", {"stage": ["I", "II", "III"]})
    names = list(data.feature_names)
    for column in ("stage=I", "stage=II", "stage=III"):
        assert set(np.unique(data.x_train[:, names.index(column)])) <= {0.0, 1.0}
    assert np.all(data.x_train[:, names.index("stage=III")] == 0.0)


def test_integer_coded_categorical_with_missing_value(tmp_path):
    """Levels 1/2/3 read as floats once a NaN is in the column; they must still match "1", "2", "3"."""
    n = 20
    frame = pd.DataFrame(
        {
            "age": np.arange(n, dtype=float),
            "grade": [1, 2, 3, 1, None, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1],
            "y": np.arange(n) % 2,
        }
    )
    path = write_csv(tmp_path, frame)
    site = make_site(path, categorical=["grade"], missing="drop")
    data = load_site_data(site, "binary", {"grade": ["1", "2", "3"]})
    assert data.rows_dropped == 1
    assert data.feature_names == ("age", "grade=1", "grade=2", "grade=3")


def test_tiny_binary_site_still_splits(tmp_path):
    """Five usable rows with both classes: a stratified split is impossible, a plain one is not."""
    frame = pd.DataFrame({"age": [1.0, 2.0, 3.0, 4.0, 5.0], "y": [0, 1, 0, 1, 1]})
    path = write_csv(tmp_path, frame)
    data = load_site_data(make_site(path), "binary")
    assert data.n_train == 4 and data.n_test == 1


def test_feature_order_reorders_columns(tmp_path):
    frame = binary_frame()
    frame["fold"] = np.where(frame.index < 15, "train", "test")
    path = write_csv(tmp_path, frame)
    site = make_site(path, split_column="fold", normalize="none")
    plain = load_site_data(site, "binary")
    order = ["smoker", "age", "bmi"]
    ordered = load_site_data(site, "binary", feature_order=order)
    assert ordered.feature_names == tuple(order)
    idx = [plain.feature_names.index(c) for c in order]
    np.testing.assert_array_equal(ordered.x_train, plain.x_train[:, idx])
    np.testing.assert_array_equal(ordered.x_test, plain.x_test[:, idx])


def test_warnings_are_logged(tmp_path, caplog):
    frame = binary_frame()
    frame["y"] = 0
    path = write_csv(tmp_path, frame)
    with caplog.at_level("WARNING", logger="fedhelix.data"):
        load_site_data(make_site(path), "binary")
    assert any(SITE in r.getMessage() and "only one class" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- the bundled study

FLAMBY_SIZES = {
    "northeast": (248, 63),
    "south": (156, 40),
    "west": (164, 42),
    "midwest": (129, 33),
    "europe": (129, 33),
    "canada": (40, 11),
}


def test_bundled_tcga_brca_sites_load_with_flamby_sizes():
    study = load_study(STUDY)
    site_files = sorted((REPO / "studies" / "tcga-brca" / "sites").glob("*.toml"))
    assert len(site_files) == 6
    seen = {}
    for site_file in site_files:
        site = load_site(site_file)
        data = load_site_data(site, "survival", study.categories)
        seen[site.name] = (data.n_train, data.n_test)
        assert len(data.feature_names) == 39, site.name
        assert data.x_train.shape == (data.n_train, 39)
        assert data.y_train.shape == (data.n_train, 2)
        assert np.isfinite(data.x_train).all() and np.isfinite(data.x_test).all()
        assert data.rows_dropped == 0
    assert seen == FLAMBY_SIZES
    assert sum(n for n, _ in seen.values()) + sum(m for _, m in seen.values()) == 1088


# ----------------------------------------------------------------------------- task=None: no study to check against yet


def test_without_a_task_no_label_rule_applies_but_every_other_check_does(tmp_path):
    frame = binary_frame()
    frame["y"] = frame["y"] * 2.5 - 1  # a regression target: not 0/1
    frame["ward"] = ["a", "b"] * 10
    site = make_site(write_csv(tmp_path, frame), categorical=["ward"])
    assert "0/1" in contract_error(site, task="binary", categories={"ward": ["a", "b"]})
    data = load_site_data(site, None)  # the site's own levels stand in for the study's
    assert data.n_train + data.n_test == 20 and "ward=a" in data.feature_names and "ward=b" in data.feature_names
    assert sorted(set(data.y_train.tolist()) | set(data.y_test.tolist())) == [-1.0, 1.5]
    assert "categorical column has no agreed levels" in contract_error(site, task="regression")  # a study must agree them

    broken = frame.assign(bmi=frame["bmi"].astype(object))
    broken.loc[3, "bmi"] = "high"
    assert "is not numeric" in contract_error(make_site(write_csv(tmp_path, broken, "b.csv"), categorical=["ward"]), task=None)


def test_without_a_task_a_declared_time_is_checked_as_survival_time(tmp_path):
    frame = survival_frame().astype({"T": float})
    frame.loc[[2, 5], "T"] = -3.0
    path = write_csv(tmp_path, frame)
    assert "2 negative" in contract_error(make_site(path, label="E", time="T"), task=None)
    assert "time column not found" in contract_error(make_site(path, label="E", time="days"), task=None)
