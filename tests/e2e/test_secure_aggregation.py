"""SecAgg+ claims, demonstrated on simulated federations (real Flower protocol, real sites).

* the securely aggregated model equals plain FedAvg within the stated quantisation bound;
* what the coordinator receives from one site is masked: uncorrelated with its true delta;
* a site that fails mid-round does not stop the round, the result is FedAvg of the survivors;
* too many failures halt the round and the study fails loudly (never a silent "completed");
* pooled (federated) standardisation equals standardisation on the pooled data.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
import flwr.compat.common.recorddict_compat as compat

from client.app import SiteClient
from server.secure_aggregation import derive_params
from server.simulate import simulate
from shared.config import load_site, load_study
from shared.contract import load_site_data
from shared.errors import FedhelixError

pytestmark = pytest.mark.e2e

REGIONS = ["northeast", "south", "west", "midwest", "europe"]


def tcga_study(root: Path, where: Path, *, secure: bool = True, rounds: int = 1, max_dropouts: int = 0, broken: tuple[str, ...] = (), normalize: str = "site") -> Path:
    """A TCGA study over five regions; ``broken`` sites get data on which training diverges."""
    (where / "sites").mkdir(parents=True)
    for region in REGIONS:
        text = (root / "studies" / "tcga-brca" / "sites" / f"{region}.toml").read_text()
        data = root / "data" / "tcga_brca" / "regions" / f"{region}.csv"
        if region in broken:
            frame = pd.read_csv(data)
            frame["age_at_index"] = frame["age_at_index"] * 1e30  # finite, but the Cox loss overflows
            data = where / f"{region}.csv"
            frame.to_csv(data, index=False)
            text = text.replace('normalize = "site"', 'normalize = "none"')
        text = re.sub(r'path = ".*"', f'path = "{data}"', text).replace('normalize = "site"', f'normalize = "{normalize}"')
        (where / "sites" / f"{region}.toml").write_text(text)
    study = f"""
[study]
name = "tcga-secagg"
task = "survival"
model = "cox"
rounds = {rounds}
strategy = "fedavg"
local_steps = 30
batch_size = 16
learning_rate = 0.05
seed = 7
secure_aggregation = {str(secure).lower()}

[secure_aggregation]
max_dropouts = {max_dropouts}
update_bound = 0.5
""" + "".join(f'\n[[sites]]\nname = "{r}"\nconfig = "sites/{r}.toml"\n' for r in REGIONS)
    (where / "study.toml").write_text(study)
    return where / "study.toml"


def final_weights(run_dir: Path) -> np.ndarray:
    saved = torch.load(run_dir / "model.pt", weights_only=False)
    return np.concatenate([t.numpy().ravel() for t in saved["state_dict"].values()])


def test_secure_aggregate_equals_plain_fedavg_and_the_server_sees_only_masked_vectors(root: Path, tmp_path: Path) -> None:
    exchanges: list[tuple[list, list]] = []
    secure_study = tcga_study(root, tmp_path / "secure")
    secure = simulate(secure_study, tmp_path / "run-secure", progress=False, observe=lambda sent, replies: exchanges.append((sent, replies)))
    plain = simulate(tcga_study(root, tmp_path / "plain", secure=False), tmp_path / "run-plain", progress=False)

    assert secure["secure_aggregation"] is True and plain["secure_aggregation"] is False
    p = secure["secure_aggregation_params"]
    n_train = sum(s["n_train"] for s in secure["sites"].values())
    bound = len(REGIONS) * (2 * p["clipping_range"] / p["quantization_range"]) * p["max_weight"] / n_train
    difference = np.abs(final_weights(tmp_path / "run-secure") - final_weights(tmp_path / "run-plain"))
    assert difference.max() <= bound + 1e-7, (difference.max(), bound)
    assert difference.max() > 0  # it really went through quantisation

    # What reached the coordinator from each site in the collect-masked-vectors stage.
    study = load_study(secure_study)
    sites = {ref.name: load_site(ref.config) for ref in study.sites}
    collected = [
        (next(m for m in sent if m.metadata.dst_node_id == r.metadata.src_node_id), r)
        for sent, replies in exchanges
        for r in replies
        if r.has_content() and "masked_params" in r.content.config_records.get("secaggplus_configs", {})
    ]
    assert len(collected) == len(REGIONS)
    site_of = {
        r.metadata.src_node_id: compat.recorddict_to_getpropertiesres(r.content).properties["site"]
        for sent, replies in exchanges
        for r in replies
        if r.metadata.message_type == "get_properties" and r.has_content()
    }
    seen, truth = [], []
    for sent, reply in collected:
        # Recompute the site's true (clipped) delta from the global it was sent: training is deterministic.
        fitins = compat.recorddict_to_fitins(sent.content, keep_input=True)
        delta, n, _ = SiteClient(sites[site_of[reply.metadata.src_node_id]]).fit(parameters_to_ndarrays(fitins.parameters), dict(fitins.config))
        true = np.concatenate([d.ravel() for d in delta])
        masked = np.concatenate([bytes_to_ndarray(b).ravel() for b in reply.content.config_records["secaggplus_configs"]["masked_params"]])
        values = masked[1:]  # the first element carries the (masked) example weight
        assert values.shape == true.shape
        assert values.min() >= 0 and values.max() < 2**32  # integers modulo 2^32
        quantised = np.round((np.clip(true * n / p["max_weight"], -p["clipping_range"], p["clipping_range"]) + p["clipping_range"]) * p["quantization_range"] / (2 * p["clipping_range"]))
        assert np.mean(np.abs(values - quantised) > 2) > 0.9  # masked, not the site's quantised values
        seen.append(values.astype(float) / 2**32)
        truth.append(true)
    # Pooled over the five sites (195 coordinates), the masked vectors carry no trace of the deltas.
    seen_all, truth_all = np.concatenate(seen), np.concatenate(truth)
    assert abs(np.corrcoef(seen_all, truth_all)[0, 1]) < 0.3  # independent data: |r| ~ 0.07
    assert 0.4 < seen_all.mean() < 0.6 and 0.2 < seen_all.std() < 0.37  # uniform on [0, 1): mean 0.5, std 0.29


def test_a_site_failing_mid_round_leaves_the_fedavg_of_the_survivors(root: Path, tmp_path: Path) -> None:
    secure = simulate(tcga_study(root, tmp_path / "drop", max_dropouts=1, broken=("europe",)), tmp_path / "run-drop", progress=False)
    assert secure["status"] == "completed"
    assert [f["site"] for f in secure["failures"]] == ["europe"] and "E120" in secure["failures"][0]["reason"]
    assert "diverged" in (tmp_path / "run-drop" / "audit" / "europe.errors.log").read_text()  # the line stays at the site
    assert "europe" not in secure["rounds"][0]["fit"]["sites"]

    # Plain FedAvg of the four survivors, same seed.
    survivors = tcga_study(root, tmp_path / "four", secure=False)
    text = survivors.read_text().replace('\n[[sites]]\nname = "europe"\nconfig = "sites/europe.toml"\n', "")
    survivors.write_text(text)
    simulate(survivors, tmp_path / "run-four", progress=False)

    p = secure["secure_aggregation_params"]
    n_train = sum(s["n_train"] for name, s in secure["sites"].items() if name != "europe")
    bound = 4 * (2 * p["clipping_range"] / p["quantization_range"]) * p["max_weight"] / n_train
    difference = np.abs(final_weights(tmp_path / "run-drop") - final_weights(tmp_path / "run-four"))
    assert difference.max() <= bound + 1e-7, (difference.max(), bound)


def test_too_many_failures_halt_secure_aggregation_and_fail_the_study_loudly(root: Path, tmp_path: Path) -> None:
    study = tcga_study(root, tmp_path / "halt", max_dropouts=1, broken=("europe", "midwest"))
    with pytest.raises(FedhelixError, match="secure aggregation halted|required sites"):
        simulate(study, tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.json").read_text()
    assert '"status": "failed"' in report and '"rounds": []' in report


def test_unworkable_secure_aggregation_configs_are_rejected_before_round_1(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FedhelixError, match="at least 3 sites"):
        derive_params(2, 0, 1.0, 100)
    with pytest.raises(FedhelixError, match="max_dropouts = 3 is too many"):
        derive_params(6, 3, 1.0, 100)
    with pytest.raises(FedhelixError, match="quantisation bits"):
        derive_params(2**17, 1, 1.0, 100)
    study = tcga_study(root, tmp_path / "bad", max_dropouts=3)
    with pytest.raises(FedhelixError, match="max_dropouts = 3 is too many"):
        simulate(study, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before Flower started


def test_federated_standardisation_equals_pooled_statistics(root: Path, tmp_path: Path) -> None:
    study_path = tcga_study(root, tmp_path / "fed", normalize="federated")
    report = simulate(study_path, tmp_path / "run", progress=False)
    assert report["status"] == "completed"
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    from shared.plan import TrainingPlan

    plan = TrainingPlan.from_json(saved["plan"])
    study = load_study(study_path)
    raw = [load_site_data(load_site(ref.config), "survival", feature_order=saved["features"]) for ref in study.sites]
    pooled = np.concatenate([d.x_train for d in raw]).astype(np.float64)
    indicator = np.all((pooled == 0) | (pooled == 1), axis=0)
    mean = np.where(indicator, 0.0, pooled.mean(axis=0))
    std = np.where(indicator | (pooled.std(axis=0) < 1e-12), 1.0, pooled.std(axis=0))
    assert np.allclose(plan.normalization["mean"], mean, atol=1e-3)
    assert np.allclose(plan.normalization["scale"], std, rtol=1e-3, atol=1e-3)
    assert report["final"]["mean"]["c_index"] > 0.7
