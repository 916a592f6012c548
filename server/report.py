"""The study report: ``report.json`` for machines, ``report.html`` (with plots) for people."""

from __future__ import annotations

import re

import html
import io
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # site names are text, never TeX
import matplotlib.pyplot as plt  # noqa: E402

import shared  # noqa: E402
from server.baseline_review import MEAN, interval_text, review  # noqa: E402
from server.recorder import RunRecorder, SiteInfo  # noqa: E402
from shared.config import StudyConfig  # noqa: E402
from shared.metrics import PRIMARY  # noqa: E402
from shared.plan import TrainingPlan  # noqa: E402

METRIC_LABELS = {
    "c_index": "C-index",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC",
    "accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "rmse": "RMSE",
    "mae": "MAE",
    "pearson_r": "Pearson r",
    "loss": "test loss",
}


def build_report(study: StudyConfig, plan: TrainingPlan, sites: list[SiteInfo], recorder: RunRecorder, *, status: str, error: str | None, has_model: bool) -> dict[str, Any]:
    """Everything known about the run as one JSON-ready dict."""
    last = recorder.final_evaluation()  # the selected round's with select_best, else the last round's
    counts = {s.name: {"n_train": s.n_train, "n_test": s.n_test} for s in sites}
    final_sites = {name: {**counts.get(name, {}), **{k: v for k, v in m.items() if k != "n"}} for name, m in last["sites"].items()}
    study_block = {k: v for k, v in asdict(study).items() if k not in ("sites", "path", "model_options", "categories")}
    study_block["secure"]["update_bound"] = study.update_bound  # the effective (possibly derived) bound
    study_block.update(
        sites=[s.name for s in study.sites],
        model_options=asdict(study.model_options),
        file=str(study.path) if study.path else None,
    )
    final = {"sites": final_sites, "mean": last.get("mean", {}), "weighted": last.get("weighted", {})}
    return {
        "fedhelix_version": shared.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": status,
        "error": error,
        "study": study_block,
        "secure_aggregation": study.secure.enabled,
        "secure_aggregation_params": asdict(recorder.secure) if recorder.secure is not None else None,
        "primary_metric": PRIMARY[study.task][0],
        "sites": {s.name: {"n_train": s.n_train, "n_test": s.n_test, "warnings": s.warnings} for s in sites},
        "features": plan.features,
        "rounds": recorder.rounds,
        "failures": recorder.failures,
        "final": final,
        "selected_round": recorder.selected_round,  # select_best: the round whose model is model.pt and "final"
        "baseline": review(study.task, final, study.privacy.dp),
        "personalization": personalization_summary(study, final),
        "privacy": privacy_summary(study, recorder),
        "model": "model.pt" if has_model else None,
        "timing": {"wall_s": round(time.time() - recorder.started, 2)},
    }


PERSONALIZED = "personalized_"


def personalization_summary(study: StudyConfig, final: dict[str, Any]) -> dict[str, Any] | None:
    """Global beside personalized metrics per site (primary metric and test loss), or None without [personalization].

    Sites send ``personalized_<metric>`` beside the global model's ``<metric>``; the personal
    parameters themselves never left the sites.
    """
    if study.personalization is None:
        return None
    primary = PRIMARY[study.task][0]
    pairs = [(m, f"{PERSONALIZED}{m}") for m in (primary, "loss")]
    rows = {name: {f"global_{m}": s.get(m) for m, _ in pairs} | {p: s.get(p) for _, p in pairs} for name, s in final["sites"].items()}
    mean = {f"global_{m}": final["mean"].get(m) for m, _ in pairs} | {p: final["mean"].get(p) for _, p in pairs}
    return {"method": study.personalization.method, "metric": primary, "higher_is_better": PRIMARY[study.task][1], "sites": rows, "mean": mean}


def _personalization_section(report: dict[str, Any]) -> str:
    block = report.get("personalization")
    if not block:
        return "<p>No [personalization] in this study: every site uses the global model.</p>"
    metric = block["metric"]
    label = METRIC_LABELS.get(metric, metric)
    header = ["site", f"global {label}", f"personalized {label}", "global test loss", "personalized test loss"]
    keys = [f"global_{metric}", f"{PERSONALIZED}{metric}", "global_loss", f"{PERSONALIZED}loss"]
    rows = [[name, *[_na(e.get(k)) for k in keys]] for name, e in [*block["sites"].items(), ("mean over sites", block["mean"])]]
    note = f"<p>Method <b>{html.escape(block['method'])}</b>: each site's personal parameters stayed at the site; both columns are on the same test split.</p>"
    return note + _table(rows, header)


EPSILON_SCOPE = (
    "epsilon bounds what the model deltas reveal about any one training record (record-level DP-SGD at each "
    "site, accounted by Opacus). It does not cover: per-site test metrics and train/test counts sent to the "
    "coordinator, the site-level normalisation statistics used locally, hyper-parameters chosen by looking at "
    "private data, or the feature names exchanged in the handshake."
)


SITE_LEVEL_SCOPE = (
    "site-level (central) DP: each site's whole update is clipped to the study's L2 bound and the coordinator "
    "adds Gaussian noise to the average, so epsilon bounds what the model reveals about any one site's entire "
    "dataset (and so about any one patient). It relies on the coordinator adding the noise (sites cannot verify "
    "it) and does not cover per-site metrics or counts. It is not written to the sites' record-level ledgers."
)


def _is_refusal(reason: str) -> bool:
    """A site's refusal: its sealed codes E130-E160 (plan, schedule, protocol, budget), or a refusal line."""
    return bool(re.search(r"\bE1[3-6]\d:", reason)) or "refused" in reason


def privacy_summary(study: StudyConfig, recorder: RunRecorder) -> dict[str, Any]:
    """Per site: epsilon spent (ledger value after its last round), delta, noise, refusals."""
    summary: dict[str, Any] = {}
    if study.privacy.dp and study.privacy.level == "site":
        from server.strategy import site_level_noise
        from shared.accounting import epsilon

        sigma = site_level_noise(study)
        by_round = {str(r["round"]): epsilon([(sigma, 1.0, r["round"])], study.privacy.delta, study.privacy.accountant) for r in recorder.rounds}
        for ref in study.sites:
            summary[ref.name] = {
                "level": "site",
                "epsilon": by_round[str(recorder.rounds[-1]["round"])] if recorder.rounds else 0.0,
                "delta": study.privacy.delta,
                "noise_multiplier": sigma,
                "clipping_norm": study.privacy.site_clipping_norm,
                "target_epsilon": study.privacy.target_epsilon,
                "accountant": study.privacy.accountant,
                "epsilon_by_round": by_round,
                "epsilon_budget": None,
                "refusals": [],
                "covers": SITE_LEVEL_SCOPE,
            }
        return summary
    for ref in study.sites:
        if not study.privacy.dp:
            summary[ref.name] = None
            continue
        trained = [(r["round"], r["fit"]["sites"][ref.name]) for r in recorder.rounds if ref.name in r.get("fit", {}).get("sites", {})]
        refusals = [f["reason"] for f in recorder.failures if f["site"] == ref.name and _is_refusal(f["reason"])]
        last = trained[-1][1] if trained else {}
        summary[ref.name] = {
            "epsilon": last.get("epsilon"),
            "delta": last.get("delta"),
            "noise_multiplier": last.get("noise_multiplier"),
            "sample_rate": last.get("sample_rate"),
            "epsilon_budget": last.get("epsilon_budget"),
            "target_epsilon": study.privacy.target_epsilon,
            "max_grad_norm": study.privacy.max_grad_norm,
            "accountant": study.privacy.accountant,
            "epsilon_by_round": {str(rnd): m.get("epsilon") for rnd, m in trained},
            "refusals": refusals,
            "level": "record",
            "covers": EPSILON_SCOPE,
        }
    return summary


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(out_dir: Path, study: StudyConfig, plan: TrainingPlan, sites: list[SiteInfo], recorder: RunRecorder, **kw: Any) -> dict[str, Any]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``; return the report."""
    report = build_report(study, plan, sites, recorder, **kw)
    _atomic_write(Path(out_dir) / "report.json", json.dumps(report, indent=2))
    _atomic_write(Path(out_dir) / "report.html", render_html(report))
    return report


# --------------------------------------------------------------------------- html


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _curve(report: dict[str, Any], metric: str) -> str | None:
    rounds = report["rounds"]
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sites = list(report["sites"]) or sorted({s for r in rounds for s in r["evaluate"]["sites"]})
    for site in sites:
        xs = [r["round"] for r in rounds if r["evaluate"]["sites"].get(site, {}).get(metric) is not None]
        ys = [r["evaluate"]["sites"][site][metric] for r in rounds if r["evaluate"]["sites"].get(site, {}).get(metric) is not None]
        if xs:
            ax.plot(xs, ys, marker="o", lw=1, alpha=0.7, label=site)
    xs = [r["round"] for r in rounds if r["evaluate"]["mean"].get(metric) is not None]
    ys = [r["evaluate"]["mean"][metric] for r in rounds if r["evaluate"]["mean"].get(metric) is not None]
    if xs:
        ax.plot(xs, ys, color="black", lw=2.5, marker="s", label="mean over sites")
    ax.set_xlabel("round")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{METRIC_LABELS.get(metric, metric)} on each site's test split")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _svg(fig)


def _bars(report: dict[str, Any], metric: str) -> str | None:
    final = report["final"]["sites"]
    names = [n for n in final if final[n].get(metric) is not None]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    values = [final[n][metric] for n in names]
    bars = ax.bar(names, values, color="#4C72B0")
    low, high = [final[n].get(f"ci_low_{metric}") for n in names], [final[n].get(f"ci_high_{metric}") for n in names]
    ranged = [i for i in range(len(names)) if low[i] is not None and high[i] is not None]
    if ranged:  # each site's bootstrap interval: a small site's width shows
        ax.errorbar([names[i] for i in ranged], [values[i] for i in ranged], yerr=[[values[i] - low[i] for i in ranged], [high[i] - values[i] for i in ranged]], fmt="none", ecolor="black", capsize=3, lw=1)
    constant = [(n, final[n][f"baseline_{metric}"]) for n in names if final[n].get(f"baseline_{metric}") is not None]
    if constant:
        ax.scatter([n for n, _ in constant], [v for _, v in constant], marker="_", s=500, color="#c62828", zorder=3, label="constant predictor")
    for bar, name in zip(bars, names):
        ax.annotate(f"{final[name][metric]:.3f}\nn={final[name].get('n_test', '?')}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    mean = report["final"]["mean"].get(metric)
    if mean is not None:
        ax.axhline(mean, color="black", ls="--", lw=1, label=f"mean {mean:.3f}")
    if mean is not None or constant:
        ax.legend(fontsize=7)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"Final {METRIC_LABELS.get(metric, metric)} per site (test split)")
    top = max([*values, *[h for h in high if h is not None]])
    ax.set_ylim(0, top * 1.25 if top > 0 else 1)
    return _svg(fig)


def _epsilon(report: dict[str, Any]) -> str | None:
    privacy = {k: v for k, v in report["privacy"].items() if v and v.get("epsilon_by_round")}
    if not privacy:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for site, p in privacy.items():
        rounds = sorted(p["epsilon_by_round"], key=int)
        ax.plot([int(r) for r in rounds], [p["epsilon_by_round"][r] for r in rounds], marker="o", label=site)
    budgets = {p.get("epsilon_budget") for p in privacy.values()} - {None}
    for budget in budgets:
        ax.axhline(budget, color="#c62828", ls="--", lw=1)
    target = next(iter(privacy.values()))["target_epsilon"]
    ax.axhline(target, color="grey", ls=":", lw=1, label=f"study target {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (ledger, all studies)")
    ax.set_title("Privacy spent per site (red: site budgets)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _svg(fig)


def _flatten(values: dict[str, Any], prefix: str = ""):
    """``{"privacy": {"dp": True}}`` -> rows ``("privacy.dp", True)`` for a readable settings table."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield [f"{prefix}{key}", ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value]


def _table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e6 else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _na(value: Any) -> Any:
    return "n/a" if value is None else value


def _verdict(better: bool | None) -> str:
    return "n/a" if better is None else ("better" if better else "NOT better")


def _baseline_section(report: dict[str, Any]) -> str:
    """Model vs the constant predictor per site and on the mean, the interval, and every flag in words."""
    review = report.get("baseline")
    if not review or not review["sites"]:
        return "<p>No final evaluation.</p>"
    label = METRIC_LABELS.get(review["metric"], review["metric"])
    binary = any("loss_better" in e for e in review["sites"].values())
    header = ["site", "n_test", label, f"{round(review['ci_level'] * 100)}% CI", "constant predictor", "verdict"]
    header += ["test loss", "constant's loss", "loss verdict"] if binary else []

    def row(name: str, e: dict[str, Any], interval: str) -> list[Any]:
        cells = [name, e.get("n_test", ""), _na(e["model"]), interval, _na(e["baseline"]), _verdict(e["better"])]
        return cells + ([_na(e.get("loss")), _na(e.get("baseline_loss")), _verdict(e.get("loss_better"))] if binary else [])

    rows = [row(name, e, interval_text(e, review["ci_resamples"])) for name, e in review["sites"].items()]
    rows.append(row(MEAN, review["mean"], "none (see below)"))
    if review["flags"]:
        words = '<ul class="flags">' + "".join(f"<li>{html.escape(flag)}</li>" for flag in review["flags"]) + "</ul>"
    else:
        words = '<p class="status completed">The final model is better than the constant predictor at every site and on the mean.</p>'
    if review.get("cautions"):
        words += '<ul class="cautions">' + "".join(f"<li>{html.escape(caution)}</li>" for caution in review["cautions"]) + "</ul>"
    notes = f"<p><small>Reference: {html.escape(review['reference'])}. {html.escape(review['ci_note'])}</small></p>"
    return _table(rows, header) + words + notes


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page (inline SVG, no external assets) that opens offline."""
    study, final = report["study"], report["final"]
    primary = report["primary_metric"]
    metrics = [m for m in METRIC_LABELS if any(m in s for s in final["sites"].values())]
    site_rows = [[name, s.get("n_train", ""), s.get("n_test", ""), *[s.get(m, "n/a") if s.get(m) is not None else "n/a" for m in metrics]] for name, s in final["sites"].items()]
    site_rows.append(["mean over sites", "", "", *[final["mean"].get(m, "n/a") for m in metrics]])
    site_rows.append(["weighted by n_test", "", "", *[final["weighted"].get(m, "n/a") for m in metrics]])
    plots = [p for p in (_curve(report, primary), _bars(report, primary), _curve(report, "loss"), _epsilon(report)) if p]
    failures = _table([[f["round"], f["phase"], f["site"], f.get("kind", "failed"), f["reason"]] for f in report["failures"]], ["round", "phase", "site", "kind", "reason"]) if report["failures"] else "<p>None.</p>"
    status = report["status"]
    banner = f'<p class="status {status}">Status: <b>{html.escape(status)}</b>' + (f" — {html.escape(report['error'])}" if report.get("error") else "") + "</p>"
    if report.get("selected_round") is not None:  # best-round selection: say which model the final figures describe
        banner += f"<p>Best-round selection: the model of round {report['selected_round']}, chosen on the sites' validation splits (carved from their training data), is model.pt; the final metrics below are its.</p>"
    settings = _table(list(_flatten({k: v for k, v in study.items() if k != "sites"})), ["setting", "value"])
    if report.get("secure_aggregation_params"):
        secure = "<p>SecAgg+ parameters derived for this study (see docs/secure-aggregation.md):</p>" + _table(
            list(_flatten(report["secure_aggregation_params"])), ["parameter", "value"]
        )
    elif report["secure_aggregation"]:
        secure = "<p>On, but no round reached the protocol.</p>"
    else:
        secure = "<p>Off: the coordinator saw each site's update (and checked it).</p>"
    if all(v is None for v in report["privacy"].values()):
        privacy = "<p>Differential privacy not enabled for this study.</p>"
    else:
        rows = [[k, v["epsilon"] if v["epsilon"] is not None else "n/a", v["epsilon_budget"] or "n/a", v["delta"] or "n/a", v["noise_multiplier"] or "n/a", "; ".join(v["refusals"]) or "none"] for k, v in report["privacy"].items() if v]
        privacy = _table(rows, ["site", "epsilon spent", "budget", "delta", "noise multiplier", "refusals"])
        covers = next(v["covers"] for v in report["privacy"].values() if v)
        privacy += f"<p><small>{html.escape(covers)}</small></p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedhelix report: {html.escape(study['name'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} td{{font-variant-numeric:tabular-nums}} .status.completed{{color:#1a7f37}} .status.failed{{color:#c62828}}
.flags li{{color:#c62828;font-weight:bold}} .cautions li{{color:#9a6700}} .plots{{display:flex;flex-wrap:wrap;gap:1em}} .plots svg{{max-width:100%;height:auto}}
</style></head><body>
<h1>Study <code>{html.escape(study['name'])}</code></h1>
{banner}
<p>{html.escape(study['task'])} task, <b>{html.escape(study['model'])}</b> model, <b>{html.escape(study['strategy'])}</b>,
{study['rounds']} rounds x {study['local_steps']} local steps, {len(report['sites'])} sites.
Secure aggregation: {'on' if report['secure_aggregation'] else 'off'}. Wall time {report['timing']['wall_s']} s.</p>
<h2>Final results per site</h2>
{_table(site_rows, ['site', 'n_train', 'n_test', *[METRIC_LABELS[m] for m in metrics]])}
<h2>Personalized vs global</h2>
{_personalization_section(report)}
<h2>Better than a constant?</h2>
{_baseline_section(report)}
<h2>Curves</h2><div class="plots">{''.join(plots)}</div>
<h2>Failures and refusals</h2>{failures}
<h2>Privacy</h2>{privacy}
<h2>Secure aggregation</h2>{secure}
<h2>Settings</h2>{settings}
<p><small>fedhelix {html.escape(report['fedhelix_version'])}, created {html.escape(report['created'])}.</small></p>
</body></html>
"""
