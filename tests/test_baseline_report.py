"""The report and the CLI summary say, in words, where the final model is not better than the constant predictor."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.common import Code, EvaluateRes, Status
from rich.console import Console

import server.cli
from client.app import SiteClient
from client.audit import AuditLog
from client.graph_trainer import evaluate_graphs
from client.site_data import load_for_plan
from server.recorder import RunRecorder, SiteInfo
from server.report import write_reports
from server.strategy import build_strategy
from shared.config import load_site, load_site_ref, load_study, parse_study
from shared.contract import load_site_data
from shared.models import build_model
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan

ROOT = Path(__file__).resolve().parents[1]


def summary_text(report: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """What ``fedhelix simulate`` / ``fedhelix run`` print at the end, as plain text."""
    out = io.StringIO()
    monkeypatch.setattr(server.cli, "console", Console(file=out, width=250, color_system=None))
    server.cli.print_summary(report)
    return out.getvalue()


def recorded(tmp_path: Path, task: str, final: dict[str, dict], model: str = "logistic"):
    """A study whose one recorded round holds ``final`` (per site: metrics as the sites released them)."""
    names = list(final)
    study = parse_study({"study": {"name": "baseline-demo", "task": task, "model": model, "rounds": 1}, "sites": [{"name": n, "config": f"{n}.toml"} for n in names]}, base_dir=tmp_path)
    recorder = RunRecorder(tmp_path / "run", task)
    infos = [SiteInfo(node_id=i, name=n, n_train=4 * final[n]["n"], n_test=final[n]["n"], features=["a"], order=i) for i, n in enumerate(names)]
    recorder.set_sites(infos)
    recorder.record_evaluate(1, final)
    return write_reports(tmp_path / "run", study, TrainingPlan.from_study(study, ["a"]), infos, recorder, status="completed", error=None, has_model=False)


BINARY = {
    "north": {"roc_auc": 0.81, "baseline_roc_auc": 0.5, "loss": 0.30, "baseline_loss": 0.40, "ci_low_roc_auc": 0.74, "ci_high_roc_auc": 0.88, "ci_resamples_roc_auc": 200.0, "n": 300},
    "south": {"roc_auc": 0.44, "baseline_roc_auc": 0.5, "loss": 0.20, "baseline_loss": 0.15, "ci_low_roc_auc": 0.31, "ci_high_roc_auc": 0.58, "ci_resamples_roc_auc": 200.0, "n": 120},
    "<tiny>": {"roc_auc": 1.0, "baseline_roc_auc": 0.5, "ci_low_roc_auc": 1.0, "ci_high_roc_auc": 1.0, "ci_resamples_roc_auc": 131.0, "n": 11},  # loss withheld
}  # fmt: skip


def test_report_and_summary_flag_each_site_and_the_mean_not_better_than_the_constant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = recorded(tmp_path, "binary", BINARY)
    review = json.loads((tmp_path / "run" / "report.json").read_text())["baseline"]
    assert review["flags"] == [
        "south: ROC AUC 0.440 is not better than the constant predictor's 0.500",
        "south: test loss 0.200 is not below the constant predictor's 0.150",
    ]  # north beats both; the mean ROC AUC (0.750) and loss (0.250 vs 0.275) too
    assert review["sites"]["north"] == {
        "model": 0.81, "baseline": 0.5, "better": True, "loss": 0.30, "baseline_loss": 0.40, "loss_better": True,
        "n_test": 300, "ci_low": 0.74, "ci_high": 0.88, "ci_resamples": 200,
    }  # fmt: skip
    assert review["sites"]["<tiny>"]["loss_better"] is None  # withheld: no verdict rather than a wrong one
    assert review["mean"]["model"] == pytest.approx(0.75) and review["mean"]["baseline"] == 0.5
    # the mean has no interval: interval ends are not averaged
    assert not any(k.startswith("ci_") for k in report["final"]["mean"]) and "baseline_roc_auc" in report["final"]["mean"]
    assert review["cautions"] == ["<tiny>: every bootstrap resample gives ROC AUC 1.000 on 11 test rows: the bootstrap cannot size its uncertainty; with so few rows read it as unknown"]

    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Better than a constant?</h2>" in page
    assert "<li>south: ROC AUC 0.440 is not better than the constant predictor&#x27;s 0.500</li>" in page
    assert "<td>south</td><td>120</td><td>0.4400</td><td>[0.310, 0.580]</td><td>0.5000</td><td>NOT better</td>" in page
    assert "<td>&lt;tiny&gt;</td><td>11</td><td>1.0000</td><td>[1.000, 1.000] (131/200)</td>" in page
    assert "&lt;tiny&gt;: every bootstrap resample" in page and "<tiny>" not in page

    text = summary_text(report, monkeypatch)
    assert "not better than baseline: south: ROC AUC 0.440 is not better than the constant predictor's 0.500" in text
    assert "not better than baseline: south: test loss 0.200 is not below the constant predictor's 0.150" in text
    assert "north" not in "".join(line for line in text.splitlines() if "not better" in line)
    assert "[0.74, 0.88]" in text and "[1.00, 1.00] (131/200)" in text and "caution: <tiny>" in text


def test_the_mean_is_flagged_too_and_lower_is_better_for_rmse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = {
        "east": {"rmse": 1.0, "baseline_rmse": 1.2, "ci_low_rmse": 0.8, "ci_high_rmse": 1.3, "ci_resamples_rmse": 200.0, "n": 50},
        "west": {"rmse": 3.0, "baseline_rmse": 2.0, "ci_low_rmse": 2.5, "ci_high_rmse": 3.6, "ci_resamples_rmse": 200.0, "n": 50},
    }
    report = recorded(tmp_path, "regression", final, model="mlp")
    assert report["baseline"]["flags"] == [
        "west: RMSE 3.000 is not better than the constant predictor's 2.000",
        "mean over sites: RMSE 2.000 is not better than the constant predictor's 1.600",
    ]
    assert "mean over sites: RMSE 2.000 is not better" in summary_text(report, monkeypatch)
    good = recorded(tmp_path / "good", "regression", {"east": final["east"]}, model="mlp")
    assert good["baseline"]["flags"] == [] and "better than the constant predictor at every site and on the mean" in summary_text(good, monkeypatch)


# ----------------------------------------------------------------------------- real sites, real evaluation


@pytest.fixture(scope="module")
def wdbc():
    study = load_study(ROOT / "studies" / "wdbc" / "study-logistic.toml")
    sites = [load_site_ref(ref, study.path) for ref in study.sites]
    plan = TrainingPlan.from_study(study)
    return study, sites, plan


def evaluated(tmp_path: Path, study, sites, plan, weights: list[np.ndarray]) -> dict:
    """Every site evaluates ``weights`` as a node would; the real strategy records it; the report is written."""

    class Proxy:
        def __init__(self, node_id: int) -> None:
            self.node_id, self.cid = node_id, str(node_id)

    infos, results = [], []
    for i, site in enumerate(sites):
        client = SiteClient(site, audit=AuditLog(tmp_path / f"{site.name}.audit.jsonl", site.name))
        loss, n, metrics = client.evaluate(weights, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})
        infos.append(SiteInfo(node_id=i, name=site.name, n_train=0, n_test=n, features=[], order=i))
        results.append((Proxy(i), EvaluateRes(status=Status(code=Code.OK, message="ok"), loss=loss, num_examples=n, metrics=metrics)))
    recorder = RunRecorder(tmp_path / "run", study.task)
    recorder.set_sites(infos)
    strategy = build_strategy(study, plan, weights, recorder)
    strategy.aggregate_evaluate(1, results, [])
    return write_reports(tmp_path / "run", study, plan, infos, recorder, status="completed", error=None, has_model=False)


def direction(site, plan) -> np.ndarray:
    """A sensible logistic weight vector: the difference of the class means on a site's training split."""
    data = load_for_plan(site, plan)
    return (data.x_train[data.y_train == 1].mean(0) - data.x_train[data.y_train == 0].mean(0)).astype(np.float32)


def logistic(plan, weight: np.ndarray, bias: float) -> list[np.ndarray]:
    shapes = [tuple(p.shape) for p in build_model(plan.model, plan.task, len(weight), plan.model_options).state_dict().values()]
    assert shapes == [(1, len(weight)), (1,)]
    return [weight.reshape(1, -1), np.array([bias], dtype=np.float32)]


def test_a_broken_model_is_flagged_at_every_site_and_on_the_mean(tmp_path: Path, wdbc, monkeypatch: pytest.MonkeyPatch) -> None:
    study, sites, plan = wdbc
    w = direction(sites[0], plan)
    names = [s.name for s in sites]

    good = evaluated(tmp_path / "good", study, sites, plan, logistic(plan, w / np.linalg.norm(w), -0.5))
    assert all(good["baseline"]["sites"][n]["better"] for n in names) and good["baseline"]["mean"]["better"]
    for n in names:  # the site sent the constant's metrics and an interval around its own score
        row = good["final"]["sites"][n]
        assert row["baseline_roc_auc"] == 0.5 and 0 < row["baseline_pr_auc"] < 1 and row["baseline_loss"] > 0
        assert row["ci_low_roc_auc"] <= row["roc_auc"] <= row["ci_high_roc_auc"] and row["ci_resamples_roc_auc"] == 200

    inverted = evaluated(tmp_path / "inverted", study, sites, plan, logistic(plan, -w, 0.0))
    flagged = inverted["baseline"]["flags"]
    for n in [*names, "mean over sites"]:
        assert any(f.startswith(f"{n}: ROC AUC 0.0") and "is not better than the constant predictor's 0.500" in f for f in flagged), flagged
        assert any(f.startswith(f"{n}: test loss") for f in flagged), flagged
    text = summary_text(inverted, monkeypatch)
    assert sum("not better than baseline:" in line for line in text.splitlines()) == len(flagged) == 2 * (len(names) + 1)

    constant = evaluated(tmp_path / "constant", study, sites, plan, logistic(plan, 0 * w, 2.0))  # p = 0.88 for everyone
    assert constant["baseline"]["sites"][names[0]]["model"] == 0.5
    assert [f.split(":")[0] for f in constant["baseline"]["flags"] if "ROC AUC" in f] == [*names, "mean over sites"]
    assert all(f"{n}: test loss" in " ".join(constant["baseline"]["flags"]) for n in names)


def test_a_small_site_shows_a_wider_interval_than_a_large_one(tmp_path: Path, wdbc) -> None:
    study, sites, plan = wdbc
    w = direction(sites[0], plan)
    weak = np.zeros_like(w)
    weak[int(np.argmin(np.abs(w)))] = 1.0  # the least informative feature alone: a middling model
    report = evaluated(tmp_path, study, sites, plan, logistic(plan, weak, 0.0))
    by_size = sorted(report["baseline"]["sites"].values(), key=lambda e: e["n_test"])
    small, large = by_size[0], by_size[-1]
    assert small["n_test"] * 2 < large["n_test"]
    assert small["ci_high"] - small["ci_low"] > large["ci_high"] - large["ci_low"]


MOLECULES = ["CCO", "CCN", "CCC", "c1ccccc1", "CC(=O)O", "CCCl", "OCCO", "CC(C)O", "c1ccncc1", "CCOC", "CNC", "CCS"]


@pytest.mark.parametrize("task", ["binary", "multitask"])
def test_molecule_evaluation_sends_baselines_and_an_interval(tmp_path: Path, task: str) -> None:
    rng = np.random.default_rng(0)
    rows = [(smiles, int(rng.random() < 0.3), int(rng.random() < 0.5) if i % 4 else None) for i, smiles in enumerate(MOLECULES * 5)]
    pd.DataFrame(rows, columns=["smiles", "a", "b"]).to_csv(tmp_path / "m.csv", index=False)
    labels = '["a", "b"]' if task == "multitask" else '"a"'
    (tmp_path / "m.toml").write_text(f'[site]\nname = "lab"\n[data]\npath = "m.csv"\nformat = "smiles"\nlabel = {labels}\ntest_fraction = 0.5\n')
    study = parse_study({"study": {"name": "mol", "task": task, "model": "gnn"}, "sites": [{"name": "lab", "config": "m.toml"}]}, base_dir=tmp_path)
    plan = TrainingPlan.from_study(study)
    data = load_site_data(load_site(tmp_path / "m.toml"), task)
    model = build_model(plan.model, plan.task, len(data.feature_names), plan.model_options, n_outputs=len(data.labels))
    _, metrics = evaluate_graphs(model, data, plan)
    assert metrics["baseline_roc_auc"] == 0.5 and metrics["ci_resamples_roc_auc"] > 100
    assert metrics["ci_low_roc_auc"] <= metrics["roc_auc"] <= metrics["ci_high_roc_auc"]
    y, y_train = np.asarray(data.y_test, dtype=float), np.asarray(data.y_train, dtype=float)
    if task == "multitask":  # per task: the test prevalence over the known labels
        assert metrics["baseline_pr_auc[b]"] == pytest.approx(np.nanmean(y[:, 1])) and metrics["baseline_roc_auc[b]"] == 0.5
    else:
        p = y_train.mean()
        assert metrics["baseline_pr_auc"] == pytest.approx(y.mean())
        assert metrics["baseline_loss"] == pytest.approx(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    assert evaluate_graphs(model, data, plan)[1] == metrics  # seeded: the same interval again
