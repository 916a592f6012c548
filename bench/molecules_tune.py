"""Choose the molecule studies' recipe on a validation split, never on the test molecules.

Each company's *train* molecules are split 80/20 (seeded) into fit and
validation molecules; the test split is never loaded into a score. FedAvg is
emulated in process (each company trains from the global weights with the real
``client.trainer.train``, deltas are averaged weighted by molecules, as the
ServerApp does; secure aggregation only adds quantisation error ~1e-5), and the
same GNN is trained centrally on the pooled fit molecules with the same total
number of gradient steps. Prints validation RMSE / ROC AUC for each recipe.

    python bench/molecules_tune.py --dataset esol --rounds 20 --local-steps 40 --lr 0.002
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.privacy.budget import DPRound, _noise
from client.trainer import evaluate, train
from shared.config import load_site_ref, load_study
from shared.contract import load_site_data
from shared.models import build_model
from shared.molecules import ATOM_FEATURES
from shared.paths import PROJECT_ROOT
from shared.plan import TrainingPlan

METRIC = {"esol": "rmse", "bbbp": "roc_auc"}


def validation_sites(study, seed: int = 7) -> list:
    """Each company's train molecules split into fit (as train) and validation (as test)."""
    sites = []
    for ref in study.sites:
        data = load_site_data(load_site_ref(ref, study.path), study.task)
        order = np.random.default_rng(seed).permutation(data.n_train)
        cut = int(0.8 * data.n_train)
        fit, val = order[:cut], order[cut:]
        sites.append(dataclasses.replace(
            data,
            graphs_train=tuple(data.graphs_train[i] for i in fit), y_train=data.y_train[fit],
            graphs_test=tuple(data.graphs_train[i] for i in val), y_test=data.y_train[val],
        ))  # fmt: skip
    return sites


def pool(sites: list):
    return dataclasses.replace(
        sites[0], site="central",
        graphs_train=tuple(g for s in sites for g in s.graphs_train), y_train=np.concatenate([s.y_train for s in sites]),
        graphs_test=tuple(g for s in sites for g in s.graphs_test), y_test=np.concatenate([s.y_test for s in sites]),
    )  # fmt: skip


def _dp(study, n: int, steps: int, rounds: int) -> DPRound | None:
    if not study.privacy.dp:
        return None
    q = min(1.0, study.batch_size / n)
    sigma = _noise(study.privacy.target_epsilon, 1e-5, q, rounds * steps, study.privacy.accountant)
    return DPRound(sigma, q, steps, 1e-5, study.privacy.max_grad_norm, study.privacy.accountant)


def federated(study, sites: list, pooled, every: int) -> list[tuple[int, float]]:
    """FedAvg (or a server Adam step on the averaged delta with ``fedadam``), scored on pooled validation."""
    plan = TrainingPlan.from_study(study)
    model = build_model(study.model, study.task, len(ATOM_FEATURES), study.model_options, seed=study.seed)
    weights = np.array([s.n_train for s in sites], dtype=float)
    weights /= weights.sum()
    server_opt = torch.optim.Adam(model.parameters(), lr=study.server_learning_rate, betas=(0.9, 0.99), eps=1e-3) if study.strategy == "fedadam" else None
    curve = []
    for r in range(1, study.rounds + 1):
        start = [p.detach().clone() for p in model.parameters()]
        total = [torch.zeros_like(p) for p in start]
        for w, site in zip(weights, sites):
            with torch.no_grad():
                for p, s in zip(model.parameters(), start):
                    p.copy_(s)
            train(model, site, plan, r, dp=_dp(study, site.n_train, study.local_steps, study.rounds))
            for t, p, s in zip(total, model.parameters(), start):
                t += w * (p.detach() - s)
        with torch.no_grad():
            for p, s, t in zip(model.parameters(), start, total):
                p.copy_(s)
                if server_opt is None:
                    p += t
                else:
                    p.grad = -t
        if server_opt is not None:
            server_opt.step()
        if r % every == 0 or r == study.rounds:
            curve.append((r, evaluate(model, pooled, plan)[1][METRIC_KEY]))
    return curve


def central(study, pooled, n_sites: int, every: int) -> list[tuple[int, float]]:
    plan = TrainingPlan.from_study(study)
    model = build_model(study.model, study.task, len(ATOM_FEATURES), study.model_options, seed=study.seed)
    steps = study.local_steps * n_sites
    plan = dataclasses.replace(plan, local_steps=steps)
    dp = _dp(study, pooled.n_train, steps, study.rounds)
    curve = []
    for r in range(1, study.rounds + 1):
        train(model, pooled, plan, r, dp=dp)
        if r % every == 0 or r == study.rounds:
            curve.append((r, evaluate(model, pooled, plan)[1][METRIC_KEY]))
    return curve


METRIC_KEY = "rmse"


def main() -> None:
    global METRIC_KEY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="esol", choices=list(METRIC))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--pooling")
    parser.add_argument("--optimizer")
    parser.add_argument("--strategy", choices=["fedavg", "fedadam"])
    parser.add_argument("--server-lr", type=float)
    parser.add_argument("--dp", action="store_true", help="DP-SGD at epsilon = 8")
    parser.add_argument("--max-grad-norm", type=float)
    parser.add_argument("--every", type=int, default=5, help="score every N rounds")
    parser.add_argument("--only", choices=["fed", "central"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    METRIC_KEY = METRIC[args.dataset]
    study = load_study(PROJECT_ROOT / "studies" / args.dataset / "study.toml")
    changes = {k: v for k, v in {"rounds": args.rounds, "local_steps": args.local_steps, "learning_rate": args.lr, "batch_size": args.batch_size,
                                      "optimizer": args.optimizer, "strategy": args.strategy, "server_learning_rate": args.server_lr}.items() if v is not None}  # fmt: skip
    study = dataclasses.replace(study, **changes)
    opts = study.model_options
    if args.hidden:
        opts = dataclasses.replace(opts, hidden=(args.hidden,))
    if args.pooling:
        opts = dataclasses.replace(opts, pooling=args.pooling)
    study = dataclasses.replace(study, model_options=opts)
    if args.dp:
        privacy = dataclasses.replace(study.privacy, dp=True, target_epsilon=8.0, max_grad_norm=args.max_grad_norm or study.privacy.max_grad_norm)
        study = dataclasses.replace(study, privacy=privacy)
    sites = validation_sites(study)
    pooled = pool(sites)
    print(f"{args.dataset} {changes} hidden={opts.hidden} pooling={opts.pooling} dp={args.dp}: {pooled.n_train} fit / {pooled.n_test} validation", flush=True)
    if args.only != "central":
        t = time.time()
        print(f"  federated val {METRIC_KEY}: {[(r, round(v, 3)) for r, v in federated(study, sites, pooled, args.every)]} ({time.time() - t:.0f} s)", flush=True)
    if args.only != "fed":
        t = time.time()
        print(f"  central   val {METRIC_KEY}: {[(r, round(v, 3)) for r, v in central(study, pooled, len(sites), args.every)]} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
