"""Personalized vs global model on the bundled studies, one simulation per (study, method).

Each bundled study is run unchanged but for ``[personalization] method``; the final
round's mean over sites of the primary metric is recorded twice, for the global model
and for each site's personal model on the same test split:
``personalized_<study>_<method>_<metric>`` and ``global_<study>_<method>_<metric>``.
FedBN and FENDA change the MLP, so they run on the MLP studies only (WDBC, diabetes).
Run: ``.venv/bin/python bench/personalization.py [--studies wdbc diabetes] [--methods ditto]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import record  # noqa: E402
from server.simulate import simulate  # noqa: E402
from shared.config import PERSONAL_ARCHITECTURES, PERSONALIZATION, PersonalizationConfig, load_study  # noqa: E402
from shared.metrics import PRIMARY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDIES = {"wdbc": "studies/wdbc/study.toml", "tcga": "studies/tcga-brca/study.toml", "diabetes": "studies/diabetes/study.toml", "tox21": "studies/tox21/study.toml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", default=["wdbc", "tcga", "diabetes"], choices=list(STUDIES))
    parser.add_argument("--methods", nargs="+", default=list(PERSONALIZATION), choices=list(PERSONALIZATION))
    parser.add_argument("--rounds", type=int, default=None, help="override the study's rounds (quicker, not the published setting)")
    args = parser.parse_args()
    for key in args.studies:
        base = load_study(ROOT / STUDIES[key])
        metric = PRIMARY[base.task][0]
        for method in args.methods:
            if method in PERSONAL_ARCHITECTURES and base.model != "mlp":
                print(f"{key} {method}: skipped (needs model = mlp, the study has {base.model})", flush=True)
                continue
            study = dataclasses.replace(base, personalization=PersonalizationConfig(method), rounds=args.rounds or base.rounds)
            started = time.time()
            with tempfile.TemporaryDirectory() as out:
                report = simulate(study, out, progress=False)
            mean = report["final"]["mean"]
            glob, pers = mean.get(metric), mean.get(f"personalized_{metric}")
            print(f"{key} {method}: global {metric} {glob:.4f}, personalized {pers:.4f} ({time.time() - started:.0f} s)", flush=True)
            record({f"global_{key}_{method}_{metric}": round(glob, 4), f"personalized_{key}_{method}_{metric}": round(pers, 4)})


if __name__ == "__main__":
    main()
