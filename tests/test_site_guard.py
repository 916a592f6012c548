"""The site's own guards against a hostile coordinator: plan from the approved study, bounded schedule, sealed errors."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType

from client.app import SiteClient, make_sealing_mod, public_warning
from client.approved_plan import PlanRefused, checked_plan
from client.audit import AuditLog, verify
from client.query_guard import QueryGuard, QueryRefused
from shared.config import load_site, load_study
from shared.errors import CODES, DataContractError, error_code, extract_error_line, sealed_line
from shared.metrics import MIN_TEST_FOR_COUNTS, withhold_small_sample
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def study():
    return load_study(ROOT / "studies" / "wdbc" / "study-dp.toml")


def _sent(study, **changes) -> str:
    raw = json.loads(TrainingPlan.from_study(study, ["a", "b"], ["malignant"]).to_json())
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return json.dumps(raw)


def test_the_honest_plan_passes_and_keeps_what_the_coordinator_may_choose(study) -> None:
    norm = {"mean": [0.0, 1.0], "scale": [1.0, 2.0]}
    plan = checked_plan(study, _sent(study, normalization=norm, candidates=["g1"]), "a")
    assert plan.features == ["a", "b"] and plan.labels == ["malignant"]
    assert plan.normalization == norm and plan.candidates == ["g1"]
    assert plan.privacy == study.privacy and plan.learning_rate == study.learning_rate


@pytest.mark.parametrize(
    "changes",
    [
        {"privacy": {"dp": False}},
        {"privacy": {"target_epsilon": 100.0}},
        {"privacy": {"max_grad_norm": 50.0}},
        {"privacy": {"reproducible_noise": True}},
        {"secure_aggregation": False},
        {"model": "logistic"},
        {"batch_size": 1},
        {"learning_rate": 1.0},
        {"local_steps": 10_000},
        {"rounds": 1000},
        {"update_bound": 1e9},
        {"categories": {"x": []}},
        {"model_options": {"hidden": [1024]}},
        {"exfiltrate": True},
    ],
)
def test_any_privacy_relevant_change_is_refused(study, changes) -> None:
    with pytest.raises(PlanRefused, match="differs from the approved study"):
        checked_plan(study, _sent(study, **changes), "a")


@pytest.mark.parametrize("normalization", [{"mean": [0.0, 0.0], "scale": [1.0, 0.0]}, {"mean": [0.0], "scale": [1.0]}, {"mean": [float("nan"), 0.0], "scale": [1.0, 1.0]}, {"scale": [1.0, 1.0]}])
def test_pooled_statistics_must_be_one_finite_mean_and_positive_scale_per_feature(study, normalization) -> None:
    with pytest.raises(PlanRefused, match="pooled normalisation"):
        checked_plan(study, _sent(study, normalization=normalization), "a")


@pytest.mark.parametrize("garbage", ["{not json", "[]", '"plan"', json.dumps({"features": 3})])
def test_a_plan_that_is_not_a_plan_is_refused(study, garbage) -> None:
    with pytest.raises(PlanRefused):
        checked_plan(study, garbage, "a")


def test_the_schedule_allows_one_answer_of_each_kind(tmp_path: Path) -> None:
    guard = QueryGuard(tmp_path / "g.sqlite", "a")
    guard.claim("run1", "s", "handshake", 0, 3)
    with pytest.raises(QueryRefused, match="second handshake"):
        guard.claim("run1", "s", "handshake", 0, 3)
    guard.claim("run1", "s", "fit", 1, 3)
    guard.claim("run1", "s", "fit", 3, 3)  # a site that missed round 2 may join round 3
    with pytest.raises(QueryRefused, match="rounds only increase"):
        guard.claim("run1", "s", "fit", 2, 3)
    with pytest.raises(QueryRefused, match="second fit"):
        guard.claim("run1", "s", "fit", 3, 3)
    with pytest.raises(QueryRefused, match="rounds 1..3"):
        guard.claim("run1", "s", "fit", 4, 3)
    with pytest.raises(QueryRefused, match="rounds 1..3"):
        guard.claim("run1", "s", "evaluate", 0, 3)
    guard.claim("run1", "s", "evaluate", 2, 3)
    with pytest.raises(QueryRefused, match="second evaluate"):
        guard.claim("run1", "s", "evaluate", 2, 3)
    guard.claim("run2", "s", "fit", 1, 3)  # another run has its own schedule
    assert guard.answered("run1") == [("handshake", 0), ("fit", 1), ("fit", 3), ("evaluate", 2)]
    guard.close()
    reopened = QueryGuard(tmp_path / "g.sqlite", "a")  # a restart does not reset the schedule
    with pytest.raises(QueryRefused):
        reopened.claim("run1", "s", "fit", 3, 3)
    assert stat.S_IMODE(os.stat(tmp_path / "g.sqlite").st_mode) == 0o600


def test_count_metrics_are_withheld_on_small_test_splits() -> None:
    metrics = {"accuracy": 0.9, "sensitivity": 1.0, "specificity": 0.5, "roc_auc": 0.8, "loss": 0.3, "rmse": 1.0, "mae": 0.5, "c_index": 0.7}
    small = withhold_small_sample(metrics, MIN_TEST_FOR_COUNTS - 1)
    assert small == {"accuracy": None, "sensitivity": None, "specificity": None, "roc_auc": 0.8, "loss": None, "rmse": None, "mae": None, "c_index": 0.7}
    assert withhold_small_sample(metrics, MIN_TEST_FOR_COUNTS) == metrics


def test_warnings_leave_with_counts_only() -> None:
    assert public_warning("skipped 2 of 50 SMILES are invalid or empty: row 3 'C1CC', row 9 'xx'") == "skipped 2 of 50 SMILES are invalid or empty"
    assert public_warning("dropped 4 row(s) with missing values") == "dropped 4 row(s) with missing values"


def test_error_codes_are_fixed_phrases_and_carry_no_data() -> None:
    err = DataContractError("site 'a', file /secret/path.csv, column 'hiv_status': value(s) ['positive'] not among the levels")
    line = sealed_line("a", error_code(err))
    assert "E120" in line and "hiv_status" not in line and "positive" not in line and "/secret" not in line
    assert error_code(RuntimeError("/secret/path")) == "E199"
    assert extract_error_line(f"<class 'X'>:<'{line}'>") == line.removeprefix("fedhelix: ")
    assert all(code.startswith("E1") for code in CODES)


def test_the_sealing_mod_replies_a_code_and_logs_the_line_at_the_site(tmp_path: Path, study, monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):  # messages are created inside a run
        monkeypatch.setattr(TaskIdentity, name, value)
    site = load_site(ROOT / "studies" / "wdbc" / "sites" / "hospital_a.toml")
    audit = AuditLog(tmp_path / "hospital_a.audit.jsonl", "hospital_a")
    mod = make_sealing_mod(lambda ctxt: (site, study, audit))

    def failing(msg, ctxt):
        raise DataContractError("site 'hospital_a', column 'mean_radius': value 12,4 is not numeric")

    message = Message(RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = mod(message, context, failing)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason == sealed_line("hospital_a", "E120")
    assert "12,4" in (tmp_path / "hospital_a.errors.log").read_text()
    assert stat.S_IMODE(os.stat(tmp_path / "hospital_a.errors.log").st_mode) == 0o600
    assert verify(audit.path).kinds == {"error": 1}


def test_site_client_refuses_a_crafted_plan_before_loading_or_training(tmp_path: Path, study) -> None:
    site = load_site(ROOT / "studies" / "wdbc" / "sites" / "hospital_a.toml")
    guard = QueryGuard(tmp_path / "g.sqlite", site.name)
    audit = AuditLog(tmp_path / "a.jsonl", site.name)
    client = SiteClient(site, str(tmp_path / "ledgers"), True, audit, approved=dataclasses.replace(study, rounds=2), guard=guard, run="r")
    crafted = _sent(dataclasses.replace(study, rounds=2), privacy={"dp": False})
    with pytest.raises(PlanRefused):
        client.fit([], {PLAN_KEY: crafted, ROUND_KEY: 1})
    assert guard.answered("r") == [] and not (tmp_path / "ledgers").exists() and not audit.path.exists()


def test_a_study_that_releases_no_evaluation_is_never_evaluated(tmp_path: Path, study) -> None:
    quiet = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, evaluation=False))
    site = load_site(ROOT / "studies" / "wdbc" / "sites" / "hospital_a.toml")
    guard = QueryGuard(tmp_path / "g.sqlite", site.name)
    client = SiteClient(site, None, True, AuditLog(tmp_path / "a.jsonl", site.name), approved=quiet, guard=guard, run="r")
    honest = TrainingPlan.from_study(quiet).to_json()
    with pytest.raises(QueryRefused, match="releases no evaluation"):
        client.evaluate([], {PLAN_KEY: honest, ROUND_KEY: 1})
    assert guard.answered("r") == []
    with pytest.raises(PlanRefused):  # and the coordinator cannot switch it back on
        checked_plan(quiet, _sent(quiet, privacy={"evaluation": True}), "a")


def test_a_resumed_attempt_may_repeat_only_the_round_the_last_one_stopped_at(tmp_path: Path) -> None:
    guard = QueryGuard(tmp_path / "g.sqlite", "a")
    for r in (1, 2):
        guard.claim("nonce", "s", "fit", r, 5, attempt=1)
    guard.claim("nonce", "s", "handshake", 0, 5, attempt=2)  # a new attempt shakes hands again
    with pytest.raises(QueryRefused, match="rounds only increase"):
        guard.claim("nonce", "s", "fit", 1, 5, attempt=2)  # replaying an earlier round is refused
    guard.claim("nonce", "s", "fit", 2, 5, attempt=2)  # the round in progress at the interruption, once more
    with pytest.raises(QueryRefused, match="second fit"):
        guard.claim("nonce", "s", "fit", 2, 5, attempt=2)
    guard.claim("nonce", "s", "fit", 3, 5, attempt=2)
    with pytest.raises(QueryRefused, match="rounds only increase"):
        guard.claim("nonce", "s", "fit", 3, 5, attempt=1)  # an older attempt cannot come back
    guard.claim("nonce", "s", "fit", 3, 5, attempt=3)
    fits = [r for k, r in guard.answered("nonce") if k == "fit"]
    assert fits == [1, 2, 2, 3, 3]  # rounds + one per later attempt, never more


def test_a_small_test_split_sends_no_loss_and_the_coordinator_leaves_it_out(tmp_path: Path, study) -> None:
    """With weights predicting a constant, the test loss gives a small split's number of positive labels."""
    import numpy as np

    from shared.models import build_model
    from shared.params import get_weights

    site = load_site(ROOT / "studies" / "wdbc" / "sites" / "hospital_a.toml")
    small = tmp_path / "small.csv"
    import pandas as pd

    frame = pd.read_csv(ROOT / "data" / "wdbc" / "hospital_a.csv")
    frame.iloc[:60].to_csv(small, index=False)  # 25% test: 15 rows
    site = dataclasses.replace(site, data=dataclasses.replace(site.data, path=small), path=tmp_path / "hospital_a.toml")
    features = [c for c in frame.columns if c not in ("malignant", "patient_id")]
    plain = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, dp=False))
    plan = TrainingPlan.from_study(plain, features, ["malignant"])
    weights = get_weights(build_model(plain.model, plain.task, len(features), plain.model_options, seed=0))
    client = SiteClient(site, None, True, AuditLog(tmp_path / "a.jsonl", site.name), approved=plain, guard=QueryGuard(tmp_path / "g.sqlite", site.name), run="r")
    loss, n, metrics = client.evaluate(weights, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})
    assert n < MIN_TEST_FOR_COUNTS and loss == 0.0 and metrics["loss_withheld"] == 1
    assert not {"accuracy", "sensitivity", "specificity"} & set(metrics) and "roc_auc" in metrics
    assert np.isfinite(metrics["roc_auc"])
