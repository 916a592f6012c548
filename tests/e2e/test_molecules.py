"""A small federated GNN study end to end: partition -> simulate (SecAgg+ and per-molecule DP) -> report."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from client.privacy.ledger import PrivacyLedger
from server.best_round import pooled_validation
from server.partition import partition
from server.simulate import simulate

pytestmark = pytest.mark.e2e


def test_federated_multitask_gnn_with_secure_aggregation_and_dp(root: Path, tmp_path: Path) -> None:
    tox = pd.read_csv(root / "data" / "molecules" / "tox21.csv").iloc[:180]
    tox.loc[3, "smiles"] = "not a molecule"  # skipped and counted by the partition's site files
    tox.to_csv(tmp_path / "tox.csv", index=False)
    made = partition(tmp_path / "tox.csv", "scaffold", 3, tmp_path / "study", name="tox-mini")
    assert made.task == "multitask" and made.invalid == 1
    study = made.study
    # partition writes local_epochs; DP needs a fixed step count (its noise is calibrated to it)
    text = re.sub(r"(?m)^local_epochs = .*$", "local_steps = 4", re.sub(r"(?m)^rounds = \d+$", "rounds = 2", study.read_text()))
    assert "\nrounds = 2\n" in text and "\nlocal_steps = 4\n" in text  # a recipe change must not make this test slow
    text = text.replace("select_best = true", "select_best = true\nvalidation_fraction = 0.4")  # tiny companies: enough validation molecules to score
    study.write_text(text.replace("hidden = 64", "hidden = 16") + "\n[privacy]\ndp = true\ntarget_epsilon = 8.0\n")

    report = simulate(study, tmp_path / "run", progress=False)

    assert report["status"] == "completed" and [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["secure_aggregation"] is True  # on by default, unchanged for GNN studies
    assert report["primary_metric"] == "roc_auc"
    # partition's defaults: best-round selection on validation rows carved from training data, whose model is model.pt
    assert report["selected_round"] in (1, 2) and report["final"]["mean"] == report["rounds"][report["selected_round"] - 1]["evaluate"]["mean"]
    assert all("val_roc_auc" in m and m["n_val"] > 0 for m in report["rounds"][0]["evaluate"]["sites"].values())
    final = report["final"]["mean"]
    assert 0.0 <= final["roc_auc"] <= 1.0 and final["tasks_scored"] >= 1 
    assert any(k.startswith("roc_auc[") for k in report["final"]["sites"]["company_1"])  # per-task figures
    n_val = sum(m["n_val"] for m in report["rounds"][0]["evaluate"]["sites"].values())  # carved from train (select_best)
    assert sum(s["n_train"] + s["n_test"] for s in report["sites"].values()) + n_val == 179  # the invalid SMILES skipped
    # every site clipped its delta to the update bound before masking, and spent DP budget through its ledger
    fit = report["rounds"][-1]["fit"]["sites"]
    assert set(fit) == {"company_1", "company_2", "company_3"} and all("clipped_coordinates" in m and "train_loss" not in m for m in fit.values())
    for site, summary in report["privacy"].items():
        assert 0 < summary["epsilon"] <= 8.0 + 1e-6
        ledger = PrivacyLedger(tmp_path / "run" / "ledgers" / f"{site}.ledger.sqlite", site)
        try:
            assert [e.round for e in ledger.entries] == [1, 2]
        finally:
            ledger.close()
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert len(saved["labels"]) == 12 and saved["state_dict"]["out.weight"].shape[0] == 12
    # best-round selection: the round with the best pooled validation metric (ties: the earlier), and model.pt is its model
    pooled = [pooled_validation(r["evaluate"]["sites"], "roc_auc") for r in report["rounds"]]
    assert report["selected_round"] == 1 + max(range(len(pooled)), key=lambda i: (pooled[i] is not None, pooled[i] or 0.0, -i))
    best = torch.load(tmp_path / "run" / "best-round.pt", weights_only=True)
    assert best["round"] == report["selected_round"] and all(torch.equal(a, b) for a, b in zip(saved["state_dict"].values(), best["weights"]))
