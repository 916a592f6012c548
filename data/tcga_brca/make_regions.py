"""Split FLamby's TCGA-BRCA table into the six regional "hospitals" of the federation.

Each region gets one CSV holding its patients with FLamby's fixed train/test
assignment in a ``fold`` column (values ``train``/``test``), so a site file can
use ``split_column = "fold"``. The region of a patient is FLamby's ``fold2``
suffix (``train_3`` -> region 3), which agrees with ``centers.csv`` (tissue
source site code -> region). Run from anywhere: ``python data/tcga_brca/make_regions.py``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REGIONS = {0: "northeast", 1: "south", 2: "west", 3: "midwest", 4: "europe", 5: "canada"}


def build_regions(out_dir: Path = HERE / "regions") -> dict[str, int]:
    """Write one CSV per region; return the number of patients written per region."""
    table = pd.read_csv(HERE / "brca.csv")
    split = pd.read_csv(HERE / "train_test_split.csv")
    split["region"] = split["fold2"].str.split("_").str[1].astype(int)
    merged = table.merge(split[["pid", "fold", "region"]], on="pid", how="inner")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for region_id, name in REGIONS.items():
        part = merged[merged["region"] == region_id].drop(columns=["region"])
        part.to_csv(out_dir / f"{name}.csv", index=False)
        counts[name] = len(part)
    return counts


if __name__ == "__main__":
    for region, n in build_regions().items():
        print(f"{region:10s} {n:4d} patients")
