"""Find this node's site file and load its data through the contract (cached per process)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context

from shared.config import SiteConfig, StudyConfig, check_format, load_site, load_site_ref, load_study
from shared.contract import SiteData, load_site_data
from shared.errors import ConfigError
from shared.preprocess import Standardizer
from shared.paths import resolve_path
from shared.plan import TrainingPlan

SITE_CONFIG_KEY = "site-config"  # node config key in deployment: path to the site file


def resolve_site(context: Context, study_ref: str | StudyConfig | None = None) -> SiteConfig:
    """Deployment: the node's ``site-config``; simulation: the study's site at this partition."""
    if SITE_CONFIG_KEY in context.node_config:
        return load_site(resolve_path(str(context.node_config[SITE_CONFIG_KEY])))
    study_ref = study_ref or context.run_config.get("study")
    if study_ref is None or "partition-id" not in context.node_config:
        raise ConfigError(f"node has no '{SITE_CONFIG_KEY}' in its node config; start it with --node-config \"{SITE_CONFIG_KEY}='SITE.toml'\"")
    study = study_ref if isinstance(study_ref, StudyConfig) else load_study(resolve_path(str(study_ref)))
    index = int(context.node_config["partition-id"])
    if index >= len(study.sites):
        raise ConfigError(f"simulation node {index} has no site in {study.path} ({len(study.sites)} listed)")
    return load_site_ref(study.sites[index], study.path)


def load_for_plan(site: SiteConfig, plan: TrainingPlan, scale: bool = True) -> SiteData:
    """Site data encoded the way the plan says (agreed categories, feature order, pooled scaling).

    ``scale = False``: unstandardised values (what the feature-selection statistics describe).
    """
    check_format(site, plan.model)
    paths = [t.path for t in site.data.tables] or [Path(site.data.path)]
    mtime = max(Path(p).stat().st_mtime_ns if Path(p).exists() else 0 for p in paths)
    pooled = json.dumps(plan.normalization, sort_keys=True) if plan.normalization else ""
    return _cached(site, mtime, plan.task, json.dumps(plan.categories, sort_keys=True), tuple(plan.features), pooled, bool(plan.selection), scale)


@lru_cache(maxsize=16)  # a simulation actor serves many sites; omics sites are large
def _cached(site: SiteConfig, _mtime: int, task: str, categories: str, features: tuple[str, ...], pooled: str, select: bool = False, scale: bool = True) -> SiteData:
    scaler = None
    if pooled:
        stats = json.loads(pooled)
        scaler = Standardizer(np.asarray(stats["mean"], dtype=np.float32), np.asarray(stats["scale"], dtype=np.float32))
    return load_site_data(site, task, json.loads(categories), list(features) or None, pooled=scaler, select=select, scale=scale)
