"""The study report: report.json holds the numbers, report.html opens offline and escapes what sites name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.recorder import RunRecorder, SiteInfo
from server.report import write_reports
from shared.config import parse_study
from shared.plan import TrainingPlan

EVIL = "<script>alert('x')</script>"
SITES = ("north", EVIL)
FEATURES = ["age", "grade"]


def build(tmp_path: Path, sites=SITES):
    study = parse_study(
        {
            "study": {"name": "report-demo", "task": "survival", "model": "cox", "rounds": 2, "strategy": "fedadam"},
            "sites": [{"name": name, "config": f"sites/s{i}.toml"} for i, name in enumerate(sites)],
        },
        base_dir=tmp_path,
    )
    plan = TrainingPlan.from_study(study, FEATURES)
    out = tmp_path / "run"
    recorder = RunRecorder(out, study.task)
    infos = [SiteInfo(node_id=10 + i, name=name, n_train=40 * (i + 1), n_test=10 * (i + 1), features=FEATURES, order=i) for i, name in enumerate(sites)]
    recorder.set_sites(infos)
    c_index = {1: (0.60, 0.70), 2: (0.72, 0.84)}
    for rnd in (1, 2):
        recorder.record_fit(rnd, {name: {"train_loss": 1.0 / rnd, "n": info.n_train} for name, info in zip(sites, infos)}, {})
        recorder.record_evaluate(
            rnd,
            {name: {"c_index": c_index[rnd][i], "loss": 2.0 / rnd + i, "n": infos[i].n_test} for i, name in enumerate(sites)},
        )
    return study, plan, infos, recorder, out


def test_report_json_holds_rounds_final_results_and_privacy(tmp_path: Path) -> None:
    study, plan, infos, recorder, out = build(tmp_path)

    returned = write_reports(out, study, plan, infos, recorder, status="completed", error=None, has_model=False)

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report == json.loads(json.dumps(returned))
    assert {"study", "rounds", "final", "privacy", "sites", "failures", "status"} <= set(report)
    assert report["status"] == "completed" and report["error"] is None and report["model"] is None
    assert report["study"]["name"] == "report-demo" and report["study"]["sites"] == list(SITES)
    assert report["study"]["strategy"] == "fedadam" and report["primary_metric"] == "c_index"
    assert report["features"] == FEATURES
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0]["evaluate"]["sites"]["north"]["c_index"] == 0.60

    final = report["final"]
    assert set(final["sites"]) == set(SITES)
    assert final["sites"]["north"] == {"n_train": 40, "n_test": 10, "c_index": 0.72, "loss": 1.0}
    assert final["sites"][EVIL] == {"n_train": 80, "n_test": 20, "c_index": 0.84, "loss": 2.0}
    assert final["mean"]["c_index"] == pytest.approx((0.72 + 0.84) / 2)  # unweighted
    assert final["weighted"]["c_index"] == pytest.approx((0.72 * 10 + 0.84 * 20) / 30)
    assert final["mean"]["loss"] == pytest.approx(1.5)
    assert report["privacy"] == {name: None for name in SITES}
    assert report["secure_aggregation"] is True  # on by default
    assert report["secure_aggregation_params"] is None  # no round ran under SecAgg+ here


def test_report_records_failure_and_model(tmp_path: Path) -> None:
    study, plan, infos, recorder, out = build(tmp_path)
    recorder.failures.append({"round": 2, "phase": "train", "site": "north", "reason": "update rejected: tensor 0 contains NaN or Inf"})
    report = write_reports(out, study, plan, infos, recorder, status="failed", error="round 2: too few sites", has_model=True)
    assert report["status"] == "failed" and report["error"] == "round 2: too few sites" and report["model"] == "model.pt"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "round 2: too few sites" in page and "tensor 0 contains NaN or Inf" in page
    assert 'class="status failed"' in page


def test_report_without_rounds_is_still_written(tmp_path: Path) -> None:
    study = parse_study({"study": {"name": "empty", "task": "binary", "model": "logistic"}, "sites": [{"name": "a", "config": "a.toml"}]}, base_dir=tmp_path)
    recorder = RunRecorder(tmp_path / "run", study.task)
    report = write_reports(tmp_path / "run", study, TrainingPlan.from_study(study), [], recorder, status="failed", error="handshake failed", has_model=False)
    assert report["rounds"] == [] and report["final"] == {"sites": {}, "mean": {}, "weighted": {}}
    assert report["privacy"] == {"a": None}
    assert "<svg" not in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    study, plan, infos, recorder, out = build(tmp_path)
    write_reports(out, study, plan, infos, recorder, status="completed", error=None, has_model=True)
    page = (out / "report.html").read_text(encoding="utf-8")

    assert page.startswith("<!doctype html>")
    assert page.count("<svg") == 3  # primary curve, final bars, loss curve
    # nothing is fetched from elsewhere: no external scripts, stylesheets, images or fonts
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert not re.search(r"""(?:src|href)\s*=\s*["']https?://""", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?://", page, re.I)
    # every URL left is an XML namespace or matplotlib's metadata, never something loaded
    urls = set(re.findall(r"https?://[^\"'\s<>]*", page))
    assert urls <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
        "http://purl.org/dc/elements/1.1/",
        "http://creativecommons.org/ns#",
        "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
        "http://purl.org/dc/dcmitype/StillImage",
        "https://matplotlib.org/",
    }, urls
    assert "<th>C-index</th>" in page
    assert re.search(r"<td>mean over sites</td><td></td><td></td><td>0\.7800</td>", page)  # unweighted final mean
    assert re.search(r"<td>weighted by n_test</td><td></td><td></td><td>0\.8000</td>", page)


def test_report_html_escapes_site_names(tmp_path: Path) -> None:
    study, plan, infos, recorder, out = build(tmp_path)
    recorder.failures.append({"round": 2, "phase": "evaluate", "site": EVIL, "reason": "<b>bad</b> & worse"})
    write_reports(out, study, plan, infos, recorder, status="failed", error="<img src=x onerror=alert(1)>", has_model=False)
    page = (out / "report.html").read_text(encoding="utf-8")

    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert "<b>bad</b>" not in page
    assert "&lt;script&gt;" in page
    assert "&lt;b&gt;bad&lt;/b&gt; &amp; worse" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_site_name_with_dollar_signs_does_not_break_the_report(tmp_path: Path) -> None:
    study, plan, infos, recorder, out = build(tmp_path, ("north", r"lab $\foo$ unit"))
    write_reports(out, study, plan, infos, recorder, status="completed", error=None, has_model=False)
    assert "<svg" in (out / "report.html").read_text(encoding="utf-8")


def test_settings_table_shows_small_and_derived_values_readably(tmp_path: Path) -> None:
    study, plan, infos, recorder, out = build(tmp_path)
    write_reports(out, study, plan, infos, recorder, status="completed", error=None, has_model=False)
    page = (out / "report.html").read_text()
    assert "<td>privacy.delta</td><td>1e-05</td>" in page  # not rounded to 0.0000
    assert f"<td>secure.update_bound</td><td>{study.update_bound:.4f}</td>" in page  # the effective bound, not None
    report = json.loads((out / "report.json").read_text())
    assert report["study"]["secure"]["update_bound"] == study.update_bound
