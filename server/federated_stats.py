"""The secure statistics round: pooled feature standardisation without revealing any site's statistics.

Before training, when the sites use ``normalize = "federated"``, every site sends
its per-feature mean and mean of squares *through SecAgg+*, weighted by its
number of training rows. The securely aggregated weighted mean is exactly the
pooled mean and pooled mean square, from which the pooled standard deviation
follows; the coordinator never sees one site's values. The result goes to every
site in the training plan, so all standardise identically.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
import flwr.compat.common.recorddict_compat as compat

from server.recorder import SiteInfo
from server.secure_aggregation import SecAggParams, StrictSecAggPlus
from server.strategy import StudyAborted
from shared.config import StudyConfig
from shared.imbalance import PooledLabels, describe
from shared.plan import PLAN_KEY, STAGE_KEY, TrainingPlan
from shared.preprocess import Standardizer

log = logging.getLogger("fedhelix.server")


def secure_weighted_mean(grid, context: Context, study: StudyConfig, plan: TrainingPlan, sites: list[SiteInfo], params: SecAggParams, stage: str, length: int, what: str) -> np.ndarray:
    """One SecAgg+ round in which every site sends a ``length`` vector weighted by its n_train; returns the weighted mean.

    ``stage`` tells the sites what to compute (``stats``: feature moments, ``select``:
    feature-selection statistics); ``what`` completes the error if the round fails.
    """
    # Sites weight their values by n_train here (also under site-level DP, where training uses weight 1).
    stats_params = dataclasses.replace(params, clipping_range=study.secure.stats_bound, max_weight=float(max(s.n_train for s in sites)))
    config: dict[str, Any] = {PLAN_KEY: plan.to_json(), STAGE_KEY: stage}
    collector = _SecureMeanCollector(
        fraction_fit=1.0,
        min_fit_clients=len(sites),
        min_available_clients=len(sites),
        on_fit_config_fn=lambda _: config,
        initial_parameters=ndarrays_to_parameters([np.zeros(length)]),
    )
    collector.what = what
    legacy = LegacyContext(context=Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config, state=type(context.state)(), run_config=context.run_config), config=ServerConfig(num_rounds=1), strategy=collector)
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(collector.initial_parameters, keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 0, Key.START_TIME: 0.0})
    thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    try:
        ready.wait()
        StrictSecAggPlus(stats_params, timeout=study.secure.timeout_s)(grid, legacy)
    finally:
        stop.set()
        thread.join()
    if collector.result is None:
        raise StudyAborted(f"the secure statistics round returned no aggregate; {what}")
    return collector.result


class _SecureMeanCollector(FedAvg):
    """Receives the securely aggregated vector and keeps it; updates no model."""

    result: np.ndarray | None = None
    what: str = "no standardisation was agreed"

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        if failures or not results:
            raise StudyAborted(f"the secure statistics round failed at {len(failures)} site(s); {self.what}")
        self.result = parameters_to_ndarrays(results[0][1].parameters)[0]
        return None, {}


def needs_federated_stats(sites: list[SiteInfo]) -> bool:
    """True when the sites standardise with pooled statistics; mixing modes is an error."""
    modes = {s.normalize for s in sites}
    if "federated" in modes and len(modes) > 1:
        detail = ", ".join(f"{s.name}={s.normalize}" for s in sites)
        raise StudyAborted(f"sites disagree on normalize ({detail}); with \"federated\" every site must use it")
    return modes == {"federated"}


def secure_pooled_standardizer(grid, context: Context, study: StudyConfig, plan: TrainingPlan, sites: list[SiteInfo], params: SecAggParams | None) -> Standardizer:
    """Run one SecAgg+ round of feature moments and turn it into the pooled standardisation."""
    if params is None:
        raise StudyAborted('normalize = "federated" needs secure aggregation: without it the coordinator would see each site\'s statistics')
    n_features = len(plan.features)
    result = secure_weighted_mean(grid, context, study, plan, sites, params, "stats", 2 * n_features, "no standardisation was agreed")
    mean, mean_sq = result[:n_features], result[n_features:]
    # A feature is left unscaled only if it is 0/1 at every site (known from the handshake).
    indicator = np.all([np.asarray(s.indicators, dtype=bool) for s in sites], axis=0)
    log.info("secure statistics round: pooled standardisation of %d features agreed by %d sites", n_features, len(sites))
    return Standardizer.from_moments(mean, mean_sq, indicator)


def needs_label_round(study: StudyConfig) -> bool:
    """Binary and multitask studies pool their label counts (output bias, balanced pos_weight) when SecAgg+ hides each site's."""
    wanted = study.init_output_bias or study.pos_weight == "balanced"
    return study.task in ("binary", "multitask") and wanted and study.secure.enabled


def secure_pooled_labels(grid, context: Context, study: StudyConfig, plan: TrainingPlan, sites: list[SiteInfo], params: SecAggParams | None) -> PooledLabels:
    """One SecAgg+ round of per-label positive and known fractions, pooled over every site's train rows."""
    if params is None:
        raise StudyAborted("the label round needs secure aggregation: without it the coordinator would see each site's label counts")
    names = list(plan.labels) or ["label"]
    result = secure_weighted_mean(grid, context, study, plan, sites, params, "labels", 2 * len(names), "no label counts were pooled")
    pooled = PooledLabels.from_moments(result)
    log.info("secure label round: pooled prevalence %s over %d sites", describe(pooled, names), len(sites))
    return pooled
