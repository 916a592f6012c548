"""Evaluation metrics people in the field expect, from scikit-learn, SciPy and lifelines.

Each function returns plain floats (``None`` where the metric is undefined on
the data, e.g. ROC AUC on a test split with one class) so results go straight
into JSON and Flower metric records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from lifelines.utils import concordance_index
from scipy.stats import pearsonr
from sklearn import metrics as skm

# Below this many test rows a site withholds the metrics that are counts in disguise:
# accuracy, sensitivity and specificity of a small split pin down individual labels, and the
# test loss, RMSE and MAE under weights that predict a constant give the labels' count or mean.
# So do their baselines (``baseline_<metric>``, ``ci_*_<metric>``), and the constant
# predictor's PR AUC, which is the test split's prevalence.
MIN_TEST_FOR_COUNTS = 20
COUNT_METRICS = ("accuracy", "sensitivity", "specificity", "rmse", "mae", "loss")
COUNT_BASELINES = ("pr_auc",)  # baseline_pr_auc (and per task) = the test prevalence

# What a site sends beside a metric: the constant predictor's value, and a bootstrap interval.
BASELINE = "baseline_"
CI_LOW, CI_HIGH, CI_RESAMPLES = "ci_low_", "ci_high_", "ci_resamples_"
INTERVAL_PREFIXES = (CI_LOW, CI_HIGH, CI_RESAMPLES)
BOOTSTRAP_RESAMPLES = 200
CI_LEVEL = 0.95
LOSS_WITHHELD = "loss_withheld"  # evaluation metric: the site sent no test loss (Flower's loss field is a placeholder)

# The one number each task is judged by, and whether higher is better.
PRIMARY = {"binary": ("roc_auc", True), "regression": ("rmse", False), "survival": ("c_index", True), "multitask": ("roc_auc", True)}


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float | None]:
    """Accuracy, ROC AUC, PR AUC, sensitivity and specificity at ``threshold``."""
    y_true = np.asarray(y_true).astype(int)
    pred = (np.asarray(prob) >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "roc_auc": float(skm.roc_auc_score(y_true, prob)) if both else None,
        "pr_auc": float(skm.average_precision_score(y_true, prob)) if both else None,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | None]:
    """RMSE, MAE and Pearson's r (undefined when either side is constant)."""
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    r = None
    if len(y_true) > 1 and np.std(y_true) > 0 and np.std(y_pred) > 0:
        r = float(pearsonr(y_true, y_pred).statistic)
    return {
        "rmse": float(math.sqrt(skm.mean_squared_error(y_true, y_pred))),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "pearson_r": r,
    }


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, float | None]:
    """Harrell's C-index (lifelines); higher risk should mean earlier events."""
    time, event, risk = np.asarray(time, float), np.asarray(event, float), np.asarray(risk, float)
    if event.sum() == 0 or len(time) < 2:
        return {"c_index": None}
    # lifelines expects scores that grow with survival time: negate the risk.
    return {"c_index": float(concordance_index(time, -risk, event))}


def multitask_metrics(y_true: np.ndarray, prob: np.ndarray, names: list[str] | None = None) -> dict[str, float | None]:
    """ROC AUC and PR AUC per task over its known labels (NaN = unknown), and their means.

    The means run over the tasks where the metric is defined (both classes present),
    as in MoleculeNet; ``tasks_scored`` says how many that was.
    """
    y_true, prob = np.asarray(y_true, dtype=float), np.asarray(prob, dtype=float)
    names = names or [f"task{i}" for i in range(y_true.shape[1])]
    out: dict[str, float | None] = {}
    rocs, prs = [], []
    for j, name in enumerate(names):
        known = ~np.isnan(y_true[:, j])
        y, p = y_true[known, j].astype(int), prob[known, j]
        roc = pr = None
        if len(np.unique(y)) == 2:
            roc, pr = float(skm.roc_auc_score(y, p)), float(skm.average_precision_score(y, p))
            rocs.append(roc)
            prs.append(pr)
        out[f"roc_auc[{name}]"], out[f"pr_auc[{name}]"] = roc, pr
    return {
        "roc_auc": float(np.mean(rocs)) if rocs else None,
        "pr_auc": float(np.mean(prs)) if prs else None,
        "tasks_scored": float(len(rocs)),
        **out,
    }


def task_metrics(task: str, target: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    """Dispatch on the task; ``target`` is ``(time, event)`` columns for survival."""
    if task == "binary":
        return binary_metrics(target, score)
    if task == "regression":
        return regression_metrics(target, score)
    if task == "survival":
        return survival_metrics(target[:, 0], target[:, 1], score)
    if task == "multitask":
        return multitask_metrics(target, score)
    raise ValueError(f"unknown task {task!r}")


def base_metric(key: str) -> str:
    """The metric a released key is about: ``baseline_loss`` -> ``loss``, ``ci_low_rmse`` -> ``rmse``."""
    for prefix in (BASELINE, *INTERVAL_PREFIXES):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _is_count(key: str) -> bool:
    base = base_metric(key)
    if base in COUNT_METRICS:
        return True
    return key.startswith(BASELINE) and base.split("[", 1)[0] in COUNT_BASELINES


def withhold_small_sample(metrics: dict[str, float | None], n_test: int) -> dict[str, float | None]:
    """The metrics a site releases: counts in disguise are withheld (None) on a test split below MIN_TEST_FOR_COUNTS."""
    if n_test >= MIN_TEST_FOR_COUNTS:
        return dict(metrics)
    return {k: (None if _is_count(k) else v) for k, v in metrics.items()}


# --------------------------------------------------------------------------- baselines


def _bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of probability ``p`` (kept off 0 and 1) against labels ``y``."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def baseline_metrics(task: str, y_train: np.ndarray, y_test: np.ndarray, names: list[str] | None = None) -> dict[str, float | None]:
    """What the constant predictor fit on ``y_train`` scores on ``y_test``: the reference a model must beat.

    binary: the training prevalence as every probability (its test loss; ROC AUC 0.5;
    PR AUC = test prevalence; accuracy of predicting the training majority); multitask:
    the same per task (and the means over the tasks scored); regression: the training
    mean (RMSE, MAE, MSE loss); survival: one risk for all (C-index 0.5). Keys are
    ``baseline_<metric>``; a value is None where the model's own metric is undefined.
    """
    if task == "binary":
        y, p = np.asarray(y_test, dtype=float), float(np.mean(y_train)) if len(y_train) else 0.5
        both = len(np.unique(y)) == 2
        q = float(y.mean()) if len(y) else None
        return {
            "baseline_loss": float(_bce(np.full(len(y), p), y).mean()) if len(y) else None,
            "baseline_roc_auc": 0.5 if both else None,
            "baseline_pr_auc": q if both else None,
            "baseline_accuracy": None if q is None else (q if p >= 0.5 else 1 - q),
        }
    if task == "regression":
        y, m = np.asarray(y_test, dtype=float), float(np.mean(y_train))
        if not len(y):
            return {"baseline_loss": None, "baseline_rmse": None, "baseline_mae": None}
        mse = float(np.mean((y - m) ** 2))
        return {"baseline_loss": mse, "baseline_rmse": math.sqrt(mse), "baseline_mae": float(np.mean(np.abs(y - m)))}
    if task == "survival":
        event = np.asarray(y_test, dtype=float)[:, 1] if len(y_test) else np.zeros(0)
        return {"baseline_c_index": 0.5 if event.sum() > 0 and len(event) >= 2 else None}
    if task == "multitask":
        return _multitask_baseline(np.asarray(y_train, dtype=float), np.asarray(y_test, dtype=float), names)
    raise ValueError(f"unknown task {task!r}")


def _multitask_baseline(y_train: np.ndarray, y_test: np.ndarray, names: list[str] | None) -> dict[str, float | None]:
    names = names or [f"task{i}" for i in range(y_test.shape[1])]
    known_train, known = ~np.isnan(y_train), ~np.isnan(y_test)
    prevalence = np.array([np.mean(y_train[known_train[:, j], j]) if known_train[:, j].any() else 0.5 for j in range(y_test.shape[1])])
    # the masked loss of training: per molecule, the mean over its known tasks (0 when none)
    terms = np.where(known, _bce(np.broadcast_to(prevalence, y_test.shape), np.nan_to_num(y_test)), 0.0)
    per_row = terms.sum(axis=1) / np.maximum(known.sum(axis=1), 1)
    out: dict[str, float | None] = {"baseline_loss": float(per_row.mean()) if len(per_row) else None}
    scored: list[float] = []
    for j, name in enumerate(names):
        y = y_test[known[:, j], j]
        both = len(np.unique(y)) == 2
        out[f"baseline_roc_auc[{name}]"] = 0.5 if both else None
        out[f"baseline_pr_auc[{name}]"] = float(y.mean()) if both else None
        if both:
            scored.append(float(y.mean()))
    out["baseline_roc_auc"] = 0.5 if scored else None
    out["baseline_pr_auc"] = float(np.mean(scored)) if scored else None
    return out


# --------------------------------------------------------------------------- bootstrap intervals


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval; ``used`` of ``resamples`` had the metric defined."""

    low: float | None
    high: float | None
    used: int
    resamples: int


def bootstrap_interval(
    task: str, target: np.ndarray, score: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = CI_LEVEL,
) -> Interval:  # fmt: skip
    """Percentile bootstrap interval of the task's primary metric on one test split.

    Each resample draws the rows with replacement from a seeded numpy Generator (so a
    rerun gives the same interval) and is scored as a weighting of the rows by how often
    each was drawn, so the 200 resamples cost a few array operations, not 200 metric calls.
    Resamples where the metric is undefined (one class, no comparable pair) are skipped;
    with fewer than half defined there is no interval (the split is too small to say).
    """
    target, score = np.asarray(target, dtype=float), np.asarray(score, dtype=float)
    n = len(target)
    if n < 2:
        return Interval(None, None, 0, resamples)
    rng = np.random.default_rng(seed)
    values: list[np.ndarray] = []
    chunk = max(1, min(resamples, 2_000_000 // n))  # bound memory on large splits
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(float)
        values.append(_weighted_primary(task, target, score, counts))
    stats = np.concatenate(values)
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0 or 2 * len(stats) < resamples:
        return Interval(None, None, len(stats), resamples)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(low), float(high), len(stats), resamples)


def interval_metrics(task: str, interval: Interval) -> dict[str, float | None]:
    """The interval as evaluation metrics: ``ci_low_<primary>``, ``ci_high_<primary>``, ``ci_resamples_<primary>``."""
    name = PRIMARY[task][0]
    return {f"{CI_LOW}{name}": interval.low, f"{CI_HIGH}{name}": interval.high, f"{CI_RESAMPLES}{name}": float(interval.used)}


def _weighted_primary(task: str, target: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The primary metric of each resample, the rows weighted by ``counts`` (resamples x rows); NaN = undefined."""
    if task == "binary":
        return weighted_roc_auc(target, score, counts)
    if task == "multitask":
        per_task = []
        for j in range(target.shape[1]):
            known = ~np.isnan(target[:, j])
            per_task.append(weighted_roc_auc(target[known, j], score[known, j], counts[:, known]))
        stacked = np.stack(per_task, axis=1)
        scored = np.isfinite(stacked).sum(axis=1)
        return np.where(scored > 0, np.nansum(stacked, axis=1) / np.maximum(scored, 1), np.nan)
    if task == "regression":
        return np.sqrt((counts * (target - score) ** 2).sum(axis=1) / counts.sum(axis=1))
    if task == "survival":
        return weighted_c_index(target[:, 0], target[:, 1], score, counts)
    raise ValueError(f"unknown task {task!r}")


def weighted_roc_auc(y: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC with row weights, one per row of ``counts``: P(positive outscores negative), ties one half."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(score, kind="stable")
    s, y, w = score[order], y[order], counts[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, dtype=int)
    if len(starts) == 0:
        return np.full(len(counts), np.nan)
    pos = np.add.reduceat(w * y, starts, axis=1)  # weight of positives at each distinct score
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each score
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def weighted_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Harrell's C (as lifelines counts it) with row weights, one per row of ``counts``.

    Pair (i, j) is comparable when i had the event and left first (or at the same time
    as a censored j); it is concordant when i's risk is higher, one half on a tie.
    """
    time, event, risk = np.asarray(time, float), np.asarray(event, float) > 0, np.asarray(risk, float)
    wins, pairs = np.zeros(len(counts)), np.zeros(len(counts))
    block = max(1, 4_000_000 // max(len(time), 1))  # rows of the pair matrix at a time
    for start in range(0, len(time), block):
        i = slice(start, start + block)
        comparable = event[i, None] & ((time[i, None] < time[None, :]) | ((time[i, None] == time[None, :]) & ~event[None, :]))
        concordant = comparable * np.where(risk[i, None] > risk[None, :], 1.0, np.where(risk[i, None] == risk[None, :], 0.5, 0.0))
        wins += ((counts @ concordant.T) * counts[:, i]).sum(axis=1)
        pairs += ((counts @ comparable.T.astype(float)) * counts[:, i]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)
