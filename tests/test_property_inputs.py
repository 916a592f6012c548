"""Property-based tests: malformed study/site files and site tables never crash with a traceback.

Whatever a hospital's table or an admin's TOML holds, loading it either works
or ends in the contract's one-line errors (ConfigError, DataContractError);
never a KeyError, TypeError or pandas exception surfacing to the user.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import ConfigError, load_site, load_study, parse_site, parse_study
from shared.contract import load_site_data
from shared.errors import DataContractError, FedhelixError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Anything TOML can hold (no None), nested a little.
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
toml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)

VALID_STUDY = {
    "study": {"name": "p", "task": "binary", "model": "mlp", "rounds": 2, "strategy": "fedavg", "secure_aggregation": False, "min_sites": 1},
    "model": {"hidden": [8], "dropout": 0.1},
    "privacy": {"dp": False},
    "secure_aggregation": {"max_dropouts": 0},
    "robustness": {"max_update_norm": 5.0},
    "data": {"categories": {"grade": ["1", "2"]}},
    "sites": [{"name": "a", "config": "a.toml"}, {"name": "b", "config": "b.toml"}],
}
STUDY_KEYS = {
    "study": ["name", "task", "model", "rounds", "strategy", "local_steps", "batch_size", "learning_rate", "server_learning_rate", "proximal_mu", "seed", "optimizer", "min_sites", "round_timeout_s", "secure_aggregation"],
    "model": ["hidden", "dropout", "time_bins"],
    "privacy": ["dp", "target_epsilon", "delta", "max_grad_norm", "accountant", "reproducible_noise", "level", "site_clipping_norm"],
    "secure_aggregation": ["max_dropouts", "update_bound", "timeout_s", "stats_bound"],
    "robustness": ["max_update_norm", "trim_fraction", "byzantine_sites"],
    "data": ["categories"],
}
VALID_SITE = {"site": {"name": "a"}, "data": {"path": "a.csv", "label": "y", "features": ["x"], "test_fraction": 0.2}, "privacy": {"epsilon_budget": 3.0, "delta": 1e-5}}
SITE_KEYS = {
    "site": ["name"],
    "data": ["path", "label", "time", "features", "categorical", "drop", "missing", "normalize", "test_fraction", "split_column", "split_seed"],
    "privacy": ["ledger", "epsilon_budget", "delta", "allow_site_level"],
}


def _mutations(keys: dict[str, list[str]]):
    section = st.sampled_from([*keys, "sites", "unknown"])
    return st.lists(st.tuples(section, st.one_of(st.sampled_from(sorted({k for ks in keys.values() for k in ks})), st.text(max_size=6)), toml_values, st.booleans()), min_size=1, max_size=4)


def _mutate(doc: dict, mutations) -> dict:
    doc = copy.deepcopy(doc)
    for section, key, value, replace_section in mutations:
        if replace_section:
            doc[section] = value  # the whole table replaced by anything (a list, a number, ...)
        elif isinstance(doc.get(section), dict):
            doc[section][key] = value
        elif isinstance(doc.get(section), list) and doc[section] and isinstance(doc[section][0], dict):
            doc[section][0][key] = value
    return doc


def _accepts_or_config_error(parse, doc) -> None:
    try:
        parse(doc)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).strip()


@SETTINGS
@given(_mutations(STUDY_KEYS))
def test_mutated_study_documents_end_in_config_errors(mutations) -> None:
    _accepts_or_config_error(lambda d: parse_study(d, source="study.toml", base_dir=Path("/tmp")), _mutate(VALID_STUDY, mutations))


@SETTINGS
@given(_mutations(SITE_KEYS))
def test_mutated_site_documents_end_in_config_errors(mutations) -> None:
    _accepts_or_config_error(lambda d: parse_site(d, source="site.toml", base_dir=Path("/tmp")), _mutate(VALID_SITE, mutations))


@SETTINGS
@given(st.dictionaries(st.text(max_size=10), toml_values, max_size=5))
def test_arbitrary_documents_end_in_config_errors(doc) -> None:
    _accepts_or_config_error(parse_study, doc)
    _accepts_or_config_error(parse_site, doc)


VALID_STUDY_TEXT = '[study]\nname = "p"\ntask = "binary"\nmodel = "mlp"\nrounds = 2\n[[sites]]\nname = "a"\nconfig = "a.toml"\n'


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.integers(0, len(VALID_STUDY_TEXT)).flatmap(lambda i: st.text(max_size=6).map(lambda t: VALID_STUDY_TEXT[:i] + t + VALID_STUDY_TEXT[i:]))), st.binary(max_size=20))
def test_arbitrary_toml_text_ends_in_config_errors(text: str, junk: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") + junk)
        for load in (load_study, load_site):
            try:
                load(path)
            except ConfigError as err:
                assert "\n" not in str(err)


# ----------------------------------------------------------------------------- site tables

cells = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "NA", "yes", "0", "1", "1e309", "-inf", "1,5", "x y", '"', "train", "test"]),
    st.text(max_size=5),
)
column_names = st.sampled_from(["y", "time", "x", "grade", "split", "y ", "Y", "", "x.1"])


@st.composite
def tables(draw):
    columns = draw(st.lists(column_names, min_size=1, max_size=5))
    n = draw(st.integers(0, 12))
    return {c: [draw(cells) for _ in range(n)] for c in dict.fromkeys(columns)} | ({} if len(set(columns)) == len(columns) else {"__dup__": columns})


@st.composite
def site_specs(draw):
    return {
        "task": draw(st.sampled_from(["binary", "regression", "survival"])),
        "missing": draw(st.sampled_from(["drop", "mean", "none"])),
        "normalize": draw(st.sampled_from(["site", "none"])),
        "categorical": draw(st.sampled_from([[], ["grade"]])),
        "split_column": draw(st.sampled_from([None, "split"])),
        "suffix": draw(st.sampled_from([".csv", ".tsv", ".parquet"])),
        "features": draw(st.sampled_from([[], ["x"], ["x", "grade"], ["nope"]])),
    }


def _write(table: dict, path: Path) -> None:
    dup = table.pop("__dup__", None)
    frame = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in table.items()})
    if path.suffix == ".parquet":
        try:
            frame.to_parquet(path)
        except Exception:  # noqa: BLE001 - Arrow refuses mixed-type columns; store them as text, as an export would
            frame.astype("string").to_parquet(path)
    else:
        text = frame.to_csv(index=False, sep="," if path.suffix == ".csv" else "\t")
        if dup:  # a header with a repeated column name, as a spreadsheet export can produce
            text = ",".join(dup) + "\n" + "\n".join(text.splitlines()[1:])
        path.write_text(text)


@SETTINGS
@given(tables(), site_specs())
def test_arbitrary_site_tables_end_in_data_contract_errors(table: dict, spec: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"site{spec['suffix']}"
        _write(dict(table), data)
        doc = {
            "site": {"name": "h"},
            "data": {
                "path": str(data), "label": "y", "missing": spec["missing"], "normalize": spec["normalize"],
                "categorical": spec["categorical"], "features": spec["features"],
                **({"time": "time"} if spec["task"] == "survival" else {}),
                **({"split_column": spec["split_column"]} if spec["split_column"] else {}),
            },
        }  # fmt: skip
        site = parse_site(doc, source="site.toml")
        try:
            result = load_site_data(site, spec["task"], {"grade": ["1", "2", "a"]})
        except DataContractError as err:
            assert "\n" not in str(err) and "site 'h'" in str(err)
            return
        assert result.n_train > 0 and result.n_test > 0
        assert np.isfinite(result.x_train).all() or spec["missing"] == "none"
        assert result.x_train.shape[1] == len(result.feature_names)
        assert not any(math.isnan(v) for v in result.y_train.ravel())


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([".csv", ".tsv", ".parquet"]))
def test_arbitrary_bytes_as_a_site_table_end_in_data_contract_errors(blob: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"site{suffix}"
        data.write_bytes(blob)
        site = parse_site({"site": {"name": "h"}, "data": {"path": str(data), "label": "y"}})
        try:
            load_site_data(site, "binary")
        except FedhelixError as err:
            assert isinstance(err, DataContractError) and "\n" not in str(err)
