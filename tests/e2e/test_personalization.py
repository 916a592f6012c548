"""Each personalization method through Flower's Simulation Engine (SecAgg+ on): personal metrics beside the global ones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from server.simulate import simulate
from shared.config import PersonalizationConfig, load_study
from shared.models import build_model, federated_keys

pytestmark = pytest.mark.e2e


# fedbn and fenda change what travels; finetune and ditto keep the shapes (tests/test_personalization.py runs all four at the site).
@pytest.mark.parametrize("method", ["fedbn", "fenda"])
def test_each_method_reports_personalized_metrics_per_site(method: str, root: Path, tmp_path: Path) -> None:
    base = load_study(root / "studies" / "wdbc" / "study.toml")
    study = dataclasses.replace(base, rounds=1, local_steps=10, personalization=PersonalizationConfig(method, steps=20))
    report = simulate(study, tmp_path / "run", progress=False)

    assert report["status"] == "completed" and report["secure_aggregation"] is True
    block = report["personalization"]
    assert block["method"] == method and block["metric"] == "roc_auc"
    assert set(block["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    for name, site in report["final"]["sites"].items():
        assert 0.0 <= site["personalized_roc_auc"] <= 1.0 and site["personalized_loss"] > 0
        assert block["sites"][name]["personalized_roc_auc"] == site["personalized_roc_auc"]
        if method in ("finetune", "ditto", "fenda"):  # another model than the global one
            assert site["personalized_loss"] != pytest.approx(site["loss"], abs=1e-6)
    assert "personalized_roc_auc" in report["final"]["mean"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Personalized vs global" in page and f"<b>{method}</b>" in page
    # what each site's audit log says left it: only the federated tensors' shapes, in every update
    model = build_model("mlp", "binary", len(report["features"]), study.model_options, personalization=method)
    shapes = [list(model.state_dict()[k].shape) for k in federated_keys(model)]
    for name in block["sites"]:
        lines = (tmp_path / "run" / "audit" / f"{name}.audit.jsonl").read_text().splitlines()
        updates = [e for e in map(json.loads, lines) if e["kind"] == "update"]
        assert updates and all(u["shapes"] == shapes for u in updates)
