"""Split scikit-learn's bundled UCI WDBC breast-cancer data into 3 hospitals with label skew.

Each class's patients are divided among the sites by proportions drawn from a
Dirichlet(alpha) distribution (the usual way to simulate label skew in
federated learning, Hsu et al. 2019), so one hospital sees mostly malignant
tumours and another mostly benign ones. Target ``malignant`` is 1 for a
malignant tumour (scikit-learn codes malignant as 0; we flip it so that
sensitivity means "cancer found"). Run: ``python data/wdbc/make_sites.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer

HERE = Path(__file__).resolve().parent
SITES = ("hospital_a", "hospital_b", "hospital_c")


def dirichlet_split(labels: np.ndarray, n_sites: int, alpha: float, seed: int) -> np.ndarray:
    """Site index per row; each class is spread over the sites by Dirichlet(alpha) proportions."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=int)
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet([alpha] * n_sites)
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for site, part in enumerate(np.split(rows, cuts)):
            assignment[part] = site
    return assignment


def build_sites(out_dir: Path = HERE, alpha: float = 1.0, seed: int = 7) -> dict[str, tuple[int, int]]:
    """Write one CSV per site; return (rows, malignant) per site."""
    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.rename(columns=lambda c: c.replace(" ", "_"))
    frame = frame.rename(columns={"target": "malignant"})
    frame["malignant"] = 1 - frame["malignant"]
    frame.insert(0, "patient_id", [f"WDBC-{i:04d}" for i in range(len(frame))])
    site_of = dirichlet_split(frame["malignant"].to_numpy(), len(SITES), alpha, seed)
    summary = {}
    for index, name in enumerate(SITES):
        part = frame[site_of == index]
        part.to_csv(out_dir / f"{name}.csv", index=False)
        summary[name] = (len(part), int(part["malignant"].sum()))
    return summary


if __name__ == "__main__":
    for site, (rows, malignant) in build_sites().items():
        print(f"{site}: {rows} patients, {malignant} malignant ({malignant / rows:.0%})")
