"""Molecule studies: featurisation, the SMILES contract, the GNN's two readings, partitioning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shared.config import ConfigError, ModelOptions, check_format, load_site, load_study, parse_study
from shared.contract import load_site_data
from shared.errors import DataContractError
from shared.gnn import dense_batch, sparse_batch
from shared.metrics import multitask_metrics
from shared.models import build_model
from shared.molecules import ATOM_FEATURES, featurise, scaffold
from shared.tasks import loss_for, masked_bce_per_sample

ESOL = "measured log solubility in mols per litre"


@pytest.mark.parametrize(
    ("smiles", "atoms", "bonds"),
    [("CCO", 3, 2), ("c1ccccc1", 6, 6), ("CC(=O)Oc1ccccc1C(=O)O", 13, 13), ("[Na+].[Cl-]", 2, 0), ("C", 1, 0)],
)
def test_known_molecules_have_their_heavy_atoms_and_bonds(smiles: str, atoms: int, bonds: int) -> None:
    (graph,), invalid = featurise([smiles])
    assert invalid == []
    assert graph.num_nodes == atoms
    assert graph.edge_index.shape[1] == 2 * bonds  # each bond in both directions
    assert graph.edge_attr.shape == (2 * bonds, 3)
    x, _, _, _ = sparse_batch([graph])
    assert x.shape == (atoms, len(ATOM_FEATURES))
    assert torch.equal(x.sum(1), torch.full((atoms,), 9.0))  # one category per atom feature


def test_benzene_atoms_are_aromatic_carbons_in_a_ring() -> None:
    (graph,), _ = featurise(["c1ccccc1"])
    x, _, _, _ = sparse_batch([graph])
    names = [ATOM_FEATURES[i] for i in torch.nonzero(x[0]).flatten().tolist()]
    assert "atomic_num=6" in names and "is_aromatic=True" in names and "is_in_ring=True" in names and "num_hs=1" in names


def test_invalid_and_empty_smiles_are_found_not_turned_into_empty_graphs() -> None:
    graphs, invalid = featurise(["CCO", "C1CC", "not a molecule", "", None, float("nan"), "c1ccccc1"])
    assert invalid == [1, 2, 3, 4, 5]
    assert [g is not None for g in graphs] == [True, False, False, False, False, False, True]


def _site(tmp_path: Path, rows: list[tuple], *, labels='"y"', extra: str = "", columns=("smiles", "y")) -> Path:
    pd.DataFrame(rows, columns=list(columns)).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "m.toml").write_text(f'[site]\nname = "lab"\n[data]\npath = "m.csv"\nformat = "smiles"\nlabel = {labels}\n{extra}')
    return tmp_path / "m.toml"


VALID = ["CCO", "CCN", "CCC", "c1ccccc1", "CC(=O)O", "CCCl", "OCCO", "CC(C)O", "c1ccncc1", "CCOC", "CNC", "CCS"]


def test_invalid_smiles_stop_the_site_by_default_naming_count_and_rows(tmp_path: Path) -> None:
    rows = [(s, i % 2) for i, s in enumerate(VALID)]
    rows[2] = ("C1CC", 0)
    rows[7] = ("Xx", 1)
    with pytest.raises(DataContractError) as err:
        load_site_data(load_site(_site(tmp_path, rows)), "binary")
    line = str(err.value)
    assert "\n" not in line and "site 'lab'" in line and "'smiles'" in line
    assert "2 of 12 SMILES are invalid" in line and "row 3 ('C1CC')" in line and "row 8 ('Xx')" in line
    assert 'invalid_smiles = "skip"' in line


def test_invalid_smiles_can_be_skipped_and_are_counted(tmp_path: Path) -> None:
    rows = [(s, i % 2) for i, s in enumerate(VALID)]
    rows[2] = ("C1CC", 0)
    rows[7] = ("", 1)
    data = load_site_data(load_site(_site(tmp_path, rows, extra='invalid_smiles = "skip"\ntest_fraction = 0.25\n')), "binary")
    assert data.invalid_smiles == 2 and data.n_train + data.n_test == 10
    assert any("skipped 2 of 12 SMILES" in w for w in data.warnings)
    assert all(g.num_nodes > 0 for g in data.graphs_train + data.graphs_test)


def test_multitask_keeps_unknown_labels_as_nan_and_drops_rows_without_any(tmp_path: Path) -> None:
    rows = [(s, i % 2, (i + 1) % 2 if i % 3 else None) for i, s in enumerate(VALID)]
    rows[4] = (VALID[4], None, None)
    path = _site(tmp_path, rows, labels='["a", "b"]', columns=("smiles", "a", "b"))
    data = load_site_data(load_site(path), "multitask")
    assert data.labels == ("a", "b") and data.y_train.shape[1] == 2
    assert data.n_train + data.n_test == 11 and data.rows_dropped == 1
    assert np.isnan(np.concatenate([data.y_train, data.y_test])).sum() == 4  # rows 0, 3, 6, 9 lack b; row 4 has neither
    with pytest.raises(DataContractError, match="2 label columns for a binary study"):
        load_site_data(load_site(path), "binary")


def test_label_must_be_binary_for_classification(tmp_path: Path) -> None:
    rows = [(s, float(i)) for i, s in enumerate(VALID)]
    with pytest.raises(DataContractError, match="label must be 0/1"):
        load_site_data(load_site(_site(tmp_path, rows)), "binary")
    assert load_site_data(load_site(_site(tmp_path, rows)), "regression").n_train > 0


def test_masked_loss_ignores_unknown_labels() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0], [0.5, 0.1, -0.2]], requires_grad=True)
    target = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), float("nan"), float("nan")]])
    per_row = masked_bce_per_sample(logits, target)
    expected0 = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, [0, 2]], target[0, [0, 2]])
    assert torch.allclose(per_row[0], expected0) and per_row[1] == 0
    per_row.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1] == 0 and torch.all(logits.grad[1] == 0)
    assert torch.isfinite(loss_for("multitask")(logits, target))


def test_multitask_metrics_average_tasks_with_both_classes() -> None:
    y = np.array([[1, 0, 1], [0, 0, np.nan], [1, 0, 0], [0, 0, 1.0]])
    p = np.array([[0.9, 0.1, 0.8], [0.1, 0.2, 0.5], [0.8, 0.3, 0.1], [0.3, 0.4, 0.05]])
    m = multitask_metrics(y, p, ["a", "b", "c"])
    assert m["roc_auc[a]"] == 1.0 and m["roc_auc[b]"] is None and m["roc_auc[c]"] == 0.5
    assert m["roc_auc"] == 0.75 and m["tasks_scored"] == 2


@pytest.mark.parametrize("conv", ["graphconv", "gin"])
@pytest.mark.parametrize("pooling", ["mean", "add"])
def test_dense_reading_equals_the_pyg_model(conv: str, pooling: str) -> None:
    graphs, _ = featurise(VALID + ["CC(=O)Oc1ccccc1C(=O)O", "[Na+].[Cl-]"])
    model = build_model("gnn", "multitask", len(ATOM_FEATURES), ModelOptions(hidden=(16,), layers=3, conv=conv, pooling=pooling), seed=0, n_outputs=3)
    sparse = model(*sparse_batch(graphs))
    dense = model.forward_dense(*dense_batch(graphs))
    assert sparse.shape == (len(graphs), 3)
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_study_options_for_the_gnn() -> None:
    doc = {
        "study": {"name": "m", "task": "multitask", "model": "gnn"},
        "model": {"layers": 2, "hidden": 32, "conv": "gin", "pooling": "add"},
        "sites": [{"name": "a", "config": "a.toml"}],
    }
    study = parse_study(doc)
    assert study.model_options.hidden == (32,) and study.model_options.layers == 2 and study.model_options.conv == "gin"
    with pytest.raises(ConfigError, match="conv: must be one of graphconv, gin"):
        parse_study({**doc, "model": {"conv": "gcn"}})
    with pytest.raises(ConfigError, match="one width per layer"):
        parse_study({**doc, "model": {"layers": 3, "hidden": [8, 8]}})
    with pytest.raises(ConfigError, match="does not fit task 'multitask'"):
        parse_study({**doc, "study": {"name": "m", "task": "multitask", "model": "mlp"}})


def test_gnn_needs_smiles_sites_and_smiles_sites_need_the_gnn(root: Path) -> None:
    table_site = load_site(root / "studies" / "wdbc" / "sites" / "hospital_a.toml")
    with pytest.raises(ConfigError, match='format = "smiles"'):
        check_format(table_site, "gnn")
    check_format(table_site, "mlp")


# ---------------------------------------------------------------- partition


def _fedhelix(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedhelix.cli", *args], capture_output=True, text=True, timeout=180)


def test_scaffold_partition_keeps_every_scaffold_in_one_site_and_writes_a_runnable_study(root: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(root / "data" / "molecules" / "BBBP.csv").iloc[:400]
    frame.to_csv(tmp_path / "bbbp.csv", index=False)
    result = _fedhelix("partition", str(tmp_path / "bbbp.csv"), "--by", "scaffold", "--sites", "3", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    study = load_study(tmp_path / "out" / "study.toml")
    assert study.task == "binary" and study.model == "gnn" and [s.name for s in study.sites] == ["company_1", "company_2", "company_3"]
    # defaults for large, imbalanced sets: size-independent pooling, local work in epochs, best round on validation, bias at the log-odds
    assert study.model_options.pooling == "mean" and study.local_epochs > 0 and study.select_best and study.init_output_bias
    seen: dict[str, str] = {}
    total = 0
    for ref in study.sites:
        site = load_site(ref.config)
        assert site.data.format == "smiles" and site.data.label == "p_np" and site.data.split_column == "split"
        part = pd.read_csv(site.data.path)
        total += len(part)
        for s in part["smiles"]:
            key = scaffold(s)
            if key is None:
                continue
            assert seen.setdefault(key, site.name) == site.name, f"scaffold {key} in two sites"
        assert set(part["split"]) == {"train", "test"}
    assert total == 400 and len(set(seen.values())) == 3
    # scaffold groups are whole and sizes balanced greedily: no company gets more than half
    assert max(len(pd.read_csv(load_site(r.config).data.path)) for r in study.sites) < 200


def test_partition_infers_multitask_and_asks_for_a_label_when_ambiguous(root: Path, tmp_path: Path) -> None:
    from server.partition import partition

    tox = pd.read_csv(root / "data" / "molecules" / "tox21.csv").iloc[:200]
    tox.to_csv(tmp_path / "tox.csv", index=False)
    result = partition(tmp_path / "tox.csv", "dirichlet", 2, tmp_path / "tox", alpha=1.0)
    assert result.task == "multitask" and len(result.labels) == 12 and sum(result.sites.values()) == 200
    esol = pd.read_csv(root / "data" / "molecules" / "ESOL_delaney-processed.csv").iloc[:100]
    esol.to_csv(tmp_path / "esol.csv", index=False)
    with pytest.raises(ConfigError, match="pass --label"):
        partition(tmp_path / "esol.csv", "random", 2, tmp_path / "esol")
    result = partition(tmp_path / "esol.csv", "random", 2, tmp_path / "esol", labels=[ESOL])
    assert result.task == "regression" and result.sites == {"company_1": 50, "company_2": 50}
    failed = _fedhelix("partition", str(tmp_path / "esol.csv"), "--sites", "2", "--out", str(tmp_path / "x"))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and "--label" in failed.stderr
