"""GSE7390 federated over 3 sites (clinical + expression tables each): selection, standardisation, training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from server.simulate import simulate
from shared.config import load_site_ref, load_study
from shared.contract import load_site_data
from shared.plan import TrainingPlan

pytestmark = pytest.mark.e2e


def test_gse7390_survival_study_selects_the_pooled_top_probes_and_trains(root: Path, tmp_path: Path) -> None:
    study = load_study(root / "studies/gse7390/study.toml")
    study = dataclasses.replace(study, rounds=3, local_steps=10)
    report = simulate(study, tmp_path / "run", progress=False)
    assert report["status"] == "completed"
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    plan = TrainingPlan.from_json(saved["plan"])
    features = list(saved["features"])

    # What the secure selection round should have found: top-50 pooled variance of the probes
    # over every site's train split, in the study's order (by name); the clinical features first.
    raw = [load_site_data(load_site_ref(ref, study.path), "survival", study.categories, scale=False) for ref in study.sites]
    names = list(raw[0].feature_names)
    probes = sorted(raw[0].omics_features)
    pooled = np.concatenate([d.x_train[:, [d.feature_names.index(p) for p in probes]] for d in raw]).astype(np.float64)
    top = sorted(np.argsort(-pooled.var(axis=0), kind="stable")[: study.omics.top_k])
    clinical = [n for n in names if n not in set(probes)]
    assert features == clinical + [probes[i] for i in top]
    assert site_c_order_differs(root)  # one site's file lists the probes in another order: the study's order won

    # Federated standardisation of the selected features equals the pooled statistics (within SecAgg+ quantisation).
    selected = np.concatenate([load_site_data(load_site_ref(ref, study.path), "survival", study.categories, features, select=True, scale=False).x_train for ref in study.sites]).astype(np.float64)
    continuous = ~np.all((selected == 0) | (selected == 1), axis=0)
    np.testing.assert_allclose(np.asarray(plan.normalization["mean"])[continuous], selected.mean(axis=0)[continuous], atol=1e-3)
    np.testing.assert_allclose(np.asarray(plan.normalization["scale"])[continuous], selected.std(axis=0)[continuous], rtol=1e-3, atol=1e-3)
    assert report["final"]["mean"]["c_index"] > 0.6


def site_c_order_differs(root: Path) -> bool:
    header = (root / "data/gse7390/site_c/expression.csv").read_text().splitlines()[0].split(",")[1:]
    return header != sorted(header)
