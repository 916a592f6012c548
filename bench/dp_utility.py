"""Utility under differential privacy: DP runs next to the non-DP run of the same study.

* TCGA-BRCA DP study (discrete-time hazard, epsilon = 8 per region): mean per-region C-index.
* WDBC diagnosis (3 label-skewed hospitals, MLP) at epsilon = 1, 3, 8 and without DP:
  mean accuracy and ROC AUC over sites.
Writes ``tcga_dp8_cindex`` and ``wdbc_{nodp,dp1,dp3,dp8}_{accuracy,roc_auc}`` to bench/results.json.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import record  # noqa: E402
from server.simulate import simulate  # noqa: E402
from shared.config import load_study  # noqa: E402
from shared.paths import PROJECT_ROOT  # noqa: E402


def run(study) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return simulate(study, out, progress=False)


def main() -> None:
    figures: dict[str, float] = {}
    tcga = run(load_study(PROJECT_ROOT / "studies" / "tcga-brca" / "study-dp.toml"))
    figures["tcga_dp8_cindex"] = round(tcga["final"]["mean"]["c_index"], 4)
    eps = max(p["epsilon"] for p in tcga["privacy"].values())
    print(f"TCGA-BRCA hazard model, DP epsilon=8: mean C-index {figures['tcga_dp8_cindex']:.3f} (max epsilon spent {eps:.3f})", flush=True)

    base = load_study(PROJECT_ROOT / "studies" / "wdbc" / "study-dp.toml")
    variants = {"nodp": dataclasses.replace(base, privacy=dataclasses.replace(base.privacy, dp=False), learning_rate=0.05)}
    for epsilon in (1.0, 3.0, 8.0):
        variants[f"dp{epsilon:g}"] = dataclasses.replace(base, privacy=dataclasses.replace(base.privacy, target_epsilon=epsilon))
    for name, study in variants.items():
        report = run(study)
        mean = report["final"]["mean"]
        figures[f"wdbc_{name}_accuracy"] = round(mean["accuracy"], 4)
        figures[f"wdbc_{name}_roc_auc"] = round(mean["roc_auc"], 4)
        print(f"WDBC {name:5s}: accuracy {mean['accuracy']:.3f}  ROC AUC {mean['roc_auc']:.3f}", flush=True)
    record(figures)


if __name__ == "__main__":
    main()
