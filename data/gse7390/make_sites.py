"""Write the GSE7390 breast-cancer study as per-site clinical + expression tables joined by a patient id.

Source: scikit-survival's bundled copy of GEO GSE7390 (``sksurv.datasets.load_breast_cancer``):
198 node-negative breast-cancer patients (TRANSBIG), age, tumour size, grade, ER status,
76 gene-expression probes (Affymetrix HG-U133A, log2 scale) and time to distant metastasis.
scikit-survival is needed only to run this script, never by fedhelix itself:

    .venv/bin/pip install scikit-survival && .venv/bin/python data/gse7390/make_sites.py

Partition rule (fixed, seed 7): patients are shuffled within event strata and dealt to three
sites in proportions 40 / 35 / 25 %; within each site, 30 % of the patients (stratified by
event) are marked ``fold = test``. Both studies (survival, 5-year metastasis) use the same folds.
The three sites store their expression differently on purpose (what real sites do):
``site_a`` samples x genes CSV; ``site_b`` genes x samples TSV (one row per probe);
``site_c`` samples x genes CSV with the probes in another order and the id column named ``sample``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from sksurv.datasets import load_breast_cancer

HERE = Path(__file__).resolve().parent
SEED = 7
SHARES = {"site_a": 0.40, "site_b": 0.35, "site_c": 0.25}
FIVE_YEARS_DAYS = 1826.0


def main() -> None:
    x, y = load_breast_cancer()
    x = x.copy()
    x.index = [f"P{i + 1:03d}" for i in range(len(x))]
    genes = [c for c in x.columns if c.startswith("X")]
    time = y["t.tdm"].astype(float)
    event = y["e.tdm"].astype(int)
    # Metastasis within 5 years: 1 if it happened by then, 0 if free at 5 years, unknown if censored earlier.
    within = np.where((event == 1) & (time <= FIVE_YEARS_DAYS), 1.0, np.where(time > FIVE_YEARS_DAYS, 0.0, np.nan))
    clinical = pd.DataFrame(
        {
            "patient_id": x.index,
            "age": x["age"].to_numpy(),
            "size": x["size"].to_numpy(),
            "grade": x["grade"].astype(str).to_numpy(),
            "er": x["er"].astype(str).to_numpy(),
            "time": time,
            "event": event,
            "metastasis_5y": within,
        }
    )
    rng = np.random.default_rng(SEED)
    site_of = pd.Series("", index=x.index)
    for value in (0, 1):  # deal each event stratum in the fixed proportions
        ids = x.index[event == value].to_numpy()
        rng.shuffle(ids)
        cuts = np.round(np.cumsum(list(SHARES.values()))[:-1] * len(ids)).astype(int)
        for site, part in zip(SHARES, np.split(ids, cuts)):
            site_of[part] = site
    for i, site in enumerate(SHARES):
        out = HERE / site
        out.mkdir(exist_ok=True)
        ids = site_of.index[site_of == site]
        part = clinical.set_index("patient_id").loc[ids]
        _, test = train_test_split(ids, test_size=0.3, random_state=SEED + i, stratify=part["event"])
        part.insert(len(part.columns), "fold", np.where(part.index.isin(test), "test", "train"))
        part.rename_axis("patient_id").reset_index().to_csv(out / "clinical.csv", index=False, float_format="%.6g")
        expr = x.loc[ids, genes]
        if site == "site_a":
            expr.rename_axis("patient_id").reset_index().to_csv(out / "expression.csv", index=False, float_format="%.6f")
        elif site == "site_b":
            expr.T.rename_axis("probe").reset_index().to_csv(out / "expression.tsv", sep="\t", index=False, float_format="%.6f")
        else:
            order = list(rng.permutation(genes))
            expr[order].rename_axis("sample").reset_index().to_csv(out / "expression.csv", index=False, float_format="%.6f")
        print(f"{site}: {len(ids)} patients ({int(part['event'].sum())} events, {len(test)} test), {len(genes)} probes")


if __name__ == "__main__":
    main()
