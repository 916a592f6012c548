"""TCGA-BRCA bundled study over several seeds: mean and spread of the per-region C-index.

Writes ``tcga_cindex_mean`` and ``tcga_cindex_std`` (over seeds of the mean
per-region test C-index) to bench/results.json. Published (FLamby, 5 seeds):
FedAvg 0.732, FedAdam 0.815. Run: ``.venv/bin/python bench/tcga_seeds.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import record  # noqa: E402
from server.simulate import simulate  # noqa: E402
from shared.config import load_study  # noqa: E402
from shared.paths import DEFAULT_STUDY  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    args = parser.parse_args()
    base = load_study(args.study)
    scores = []
    for seed in args.seeds:
        study = dataclasses.replace(base, seed=seed)
        with tempfile.TemporaryDirectory() as out:
            report = simulate(study, out, progress=False)
        per_site = {k: round(v["c_index"], 3) for k, v in report["final"]["sites"].items()}
        scores.append(report["final"]["mean"]["c_index"])
        print(f"seed {seed}: mean per-region C-index {scores[-1]:.4f}  {per_site}", flush=True)
    mean, std = float(np.mean(scores)), float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0
    print(f"{base.name} ({base.strategy}): C-index {mean:.4f} ± {std:.4f} over {len(scores)} seeds")
    record({"tcga_cindex_mean": round(mean, 4), "tcga_cindex_std": round(std, 4), "tcga_seeds": len(scores)})


if __name__ == "__main__":
    main()
