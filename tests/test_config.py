"""Study and site files: the bundled study parses; every mistake is one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, load_site, load_study, parse_site, parse_study
from shared.errors import FedhelixError

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "tcga-brca" / "study.toml"

GOOD_STUDY = """\
[study]
name = "demo"
task = "binary"
model = "logistic"
rounds = 3
strategy = "fedavg"

[[sites]]
name = "alpha"
config = "sites/alpha.toml"

[[sites]]
name = "beta"
config = "sites/beta.toml"
"""

GOOD_SITE = """\
[site]
name = "alpha"

[data]
path = "alpha.csv"
label = "y"
"""


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(func, path: Path, *keys: str) -> str:
    """Call ``func(path)`` expecting a one-line ConfigError naming the file and every key."""
    with pytest.raises(ConfigError) as info:
        func(path)
    message = str(info.value)
    assert isinstance(info.value, FedhelixError)
    assert message.startswith("fedhelix:"), message
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    rest = message.replace(str(path), "<file>")  # tmp_path holds the test's own name
    for key in keys:
        assert key in rest, message
    return rest


# ----------------------------------------------------------------------------- the bundled study


def test_bundled_study_loads():
    study = load_study(STUDY)
    assert study.name == "tcga-brca"
    assert study.task == "survival"
    assert study.model == "cox"
    assert study.strategy == "fedadam"
    assert study.rounds == 5
    assert study.batch_size == 8
    assert study.path == STUDY.resolve()
    assert [s.name for s in study.sites] == ["northeast", "south", "west", "midwest", "europe", "canada"]
    assert study.required_sites == 6
    for ref in study.sites:
        assert ref.config.is_absolute() and ref.config.is_file(), ref.config
        site = load_site(ref.config)
        assert site.name == ref.name
        assert site.path == ref.config
        assert site.data.path.is_absolute() and site.data.path.is_file(), site.data.path
        assert site.data.label == "E" and site.data.time == "T"
        assert site.data.split_column == "fold"
        assert site.data.drop == ("pid",)


def test_defaults_and_relative_paths(tmp_path):
    path = write(tmp_path, GOOD_STUDY)
    study = load_study(path)
    assert study.sites[0].config == (tmp_path / "sites" / "alpha.toml").resolve()
    assert study.local_steps == 100 and study.batch_size == 32 and study.optimizer == "sgd"
    assert study.min_sites == 0 and study.required_sites == 2
    assert study.learning_rate == 0.01 and isinstance(study.learning_rate, float)
    site_path = write(tmp_path, GOOD_SITE, "sites/alpha.toml")
    site = load_site(site_path)
    assert site.data.path == (tmp_path / "sites" / "alpha.csv").resolve()
    assert site.data.missing == "drop" and site.data.normalize == "site"
    assert site.data.test_fraction == 0.2


def test_integer_accepted_where_float_expected(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace('rounds = 3', 'rounds = 3\nlearning_rate = 1'))
    assert load_study(path).learning_rate == 1.0


def test_categories_parsed_as_strings(tmp_path):
    path = write(tmp_path, GOOD_STUDY + '\n[data.categories]\nstage = ["I", "II"]\ngrade = [1, 2, 3]\n')
    study = load_study(path)
    assert study.categories == {"stage": ("I", "II"), "grade": ("1", "2", "3")}


# ----------------------------------------------------------------------------- study errors


def test_unknown_task(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace('task = "binary"', 'task = "classification"'))
    message = config_error(load_study, path, "task", "classification")
    assert "binary" in message  # lists the allowed values


def test_unknown_strategy(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace('strategy = "fedavg"', 'strategy = "fedsgd"'))
    message = config_error(load_study, path, "strategy", "fedsgd")
    assert "fedadam" in message


def test_unknown_key_in_study(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace("rounds = 3", "roundz = 3"))
    message = config_error(load_study, path, "[study]", "roundz")
    assert "spelling" in message


def test_unknown_key_in_site(tmp_path):
    path = write(tmp_path, GOOD_SITE + 'lable = "y"\n', "site.toml")
    config_error(load_site, path, "[data]", "lable")


def test_unknown_section(tmp_path):
    path = write(tmp_path, GOOD_STUDY + "\n[sutdy]\nx = 1\n")
    config_error(load_study, path, "sutdy")


def test_model_does_not_fit_task(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace('model = "logistic"', 'model = "cox"'))
    message = config_error(load_study, path, "model", "cox", "binary")
    assert "logistic" in message  # says what would fit


def test_logistic_for_survival_rejected(tmp_path):
    text = GOOD_STUDY.replace('task = "binary"', 'task = "survival"')
    config_error(load_study, write(tmp_path, text), "model", "logistic", "survival")


def test_duplicate_site_names(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace('name = "beta"', 'name = "alpha"'))
    message = config_error(load_study, path, "alpha")
    assert "duplicate" in message


def test_missing_study_section(tmp_path):
    text = GOOD_STUDY.split("[[sites]]", 1)[1]
    path = write(tmp_path, "[[sites]]" + text)
    message = config_error(load_study, path, "[study]")
    assert "section is missing" in message


def test_invalid_toml(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace('rounds = 3', 'rounds = = 3'))
    message = config_error(load_study, path)
    assert "not valid TOML" in message
    assert "line" in message  # tomllib's position survives on the one line


def test_study_file_missing(tmp_path):
    message = config_error(load_study, tmp_path / "nope.toml")
    assert "not found" in message


def test_missing_site_file(tmp_path):
    # The study may list a site whose file is elsewhere (deployment); loading it is the error.
    study = load_study(write(tmp_path, GOOD_STUDY))
    missing = study.sites[1].config
    assert not missing.exists()
    message = config_error(load_site, missing)
    assert "not found" in message


def test_wrong_type(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace("rounds = 3", 'rounds = "five"'))
    message = config_error(load_study, path, "rounds", "five")
    assert "int" in message


def test_bool_is_not_an_int(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace("rounds = 3", "rounds = true"))
    config_error(load_study, path, "rounds")


def test_non_positive_rounds(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace("rounds = 3", "rounds = 0"))
    config_error(load_study, path, "rounds", "> 0")


def test_min_sites_larger_than_sites(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace("rounds = 3", "rounds = 3\nmin_sites = 3"))
    message = config_error(load_study, path, "min_sites")
    assert "2" in message


def test_min_sites_within_range(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace("rounds = 3", "rounds = 3\nmin_sites = 1\nsecure_aggregation = false"))
    study = load_study(path)
    assert study.min_sites == 1 and study.required_sites == 1


def test_no_sites(tmp_path):
    path = write(tmp_path, GOOD_STUDY.split("[[sites]]", 1)[0])
    config_error(load_study, path, "sites")


def test_site_entry_missing_config(tmp_path):
    path = write(tmp_path, GOOD_STUDY.replace('config = "sites/beta.toml"\n', ""))
    config_error(load_study, path, "config", "required")


def test_bad_categories(tmp_path):
    path = write(tmp_path, GOOD_STUDY + '\n[data.categories]\nstage = ["I", "I"]\n')
    config_error(load_study, path, "stage")


# ----------------------------------------------------------------------------- site errors


def test_site_missing_label(tmp_path):
    path = write(tmp_path, GOOD_SITE.replace('label = "y"\n', ""), "site.toml")
    config_error(load_site, path, "[data]", "label", "required")


def test_site_bad_missing_choice(tmp_path):
    path = write(tmp_path, GOOD_SITE + 'missing = "zero"\n', "site.toml")
    config_error(load_site, path, "missing", "zero")


def test_site_bad_test_fraction(tmp_path):
    path = write(tmp_path, GOOD_SITE + "test_fraction = 1.5\n", "site.toml")
    config_error(load_site, path, "test_fraction")


def test_site_features_must_be_strings(tmp_path):
    path = write(tmp_path, GOOD_SITE + "features = [1, 2]\n", "site.toml")
    config_error(load_site, path, "features")


def test_site_missing_section(tmp_path):
    path = write(tmp_path, '[site]\nname = "alpha"\n', "site.toml")
    message = config_error(load_site, path, "[data]")
    assert "section is missing" in message


def test_parse_site_without_file():
    site = parse_site({"site": {"name": "x"}, "data": {"path": "/abs/x.csv", "label": "y"}})
    assert site.path is None and site.data.path == Path("/abs/x.csv")


def test_parse_study_source_named():
    with pytest.raises(ConfigError, match="my-study.toml"):
        parse_study({"study": {"name": "x", "task": "nope", "model": "mlp"}}, source="my-study.toml")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, 1.0),
        ({"privacy": {"dp": True, "max_grad_norm": 0.5}}, 0.1 * 20 * 0.5),
        ({"privacy": {"dp": True}, "study": {"optimizer": "adam"}}, 0.1 * 20 * 0.1 / 0.001**0.5),
        ({"privacy": {"dp": True, "level": "site", "site_clipping_norm": 0.3}}, 0.3),
        ({"secure_aggregation": {"update_bound": 2.5}}, 2.5),
    ],
)
def test_secure_aggregation_update_bound_is_derived_from_the_study(extra: dict, expected: float) -> None:
    doc = {
        "study": {"name": "s", "task": "binary", "model": "logistic", "learning_rate": 0.1, "local_steps": 20, **extra.get("study", {})},
        "sites": [{"name": n, "config": f"{n}.toml"} for n in ("a", "b", "c")],
    }
    doc.update({k: v for k, v in extra.items() if k != "study"})
    assert parse_study(doc).update_bound == pytest.approx(expected)


# ----------------------------------------------------------------------------- robustness (issue 7)


def _robust_doc(strategy: str, secure: bool, **robustness) -> dict:
    doc = {"study": {"name": "r", "task": "binary", "model": "logistic", "strategy": strategy, "secure_aggregation": secure}, "sites": [{"name": "a", "config": "a.toml"}]}
    if robustness:
        doc["robustness"] = robustness
    return doc


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum"])
def test_robust_strategies_are_refused_with_secure_aggregation_in_one_line(strategy: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_study(_robust_doc(strategy, True))
    message = info.value.line
    assert strategy in message and "only ever sees the sum" in message and "secure_aggregation = false" in message
    assert parse_study(_robust_doc(strategy, False)).strategy == strategy


def test_norm_bound_needs_secure_aggregation_off() -> None:
    with pytest.raises(ConfigError, match="max_update_norm needs secure aggregation off"):
        parse_study(_robust_doc("fedavg", True, max_update_norm=5.0))
    assert parse_study(_robust_doc("fedavg", False, max_update_norm=5.0)).robustness.max_update_norm == 5.0


@pytest.mark.parametrize("table, match", [({"trim_fraction": 0.5}, "trim_fraction"), ({"byzantine_sites": -1}, "byzantine_sites"), ({"max_update_norm": 0}, "max_update_norm"), ({"typo": 1}, "unknown key")])
def test_bad_robustness_settings_are_named(table: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_study(_robust_doc("fedavg", False, **table))


def test_round_timeout_is_positive_or_absent() -> None:
    doc = _robust_doc("fedavg", False)
    assert parse_study(doc).round_timeout_s is None
    doc["study"]["round_timeout_s"] = 30
    assert parse_study(doc).round_timeout_s == 30.0
    doc["study"]["round_timeout_s"] = -1
    with pytest.raises(ConfigError, match="round_timeout_s"):
        parse_study(doc)


def test_min_sites_below_what_secure_aggregation_may_unmask_is_refused(tmp_path) -> None:
    from shared.config import parse_study

    doc = {"study": {"name": "s", "task": "binary", "model": "logistic", "min_sites": 2}, "sites": [{"name": n, "config": f"{n}.toml"} for n in "abc"]}
    with pytest.raises(ConfigError, match="set max_dropouts = 1"):
        parse_study(doc, base_dir=tmp_path)
    assert parse_study({**doc, "secure_aggregation": {"max_dropouts": 1}}, base_dir=tmp_path).required_sites == 2
    assert parse_study({**doc, "study": {**doc["study"], "secure_aggregation": False}}, base_dir=tmp_path).required_sites == 2
