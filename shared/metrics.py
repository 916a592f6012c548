"""Evaluation metrics people in the field expect, from scikit-learn, SciPy and lifelines.

Each function returns plain floats (``None`` where the metric is undefined on
the data, e.g. ROC AUC on a test split with one class) so results go straight
into JSON and Flower metric records.
"""

from __future__ import annotations

import math

import numpy as np
from lifelines.utils import concordance_index
from scipy.stats import pearsonr
from sklearn import metrics as skm

# Below this many test rows a site withholds the metrics that are counts in disguise:
# accuracy, sensitivity and specificity of a small split pin down individual labels, and the
# test loss, RMSE and MAE under weights that predict a constant give the labels' count or mean.
MIN_TEST_FOR_COUNTS = 20
COUNT_METRICS = ("accuracy", "sensitivity", "specificity", "rmse", "mae", "loss")
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


def withhold_small_sample(metrics: dict[str, float | None], n_test: int) -> dict[str, float | None]:
    """The metrics a site releases: counts in disguise are withheld (None) on a test split below MIN_TEST_FOR_COUNTS."""
    if n_test >= MIN_TEST_FOR_COUNTS:
        return dict(metrics)
    return {k: (None if k in COUNT_METRICS else v) for k, v in metrics.items()}
