"""Whole studies through Flower's Simulation Engine: real ServerApp, real ClientApps, real data."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from client.trainer import evaluate
from shared.config import load_site, load_study
from shared.contract import load_site_data
from shared.errors import FedhelixError
from shared.models import build_model
from shared.paths import DEFAULT_STUDY
from shared.plan import TrainingPlan
from server.simulate import simulate

pytestmark = pytest.mark.e2e


def test_bundled_tcga_study_reaches_published_fedadam_level(tmp_path: Path) -> None:
    report = simulate(DEFAULT_STUDY, tmp_path, progress=False)

    assert report["status"] == "completed"
    assert report["secure_aggregation"] is True  # the default
    assert report["secure_aggregation_params"]["num_shares"] == 5  # 6 sites -> 5 (odd)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    assert set(report["final"]["sites"]) == {"northeast", "south", "west", "midwest", "europe", "canada"}
    assert report["final"]["sites"]["canada"]["n_test"] == 11
    # FLamby's published FedAdam figure is 0.815; the issue asks for >= 0.80.
    assert report["final"]["mean"]["c_index"] >= 0.80
    assert set(report["privacy"]) == set(report["final"]["sites"]) and all(v is None for v in report["privacy"].values())

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["evaluate"]["mean"] == report["final"]["mean"]
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") >= 3 and "northeast" in page

    # The saved model reproduces the reported metric when evaluated locally at a site.
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    plan = TrainingPlan.from_json(saved["plan"])
    model = build_model(plan.model, plan.task, len(saved["features"]), plan.model_options)
    model.load_state_dict(saved["state_dict"])
    site = load_site(load_study(DEFAULT_STUDY).sites[0].config)
    _, metrics = evaluate(model, load_site_data(site, "survival", feature_order=saved["features"]), plan)
    assert metrics["c_index"] == pytest.approx(report["final"]["sites"]["northeast"]["c_index"], abs=1e-9)


def _copy_wdbc(root: Path, tmp_path: Path) -> Path:
    study_dir = tmp_path / "study"
    shutil.copytree(root / "studies" / "wdbc", study_dir)
    shutil.copytree(root / "data" / "wdbc", tmp_path / "data" / "wdbc")
    # keep the relative layout the site files expect: studies/wdbc/sites -> ../../../data
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    shutil.move(str(study_dir), nested / "wdbc")
    shutil.move(str(tmp_path / "data"), tmp_path / "a" / "data")
    return nested / "wdbc"


def test_site_with_broken_data_stops_the_study_before_any_training(root: Path, tmp_path: Path) -> None:
    study_dir = _copy_wdbc(root, tmp_path)
    broken = tmp_path / "a" / "data" / "wdbc" / "hospital_b.csv"
    pd.read_csv(broken).drop(columns=["malignant"]).to_csv(broken, index=False)

    # check=False skips the local pre-check: the error must travel through Flower itself.
    with pytest.raises(FedhelixError) as excinfo:
        simulate(study_dir / "study.toml", tmp_path / "run", progress=False, check=False)

    message = str(excinfo.value)
    assert "hospital_b" in message and "malignant" in message and "\n" not in message
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["rounds"] == [] and report["model"] is None  # nothing was trained or sent
    assert not (tmp_path / "run" / "model.pt").exists()


def test_local_precheck_names_the_site_before_starting_flower(root: Path, tmp_path: Path) -> None:
    study_dir = _copy_wdbc(root, tmp_path)
    broken = tmp_path / "a" / "data" / "wdbc" / "hospital_c.csv"
    frame = pd.read_csv(broken).astype({"mean_radius": object})
    frame.loc[3, "mean_radius"] = "12,4"  # a decimal comma from a spreadsheet export
    frame.to_csv(broken, index=False)
    with pytest.raises(FedhelixError, match=r"site 'hospital_c'.*column 'mean_radius'.*not numeric"):
        simulate(study_dir / "study.toml", tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_regression_study_reports_rmse_and_pearson(root: Path, tmp_path: Path) -> None:
    study = dataclasses.replace(load_study(root / "studies" / "diabetes" / "study.toml"), rounds=5)
    report = simulate(study, tmp_path, progress=False)
    assert report["primary_metric"] == "rmse"
    targets = pd.concat(pd.read_csv(p)["progression"] for p in (root / "data" / "diabetes").glob("*.csv"))
    for site in report["final"]["sites"].values():
        assert site["rmse"] < targets.std()  # better than predicting the mean
        assert site["pearson_r"] > 0.5 and site["mae"] <= site["rmse"]
        assert site["rmse"] < site["baseline_rmse"] and site["ci_low_rmse"] <= site["rmse"] <= site["ci_high_rmse"]  # each site's own reference
    assert report["baseline"]["flags"] == [] and report["baseline"]["mean"]["better"]
