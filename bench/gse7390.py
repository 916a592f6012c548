"""GSE7390 across 3 sites: the federated model against a pooled model, on the same test patients.

For each study (survival: linear Cox, C-index; 5-year metastasis: logistic, ROC AUC),
runs the federated simulation (SecAgg+, federated feature selection, federated
standardisation), then trains the same model centrally on the pooled train splits
(same features, pooled standardisation, same optimiser, rounds x local_steps steps)
and scores both on the union of the sites' test folds. Records
``gse7390_cindex_federated`` / ``gse7390_cindex_pooled`` and
``gse7390_auc5y_federated`` / ``gse7390_auc5y_pooled`` (means over seeds) in bench/results.json.
Run: ``.venv/bin/python bench/gse7390.py [--seeds 0 1 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import record  # noqa: E402
from client.trainer import evaluate, train  # noqa: E402
from server.simulate import simulate  # noqa: E402
from shared.config import StudyConfig, load_site_ref, load_study  # noqa: E402
from shared.contract import SiteData, load_site_data  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.plan import TrainingPlan  # noqa: E402
from shared.preprocess import Standardizer  # noqa: E402

STUDIES = {"cindex": ROOT / "studies/gse7390/study.toml", "auc5y": ROOT / "studies/gse7390/study-metastasis.toml"}


def pooled_data(study: StudyConfig, features: list[str]) -> SiteData:
    """Every site's unstandardised train and test splits, on the agreed features, concatenated."""
    parts = [
        load_site_data(load_site_ref(ref, study.path), study.task, study.categories, features, select=True, scale=False)
        for ref in study.sites
    ]  # fmt: skip
    cat = lambda key: np.concatenate([getattr(p, key) for p in parts])  # noqa: E731
    return SiteData("pooled", tuple(features), cat("x_train"), cat("y_train"), cat("x_test"), cat("y_test"))


def run(study: StudyConfig, metric: str) -> tuple[float, float, int]:
    """(federated, pooled) score on the pooled test patients, and how many features the federation selected."""
    with tempfile.TemporaryDirectory() as out:
        simulate(study, out, progress=False)
        saved = torch.load(Path(out) / "model.pt", weights_only=False)
    plan = TrainingPlan.from_json(saved["plan"])
    features = list(saved["features"])
    raw = pooled_data(study, features)

    def scaled(scaler: Standardizer) -> SiteData:
        return dataclasses.replace(raw, x_train=scaler.transform(raw.x_train), x_test=scaler.transform(raw.x_test))

    federated_scaler = Standardizer(np.asarray(plan.normalization["mean"], np.float32), np.asarray(plan.normalization["scale"], np.float32))
    model = build_model(plan.model, plan.task, len(features), plan.model_options)
    model.load_state_dict(saved["state_dict"])
    _, fed = evaluate(model, scaled(federated_scaler), plan)

    central = dataclasses.replace(plan, local_steps=plan.local_steps * plan.rounds)
    pooled_model = build_model(plan.model, plan.task, len(features), plan.model_options, seed=study.seed)
    data = scaled(Standardizer.fit(raw.x_train))
    train(pooled_model, data, central, server_round=1)
    _, pooled = evaluate(pooled_model, data, plan)
    gap = sum(float((a - b).norm()) ** 2 for a, b in zip(model.state_dict().values(), pooled_model.state_dict().values())) ** 0.5
    print(f"  L2 distance between federated and pooled weights: {gap:.4f}", flush=True)
    return float(fed[metric]), float(pooled[metric]), len(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    figures: dict[str, float | int | str] = {}
    for name, path in STUDIES.items():
        base = load_study(path)
        metric = "c_index" if base.task == "survival" else "roc_auc"
        fed, pooled = [], []
        for seed in args.seeds:
            f, p, n = run(dataclasses.replace(base, seed=seed), metric)
            fed.append(f)
            pooled.append(p)
            print(f"{base.name} seed {seed}: {metric} federated {f:.4f} pooled {p:.4f} ({n} features)", flush=True)
        figures[f"gse7390_{name}_federated"] = round(float(np.mean(fed)), 4)
        figures[f"gse7390_{name}_pooled"] = round(float(np.mean(pooled)), 4)
        print(f"{base.name}: {metric} federated {np.mean(fed):.4f} ± {np.std(fed):.4f}, pooled {np.mean(pooled):.4f} ± {np.std(pooled):.4f}")
    figures["gse7390_seeds"] = len(args.seeds)
    record(figures)


if __name__ == "__main__":
    main()
