"""Split one molecule table into simulated companies, ready for ``fedhelix simulate``.

Pharma companies hold different chemical series, so the realistic split is by
Bemis-Murcko scaffold: every molecule sharing a scaffold goes to the same
company (largest scaffold groups first, each to the company with the fewest
molecules so far). ``random`` splits uniformly; ``dirichlet`` skews the label
mix per company (Dirichlet(alpha) proportions per label class, or per label
quartile for regression). Each company gets a CSV (SMILES, labels, a fixed
``split`` column), a site file, and the directory a ready ``study.toml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import ConfigError

METHODS = ("scaffold", "random", "dirichlet")
# Defaults that hold on a large, imbalanced set: local work in passes over each company's own
# train split (a large company is not under-trained), the output bias at the pooled log-odds
# (init_output_bias, on by default), and the round whose model scored best on validation
# rows carved from each company's training data.
STUDY_DEFAULTS = (
    "rounds = 20\nlocal_epochs = 5  # passes over each company's train split per round\nbatch_size = 32\n"
    "optimizer = \"adam\"\nlearning_rate = 0.002\nseed = 42\n"
    "select_best = true  # keep the round best on validation rows carved from training data\n"
)
_ID_NAMES = {"num", "id", "index", "idx", "mol_id", "compound id", "cid"}


@dataclass(frozen=True)
class Partition:
    """What was written: per site its name, molecule count, and the study file."""

    study: Path
    task: str
    labels: tuple[str, ...]
    sites: dict[str, int]
    invalid: int  # SMILES without a scaffold (unparsable); kept, and skipped by the site files


def _smiles_column(frame: pd.DataFrame, smiles: str | None, source: str) -> str:
    if smiles is not None:
        if smiles not in frame.columns:
            raise ConfigError(f"{source}: no column '{smiles}' (columns: {', '.join(map(str, frame.columns[:10]))})")
        return smiles
    found = [c for c in frame.columns if str(c).strip().lower() == "smiles"]
    if not found:
        raise ConfigError(f"{source}: no 'smiles' column; name the SMILES column with --smiles")
    return str(found[0])


def _is_binary(values: pd.Series) -> bool:
    present = set(values.dropna().astype(float).tolist())
    return bool(present) and present <= {0.0, 1.0}


def infer_labels(frame: pd.DataFrame, smiles: str, source: str) -> list[str]:
    """Label columns when none are given: the numeric columns that are not identifiers.

    Several numeric columns that are not all 0/1 are ambiguous (ESOL also carries
    descriptor columns): then the user must say which with ``--label``.
    """
    numeric = [
        str(c) for c in frame.columns
        if c != smiles and pd.api.types.is_numeric_dtype(frame[c].dtype) and str(c).strip().lower() not in _ID_NAMES
    ]  # fmt: skip
    if not numeric:
        raise ConfigError(f"{source}: no numeric label column found; name it with --label")
    binary = [c for c in numeric if _is_binary(frame[c])]
    if len(binary) == len(numeric) or (len(numeric) == 1):
        return numeric
    shown = ", ".join(f"'{c}'" for c in numeric[:6]) + (", ..." if len(numeric) > 6 else "")
    raise ConfigError(f"{source}: cannot tell which column is the label among {len(numeric)} numeric columns ({shown}); pass --label COLUMN (repeat it for several tasks)")


def infer_task(frame: pd.DataFrame, labels: list[str]) -> str:
    """binary (one 0/1 label), multitask (several 0/1 labels) or regression (one numeric label)."""
    if all(_is_binary(frame[c]) for c in labels):
        return "multitask" if len(labels) > 1 else "binary"
    if len(labels) > 1:
        raise ConfigError(f"several labels ({', '.join(labels)}) must all be 0/1 (multitask); give one label for regression")
    return "regression"


def by_scaffold(scaffolds: list[str | None], n_sites: int, seed: int) -> np.ndarray:
    """Site of each molecule: whole scaffold groups, largest first, to the emptiest site.

    Molecules without a scaffold (unparsable SMILES) are spread at random.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    loose = []
    for i, s in enumerate(scaffolds):
        if s is None:
            loose.append(i)
        else:
            groups.setdefault(s, []).append(i)
    keys = list(groups)
    rng.shuffle(keys)  # ties in size are broken by the seed, not by the scaffold text
    keys.sort(key=lambda k: -len(groups[k]))
    site = np.full(len(scaffolds), -1)
    sizes = np.zeros(n_sites, dtype=int)
    for key in keys:
        target = int(np.argmin(sizes))
        site[groups[key]] = target
        sizes[target] += len(groups[key])
    site[loose] = rng.integers(0, n_sites, len(loose))
    return site


def by_random(n: int, n_sites: int, seed: int) -> np.ndarray:
    """Uniformly random sites of (almost) equal size."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % n_sites)


def by_dirichlet(classes: np.ndarray, n_sites: int, alpha: float, seed: int, min_size: int = 10) -> np.ndarray:
    """Label skew: each class is shared out with Dirichlet(alpha) proportions over the sites."""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        site = np.empty(len(classes), dtype=int)
        for k in np.unique(classes):
            members = rng.permutation(np.flatnonzero(classes == k))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_sites, alpha))) * len(members)).astype(int)[:-1]
            for s, part in enumerate(np.split(members, cuts)):
                site[part] = s
        if np.bincount(site, minlength=n_sites).min() >= min_size:
            return site
    raise ConfigError(f"Dirichlet(alpha={alpha}) left a site with fewer than {min_size} molecules in 200 draws; raise --alpha or use fewer --sites")


def _skew_classes(frame: pd.DataFrame, labels: list[str], task: str) -> np.ndarray:
    first = frame[labels[0]].astype(float)
    if task == "regression":
        return pd.qcut(first.rank(method="first"), 4, labels=False).fillna(-1).to_numpy(dtype=int)
    return first.fillna(2).to_numpy(dtype=int)  # unknown counts as its own class


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is JSON-escaped


def partition(
    csv: Path,
    by: str,
    n_sites: int,
    out: Path,
    *,
    labels: list[str] | None = None,
    task: str | None = None,
    smiles: str | None = None,
    seed: int = 0,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    name: str | None = None,
) -> Partition:
    """Write ``n_sites`` company CSVs and site files plus ``study.toml`` into ``out``."""
    from sklearn.model_selection import train_test_split

    from shared.molecules import scaffold

    csv, out = Path(csv), Path(out)
    source = str(csv)
    if by not in METHODS:
        raise ConfigError(f"--by must be one of {', '.join(METHODS)}, got '{by}'")
    if n_sites < 2:
        raise ConfigError("--sites must be at least 2 (a federation)")
    if not 0 < test_fraction < 1:
        raise ConfigError("--test-fraction must be between 0 and 1")
    if not csv.is_file():
        raise ConfigError(f"{source}: file not found")
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot be read as CSV ({str(exc).splitlines()[0]})") from None
    smiles = _smiles_column(frame, smiles, source)
    labels = list(labels) if labels else infer_labels(frame, smiles, source)
    missing = [c for c in labels if c not in frame.columns]
    if missing:
        raise ConfigError(f"{source}: label column '{missing[0]}' not found (columns: {', '.join(map(str, frame.columns[:10]))})")
    inferred = infer_task(frame, labels)
    task = task or inferred
    if task in ("binary", "multitask") and inferred == "regression":
        raise ConfigError(f"{source}: --task {task} needs 0/1 labels, but '{labels[0]}' has other values")
    if task == "binary" and len(labels) > 1:
        raise ConfigError("--task binary takes one --label; use --task multitask for several")

    scaffolds = [scaffold(s) for s in frame[smiles]]
    invalid = sum(s is None for s in scaffolds)
    if by == "scaffold":
        site_of = by_scaffold(scaffolds, n_sites, seed)
    elif by == "random":
        site_of = by_random(len(frame), n_sites, seed)
    else:
        site_of = by_dirichlet(_skew_classes(frame, labels, task), n_sites, alpha, seed)

    out.mkdir(parents=True, exist_ok=True)
    study_name = name or out.resolve().name
    sites: dict[str, int] = {}
    for s in range(n_sites):
        site = f"company_{s + 1}"
        part = frame.loc[site_of == s, [smiles, *labels]].copy()
        if len(part) < 5:
            raise ConfigError(f"{source}: {site} would get only {len(part)} molecules; use fewer --sites")
        first = part[labels[0]]
        strat = first if task == "binary" and first.notna().all() and first.value_counts().min() >= 2 else None
        _, test = train_test_split(part.index, test_size=test_fraction, random_state=seed, stratify=strat)
        part["split"] = np.where(part.index.isin(test), "test", "train")
        part.to_csv(out / f"{site}.csv", index=False)
        label_toml = _toml_str(labels[0]) if len(labels) == 1 else "[" + ", ".join(map(_toml_str, labels)) + "]"
        (out / f"{site}.toml").write_text(
            f"# Site file written by `fedhelix partition` ({by} split of {csv.name}).\n"
            f"[site]\nname = {_toml_str(site)}\n\n"
            f"[data]\npath = {_toml_str(site + '.csv')}\nformat = \"smiles\"\nsmiles = {_toml_str(smiles)}\n"
            f"label = {label_toml}\nsplit_column = \"split\"\ninvalid_smiles = \"skip\"\n\n"
            f"[privacy]\nledger = {_toml_str(site + '.ledger.sqlite')}\nepsilon_budget = 10.0\ndelta = 1e-5\n",
            encoding="utf-8",
        )
        sites[site] = len(part)
    study = out / "study.toml"
    study.write_text(
        f"# Study written by `fedhelix partition {csv.name} --by {by} --sites {n_sites}`: a GNN over {n_sites} simulated companies.\n"
        "# Run it with `fedhelix simulate` on this file; edit freely (see docs/study-and-site-files.md).\n"
        f"[study]\nname = {_toml_str(study_name)}\ntask = \"{task}\"\nmodel = \"gnn\"\nstrategy = \"fedavg\"\n"
        + ("secure_aggregation = false  # SecAgg+ needs at least 3 sites\n" if n_sites < 3 else "")
        + STUDY_DEFAULTS
        + ('# pos_weight = "balanced"  # optional: weigh rare positives as much as negatives (needs 3+ sites)\n' if task in ("binary", "multitask") else "")
        + "\n[model]\nlayers = 3\nhidden = 64\nconv = \"graphconv\"\npooling = \"mean\"  # does not grow with molecule size\n\n"
        + "".join(f"[[sites]]\nname = \"{site}\"\nconfig = \"{site}.toml\"\n\n" for site in sites),
        encoding="utf-8",
    )
    return Partition(study, task, tuple(labels), sites, invalid)
