"""Central versus federated GNN on MoleculeNet data split by scaffold over 4 companies.

For ESOL (regression, RMSE) and BBBP (binary, ROC AUC): the bundled study
(``studies/esol``, ``studies/bbbp``: 4 scaffold-split companies) runs as a real
simulated federation (SecAgg+ on), and the *same* GNN is trained centrally on
the union of the companies' train splits with the same total number of
gradient steps. Both final models are scored on the same molecules: the union
of the companies' test splits. Then both again with DP-SGD at epsilon = 8
(per company; for the central model, on the pooled data).
Writes ``esol_rmse_{federated,central}``, ``bbbp_auc_{federated,central}`` and
their ``_dp8`` variants to bench/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import record  # noqa: E402
from client.privacy.budget import DPRound, _noise  # noqa: E402
from client.trainer import evaluate, train  # noqa: E402
from server.simulate import simulate  # noqa: E402
from shared.config import load_site_ref, load_study  # noqa: E402
from shared.contract import load_site_data  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.molecules import ATOM_FEATURES  # noqa: E402
from shared.paths import PROJECT_ROOT  # noqa: E402
from shared.plan import TrainingPlan  # noqa: E402

DATASETS = {"esol": ("rmse", "esol_rmse"), "bbbp": ("roc_auc", "bbbp_auc"), "tox21": ("roc_auc", "tox21_auc")}


def with_partition_defaults(study):
    """The bundled study with the recipe `fedhelix partition` now writes (mean pooling, local epochs, best round)."""
    import tomllib

    from server.partition import STUDY_DEFAULTS

    recipe = tomllib.loads(STUDY_DEFAULTS)
    options = dataclasses.replace(study.model_options, pooling="mean")
    return dataclasses.replace(study, rounds=recipe["rounds"], local_epochs=float(recipe["local_epochs"]), select_best=recipe["select_best"], init_output_bias=True, model_options=options)


def pooled(study):
    """All companies' molecules as one site (same train/test molecules as the federation)."""
    parts = [load_site_data(load_site_ref(ref, study.path), study.task) for ref in study.sites]
    first = parts[0]
    return dataclasses.replace(
        first,
        site="central",
        graphs_train=tuple(g for p in parts for g in p.graphs_train),
        graphs_test=tuple(g for p in parts for g in p.graphs_test),
        y_train=np.concatenate([p.y_train for p in parts]),
        y_test=np.concatenate([p.y_test for p in parts]),
    )


def federated(study, data) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"fedhelix-bench-{study.name}-"))  # kept: flower.log explains a failure
    report = simulate(study, out, progress=False)
    saved = torch.load(out / "model.pt", weights_only=False)
    plan = TrainingPlan.from_json(saved["plan"])
    model = build_model(plan.model, plan.task, len(ATOM_FEATURES), plan.model_options, n_outputs=len(saved["labels"]) if plan.task == "multitask" else 1)
    model.load_state_dict(saved["state_dict"])
    assert report["status"] == "completed"
    return evaluate(model, data, plan)[1]


def central(study, data) -> dict:
    """The same GNN, one site, as many gradient steps as all companies together."""
    plan = TrainingPlan.from_study(study)
    model = build_model(study.model, study.task, len(ATOM_FEATURES), study.model_options, seed=study.seed)
    steps = study.local_steps * len(study.sites)
    dp = None
    if study.privacy.dp:
        q = min(1.0, study.batch_size / data.n_train)
        sigma = _noise(study.privacy.target_epsilon, 1e-5, q, study.rounds * steps, study.privacy.accountant)
        dp = DPRound(sigma, q, steps, 1e-5, study.privacy.max_grad_norm, study.privacy.accountant)
    plan = dataclasses.replace(plan, local_steps=steps)
    for r in range(1, study.rounds + 1):
        train(model, data, plan, r, dp=dp)
    return evaluate(model, data, plan)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--rounds", type=int, default=None, help="override the studies' rounds")
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--dp-only", action="store_true", help="only the epsilon = 8 variants")
    parser.add_argument("--partition-defaults", action="store_true", help="federated only, with partition's defaults (keys *_federated_partition_defaults)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, float] = {}
    for name in args.datasets:
        metric, key = DATASETS[name]
        study = load_study(PROJECT_ROOT / "studies" / name / "study.toml")
        if args.rounds:
            study = dataclasses.replace(study, rounds=args.rounds)
        data = pooled(study)
        if args.partition_defaults:
            start = time.time()
            fed = federated(with_partition_defaults(study), data)[metric]
            figures[f"{key}_federated_partition_defaults"] = round(fed, 4)
            print(f"{name} (partition defaults): {metric} federated {fed:.3f} on {data.n_test} pooled test molecules ({time.time() - start:.0f} s)", flush=True)
            record(figures)
            continue
        variants = [] if args.dp_only else [("", study)]
        if not args.no_dp:
            variants.append(("_dp8", dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, dp=True, target_epsilon=8.0))))
        for suffix, s in variants:
            start = time.time()
            fed = federated(s, data)[metric]
            cen = central(s, data)[metric]
            figures[f"{key}_federated{suffix}"] = round(fed, 4)
            figures[f"{key}_central{suffix}"] = round(cen, 4)
            print(f"{name}{suffix or ' (no DP)'}: {metric} federated {fed:.3f}, central {cen:.3f} on {data.n_test} pooled test molecules ({time.time() - start:.0f} s)", flush=True)
            record({k: v for k, v in figures.items()})
    record(figures)


if __name__ == "__main__":
    main()
