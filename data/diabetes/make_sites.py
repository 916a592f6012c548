"""Split scikit-learn's bundled diabetes progression data (442 patients) into 3 clinics by age.

A covariate-shifted split, as between a paediatric-adjacent, a general and a
geriatric clinic: patients are ordered by (standardised) age and cut into
thirds, so each site sees a different age range. Target ``progression`` is the
quantitative disease progression one year after baseline.
Run: ``python data/diabetes/make_sites.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_diabetes

HERE = Path(__file__).resolve().parent
SITES = ("clinic_young", "clinic_middle", "clinic_old")


def build_sites(out_dir: Path = HERE) -> dict[str, int]:
    frame = load_diabetes(as_frame=True, scaled=False).frame.rename(columns={"target": "progression"})
    frame.insert(0, "patient_id", [f"DIAB-{i:03d}" for i in range(len(frame))])
    order = np.argsort(frame["age"].to_numpy(), kind="stable")
    sizes = {}
    for name, rows in zip(SITES, np.array_split(order, len(SITES))):
        part = frame.iloc[np.sort(rows)]
        part.to_csv(out_dir / f"{name}.csv", index=False)
        sizes[name] = len(part)
    return sizes


if __name__ == "__main__":
    for site, n in build_sites().items():
        print(f"{site}: {n} patients")
