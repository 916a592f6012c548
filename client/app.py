"""The fedhelix ClientApp: one hospital's node in a study.

The coordinator is not trusted. Each request carries the coordinator's plan, but
the site derives its own plan from the study it approved and refuses any request
that asks for something else (:mod:`client.approved_plan`), or more often than the
approved schedule allows (:mod:`client.query_guard`). The node loads its own data
through the contract, trains from the global weights and sends back only the
*delta* (local minus global) plus aggregate metrics. Raw rows never leave.
Any error is sealed (:func:`make_sealing_mod`): the coordinator gets a code and a
fixed phrase, the site's log and audit log keep the whole line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.client import Client, ClientApp, NumPyClient
from flwr.app.message_type import MessageType
import flwr.compat.common.recorddict_compat as compat
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from client.approved_plan import approved_study, check_labels, check_selected, checked_plan
from client.audit import AuditLog, audit_path
from client.privacy.budget import open_ledger, plan_dp_round
from client.privacy.ledger import LedgerEntry
from client.query_guard import QueryGuard, QueryRefused, guard_path
from client.secagg_auth import AUTH_KEY
from client.secagg_mod import Requirements, make_secaggplus_mod, study_requirements
from shared.secure_aggregation import ProtocolRefused
from client.site_data import load_for_plan, resolve_site
from client.personal import PersonalStore, check_private, fit_personal, global_view, personalized_metrics
from client.trainer import evaluate, train, validation_metrics
from shared.approval import ATTEMPT_KEY, NONCE_KEY, ROSTER_KEY, decode_roster
from shared.config import SiteConfig, StudyConfig, load_study
from shared.contract import SiteData
from shared.errors import ConfigError, DataContractError, FedhelixError, RequestRefused, error_code, sealed_line, site_error_log
from shared.metrics import LOSS_WITHHELD, withhold_small_sample
from shared.models import build_model, federated_keys
from shared.params import NDArrays, clip_l2, get_weights, l2_norm, set_weights, subtract
from shared.plan import PLAN_KEY, ROUND_KEY, STAGE_KEY, TrainingPlan
from shared.omics import selection_moments
from shared.paths import resolve_path
from shared.pki import key_pem, load_ssh_private_key, new_key, openssh_public
from shared.preprocess import is_indicator, moments
from shared.validation import carve_validation
from shared.imbalance import label_moments

log = logging.getLogger("fedhelix.client")


def _scalars(metrics: dict) -> dict:
    """Flower metrics hold scalars only: drop undefined (None) values."""
    return {k: v for k, v in metrics.items() if v is not None}


class SiteClient(NumPyClient):
    """Trains and evaluates the global model on one site's private data.

    ``approved`` is the study this site agreed to: every request's plan is checked
    against it, and ``guard`` bounds how often each kind of request is answered in
    ``run``. The ClientApp always passes both; ``approved=None`` (in-process use by
    tests and benchmarks that build plans themselves) takes the plan as given.
    """

    def __init__(
        self, site: SiteConfig, ledger_dir: str | None = None, simulation: bool = False, audit: AuditLog | None = None,
        *, approved: StudyConfig | None = None, guard: QueryGuard | None = None, run: str = "local", attempt: int = 1,
    ) -> None:  # fmt: skip
        self.site = site
        self.ledger_dir = ledger_dir
        self.simulation = simulation  # only a simulation may accept reproducible (predictable) DP noise
        self.audit = audit or AuditLog(audit_path(site.name, site.path), site.name)  # every reply is logged before it leaves
        self.approved = approved
        self.guard = guard
        self.run = run
        self.attempt = attempt

    def _plan(self, config: dict) -> TrainingPlan:
        """The approved study's plan, completed with what the coordinator may choose; refused if it asks for more."""
        if PLAN_KEY not in config:
            raise RequestRefused(f"site '{self.site.name}' refused a request without a plan")
        if self.approved is None:
            return TrainingPlan.from_json(str(config[PLAN_KEY]))
        return checked_plan(self.approved, str(config[PLAN_KEY]), self.site.name)

    def _claim(self, plan: TrainingPlan, kind: str, server_round: int = 0) -> None:
        if self.guard is not None:
            self.guard.claim(self.run, plan.study, kind, server_round, plan.rounds, self.attempt)

    def _setup(self, plan: TrainingPlan, parameters: NDArrays | None = None, validation: bool = False):
        """The site's data (with ``select_best``, train rows less the validation split) and the model.

        ``validation``: the carved validation view instead (its test arrays are the validation rows).
        """
        data = load_for_plan(self.site, plan)
        if plan.select_best:
            data = carve_validation(data, plan.validation_fraction, plan.seed)[1 if validation else 0]
        if self.approved is not None:
            check_labels(plan, list(getattr(data, "labels", (self.site.data.label,))), self.site.name)
            if parameters is not None:  # a model: with [omics] top_k, never over more omics features than selected
                check_selected(plan, len(getattr(data, "omics_features", ())), self.site.name)
        n_outputs = len(getattr(data, "labels", ())) or 1
        model = build_model(plan.model, plan.task, len(data.feature_names), plan.model_options, n_outputs=n_outputs, personalization=plan.personal_method)
        if parameters is not None:  # only the federated tensors travel (a personalized model keeps some at the site)
            keys = federated_keys(model)
            state = model.state_dict()
            if [tuple(np.shape(p)) for p in parameters] != [tuple(state[k].shape) for k in keys]:
                raise RequestRefused(f"site '{self.site.name}' refused weights whose shapes differ from the approved model's")
            set_weights(model, parameters, keys)
        return data, model

    def _store(self) -> PersonalStore:
        """Where this run's personal parameters stay between rounds: beside the site's audit log."""
        return PersonalStore(self.audit.path, self.site.name, self.run)

    def get_properties(self, config):
        """Handshake before round 1: counts and encoded feature names, never values."""
        plan = self._plan(config)
        self._claim(plan, "handshake")
        data, _ = self._setup(plan)
        props = {
            "site": self.site.name,
            "n_train": data.n_train,
            "n_test": data.n_test,
            "features": json.dumps(list(data.feature_names)),
            # counts only: a warning's detail (rows, SMILES, values) stays in the site's log
            "warnings": json.dumps([public_warning(w) for w in data.warnings]),
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

    def _fit_labels(self, plan: TrainingPlan) -> tuple[NDArrays, int, dict]:
        """Secure label round: per label, this site's fraction of positive and of known train labels, under SecAgg+.

        Weighted by n_train, the secure sum gives the pooled counts from which the coordinator
        sets the output bias (pooled log-odds) and a balanced ``pos_weight``; it never sees this site's.
        """
        if plan.task not in ("binary", "multitask"):
            raise ConfigError(f"site '{self.site.name}' refused the label round: study '{plan.study}' is not a binary or multitask study")
        if self.approved is not None and not (self.approved.init_output_bias or self.approved.pos_weight == "balanced"):
            raise RequestRefused(f"site '{self.site.name}' refused the label round: the approved study uses no pooled label counts (init_output_bias = false, no balanced pos_weight)")
        data, _ = self._setup(plan)
        labels = list(getattr(data, "labels", (self.site.data.label,)))
        if plan.labels:  # the agreed order of the tasks
            order = [labels.index(name) for name in plan.labels]
            y = np.asarray(data.y_train, dtype=np.float64)
            data_y = y[:, order] if y.ndim == 2 else y
            labels = list(plan.labels)
        else:
            data_y = np.asarray(data.y_train, dtype=np.float64)
        return self._masked_statistics(plan, label_moments(data_y), labels, data.n_train, "label fractions", "check the label columns")

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
        plan = self._plan(config)
        stage = config.get(STAGE_KEY)
        if stage not in (None, "stats", "select", "labels"):
            raise RequestRefused(f"site '{self.site.name}' refused an unknown stage {stage!r}")
        if stage in ("stats", "select", "labels"):  # statistics of the site's own values: no pooled scaling applies yet
            plan = dataclasses.replace(plan, normalization={})
        if stage == "select":
            self._claim(plan, "select")
            return self._fit_selection(plan)
        if stage == "labels":
            self._claim(plan, "labels")
            return self._fit_labels(plan)
        if stage == "stats":
            self._claim(plan, "stats")
            data, _ = self._setup(plan)
            return self._fit_statistics(plan, data)
        server_round = _round(config)
        self._claim(plan, "fit", server_round)
        data, model = self._setup(plan, parameters)
        weight = data.n_train
        check_private(plan)
        if plan.privacy.dp and plan.privacy.level == "site":
            self._accept_site_level(plan)
            train(model, data, plan, server_round)
            delta, _ = clip_l2(_delta(model, parameters), plan.privacy.site_clipping_norm)
            metrics = {}  # nothing about the un-noised update leaves in the clear (no loss, no clipping flag)
            weight = 1  # central DP-FedAvg averages sites unweighted: the noise is calibrated to S / n_sites
        elif plan.privacy.dp:
            metrics, delta = self._fit_private(plan, data, model, parameters, server_round)
        elif plan.personalization is not None:  # the personal part stays in the site's store; the delta is the federated part
            metrics = fit_personal(plan, data, model, self._store(), server_round)
            delta = _delta(model, parameters)
        else:
            metrics = train(model, data, plan, server_round)
            delta = _delta(model, parameters)
        _check_finite(delta, self.site.name, server_round)
        norm = l2_norm(delta)
        if plan.secure_aggregation:
            # Clip before SecAgg+ quantises, so Flower's own clipping never bites silently;
            # the norm stays at the site (in plaintext it would describe this site's update).
            bound = plan.update_bound
            clipped = sum(int((np.abs(d) > bound).sum()) for d in delta)
            delta = [np.clip(d, -bound, bound) for d in delta]
            if not (plan.privacy.dp and plan.privacy.level == "site"):  # the noise is added later, by the coordinator
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
        ledger, budget = open_ledger(self.site, self.ledger_dir, self.audit.path)
        try:
            dp = plan_dp_round(plan, self.site, data.n_train, ledger)
            ledger.check(plan.study, server_round, dp.step, dp.delta, dp.accountant, budget)
            metrics = train(model, data, plan, server_round, dp=dp)
            delta = _delta(model, parameters)
            _check_finite(delta, self.site.name, server_round)  # a diverged round sends nothing: nothing to charge
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
        plan = self._plan(config)
        if not plan.privacy.evaluation:
            raise QueryRefused(f"site '{self.site.name}' refused an evaluation: study '{plan.study}' releases no evaluation metrics ([privacy] evaluation = false)")
        server_round = _round(config)
        self._claim(plan, "evaluate", server_round)
        data, model = self._setup(plan, parameters)
        glob = global_view(plan, data, model)
        loss, metrics = evaluate(glob, data, plan)
        if plan.select_best:  # best-round selection: the same global model on the validation rows carved from train
            metrics |= validation_metrics(glob, self._setup(plan, validation=True)[0], plan)
        released = withhold_small_sample({"loss": loss, **metrics}, data.n_test)
        loss = released.pop("loss")
        personal = personalized_metrics(plan, data, model, self._store(), server_round) if plan.personalization else {}
        metrics = _scalars({"site": self.site.name, **released, **personal, **({LOSS_WITHHELD: 1} if loss is None else {})})
        self.audit.append(study=plan.study, server_round=server_round, kind="metrics", metrics={"loss": loss, "n": data.n_test, **metrics})
        return (0.0 if loss is None else loss), data.n_test, metrics  # Flower needs a number; the flag says it is none


def run_identity(context: Context) -> tuple[str, int]:
    """(run, attempt) the schedule is kept for: the signed run identity deployed, Flower's run id in simulation.

    Only the node's approval gate makes the signed keys trustworthy: it admits each (identity,
    attempt) once and checks them against the admin's signature of this very run config.
    """
    nonce = str(context.run_config.get(NONCE_KEY, "") or "")
    if not nonce:
        return str(context.run_id), 1
    try:
        return nonce, int(context.run_config.get(ATTEMPT_KEY, 1))
    except (TypeError, ValueError):
        raise RequestRefused("refused a run whose attempt number is not a number") from None


def _check_finite(delta: NDArrays, site: str, server_round: int) -> None:
    if not all(np.isfinite(d).all() for d in delta):
        raise DataContractError(f"site '{site}': training diverged in round {server_round} (non-finite update); nothing was sent. Fix: lower the study's learning_rate")


def _round(config: dict) -> int:
    try:
        return int(config[ROUND_KEY])
    except (KeyError, TypeError, ValueError):
        raise RequestRefused("refused a request without a valid round number") from None


_NAMED = re.compile(r"\S*[./\\'\"`\[\]]\S*")  # file names, paths, quoted values, lists


def public_warning(text: str) -> str:
    """A data warning as it may leave the site: its counts, never rows, values or file names.

    Everything after the first colon (the rows or values it is about) stays at the site,
    and any token that names something (a file, a path, a quoted value, a list) becomes
    ``<named>``; the full warning is in the site's log.
    """
    return _NAMED.sub("<named>", text.split(":", 1)[0]).strip()


def _delta(model, parameters: NDArrays) -> NDArrays:
    """What a site shares: its locally trained federated weights minus the global weights it received."""
    return subtract(get_weights(model, federated_keys(model)), [np.asarray(p, dtype=np.float32) for p in parameters])


SiteOf = Callable[[Context], tuple[SiteConfig, StudyConfig, AuditLog]]
Authentication = Callable[[Context, str], dict]


def make_secure_aggregation_mod(site_of: SiteOf, authentication: Authentication) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """Run the SecAgg+ client protocol for studies that use it, pass others through.

    Whether a study masks its updates, and every protocol parameter, is read from the
    *approved* study, never from the message (:func:`client.secagg_mod.study_requirements`):
    a train message without SecAgg+ for a study that says secure aggregation (or for a
    statistics round) is refused, so the site never sends in the clear what it agreed to
    mask; SecAgg+ messages for a study without it are refused too. ``authentication``
    gives the roster and signing key that authenticate the sites' SecAgg+ public keys.
    """

    def requirements(msg: Message, ctxt: Context) -> Requirements:
        site, study, _ = site_of(ctxt)
        # own weight 1: the mod still refuses, when it masks, a weight above the coordinator's max_weight
        return study_requirements(study, n_train=1, group_id=msg.metadata.group_id, **authentication(ctxt, site.name))

    secaggplus = make_secaggplus_mod(requirements)

    def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        site, study, _ = site_of(ctxt)
        if "secaggplus_configs" in msg.content.config_records:
            if not study.secure.enabled:
                raise RequestRefused(f"site '{site.name}' refused SecAgg+ messages for study '{study.name}', which does not use secure aggregation")
            return secaggplus(msg, ctxt, call_next)
        config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        if study.secure.enabled or config.get(STAGE_KEY) in ("stats", "select", "labels"):
            raise RequestRefused(f"site '{site.name}' refused: study '{study.name}' requires secure aggregation but this update was requested without SecAgg+")
        return call_next(msg, ctxt)

    return secure_aggregation_mod


def simulated_authentication(study: StudyConfig) -> Authentication:
    """A simulation's sites each get an ephemeral ECDSA key; their roster authenticates SecAgg+ keys.

    Keys travel as PEM bytes: the simulation ships the ClientApp to its workers by value.
    """
    keys = {ref.name: new_key() for ref in study.sites}
    pems = {name: key_pem(key) for name, key in keys.items()}
    roster = {name: openssh_public(key).decode() for name, key in keys.items()}

    def authentication(ctxt: Context, site: str) -> dict:
        from cryptography.hazmat.primitives import serialization

        return dict(roster=roster, site=site, signing_key=serialization.load_pem_private_key(pems[site], None))

    return authentication


def deployed_authentication(ctxt: Context, site: str) -> dict:
    """A node signs with its provisioned key; the roster is the one the admin signed into the run.

    A signed run without a roster (an admin kit provisioned before rosters existed) is refused:
    unauthenticated keys would let the coordinator play every neighbour. A SuperNode started
    by hand without a node key (benchmarks) runs unauthenticated and says so in its log.
    """
    roster = decode_roster(str(ctxt.run_config.get(ROSTER_KEY, "") or "")) if ctxt.run_config.get(ROSTER_KEY) else {}
    if AUTH_KEY not in ctxt.node_config:  # a SuperNode started by hand, without `fedhelix node` (benchmarks)
        log.warning("site '%s': SecAgg+ public keys are not authenticated (the node has no key to sign with)", site)
        return {}
    if not roster:  # unauthenticated keys would let the coordinator play every neighbour
        raise ProtocolRefused(f"site '{site}' refused SecAgg+: the signed run carries no roster of node keys; re-provision the admin kit (fedhelix provision writes roster.json)")
    return dict(roster=roster, site=site, signing_key=load_ssh_private_key(Path(str(ctxt.node_config[AUTH_KEY]))))


def make_sealing_mod(site_of: SiteOf, site_log: Callable[[Context], tuple[SiteConfig, AuditLog]] | None = None) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """Seal every error: the coordinator gets a code and a fixed phrase, the site keeps the line.

    Flower forwards a ClientApp exception's text to the coordinator, and that text can
    name the site's files, columns, category values or patients. This outermost mod
    turns any exception into an error reply of its own (:func:`shared.errors.sealed_line`),
    logs the whole line at the site (its log and ``SITE.errors.log`` beside its audit
    log), and records the reply that left in the audit log, like every other reply.
    ``site_log`` gives the site and its audit log when ``site_of`` itself fails (e.g. the run's
    study is refused), so that refusal is logged and audited like any other.
    """

    def sealing_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        try:
            return call_next(msg, ctxt)
        except Exception as err:  # noqa: BLE001 - nothing unsealed may leave
            code = error_code(err)
            line = err.line if isinstance(err, FedhelixError) else f"{type(err).__name__}: {err}"
            name, study, audit = "?", "?", None
            try:
                site, approved, audit = site_of(ctxt)
                name, study = site.name, approved.name
            except Exception:  # noqa: BLE001 - the site file or study itself is what failed
                try:
                    if site_log is not None:
                        site, audit = site_log(ctxt)
                        name = site.name
                except Exception:  # noqa: BLE001 - not even the site file: the reply says '?'
                    pass
            log.error("site '%s' %s (%s message): %s", name, code, msg.metadata.message_type, line, exc_info=not isinstance(err, FedhelixError))
            reply = sealed_line(name, code)
            if audit is not None:
                try:
                    with _site_error_log(audit.path, name).open("a", encoding="utf-8") as fh:
                        fh.write(f"{code} {msg.metadata.message_type} run {msg.metadata.run_id}: {line}\n")
                    audit.append(study=study, server_round=-1, kind="error", metrics={"code": code, "reply": reply})
                except Exception as failure:  # noqa: BLE001 - the reply stays sealed whatever the disk says
                    log.error("site '%s': could not record error %s: %s", name, code, failure)
                    reply = sealed_line(name, "E180")
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reply), reply_to=msg)

    return sealing_mod


def _site_error_log(audit_log: Path, site: str) -> Path:
    """The site's own record of its errors in full, created owner-only."""
    path = site_error_log(audit_log, site)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    return path


def create_client_app(
    study: str | Path | StudyConfig | None = None, ledger_dir: str | None = None, audit_dir: str | None = None,
    *, mods: Sequence[Mod] = (),
) -> ClientApp:  # fmt: skip
    """Build the ClientApp; ``study`` (a file or the parsed study) pins it in simulation (else run config).

    In a simulation the researcher is every site's IT: the study it passes here is
    the study every simulated site approved, and each request is checked against it.
    ``mods`` run inside the sealing mod and outside secure aggregation (fault injection in tests).

    ``ledger_dir`` (simulations only) keeps each run's privacy ledgers apart
    from the sites' real ledgers. A node may relocate its ledgers with its own
    node config ``ledger-dir`` (never the run config, which the coordinator sets).
    ``audit_dir`` (simulations) holds each site's audit log; a node's log is its
    node config ``audit-log``, else ``SITE.audit.jsonl`` beside its site file.
    """
    simulation = study is not None

    def site_log(context: Context) -> tuple[SiteConfig, AuditLog]:
        site = resolve_site(context, study)
        return site, AuditLog(audit_path(site.name, site.path, audit_dir, context.node_config), site.name)

    def site_of(context: Context) -> tuple[SiteConfig, StudyConfig, AuditLog]:
        site, audit = site_log(context)
        return site, approved_study(context, site, study), audit

    def client_fn(context: Context) -> Client:
        torch.set_num_threads(1)  # tiny models; one thread avoids oversubscribing small hosts
        ledgers = ledger_dir or context.node_config.get("ledger-dir")
        site, study, audit = site_of(context)
        guard = QueryGuard(guard_path(audit.path, site.name), site.name)
        run, attempt = run_identity(context)
        client = SiteClient(site, str(ledgers) if ledgers else None, simulation, audit, approved=study, guard=guard, run=run, attempt=attempt)
        return client.to_client()

    authentication = deployed_authentication
    if isinstance(study, StudyConfig):
        authentication = simulated_authentication(study)
    elif study is not None:
        authentication = simulated_authentication(load_study(resolve_path(str(study))))
    sealing = make_sealing_mod(site_of, site_log)
    return ClientApp(client_fn=client_fn, mods=[sealing, *mods, make_secure_aggregation_mod(site_of, authentication)])


app = create_client_app()
