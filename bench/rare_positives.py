"""A rare-positive molecule set: does the study `fedhelix partition` writes beat the atom count?

Two sets made from the bundled Tox21 molecules, each shaped like the set of issue 15
(3.5% positives, where the atom count alone reaches ROC AUC 0.64-0.68 and the old
defaults, sum pooling, fixed steps, bias 0, last round, ended at 0.44):

* ``NR-AR-LBD`` (default): one Tox21 assay as a binary label, molecules without a
  measurement left out: 6,751 molecules, 3.5% positive, atom-count AUC 0.73 overall;
* ``sulfonamide``: the synthetic label "has a sulfonamide group" (SMARTS ``S(=O)(=O)N``)
  on all 7,831 molecules: 3.3% positive, atom-count AUC 0.71 (an easy label for a GNN).

The set is split with
``partition(..., "scaffold", 4)`` (what ``fedhelix partition --by scaffold --sites 4``
runs), the written study runs unchanged in simulation, and each company's test split
is scored by the atom count alone. Records ``rare_positive_auc_default`` (mean test
ROC AUC over companies), ``rare_positive_auc_atom_count`` (the same mean for the atom
count), ``rare_positive_prevalence`` and, with ``--old-defaults``, the old recipe's AUC
(``rare_substructure_*`` for the sulfonamide set).

    PYTHONPATH=$PWD .venv/bin/python bench/rare_positives.py [--label NR-AR-LBD|sulfonamide] [--molecules N] [--rounds N] [--old-defaults]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import record  # noqa: E402
from server.partition import partition  # noqa: E402
from server.simulate import simulate  # noqa: E402
from shared.config import load_site_ref, load_study  # noqa: E402
from shared.contract import load_site_data  # noqa: E402
from shared.metrics import binary_metrics  # noqa: E402
from shared.paths import PROJECT_ROOT  # noqa: E402

PATTERN = "S(=O)(=O)N"  # sulfonamide
OLD_RECIPE = {r"(?m)^rounds = .*$": "rounds = 10", r"(?m)^local_epochs = .*$": "local_steps = 80", r'(?m)^pooling = "mean".*$': 'pooling = "add"', r"(?m)^select_best = true.*$": "select_best = false"}


def rare_set(out: Path, label: str, molecules: int, seed: int = 0) -> Path:
    """Tox21's SMILES with one rare label (an assay, or the sulfonamide substructure); a seeded subset when ``molecules`` is smaller."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    tox = pd.read_csv(PROJECT_ROOT / "data" / "molecules" / "tox21.csv")
    if label == "sulfonamide":
        frame = tox[["smiles"]].copy()
        query = Chem.MolFromSmarts(PATTERN)
        frame[label] = [int(m is not None and m.HasSubstructMatch(query)) for m in (Chem.MolFromSmiles(s) for s in frame["smiles"])]
    else:
        frame = tox.loc[tox[label].notna(), ["smiles", label]].reset_index(drop=True)
        frame[label] = frame[label].astype(int)
    if molecules < len(frame):
        frame = frame.sample(molecules, random_state=seed).reset_index(drop=True)
    path = out / "rare.csv"
    frame.to_csv(path, index=False)
    return path


def atom_count_auc(study) -> dict[str, float]:
    """Per company: the test ROC AUC of the molecule's atom count alone (higher count, higher score)."""
    aucs = {}
    for ref in study.sites:
        data = load_site_data(load_site_ref(ref, study.path), study.task)
        atoms = np.array([g.num_nodes for g in data.graphs_test], dtype=float)
        aucs[ref.name] = binary_metrics(np.asarray(data.y_test), atoms)["roc_auc"]
    return aucs


def run(study_path: Path, out: Path) -> dict:
    started = time.time()
    report = simulate(study_path, out, progress=False)
    assert report["status"] == "completed", report.get("error")
    per_site = {name: m.get("roc_auc") for name, m in report["final"]["sites"].items()}
    print(f"  {study_path.name}: mean test ROC AUC {report['final']['mean']['roc_auc']:.3f} {per_site}, selected round {report.get('selected_round')} ({time.time() - started:.0f} s)", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="NR-AR-LBD", help="a Tox21 assay column, or 'sulfonamide' (synthetic substructure label)")
    parser.add_argument("--molecules", type=int, default=10**6, help="at most this many molecules (all by default)")
    parser.add_argument("--rounds", type=int, default=None, help="override the written study's rounds")
    parser.add_argument("--balanced", action="store_true", help="also run the written study with its pos_weight = \"balanced\" line uncommented")
    parser.add_argument("--only-balanced", action="store_true", help="only that variant (no default run)")
    parser.add_argument("--old-defaults", action="store_true", help="also run the recipe partition wrote before (sum pooling, 80 steps, last round)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedhelix-bench-rare-"))  # kept: flower.log explains a failure
    made = partition(rare_set(work, args.label, args.molecules), "scaffold", 4, work / "study", name="rare-positives")
    text = made.study.read_text()
    if args.rounds:
        text = re.sub(r"(?m)^rounds = \d+$", f"rounds = {args.rounds}", text)
        made.study.write_text(text)
    study = load_study(made.study)
    prevalence = float(pd.read_csv(work / "rare.csv")[args.label].mean())
    atoms = atom_count_auc(study)
    print(f"rare-positive set: {sum(made.sites.values())} molecules, {100 * prevalence:.1f}% positive; atom-count test ROC AUC {atoms}", flush=True)
    key = "rare_substructure" if args.label == "sulfonamide" else "rare_positive"
    figures = {
        f"{key}_prevalence": round(prevalence, 4),
        f"{key}_auc_atom_count": round(float(np.mean(list(atoms.values()))), 4),
    }
    if not args.only_balanced:
        figures[f"{key}_auc_default"] = round(run(made.study, work / "run-default")["final"]["mean"]["roc_auc"], 4)
    if args.balanced or args.only_balanced:
        balanced = work / "study" / "balanced-study.toml"
        balanced.write_text(text.replace('# pos_weight = "balanced"', 'pos_weight = "balanced"'))
        figures[f"{key}_auc_balanced"] = round(run(balanced, work / "run-balanced")["final"]["mean"]["roc_auc"], 4)
    if args.old_defaults:
        old = work / "study" / "old-study.toml"
        for new, before in OLD_RECIPE.items():
            text = re.sub(new, before, text)
        old.write_text(text.replace("seed = 42\n", "seed = 42\ninit_output_bias = false\n"))
        figures[f"{key}_auc_old_defaults"] = round(run(old, work / "run-old")["final"]["mean"]["roc_auc"], 4)
    print(figures, flush=True)
    record(figures)


if __name__ == "__main__":
    main()
