"""Strategies that aggregate *deltas*, built on Flower's own (legacy) strategies.

Sites send ``local - global``. Before Flower's aggregation runs, each delta is
checked (finite, right shapes) and turned back into ``global + delta``, so
FedAvg's weighted mean and FedAdam/FedYogi/FedAdagrad's pseudo-gradient are
exactly what those strategies expect. We use the legacy ``flwr.server.strategy``
classes on purpose: Flower 1.42's SecAgg+ workflow only wraps those.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from server.recorder import RunRecorder
from shared.accounting import calibrate_noise
from shared.config import StudyConfig
from shared.errors import FedhelixError
from shared.params import NDArrays, l2_norm
from shared.metrics import LOSS_WITHHELD
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan

log = logging.getLogger("fedhelix.server")

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    # Robust aggregation (secure aggregation off only: they need every site's own update).
    "median": FedMedian,
    "trimmed_mean": FedTrimmedAvg,
    "krum": Krum,
}


class StudyAborted(FedhelixError):
    """The study cannot continue (too few sites, nothing valid to aggregate)."""


def check_delta(delta: NDArrays, reference: NDArrays, max_norm: float | None = None) -> str | None:
    """Why an update must be rejected, or ``None`` when it is usable.

    ``max_norm`` bounds the L2 norm of one site's update; it is only meaningful
    where the server sees individual updates (secure aggregation off).
    """
    if len(delta) != len(reference):
        return f"wrong number of tensors ({len(delta)}, expected {len(reference)})"
    for i, (d, r) in enumerate(zip(delta, reference)):
        if d.shape != r.shape:
            return f"tensor {i} has shape {d.shape}, expected {r.shape}"
        if not np.issubdtype(d.dtype, np.floating):
            return f"tensor {i} has dtype {d.dtype}, expected floating point"
        if not np.isfinite(d).all():
            return f"tensor {i} contains NaN or Inf"
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite((r + d).astype(r.dtype)).all():
                return f"tensor {i} overflows {r.dtype} when added to the global model"
    if max_norm is not None:
        norm = l2_norm(delta)
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds the study's max_update_norm {max_norm:g}"
    return None


class DeltaAggregationMixin:
    """Mixed in front of a Flower strategy: delta bookkeeping, validation, recording."""

    recorder: RunRecorder
    required_sites: int
    max_update_norm: float | None = None
    evaluation: bool = True  # the study's [privacy] evaluation: false = sites release no metrics
    _global: NDArrays

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager):  # noqa: D102
        if not self.evaluation:  # sites would refuse: close the round without metrics instead of asking
            self.recorder.record_evaluate(server_round, {})
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)  # type: ignore[misc]

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):  # noqa: D102
        self._global = [np.asarray(a) for a in parameters_to_ndarrays(parameters)]
        return super().configure_fit(server_round, parameters, client_manager)  # type: ignore[misc]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]):  # noqa: D102
        accepted: list[tuple[ClientProxy, FitRes]] = []
        per_site: dict[str, dict[str, Any]] = {}
        rejected: dict[str, str] = {}
        for proxy, res in results:
            site = str(res.metrics.get("site", self.recorder.site_name(proxy.node_id)))
            delta = parameters_to_ndarrays(res.parameters)
            problem = check_delta(delta, self._global, self.max_update_norm)
            if problem is not None:
                rejected[site] = f"update rejected: {problem}"
                log.warning("round %d: rejected update from site '%s': %s", server_round, site, problem)
                continue
            per_site[site] = {**dict(res.metrics), "n": res.num_examples}
            res.parameters = ndarrays_to_parameters([(g + d).astype(g.dtype) for g, d in zip(self._global, delta)])
            accepted.append((proxy, res))
        self.recorder.record_fit(server_round, per_site, rejected)
        if len(accepted) < self.required_sites:
            failed = [f"{f['site']}: {f['reason']}" for f in self.recorder.failures if f["round"] == server_round]
            detail = "; ".join(failed) if failed else "no reason given"
            raise StudyAborted(
                f"round {server_round}: only {len(accepted)} of the {self.required_sites} required sites "
                f"sent a usable update ({detail})"
            )
        # A fixed order (the sites' names) makes floating-point sums independent of who answered first,
        # so a resumed study reproduces an uninterrupted one bit for bit.
        accepted.sort(key=lambda pair: str(pair[1].metrics.get("site", pair[0].node_id)))
        return super().aggregate_fit(server_round, accepted, failures)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, results, failures):  # noqa: D102
        per_site = {}
        for proxy, res in results:
            site = str(res.metrics.get("site", self.recorder.site_name(proxy.node_id)))
            withheld = bool(res.metrics.get(LOSS_WITHHELD))  # a small test split: the site sent no loss
            metrics = {k: v for k, v in res.metrics.items() if k not in ("site", LOSS_WITHHELD)}
            per_site[site] = metrics | {"loss": None if withheld else float(res.loss), "n": res.num_examples}
        self.recorder.record_evaluate(server_round, per_site)
        with_loss = [(proxy, res) for proxy, res in results if not res.metrics.get(LOSS_WITHHELD)]
        return super().aggregate_evaluate(server_round, with_loss, failures)  # type: ignore[misc]


class SiteLevelDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP (sites clip, the coordinator adds noise), without its silent skip.

    Flower's wrapper returns no update when any site failed; a round that
    silently does nothing is a failure we report instead.
    """

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        if failures:
            raise StudyAborted(
                f"round {server_round}: {len(failures)} site(s) failed; site-level DP calibrates its noise to every "
                "sampled site, so the round cannot be aggregated"
            )
        return super().aggregate_fit(server_round, results, failures)


def site_level_noise(study: StudyConfig) -> float:
    """Noise multiplier for site-level DP: every site sampled in every round (q = 1)."""
    return calibrate_noise(study.privacy.target_epsilon, study.privacy.delta, 1.0, study.rounds, study.privacy.accountant)


def build_strategy(study: StudyConfig, plan: TrainingPlan, initial: NDArrays, recorder: RunRecorder) -> Strategy:
    """The study's strategy over deltas, configured from the study file."""
    base = BASES[study.strategy]
    cls = type(f"Delta{base.__name__}", (DeltaAggregationMixin, base), {})
    plan_json = plan.to_json()

    def round_config(server_round: int) -> dict[str, Scalar]:
        return {PLAN_KEY: plan_json, ROUND_KEY: server_round}

    n_sites = len(study.sites)
    kwargs: dict[str, Any] = dict(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        # A round starts once the required sites are connected (a dead node must not stall the study).
        min_fit_clients=study.required_sites,
        min_evaluate_clients=study.required_sites,
        min_available_clients=study.required_sites,
        on_fit_config_fn=round_config,
        on_evaluate_config_fn=round_config,
        initial_parameters=ndarrays_to_parameters(initial),
        accept_failures=True,
    )
    if study.strategy == "fedprox":
        kwargs["proximal_mu"] = study.proximal_mu
    if study.strategy in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs.update(eta=study.server_learning_rate, eta_l=study.learning_rate)
    if study.strategy == "trimmed_mean":
        kwargs["beta"] = study.robustness.trim_fraction
    if study.strategy == "krum":
        kwargs["num_malicious_clients"] = study.robustness.byzantine_sites
    strategy = cls(**kwargs)
    strategy.recorder = recorder
    strategy.required_sites = study.required_sites
    strategy.max_update_norm = None if study.secure.enabled else study.robustness.max_update_norm
    strategy.evaluation = study.privacy.evaluation
    if study.privacy.dp and study.privacy.level == "site":
        sigma = site_level_noise(study)
        log.info("site-level DP: clipping norm %g, noise multiplier %.3f for epsilon %g over %d rounds", study.privacy.site_clipping_norm, sigma, study.privacy.target_epsilon, study.rounds)
        return SiteLevelDP(strategy, noise_multiplier=sigma, clipping_norm=study.privacy.site_clipping_norm, num_sampled_clients=n_sites)
    return strategy
