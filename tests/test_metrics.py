"""Metrics and the Cox loss against references computed here by hand or by a slow, obvious route."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.metrics import multitask_metrics, PRIMARY, binary_metrics, regression_metrics, survival_metrics, task_metrics
from shared.tasks import cox_partial_nll, loss_for, predict

# ----------------------------------------------------------------------------- references


def auc_by_pairs(y: np.ndarray, score: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = score[y == 1], score[y == 0]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def average_precision_by_steps(y: np.ndarray, score: np.ndarray) -> float:
    """AP = sum over distinct thresholds (high to low) of (recall step) * precision there."""
    total, previous_recall = 0.0, 0.0
    n_pos = int((y == 1).sum())
    for threshold in sorted(set(score.tolist()), reverse=True):
        chosen = score >= threshold
        tp = int(((y == 1) & chosen).sum())
        precision = tp / int(chosen.sum())
        recall = tp / n_pos
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Brute-force Harrell's C: pair (i, j) counts when t_i < t_j and i had the event."""
    concordant = comparable = 0.0
    for i in range(len(time)):
        if event[i] != 1:
            continue
        for j in range(len(time)):
            if time[i] < time[j]:
                comparable += 1
                if risk[i] > risk[j]:
                    concordant += 1
                elif risk[i] == risk[j]:
                    concordant += 0.5
    return concordant / comparable


def breslow_nll(log_hazard: list[float], time: list[float], event: list[int]) -> float:
    """Per-event Breslow negative partial log-likelihood, averaged over events."""
    terms = []
    for i in range(len(time)):
        if event[i]:
            risk_set = [math.exp(log_hazard[j]) for j in range(len(time)) if time[j] >= time[i]]
            terms.append(log_hazard[i] - math.log(sum(risk_set)))
    return -sum(terms) / len(terms)


# ----------------------------------------------------------------------------- binary

Y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
PROB = np.array([0.9, 0.4, 0.6, 0.2, 0.55, 0.1, 0.5, 0.5])
# at threshold 0.5 (>=): predictions 1 0 1 0 1 0 1 1 -> TP 3, FN 1, TN 2, FP 2


def test_binary_metrics_hand_example():
    m = binary_metrics(Y, PROB)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    # 16 positive/negative pairs: 12 won, 1 tie (0.5 vs 0.5), 3 lost.
    assert auc_by_pairs(Y, PROB) == pytest.approx(12.5 / 16)
    assert m["roc_auc"] == pytest.approx(auc_by_pairs(Y, PROB))
    assert m["pr_auc"] == pytest.approx(average_precision_by_steps(Y, PROB))
    assert all(isinstance(v, float) for v in m.values())


def test_binary_metrics_threshold():
    m = binary_metrics(Y, PROB, threshold=0.58)
    # predictions 1 0 1 0 0 0 0 0 -> TP 2, FN 2, TN 4, FP 0
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["roc_auc"] == pytest.approx(12.5 / 16)  # the threshold does not move the AUC


def test_binary_metrics_random_against_pair_count():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    prob = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1), 2)  # rounding makes ties
    m = binary_metrics(y, prob)
    assert m["roc_auc"] == pytest.approx(auc_by_pairs(y, prob))
    assert m["pr_auc"] == pytest.approx(average_precision_by_steps(y, prob))
    pred = prob >= 0.5
    assert m["accuracy"] == pytest.approx(np.mean(pred == (y == 1)))


@pytest.mark.parametrize("label", [0, 1])
def test_roc_auc_none_with_one_class(label):
    y = np.full(5, label)
    m = binary_metrics(y, np.array([0.1, 0.7, 0.4, 0.9, 0.5]))  # 0.7, 0.9 and 0.5 are called positive
    assert m["roc_auc"] is None and m["pr_auc"] is None
    if label == 0:
        assert m["accuracy"] == pytest.approx(2 / 5)
        assert m["sensitivity"] is None and m["specificity"] == pytest.approx(2 / 5)
    else:
        assert m["accuracy"] == pytest.approx(3 / 5)
        assert m["specificity"] is None and m["sensitivity"] == pytest.approx(3 / 5)


def test_perfect_and_inverted_scores():
    y = np.array([0, 0, 1, 1])
    assert binary_metrics(y, np.array([0.1, 0.2, 0.8, 0.9]))["roc_auc"] == pytest.approx(1.0)
    assert binary_metrics(y, np.array([0.9, 0.8, 0.2, 0.1]))["roc_auc"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- regression


def test_regression_metrics_against_numpy():
    rng = np.random.default_rng(1)
    y = rng.normal(size=50)
    pred = 0.7 * y + rng.normal(scale=0.5, size=50)
    m = regression_metrics(y, pred)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - pred) ** 2)))
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - pred)))
    assert m["pearson_r"] == pytest.approx(np.corrcoef(y, pred)[0, 1])


def test_regression_metrics_hand_example():
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert m["rmse"] == pytest.approx(math.sqrt(4 / 3))
    assert m["mae"] == pytest.approx(2 / 3)
    assert m["pearson_r"] == pytest.approx(np.corrcoef([1, 2, 3], [1, 2, 5])[0, 1])


def test_pearson_none_when_constant():
    assert regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])["pearson_r"] is None
    assert regression_metrics([4.0, 4.0, 4.0], [1.0, 2.0, 3.0])["pearson_r"] is None
    single = regression_metrics([1.0], [3.0])
    assert single["pearson_r"] is None and single["rmse"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- survival


def test_c_index_against_brute_force():
    rng = np.random.default_rng(7)
    n = 80
    time = rng.exponential(500, n)  # continuous: no tied times
    event = rng.integers(0, 2, n)
    risk = np.round(rng.normal(size=n), 1)  # rounded: plenty of tied risks
    assert len(np.unique(time)) == n and len(np.unique(risk)) < n
    assert survival_metrics(time, event, risk)["c_index"] == pytest.approx(harrell_c(time, event, risk))


def test_c_index_informative_risk():
    rng = np.random.default_rng(11)
    n = 60
    risk = rng.normal(size=n)
    time = np.exp(-risk) * 100 + rng.uniform(0, 1e-3, n)  # higher risk -> earlier event
    event = np.ones(n)
    event[::4] = 0
    c = survival_metrics(time, event, risk)["c_index"]
    assert c == pytest.approx(1.0)
    assert c == pytest.approx(harrell_c(time, event, risk))
    assert survival_metrics(time, event, -risk)["c_index"] == pytest.approx(0.0)


def test_c_index_small_hand_example():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 0, 1, 0])
    risk = np.array([0.9, 0.8, 0.1, 0.1])
    # comparable: (0,1) (0,2) (0,3) (2,3) -> concordant 1 + 1 + 1 + tie 0.5
    assert survival_metrics(time, event, risk)["c_index"] == pytest.approx(3.5 / 4)


def test_c_index_none_without_events_or_pairs():
    assert survival_metrics([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3])["c_index"] is None
    assert survival_metrics([1.0], [1], [0.1])["c_index"] is None


def test_task_metrics_dispatch():
    target = np.column_stack([[5.0, 1.0, 3.0], [1, 1, 0]])
    assert task_metrics("survival", target, np.array([0.0, 2.0, 1.0])) == survival_metrics(
        target[:, 0], target[:, 1], np.array([0.0, 2.0, 1.0])
    )
    assert task_metrics("binary", Y, PROB) == binary_metrics(Y, PROB)
    assert task_metrics("regression", np.array([1.0, 2.0]), np.array([1.5, 2.5]))["mae"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        task_metrics("ranking", Y, PROB)
    multi_target = np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    multi_score = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.3], [0.2, 0.6]])
    assert task_metrics("multitask", multi_target, multi_score) == multitask_metrics(multi_target, multi_score)
    assert set(PRIMARY) == {"binary", "regression", "survival", "multitask"}


# ----------------------------------------------------------------------------- Cox loss


def test_cox_partial_nll_against_breslow_loop_with_ties():
    time = [5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 8.0, 10.0, 2.0]
    event = [1, 1, 1, 0, 1, 0, 1, 0, 0]
    log_hazard = [0.3, -1.2, 0.8, 0.1, 1.5, -0.4, 0.0, 2.0, -0.7]
    target = torch.tensor(list(zip(time, event)), dtype=torch.float32)
    loss = cox_partial_nll(torch.tensor(log_hazard), target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(breslow_nll(log_hazard, time, event), rel=1e-5)


def test_cox_partial_nll_random_batches():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        n = 25
        time = torch.randint(1, 8, (n,), generator=gen).float()  # small range: many ties
        event = torch.randint(0, 2, (n,), generator=gen).float()
        event[0] = 1.0
        log_hazard = torch.randn(n, generator=gen)
        loss = cox_partial_nll(log_hazard, torch.stack([time, event], dim=1))
        expected = breslow_nll(log_hazard.tolist(), time.tolist(), [int(e) for e in event.tolist()])
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cox_partial_nll_gradient_matches_finite_difference():
    time = torch.tensor([4.0, 2.0, 2.0, 7.0, 1.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    target = torch.stack([time, event], dim=1)
    h = torch.tensor([0.2, -0.5, 0.4, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    cox_partial_nll(h, target.double()).backward()
    eps = 1e-6
    for k in range(5):
        up, down = h.detach().clone().tolist(), h.detach().clone().tolist()
        up[k] += eps
        down[k] -= eps
        numeric = (breslow_nll(up, time.tolist(), event.int().tolist()) - breslow_nll(down, time.tolist(), event.int().tolist())) / (2 * eps)
        assert h.grad[k].item() == pytest.approx(numeric, abs=1e-6)


def test_cox_partial_nll_zero_without_events():
    h = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    target = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    loss = cox_partial_nll(h, target)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, so a batch without events does not break training
    assert torch.all(h.grad == 0)


def test_cox_partial_nll_shift_invariant():
    target = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, 0.0], [5.0, 1.0]])
    h = torch.tensor([0.1, 0.4, -0.3, 0.9])
    assert cox_partial_nll(h + 7.0, target).item() == pytest.approx(cox_partial_nll(h, target).item(), rel=1e-5)


def test_loss_and_predict_per_task():
    assert loss_for("survival") is cox_partial_nll
    out = torch.tensor([0.0, 2.0])
    assert torch.allclose(predict("binary", out), torch.sigmoid(out))
    assert torch.equal(predict("survival", out), out)
    with pytest.raises(ValueError):
        loss_for("ranking")
