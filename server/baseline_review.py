"""Is the final model better than a constant? The verdict per site and on the mean, in words.

Every site sends, beside the model's metrics, the constant predictor's on the same test
split (``baseline_<metric>``) and a bootstrap interval of its primary metric
(``ci_low_``/``ci_high_``/``ci_resamples_<metric>``). This module reads them off the
final round and says plainly where the model does not beat the constant, so a report
cannot show accuracy 0.965 on a model that learned nothing (or worse).
"""

from __future__ import annotations

from typing import Any

from shared.metrics import BASELINE, BOOTSTRAP_RESAMPLES, CI_HIGH, CI_LEVEL, CI_LOW, CI_RESAMPLES, PRIMARY

LABELS = {"roc_auc": "ROC AUC", "c_index": "C-index", "rmse": "RMSE", "loss": "test loss"}
MEAN = "mean over sites"

REFERENCE = {
    "binary": "the constant predictor: every probability = the site's training prevalence (ROC AUC 0.5, PR AUC = test prevalence)",
    "multitask": "the constant predictor: per task, every probability = the site's training prevalence (ROC AUC 0.5)",
    "regression": "the constant predictor: every prediction = the site's training mean",
    "survival": "the constant predictor: one risk for every patient (C-index 0.5)",
}
DP_REFERENCE = " Under DP the constant is fit on the test split instead (the training labels' mean would leave the site outside epsilon), a stricter reference."
MEAN_INTERVAL = "The mean over sites has no interval: averaging the ends of the sites' intervals gives no interval of the mean."


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.4g}"


def _better(model: float | None, baseline: float | None, higher: bool) -> bool | None:
    if model is None or baseline is None:
        return None
    return model > baseline if higher else model < baseline


def review(task: str, final: dict[str, Any], dp: bool = False) -> dict[str, Any]:
    """The baseline section of the report: per site and mean, model vs constant, the interval, and the flags.

    ``final`` is the report's ``final`` block (per-site metrics and their mean). A flag is
    raised wherever the model's primary metric is not better than the constant's, and for
    a binary task wherever its test loss is not below the constant's (a model can rank a
    little and still be worse calibrated than predicting the prevalence).
    """
    metric, higher = PRIMARY[task]
    label = LABELS.get(metric, metric)
    flags: list[str] = []

    def judge(name: str, row: dict[str, Any]) -> dict[str, Any]:
        model, baseline = row.get(metric), row.get(BASELINE + metric)
        entry: dict[str, Any] = {"model": model, "baseline": baseline, "better": _better(model, baseline, higher)}
        if entry["better"] is False:
            flags.append(f"{name}: {label} {_num(model)} is not better than the constant predictor's {_num(baseline)}")
        if task == "binary":
            loss, constant = row.get("loss"), row.get(BASELINE + "loss")
            entry |= {"loss": loss, "baseline_loss": constant, "loss_better": _better(loss, constant, False)}
            if entry["loss_better"] is False:
                flags.append(f"{name}: test loss {_num(loss)} is not below the constant predictor's {_num(constant)}")
        return entry

    sites, cautions = {}, []
    for name, row in final.get("sites", {}).items():
        entry = judge(name, row)
        used = row.get(CI_RESAMPLES + metric)
        entry |= {
            "n_test": row.get("n_test"),
            "ci_low": row.get(CI_LOW + metric),
            "ci_high": row.get(CI_HIGH + metric),
            "ci_resamples": None if used is None else int(used),
        }
        sites[name] = entry
        caution = _caution(name, label, entry)
        if caution:
            cautions.append(caution)
    mean = judge(MEAN, final.get("mean", {}))
    return {
        "metric": metric,
        "higher_is_better": higher,
        "reference": REFERENCE[task] + (DP_REFERENCE if dp else ""),
        "ci_level": CI_LEVEL,
        "ci_resamples": BOOTSTRAP_RESAMPLES,
        "ci_note": f"Percentile bootstrap at each site on its test split ({BOOTSTRAP_RESAMPLES} resamples; those where the metric is undefined are skipped, and below half defined there is no interval). {MEAN_INTERVAL}",
        "sites": sites,
        "mean": mean,
        "flags": flags,
        "cautions": cautions,
    }


def _caution(name: str, label: str, entry: dict[str, Any]) -> str | None:
    """Where the interval cannot show the uncertainty it should: none at all, or every resample alike.

    A perfect score (C-index 1.000 on 11 patients) stays perfect in every resample, so its
    percentile interval has no width; that is the split's smallness, not the model's certainty.
    """
    model, low, high, used = entry["model"], entry["ci_low"], entry["ci_high"], entry["ci_resamples"]
    rows = f" on {entry['n_test']} test rows" if entry.get("n_test") else ""
    if model is None or used is None:
        return None
    if low is None:
        return f"{name}: no interval for {label} {_num(model)}{rows}: only {used} of {BOOTSTRAP_RESAMPLES} resamples had it defined"
    if low == high:
        return f"{name}: every bootstrap resample gives {label} {_num(low)}{rows}: the bootstrap cannot size its uncertainty; with so few rows read it as unknown"
    return None


def interval_text(entry: dict[str, Any], resamples: int = BOOTSTRAP_RESAMPLES, digits: int = 3) -> str:
    """``[0.610, 0.930] (187/200)``: the interval, and how many resamples had the metric when not all; or why there is none."""
    used = entry.get("ci_resamples")
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return "n/a" if used is None else f"n/a ({used}/{resamples} defined)"
    return f"[{_num(entry['ci_low'], digits)}, {_num(entry['ci_high'], digits)}]" + ("" if used is None or used == resamples else f" ({used}/{resamples})")
