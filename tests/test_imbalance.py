"""Rare positives and scale: pooled label counts (output bias, balanced pos_weight), local epochs,
the validation split carved from training rows, and best-round selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from client.approved_plan import PlanRefused, checked_plan
from client.trainer import scaled_steps
from server.best_round import BestRoundKeeper, pooled_validation
from shared.config import load_site, parse_study
from shared.contract import load_site_data
from shared.errors import ConfigError, RequestRefused
from shared.imbalance import PooledLabels, label_moments, set_output_bias
from shared.models import build_model
from shared.config import ModelOptions
from shared.plan import TrainingPlan
from shared.tasks import per_sample_loss
from shared.validation import carve_validation, validation_indices


def _study(**extra: object) -> dict:
    study = {"name": "s", "task": "binary", "model": "mlp", **extra}
    return {"study": study, "sites": [{"name": n, "config": f"{n}.toml"} for n in "abc"]}


def _secure_mean(site_labels: list[np.ndarray]) -> np.ndarray:
    """What the secure label round yields: each site's moments weighted by its n_train, averaged."""
    weights = np.array([len(y) for y in site_labels], dtype=float)
    return sum(w * label_moments(y) for w, y in zip(weights, site_labels)) / weights.sum()


def test_output_bias_starts_at_the_pooled_training_log_odds() -> None:
    sites = [np.r_[np.ones(3), np.zeros(97)], np.r_[np.ones(10), np.zeros(40)], np.zeros(30)]
    pooled = PooledLabels.from_moments(_secure_mean(sites))
    positives, total = 13, 180
    assert pooled.log_odds() == pytest.approx([math.log(positives / (total - positives))])
    model = build_model("mlp", "binary", 4, seed=1)
    set_output_bias(model, pooled.log_odds())
    assert float(model.net[-1].bias.detach()) == pytest.approx(math.log(13 / 167), rel=1e-6)


def test_multitask_bias_and_balanced_pos_weight_count_known_labels_only_per_task() -> None:
    nan = np.nan
    a = np.array([[1, 0], [0, nan], [0, 1], [nan, 0]], dtype=float)
    b = np.array([[0, nan], [1, nan]], dtype=float)
    pooled = PooledLabels.from_moments(_secure_mean([a, b]))
    # task 0: known 5 (2 positive); task 1: known 3 (1 positive)
    assert pooled.prevalence == pytest.approx([2 / 5, 1 / 3])
    assert pooled.log_odds() == pytest.approx([math.log(2 / 3), math.log(1 / 2)])
    assert pooled.balanced_pos_weight() == pytest.approx([3 / 2, 2.0])
    gnn = build_model("gnn", "multitask", 9, ModelOptions(hidden=(8,), layers=2), seed=0, n_outputs=2)
    set_output_bias(gnn, pooled.log_odds())
    assert gnn.out.bias.detach().numpy() == pytest.approx(pooled.log_odds(), rel=1e-6)


def test_a_label_without_positives_gives_a_finite_bias_and_bounded_weight() -> None:
    pooled = PooledLabels.from_moments(_secure_mean([np.zeros(50)]))
    assert np.isfinite(pooled.log_odds()).all() and pooled.log_odds()[0] < -10
    assert 1 < pooled.balanced_pos_weight()[0] <= 1e4


def test_pos_weight_scales_the_positive_term_of_the_loss() -> None:
    out, y = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.0, 0.0, 1.0])
    weighted = per_sample_loss("binary", pos_weight=[4.0])(out, y)
    expected = -(4.0 * y * F.logsigmoid(out) + (1 - y) * F.logsigmoid(-out))
    assert torch.allclose(weighted, expected, atol=1e-6)
    multi = per_sample_loss("multitask", pos_weight=[4.0, 1.0])
    target = torch.tensor([[1.0, float("nan")]])
    assert float(multi(torch.tensor([[0.0, 5.0]]), target)) == pytest.approx(4.0 * math.log(2), rel=1e-6)


def test_study_fields_for_imbalance_and_their_refusals() -> None:
    study = parse_study(_study(pos_weight="balanced", local_epochs=2, select_best=True))
    assert study.pos_weight == "balanced" and study.local_epochs == 2.0 and study.select_best and study.init_output_bias
    assert parse_study(_study(pos_weight=3)).pos_weight == 3.0
    bad = [
        (_study(pos_weight="heavy"), "pos_weight must be"),
        (_study(pos_weight=-1.0), "pos_weight must be a positive"),
        ({**_study(pos_weight="balanced"), "study": {**_study()["study"], "pos_weight": "balanced", "secure_aggregation": False}}, "needs secure aggregation"),
        ({**_study(local_epochs=1), "privacy": {"dp": True}}, "local_epochs cannot be used with dp"),
        ({**_study(select_best=True), "privacy": {"evaluation": False}}, "select_best needs"),
        ({"study": {"name": "s", "task": "regression", "model": "mlp", "pos_weight": 2.0}, "sites": [{"name": "a", "config": "a.toml"}]}, "binary and multitask"),
        (_study(validation_fraction=0.7), "validation_fraction"),
    ]
    for doc, match in bad:
        with pytest.raises(ConfigError, match=match):
            parse_study(doc)


def test_local_epochs_scale_steps_to_the_sites_own_data() -> None:
    plan = TrainingPlan.from_study(parse_study(_study(local_epochs=2, batch_size=32)))
    assert scaled_steps(plan, 1000).local_steps == math.ceil(2 * 1000 / 32)
    assert scaled_steps(plan, 10).local_steps == 1
    fixed = TrainingPlan.from_study(parse_study(_study(local_steps=7)))
    assert scaled_steps(fixed, 1000).local_steps == 7


def test_site_takes_a_balanced_pos_weight_from_the_coordinator_only_if_sane() -> None:
    study = parse_study(_study(pos_weight="balanced"))
    sent = json.loads(TrainingPlan.from_study(study, ["x"], ["y"]).to_json())
    assert checked_plan(study, json.dumps({**sent, "pos_weight": [27.5]}), "a").pos_weight == [27.5]
    for lie in ([-1.0], [float("inf")], [1.0, 2.0], "27"):
        with pytest.raises(PlanRefused, match="pos_weight"):
            checked_plan(study, json.dumps({**sent, "pos_weight": lie}), "a")
    fixed = parse_study(_study(pos_weight=2.0))
    sent = json.loads(TrainingPlan.from_study(fixed, ["x"], ["y"]).to_json())
    with pytest.raises(PlanRefused, match="pos_weight"):  # a study's own number is not the coordinator's to change
        checked_plan(fixed, json.dumps({**sent, "pos_weight": [50.0]}), "a")


def test_validation_split_is_carved_from_train_deterministic_stratified_and_disjoint_from_test(root: Path) -> None:
    data = load_site_data(load_site(root / "studies" / "wdbc" / "sites" / "hospital_a.toml"), "binary")
    train_view, val_view = carve_validation(data, 0.15, seed=42)
    again = carve_validation(data, 0.15, seed=42)[1]
    assert np.array_equal(val_view.x_test, again.x_test) and np.array_equal(val_view.y_test, again.y_test)
    rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
    assert rows(val_view.x_test) <= rows(data.x_train)
    assert not rows(val_view.x_test) & rows(data.x_test)  # never a test row
    assert not rows(val_view.x_test) & rows(train_view.x_train)  # never trained on
    assert train_view.n_train + val_view.n_test == data.n_train and np.array_equal(train_view.x_test, data.x_test)
    assert 0 < val_view.y_test.mean() < 1  # both classes present
    other = carve_validation(data, 0.15, seed=7)[1]
    assert not np.array_equal(other.x_test, val_view.x_test)  # the seed, not chance, fixes the rows


def test_validation_split_keeps_rare_positives_on_both_sides() -> None:
    y = np.r_[np.ones(4), np.zeros(196)]
    held = validation_indices(y, 0.15, 42, "a")
    assert 0 < y[held].sum() < 4 and len(held) == pytest.approx(30, abs=1)


def test_best_round_keeper_picks_the_best_pooled_validation_round_and_survives_a_resume(tmp_path: Path) -> None:
    rounds = {1: (0.60, 0.70), 2: (0.80, 0.78), 3: (0.75, 0.70)}  # (site a, site b) validation ROC AUC
    keeper = BestRoundKeeper(tmp_path, "binary")
    for r, (a, b) in rounds.items():
        sites = {"a": {"val_roc_auc": a, "n_val": 30}, "b": {"val_roc_auc": b, "n_val": 10}}
        keeper.offer(r, sites, [np.full(3, float(r))])
    assert keeper.round == 2 and keeper.value == pytest.approx((0.8 * 30 + 0.78 * 10) / 40)
    assert keeper.weights[0].tolist() == [2.0, 2.0, 2.0]
    resumed = BestRoundKeeper(tmp_path, "binary", resume=True)
    assert resumed.round == 2 and resumed.weights[0].tolist() == [2.0, 2.0, 2.0]
    regression = BestRoundKeeper(tmp_path / "r", "regression")  # RMSE: lower is better
    for r, v in ((1, 2.0), (2, 1.5), (3, 1.7)):
        regression.offer(r, {"a": {"val_rmse": v, "n_val": 5}}, [np.zeros(1)])
    assert regression.round == 2
    assert pooled_validation({"a": {"roc_auc": 0.9}}, "roc_auc") is None


def test_a_site_answers_the_label_round_with_its_train_fractions_only(root: Path, tmp_path: Path) -> None:
    from client.app import SiteClient
    from client.audit import AuditLog
    from shared.plan import PLAN_KEY, STAGE_KEY

    site = load_site(root / "studies" / "wdbc" / "sites" / "hospital_a.toml")
    study = parse_study(_study(select_best=True))
    plan = TrainingPlan.from_study(study, labels=["malignant"])
    client = SiteClient(site, audit=AuditLog(tmp_path / "a.audit.jsonl", site.name))
    arrays, weight, _ = client.fit([], {PLAN_KEY: plan.to_json(), STAGE_KEY: "labels"})
    train_view, _ = carve_validation(load_site_data(site, "binary"), plan.validation_fraction, plan.seed)
    assert weight == train_view.n_train  # validation rows are not training rows
    assert arrays[0] == pytest.approx([train_view.y_train.mean(), 1.0])
    regression = TrainingPlan.from_study(parse_study({**_study(), "study": {"name": "s", "task": "regression", "model": "mlp"}}))
    with pytest.raises(ConfigError, match="not a binary or multitask"):
        client.fit([], {PLAN_KEY: regression.to_json(), STAGE_KEY: "labels"})
    # a site whose approved study uses no pooled label counts never sends them
    no_counts = parse_study(_study(init_output_bias=False))
    strict = SiteClient(site, audit=AuditLog(tmp_path / "b.audit.jsonl", site.name), approved=no_counts)
    sent = TrainingPlan.from_study(no_counts, list(load_site_data(site, "binary").feature_names), ["malignant"])
    with pytest.raises(RequestRefused, match="uses no pooled label counts"):
        strict.fit([], {PLAN_KEY: sent.to_json(), STAGE_KEY: "labels"})
