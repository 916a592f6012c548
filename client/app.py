"""The fedhelix ClientApp: one hospital's node in a study.

Each instruction carries the study's training plan; the node loads its own data
through the contract, trains from the global weights and sends back only the
*delta* (local minus global) plus aggregate metrics. Raw rows never leave.
A contract violation raises a one-line :class:`~shared.errors.FedhelixError`
before anything is computed, so the node replies with that error and no update.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import Client, ClientApp, NumPyClient
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
import flwr.compat.common.recorddict_compat as compat
from flwr.clientapp.typing import ClientAppCallable

from client.audit import AuditLog, audit_path
from client.privacy.budget import open_ledger, plan_dp_round
from client.privacy.ledger import LedgerEntry
from client.site_data import load_for_plan, resolve_site
from client.trainer import evaluate, train
from shared.config import SiteConfig
from shared.contract import SiteData
from shared.errors import ConfigError, DataContractError
from shared.models import build_model
from shared.params import NDArrays, clip_l2, get_weights, l2_norm, set_weights, subtract
from shared.plan import PLAN_KEY, ROUND_KEY, STAGE_KEY, TrainingPlan
from shared.omics import selection_moments
from shared.preprocess import is_indicator, moments

log = logging.getLogger("fedhelix.client")


def _scalars(metrics: dict) -> dict:
    """Flower metrics hold scalars only: drop undefined (None) values."""
    return {k: v for k, v in metrics.items() if v is not None}


class SiteClient(NumPyClient):
    """Trains and evaluates the global model on one site's private data."""

    def __init__(self, site: SiteConfig, ledger_dir: str | None = None, simulation: bool = False, audit: AuditLog | None = None) -> None:
        self.site = site
        self.ledger_dir = ledger_dir
        self.simulation = simulation  # only a simulation may accept reproducible (predictable) DP noise
        self.audit = audit or AuditLog(audit_path(site.name, site.path), site.name)  # every reply is logged before it leaves

    def _setup(self, config: dict, parameters: NDArrays | None = None):
        plan = TrainingPlan.from_json(str(config[PLAN_KEY]))
        data = load_for_plan(self.site, plan)
        model = build_model(plan.model, plan.task, len(data.feature_names), plan.model_options, n_outputs=len(getattr(data, "labels", ())) or 1)
        if parameters is not None:
            set_weights(model, parameters)
        return plan, data, model

    def get_properties(self, config):
        """Handshake before round 1: counts and encoded feature names, never values."""
        plan, data, _ = self._setup(config)
        props = {
            "site": self.site.name,
            "n_train": data.n_train,
            "n_test": data.n_test,
            "features": json.dumps(list(data.feature_names)),
            "warnings": json.dumps(list(data.warnings)),
            "normalize": self.site.data.normalize,
            # which features are 0/1 here (a pooled scaler leaves features that are 0/1 everywhere alone)
            "indicators": json.dumps(is_indicator(data.x_train).tolist() if isinstance(data, SiteData) else []),
            "labels": json.dumps(list(getattr(data, "labels", (self.site.data.label,)))),
            # omics features (a study with [omics] selects among those every site has); names only
            "candidates": json.dumps(list(getattr(data, "omics_features", ()))),
            "join_dropped": int(getattr(data, "join_dropped", 0)),
        }
        self.audit.append(study=plan.study, server_round=0, kind="handshake", metrics=props)
        return props

    def _fit_selection(self, plan: TrainingPlan) -> tuple[NDArrays, int, dict]:
        """Federated feature selection: this site's per-feature presence, sum and sum of squares, under SecAgg+.

        Computed on the train split's unstandardised values (after the table's transforms),
        weighted by n_train; the coordinator sees only the pooled statistics.
        """
        if not plan.selection:
            raise ConfigError(f"site '{self.site.name}' refused the selection round: the study has no [omics] section")
        data = load_for_plan(self.site, plan, scale=False)
        index = {name: i for i, name in enumerate(data.feature_names)}
        absent = [f for f in plan.candidates if f not in index]
        if absent:
            raise DataContractError(f"site '{self.site.name}': candidate feature(s) {absent[:3]} not in its data; nothing was sent. Fix: check the omics tables")
        pos = np.fromiter((index[f] for f in plan.candidates), dtype=np.int64, count=len(plan.candidates))
        values = selection_moments(data.x_train[:, pos], data.missing_rate[pos])
        fix = 'log-transform the table (transforms = ["log1p"]) or raise [secure_aggregation] stats_bound'
        return self._masked_statistics(plan, values, list(plan.candidates), data.n_train, "selection statistics", fix)

    def _fit_statistics(self, plan: TrainingPlan, data) -> tuple[NDArrays, int, dict]:
        """Secure statistics round: this site's feature means and mean squares, summed under SecAgg+.

        Weighted by n_train, the secure weighted mean over sites is exactly the pooled
        mean and pooled mean square; the coordinator never sees this site's values.
        """
        if self.site.data.normalize != "federated":
            raise ConfigError(f"site '{self.site.name}' refused the statistics round: its site file does not ask for normalize = \"federated\"")
        fix = "rescale the column or raise [secure_aggregation] stats_bound"
        return self._masked_statistics(plan, moments(data.x_train), data.feature_names, data.n_train, "feature statistics", fix)

    def _masked_statistics(self, plan: TrainingPlan, values: np.ndarray, names: list[str], weight: int, what: str, fix: str) -> tuple[NDArrays, int, dict]:
        """The reply of a secure statistics round: bounded (the secure sum must not wrap), audited, then masked by SecAgg+.

        ``values`` holds one block per statistic, each in the order of ``names``.
        """
        worst = int(np.argmax(np.abs(values)))
        if abs(values[worst]) > plan.stats_bound:
            feature = names[worst % len(names)]
            raise DataContractError(
                f"site '{self.site.name}': feature '{feature}' has magnitude {abs(values[worst]):.3g}, beyond the study's "
                f"stats_bound {plan.stats_bound:g}; nothing was sent. Fix: {fix}"
            )
        log.info("site '%s': masking %d %s for the secure sum", self.site.name, len(values), what)
        arrays, metrics = [values.astype(np.float64)], {"site": self.site.name}
        self.audit.append(study=plan.study, server_round=0, kind="statistics", arrays=arrays, metrics=metrics, l2_norm=l2_norm(arrays), masked=True)
        return arrays, weight, metrics

    def fit(self, parameters, config):
        if config.get(STAGE_KEY) == "select":
            return self._fit_selection(TrainingPlan.from_json(str(config[PLAN_KEY])))
        plan, data, model = self._setup(config, None if config.get(STAGE_KEY) == "stats" else parameters)
        if config.get(STAGE_KEY) == "stats":
            return self._fit_statistics(plan, data)
        server_round = int(config[ROUND_KEY])
        weight = data.n_train
        if plan.privacy.dp and plan.privacy.level == "site":
            self._accept_site_level(plan)
            train(model, data, plan, server_round)
            delta, clipped = clip_l2(_delta(model, parameters), plan.privacy.site_clipping_norm)
            metrics = {"site_update_clipped": clipped}  # no train loss: it is not covered by any noise
            weight = 1  # central DP-FedAvg averages sites unweighted: the noise is calibrated to S / n_sites
        elif plan.privacy.dp:
            metrics, delta = self._fit_private(plan, data, model, parameters, server_round)
        else:
            metrics = train(model, data, plan, server_round)
            delta = _delta(model, parameters)
        if not all(np.isfinite(d).all() for d in delta):
            raise DataContractError(
                f"site '{self.site.name}': training diverged in round {server_round} (non-finite update); "
                "nothing was sent. Fix: lower the study's learning_rate"
            )
        norm = l2_norm(delta)
        if plan.secure_aggregation:
            # Clip before SecAgg+ quantises, so Flower's own clipping never bites silently;
            # the norm stays at the site (in plaintext it would describe this site's update).
            bound = plan.update_bound
            clipped = sum(int((np.abs(d) > bound).sum()) for d in delta)
            delta = [np.clip(d, -bound, bound) for d in delta]
            metrics["clipped_coordinates"] = clipped
            log.info("site '%s' round %d: masking delta (L2 norm %.4g, %d coordinates clipped to +-%g) from %d examples", self.site.name, server_round, norm, clipped, bound, data.n_train)
        else:
            metrics["update_norm"] = norm
            log.info("site '%s' round %d: sending delta (L2 norm %.4g) from %d examples", self.site.name, server_round, norm, data.n_train)
        metrics = _scalars({"site": self.site.name, **metrics})
        self.audit.append(
            study=plan.study, server_round=server_round, kind="update", arrays=delta, metrics=metrics,
            l2_norm=l2_norm(delta), epsilon=metrics.get("epsilon"), masked=plan.secure_aggregation,
        )  # fmt: skip
        return delta, weight, metrics

    def _fit_private(self, plan: TrainingPlan, data, model, parameters, server_round: int):
        """DP-SGD round: refuse before training if the ledger's budget would be exceeded."""
        if plan.privacy.reproducible_noise and not self.simulation:
            raise ConfigError(
                f"site '{self.site.name}' refused: the study asks for reproducible DP noise, which the coordinator "
                "could predict and subtract; that setting is for simulations only"
            )
        ledger, budget = open_ledger(self.site, self.ledger_dir)
        try:
            dp = plan_dp_round(plan, self.site, data.n_train, ledger)
            ledger.check(plan.study, server_round, dp.step, dp.delta, dp.accountant, budget)
            metrics = train(model, data, plan, server_round, dp=dp)
            delta = _delta(model, parameters)
            # Recorded before the update leaves (a crash after this line over-counts, never
            # under-counts), with the budget checked again against what other studies spent meanwhile.
            entry = ledger.record(
                LedgerEntry(plan.study, server_round, dp.steps, dp.sample_rate, dp.noise_multiplier, dp.max_grad_norm, dp.accountant, dp.delta, 0.0),
                budget=budget,
            )
            eps_after = entry.epsilon_after
        finally:
            ledger.close()
        log.info("site '%s' round %d: DP-SGD, sigma=%.3f q=%.4f, epsilon now %.3f of budget %g", self.site.name, server_round, dp.noise_multiplier, dp.sample_rate, eps_after, budget)
        privacy = {"epsilon": eps_after, "delta": dp.delta, "noise_multiplier": dp.noise_multiplier, "sample_rate": dp.sample_rate, "epsilon_budget": budget}
        return {**metrics, **privacy}, delta

    def _accept_site_level(self, plan: TrainingPlan) -> None:
        """Site-level DP puts the noise in the coordinator's hands: only on the site's explicit consent."""
        if self.site.privacy is None or not self.site.privacy.allow_site_level:
            raise ConfigError(
                f"site '{self.site.name}' refused: the study uses site-level DP, where the coordinator adds the noise; "
                "set [privacy] allow_site_level = true in the site file to accept that"
            )
        if not plan.secure_aggregation:
            raise ConfigError(f"site '{self.site.name}' refused: site-level DP without secure aggregation would reveal its un-noised update")

    def evaluate(self, parameters, config):
        plan, data, model = self._setup(config, parameters)
        loss, metrics = evaluate(model, data, plan)
        metrics = _scalars({"site": self.site.name, **metrics})
        self.audit.append(study=plan.study, server_round=int(config.get(ROUND_KEY, 0)), kind="metrics", metrics={"loss": loss, "n": data.n_test, **metrics})
        return loss, data.n_test, metrics


def _delta(model, parameters: NDArrays) -> NDArrays:
    """What a site shares: its locally trained weights minus the global weights it received."""
    return subtract(get_weights(model), [np.asarray(p, dtype=np.float32) for p in parameters])


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ client protocol for studies that use it, pass others through.

    Flower's ``secaggplus_mod`` fails on a plain (non-SecAgg) train message, and a
    node must serve both kinds of study. A train message *without* SecAgg+ for a
    study whose plan says secure aggregation (or for the statistics round) is
    refused: the site never sends in the clear what the study promised to mask.
    """
    if "secaggplus_configs" in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    if msg.metadata.message_type == MessageType.TRAIN:
        config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        if config.get(STAGE_KEY) in ("stats", "select") or (PLAN_KEY in config and TrainingPlan.from_json(str(config[PLAN_KEY])).secure_aggregation):
            raise ConfigError("refused: the study requires secure aggregation but this update was requested without SecAgg+")
    return call_next(msg, ctxt)


def _temp_secagg_wiring(study_path: str | None):
    """TEMP wiring (secagg branch, for its e2e check): the lead replaces this with the approved study.

    Requirements come from the study file (simulation) or the run's study; own weight 1
    (the mod still refuses a weight above max_weight when it masks). In simulation each
    site gets an ephemeral ECDSA key and the sites' roster authenticates the keys.
    """
    import tomllib

    from client.secagg_mod import make_secaggplus_mod, study_requirements
    from shared.pki import key_pem, new_key, openssh_public
    from shared.approval import STUDY_B64_KEY, decode_study
    from shared.config import load_study, parse_study
    from shared.paths import resolve_path

    if study_path is not None:
        keys = {ref.name: new_key() for ref in load_study(study_path).sites}
        pems = {name: key_pem(k) for name, k in keys.items()}  # picklable, for Ray workers
        roster = {name: openssh_public(k).decode() for name, k in keys.items()}

    def requirements(msg: Message, ctxt: Context):
        from cryptography.hazmat.primitives import serialization  # imported here: Ray pickles this closure

        auth: dict = {}
        if study_path is not None:
            site = resolve_site(ctxt, study_path).name
            auth = dict(roster=roster, site=site, signing_key=serialization.load_pem_private_key(pems[site], None))
        encoded = str(ctxt.run_config.get(STUDY_B64_KEY, "") or "")
        if study_path is None and encoded:
            study = parse_study(tomllib.loads(decode_study(encoded).decode("utf-8")), source="submitted study")
        else:
            study = load_study(resolve_path(study_path or str(ctxt.run_config.get("study", ""))))
        return study_requirements(study, n_train=1, group_id=msg.metadata.group_id, **auth)

    secagg = make_secaggplus_mod(requirements)

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if "secaggplus_configs" in msg.content.config_records:
            return secagg(msg, ctxt, call_next)
        return secure_aggregation_mod(msg, ctxt, call_next)

    return mod


def create_client_app(study_path: str | None = None, ledger_dir: str | None = None, audit_dir: str | None = None) -> ClientApp:
    """Build the ClientApp; ``study_path`` pins the study in simulation (else run config).

    ``ledger_dir`` (simulations only) keeps each run's privacy ledgers apart
    from the sites' real ledgers. A node may relocate its ledgers with its own
    node config ``ledger-dir`` (never the run config, which the coordinator sets).
    ``audit_dir`` (simulations) holds each site's audit log; a node's log is its
    node config ``audit-log``, else ``SITE.audit.jsonl`` beside its site file.
    """
    simulation = study_path is not None

    def client_fn(context: Context) -> Client:
        torch.set_num_threads(1)  # tiny models; one thread avoids oversubscribing small hosts
        ledgers = ledger_dir or context.node_config.get("ledger-dir")
        site = resolve_site(context, study_path)
        audit = AuditLog(audit_path(site.name, site.path, audit_dir, context.node_config), site.name)
        return SiteClient(site, str(ledgers) if ledgers else None, simulation, audit).to_client()

    return ClientApp(client_fn=client_fn, mods=[_temp_secagg_wiring(study_path)])  # TEMP wiring (secagg branch)


app = create_client_app()
