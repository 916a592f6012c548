"""Federated feature selection: the sites' pooled statistics choose the omics features every site uses.

With an ``[omics]`` section in the study, each site reported its omics feature
*names* in the handshake. The candidates are those every site has, in the
study's order. One SecAgg+ round then sums, per candidate, each site's fraction
of present values and the sum and sum of squares of its train split (weighted
by n_train), so the coordinator learns only the pooled missing rate and
variance; the study's rules pick the features, and the training plan carries
the list to every site. Sites' extra columns and file orders do not matter.
"""

from __future__ import annotations

import dataclasses
import logging

from flwr.app import Context

from server.federated_stats import secure_weighted_mean
from server.recorder import SiteInfo
from server.secure_aggregation import SecAggParams
from server.strategy import StudyAborted
from shared.config import StudyConfig
from shared.omics import PooledFeatureStats, candidate_order, select_features
from shared.plan import TrainingPlan

log = logging.getLogger("fedhelix.server")


def shared_features(sites: list[SiteInfo]) -> list[str]:
    """The non-omics (clinical) features, in the reference site's order: every site must have them all."""
    omics = set(sites[0].candidates)
    return [f for f in sites[0].features if f not in omics]


def select_study_features(grid, context: Context, study: StudyConfig, plan: TrainingPlan, sites: list[SiteInfo], params: SecAggParams | None) -> list[str]:
    """The study's agreed feature list: clinical features, then the selected omics features in the study's order."""
    rule = study.omics
    assert rule is not None
    if params is None:
        raise StudyAborted("[omics] feature selection needs secure aggregation: without it the coordinator would see each site's per-gene statistics")
    candidates = candidate_order([s.candidates for s in sites], rule)
    if not candidates:
        raise StudyAborted("[omics] no omics feature is present at every site (check the sites' omics tables and the study's [omics] features)")
    for site in sites:
        extra = len(set(site.candidates)) - len(candidates)
        if extra:
            log.info("site '%s': %d omics feature(s) not shared by every site (or not in the study's list) are left out", site.name, extra)
    result = secure_weighted_mean(
        grid, context, study, dataclasses.replace(plan, candidates=candidates), sites, params, "select", 3 * len(candidates), "no features were selected"
    )  # fmt: skip
    stats = PooledFeatureStats.from_moments(result)
    chosen = select_features(candidates, stats, rule)
    if not chosen:
        raise StudyAborted(
            f"[omics] none of the {len(candidates)} candidate features passed max_missing_rate = {rule.max_missing_rate:g} "
            f"and min_variance = {rule.min_variance:g} (pooled); loosen the rules"
        )
    log.info("federated feature selection: %d of %d candidate omics features kept by %d sites", len(chosen), len(candidates), len(sites))
    features = shared_features(sites) + chosen
    for site in sites:
        site.features = list(features)
        site.indicators = [bool(site.flags.get(f, False)) for f in features]
    return features
