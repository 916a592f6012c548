"""The constant predictor's metrics and the bootstrap interval, against hand values and the slow, obvious route."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index
from sklearn import metrics as skm

from shared.metrics import (
    BOOTSTRAP_RESAMPLES,
    baseline_metrics,
    binary_metrics,
    bootstrap_interval,
    interval_metrics,
    multitask_metrics,
    weighted_c_index,
    weighted_roc_auc,
    withhold_small_sample,
)
from shared.tasks import loss_for

# ----------------------------------------------------------------------------- baselines


def test_binary_baseline_hand_example() -> None:
    y_train = np.array([1, 0, 0, 0])  # prevalence 0.25: the constant predicts 0.25 and the majority class 0
    y_test = np.array([1, 1, 0, 0, 0])  # prevalence 0.4
    b = baseline_metrics("binary", y_train, y_test)
    assert b["baseline_loss"] == pytest.approx(-(0.4 * math.log(0.25) + 0.6 * math.log(0.75)))
    assert b["baseline_roc_auc"] == 0.5
    assert b["baseline_pr_auc"] == pytest.approx(0.4)
    assert b["baseline_accuracy"] == pytest.approx(0.6)
    # the same constant scored by the model's own metrics and loss
    constant = np.full(5, 0.25)
    assert binary_metrics(y_test, constant)["roc_auc"] == 0.5
    assert binary_metrics(y_test, constant)["pr_auc"] == pytest.approx(b["baseline_pr_auc"])
    assert binary_metrics(y_test, constant)["accuracy"] == pytest.approx(b["baseline_accuracy"])
    logit = torch.full((5,), math.log(0.25 / 0.75))
    assert float(loss_for("binary")(logit, torch.tensor(y_test, dtype=torch.float32))) == pytest.approx(b["baseline_loss"], rel=1e-6)


def test_binary_baseline_majority_and_one_class() -> None:
    assert baseline_metrics("binary", np.array([1, 1, 0]), np.array([1, 0, 0, 0]))["baseline_accuracy"] == pytest.approx(0.25)  # predicts 1
    one_class = baseline_metrics("binary", np.array([1, 0]), np.array([0, 0, 0]))
    assert one_class["baseline_roc_auc"] is None and one_class["baseline_pr_auc"] is None  # undefined, as the model's
    assert one_class["baseline_loss"] == pytest.approx(math.log(2))


def test_regression_baseline_is_the_training_mean() -> None:
    b = baseline_metrics("regression", np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0]))  # mean 2: errors 0 and 2
    assert b == pytest.approx({"baseline_loss": 2.0, "baseline_rmse": math.sqrt(2.0), "baseline_mae": 1.0})


def test_survival_baseline() -> None:
    assert baseline_metrics("survival", np.zeros((3, 2)), np.array([[1.0, 1.0], [2.0, 0.0]])) == {"baseline_c_index": 0.5}
    assert baseline_metrics("survival", np.zeros((3, 2)), np.array([[1.0, 0.0], [2.0, 0.0]])) == {"baseline_c_index": None}


def test_multitask_baseline_per_task_over_known_labels() -> None:
    nan = np.nan
    y_train = np.array([[1, 0], [0, nan], [0, 1], [1, 1]])  # prevalences 0.5 and 2/3
    y_test = np.array([[1, 1], [0, nan], [0, 1], [0, 1]])  # task a: 1 of 4; task b: all 1 (not scored)
    b = baseline_metrics("multitask", y_train, y_test, ["a", "b"])
    assert b["baseline_roc_auc[a]"] == 0.5 and b["baseline_pr_auc[a]"] == pytest.approx(0.25)
    assert b["baseline_roc_auc[b]"] is None and b["baseline_pr_auc[b]"] is None
    assert b["baseline_roc_auc"] == 0.5 and b["baseline_pr_auc"] == pytest.approx(0.25)
    # the masked training loss of the constant, as training computes it
    logits = torch.tensor(np.log([[0.5 / 0.5, (2 / 3) / (1 / 3)]] * 4), dtype=torch.float32)
    assert float(loss_for("multitask")(logits, torch.tensor(y_test, dtype=torch.float32))) == pytest.approx(b["baseline_loss"], rel=1e-6)
    # and the model's own metrics agree on a constant
    assert multitask_metrics(y_test, np.tile([0.5, 2 / 3], (4, 1)), ["a", "b"])["pr_auc[a]"] == pytest.approx(0.25)


def test_small_test_split_withholds_baselines_that_are_counts() -> None:
    released = {
        "roc_auc": 0.7, "baseline_roc_auc": 0.5, "baseline_pr_auc": 0.3, "baseline_pr_auc[a]": 0.3, "pr_auc[a]": 0.6,
        "baseline_loss": 0.6, "baseline_accuracy": 0.7, "baseline_rmse": 2.0, "ci_low_rmse": 1.0, "ci_low_roc_auc": 0.4,
        "ci_high_roc_auc": 0.9, "ci_resamples_roc_auc": 180.0,
    }  # fmt: skip
    small = withhold_small_sample(released, 11)
    for key in ("baseline_pr_auc", "baseline_pr_auc[a]", "baseline_loss", "baseline_accuracy", "baseline_rmse", "ci_low_rmse"):
        assert small[key] is None, key
    for key in ("roc_auc", "baseline_roc_auc", "pr_auc[a]", "ci_low_roc_auc", "ci_high_roc_auc", "ci_resamples_roc_auc"):
        assert small[key] == released[key], key  # the interval of a small site is what must show
    assert withhold_small_sample(released, 20) == released


# ----------------------------------------------------------------------------- bootstrap


def _resampled(seed: int, n: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """The row indices bootstrap_interval draws: one Generator, one (resamples x n) draw."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentile(values: list[float]) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def test_weighted_auc_and_c_index_equal_the_metrics_of_resampled_rows() -> None:
    rng = np.random.default_rng(1)
    y, score = rng.integers(0, 2, 30), np.round(rng.random(30), 1)  # rounded: many tied scores
    time, event = np.round(rng.random(30) * 5), rng.integers(0, 2, 30)  # tied times, censored and not
    idx = rng.integers(0, 30, size=(40, 30))
    counts = np.stack([np.bincount(i, minlength=30) for i in idx]).astype(float)
    auc = [skm.roc_auc_score(y[i], score[i]) if len(set(y[i])) == 2 else np.nan for i in idx]
    np.testing.assert_allclose(weighted_roc_auc(y, score, counts), auc, atol=1e-12)
    np.testing.assert_allclose(weighted_c_index(time, event, score, counts), [concordance_index(time[i], -score[i], event[i]) for i in idx], atol=1e-12)


def test_bootstrap_interval_is_the_percentile_of_resampled_metrics_and_reproducible() -> None:
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1])
    score = np.array([0.9, 0.2, 0.7, 0.4, 0.5, 0.1, 0.8, 0.3, 0.35, 0.6, 0.2, 0.75])
    expected = [skm.roc_auc_score(y[i], score[i]) for i in _resampled(7, len(y)) if len(set(y[i])) == 2]
    interval = bootstrap_interval("binary", y, score, seed=7)
    assert (interval.low, interval.high) == pytest.approx(_percentile(expected))
    assert interval.used == len(expected) and interval.resamples == BOOTSTRAP_RESAMPLES >= 200
    assert bootstrap_interval("binary", y, score, seed=7) == interval  # seeded: a rerun reports the same
    assert bootstrap_interval("binary", y, score, seed=8) != interval
    assert interval.low <= binary_metrics(y, score)["roc_auc"] <= interval.high


def test_bootstrap_skips_resamples_where_the_metric_is_undefined() -> None:
    y = np.array([1, 1] + [0] * 10)  # 2 positives in 12: about (10/12)^12 = 11% of resamples hold none
    score = np.linspace(0.9, 0.1, 12)
    defined = [i for i in _resampled(3, 12) if len(set(y[i])) == 2]
    interval = bootstrap_interval("binary", y, score, seed=3)
    assert interval.used == len(defined) and 150 < interval.used < BOOTSTRAP_RESAMPLES
    assert (interval.low, interval.high) == pytest.approx(_percentile([skm.roc_auc_score(y[i], score[i]) for i in defined]))
    # one comparable pair in 12 patients (the event, and one patient censored later): a resample
    # needs both, which fewer than half hold (about 0.65^2): no interval, and the count says why
    time = np.array([5.0, 6.0] + [1.0] * 10)
    event = np.array([1] + [0] * 11)
    rare = bootstrap_interval("survival", np.c_[time, event], score, seed=3)
    assert rare.low is None and rare.high is None and 0 < rare.used < BOOTSTRAP_RESAMPLES / 2
    assert rare.used == sum(1 for i in _resampled(3, 12) if {0, 1} <= set(i))
    assert interval_metrics("survival", rare) == {"ci_low_c_index": None, "ci_high_c_index": None, "ci_resamples_c_index": float(rare.used)}


def test_bootstrap_interval_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        time, event = rng.exponential(1.0, n), rng.integers(0, 2, n)
        risk = -np.log(time) + rng.normal(0, 1.0, n)  # informative, not perfect
        interval = bootstrap_interval("survival", np.c_[time, event], risk, seed=1)
        return interval.high - interval.low

    small, large = width(11), width(400)
    assert large < small / 3


def test_bootstrap_interval_of_regression_and_multitask() -> None:
    rng = np.random.default_rng(2)
    y, pred = rng.normal(size=25), rng.normal(size=25)
    rmse = [math.sqrt(np.mean((y[i] - pred[i]) ** 2)) for i in _resampled(5, 25)]
    interval = bootstrap_interval("regression", y, pred, seed=5)
    assert (interval.low, interval.high) == pytest.approx(_percentile(rmse)) and interval.used == BOOTSTRAP_RESAMPLES
    target = rng.integers(0, 2, (25, 2)).astype(float)
    target[::4, 1] = np.nan
    prob = rng.random((25, 2))
    means = [m for i in _resampled(5, 25) if (m := multitask_metrics(target[i], prob[i])["roc_auc"]) is not None]
    interval = bootstrap_interval("multitask", target, prob, seed=5)
    assert (interval.low, interval.high) == pytest.approx(_percentile(means)) and interval.used == len(means)
