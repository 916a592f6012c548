"""Personalization at the site: personal parameters never leave, and the personal model is reported beside the global one."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import SiteClient
from client.approved_plan import PlanRefused
from client.audit import AuditLog
from client.personal import PersonalStore
from shared.config import load_site, parse_study
from shared.errors import ConfigError
from shared.models import build_model, federated_keys, personal_keys
from shared.params import get_weights
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan

METHODS = ("finetune", "fedbn", "ditto", "fenda")


def _doc(root: Path, personalization: dict | None, **study) -> dict:
    sites = [{"name": n, "config": str(root / "studies" / "wdbc" / "sites" / f"{n}.toml")} for n in ("hospital_a", "hospital_b")]
    doc = {
        "study": {"name": "pers", "task": "binary", "model": "mlp", "rounds": 2, "local_steps": 15, "learning_rate": 0.05, "secure_aggregation": False, **study},
        "model": {"hidden": [8, 4]},
        "sites": sites,
    }
    if personalization is not None:
        doc["personalization"] = personalization
    return doc


def test_personalization_section_is_parsed_and_refused_where_it_cannot_work(root: Path) -> None:
    study = parse_study(_doc(root, {"method": "ditto", "lambda": 0.5, "steps": 7}))
    assert (study.personalization.method, study.personalization.lam, study.personalization.steps) == ("ditto", 0.5, 7)
    assert parse_study(_doc(root, None)).personalization is None
    with pytest.raises(ConfigError, match=r"method.*must be one of finetune, fedbn, ditto, fenda") as info:
        parse_study(_doc(root, {"method": "pfedme"}))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not available with \\[privacy\\] dp = true"):
        parse_study({**_doc(root, {"method": "finetune"}), "privacy": {"dp": True}})
    with pytest.raises(ConfigError, match="needs \\[study\\] model = \"mlp\""):
        parse_study(_doc(root, {"method": "fenda"}, model="logistic"))
    with pytest.raises(ConfigError, match="lambda must be >= 0"):
        parse_study(_doc(root, {"method": "ditto", "lambda": -1.0}))


def test_a_site_refuses_a_plan_that_drops_or_changes_its_approved_personalization(root: Path, tmp_path: Path) -> None:
    approved = parse_study(_doc(root, {"method": "fenda"}))
    site = load_site(approved.sites[0].config)
    client = SiteClient(site, audit=AuditLog(tmp_path / "a.audit.jsonl", site.name), approved=approved)
    for other in (parse_study(_doc(root, None)), parse_study(_doc(root, {"method": "finetune"}))):
        with pytest.raises(PlanRefused, match="personalization"):
            client.get_properties({PLAN_KEY: TrainingPlan.from_study(other).to_json()})


@pytest.mark.parametrize("method", METHODS)
def test_personal_parameters_never_leave_and_are_reported_beside_the_global_ones(method: str, root: Path, tmp_path: Path) -> None:
    study = parse_study(_doc(root, {"method": method, "steps": 30, "lambda": 0.01}))
    site = load_site(study.sites[0].config)
    audit = AuditLog(tmp_path / f"{site.name}.audit.jsonl", site.name)
    client = SiteClient(site, audit=audit, approved=study, run="run-1")
    props = client.get_properties({PLAN_KEY: TrainingPlan.from_study(study).to_json()})
    plan = TrainingPlan.from_study(study, json.loads(props["features"]), json.loads(props["labels"]))
    model = build_model("mlp", "binary", len(plan.features), study.model_options, seed=1, personalization=method)
    keys = federated_keys(model)
    weights = get_weights(model, keys)
    store = PersonalStore(audit.path, site.name, "run-1")

    for rnd in (1, 2):
        sent, n, fit_metrics = client.fit([w.copy() for w in weights], {PLAN_KEY: plan.to_json(), ROUND_KEY: rnd})
        # what leaves is exactly the federated tensors, in order, never a personal one
        assert [a.shape for a in sent] == [w.shape for w in weights] and n == props["n_train"]
        state = model.state_dict()
        assert [a.shape for a in sent] == [tuple(state[k].shape) for k in keys]
        personal = store.load() if method != "finetune" else None
        if method in ("fedbn", "fenda"):
            assert personal_keys(model) and set(personal) == set(personal_keys(model))
            assert not set(personal) & set(keys)
            for tensor in personal.values():  # no personal tensor (nor its change) is among the arrays sent
                assert all(a.shape != tuple(tensor.shape) or not np.allclose(a, tensor.numpy()) for a in sent)
        if method == "ditto":  # the personal model is a whole model, trained apart from the global update
            moved = [personal[k].numpy() - w for k, w in zip(keys, weights)]
            assert all(not np.allclose(a, m) for a, m in zip(sent, moved) if np.abs(m).sum() > 0)
            assert "personalized_train_loss" in fit_metrics
        if method == "finetune":
            assert not store.path.exists()  # fine-tuning keeps nothing between rounds
        weights = [w + d for w, d in zip(weights, sent)]

    if method != "finetune":
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    loss, n_test, metrics = client.evaluate([w.copy() for w in weights], {PLAN_KEY: plan.to_json(), ROUND_KEY: 2})
    assert n_test == props["n_test"]
    for name in ("roc_auc", "loss", "accuracy"):
        assert f"personalized_{name}" in metrics
    assert 0.0 <= metrics["personalized_roc_auc"] <= 1.0
    if method in ("finetune", "ditto", "fenda"):  # a personal model that is not the global one scores differently
        assert metrics["personalized_loss"] != pytest.approx(loss, abs=1e-6)
    # the audit log recorded every update with exactly the federated shapes
    updates = [json.loads(line) for line in audit.path.read_text().splitlines() if '"update"' in line]
    assert len(updates) == 2 and all(u["shapes"] == [list(w.shape) for w in weights] for u in updates)


def test_a_coordinator_cannot_push_personal_tensors_into_a_site(root: Path, tmp_path: Path) -> None:
    """Weights shaped like the whole FENDA model (local parts included) are refused, so the site's own never get overwritten."""
    study = parse_study(_doc(root, {"method": "fenda"}))
    site = load_site(study.sites[0].config)
    client = SiteClient(site, audit=AuditLog(tmp_path / "a.audit.jsonl", site.name), approved=study)
    props = client.get_properties({PLAN_KEY: TrainingPlan.from_study(study).to_json()})
    plan = TrainingPlan.from_study(study, json.loads(props["features"]), json.loads(props["labels"]))
    whole = get_weights(build_model("mlp", "binary", len(plan.features), study.model_options, personalization="fenda"))
    with pytest.raises(Exception, match="shapes differ"):
        client.fit(whole, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})


def test_fedbn_model_keeps_its_norm_layers_local_and_fenda_its_extractor_and_head() -> None:
    bn = build_model("mlp", "binary", 5, personalization="fedbn")
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules())
    assert all("running_mean" not in k and "num_batches" not in k for k in federated_keys(bn))
    assert {k.rsplit(".", 1)[1] for k in personal_keys(bn)} == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    fenda = build_model("mlp", "binary", 5, personalization="fenda")
    assert all(k.startswith(("global_extractor.", "global_head.")) for k in federated_keys(fenda))
    assert all(k.startswith(("local_extractor.", "local_head.")) for k in personal_keys(fenda))
    plain = build_model("mlp", "binary", 5)
    assert federated_keys(plain) == list(plain.state_dict()) and not personal_keys(plain)
