"""The fedhelix ServerApp: plans the study, runs Flower's workflow, writes the results.

Structure: handshake -> initial model -> ``DefaultWorkflow`` over a legacy
strategy inside a ``LegacyContext``. That is the one path on which Flower 1.42
can wrap the fit step in SecAgg+ (``DefaultWorkflow(fit_workflow=...)``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.app import Context
from flwr.common import parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server.checkpoint import Checkpointer, load_checkpoint, resume_state
from server.feature_selection import select_study_features
from server.best_round import BestRoundKeeper
from server.federated_stats import needs_federated_stats, needs_label_round, secure_pooled_labels, secure_pooled_standardizer
from server.grid_tap import Observer, TappedGrid
from server.handshake import handshake
from server.recorder import RunRecorder
from server.run_store import deployed_run_dir, runs_dir_from_env
from server.report import write_reports
from server.secure_aggregation import StrictSecAggPlus
from server.short_poll import ShortPollGrid, poll_interval
from server.strategy import build_strategy
from server.tracking import add_trackers
from server.workflow import ResumableWorkflow
from shared.approval import STUDY_B64_KEY, decode_study
from shared.config import StudyConfig, load_study, parse_study
from shared.errors import FedhelixError
from shared.imbalance import set_output_bias
from shared.models import build_model, federated_keys
from shared.params import get_weights, set_weights
from shared.paths import resolve_path
from shared.plan import TrainingPlan
from shared.secure_aggregation import derive_params

log = logging.getLogger("fedhelix.server")

SIMULATION_PULL_INTERVAL_S = 0.005


def run_study(grid: Grid, context: Context, study: StudyConfig, out_dir: Path, observe: Observer | None = None, resume: bool = False) -> dict:
    """Run one study on ``grid``; always leaves a report, raises if the study failed.

    With ``resume``, continue from the last complete round checkpointed in ``out_dir``.
    """
    ckpt = load_checkpoint(out_dir, study) if resume else None  # refused before anything in out_dir changes
    if ckpt is not None:  # Flower's logger: its lines reach the admin's `fedhelix run` stream
        logging.getLogger("flwr").info("resuming study '%s' after round %d of %d from %s", study.name, ckpt.round, study.rounds, out_dir)
    recorder = RunRecorder(out_dir, study.task)
    if ckpt is not None:
        recorder.restore(ckpt.rounds, ckpt.failures)
    add_trackers(recorder, out_dir, start_round=ckpt.round + 1 if ckpt else 1)
    if isinstance(grid, InMemoryGrid):
        # Simulation: polling in-process state is free; Flower's 0.1 s default dominates
        # SecAgg+'s four round trips per round.
        grid.pull_interval = SIMULATION_PULL_INTERVAL_S
    elif (interval := poll_interval(context.run_config)) is not None:
        grid = ShortPollGrid(grid, interval)  # deployment: Flower's HttpGrid waits 3 s between pulls
    tapped = TappedGrid(grid, recorder.observe_reply, observe, timeout=study.round_timeout_s)
    status, error, sites = "completed", None, []
    final_model = None
    plan = TrainingPlan.from_study(study)
    try:
        sites = handshake(tapped, study, plan)
        recorder.set_sites(sites)
        features = sites[0].features
        labels = sites[0].labels
        plan = TrainingPlan.from_study(study, features, labels)
        n_outputs = len(labels) if study.task == "multitask" else 1
        model = build_model(study.model, study.task, len(features), study.model_options, seed=study.seed, n_outputs=n_outputs, personalization=plan.personal_method)
        params = None
        if study.secure.enabled:
            site_level = study.privacy.dp and study.privacy.level == "site"  # sites send weight 1
            params = derive_params(len(study.sites), study.secure.max_dropouts, study.update_bound, 1 if site_level else max(s.n_train for s in sites))
            recorder.secure = params
            log.info("SecAgg+: %d shares, threshold %d, clipping +-%g, Q=2^%d, M=2^32, max_weight %g", params.num_shares, params.reconstruction_threshold, params.clipping_range, params.quantization_range.bit_length() - 1, params.max_weight)
        if study.omics is not None:  # federated feature selection fixes the feature list (repeated on resume: it must agree)
            features = select_study_features(tapped, context, study, plan, sites, params)
            plan = TrainingPlan.from_study(study, features, labels)
            model = build_model(study.model, study.task, len(features), study.model_options, seed=study.seed, n_outputs=n_outputs, personalization=plan.personal_method)
        if ckpt is not None:
            plan = resume_state(ckpt, plan, model)
        elif needs_federated_stats(sites):
            pooled = secure_pooled_standardizer(tapped, context, study, plan, sites, params)
            plan = dataclasses.replace(plan, normalization={"mean": pooled.mean.tolist(), "scale": pooled.scale.tolist()})
        if needs_label_round(study) and (ckpt is None or study.pos_weight == "balanced"):
            labels_pooled = secure_pooled_labels(tapped, context, study, plan, sites, params)
            if study.pos_weight == "balanced":
                plan = dataclasses.replace(plan, pos_weight=labels_pooled.balanced_pos_weight())
            if study.init_output_bias and ckpt is None:  # before round 1: start at the constant predictor
                set_output_bias(model, labels_pooled.log_odds())
        strategy = build_strategy(study, plan, ckpt.weights if ckpt else get_weights(model, federated_keys(model)), recorder)
        checkpointer = Checkpointer(out_dir, study, plan, recorder, strategy, ckpt)
        keeper = BestRoundKeeper(out_dir, study.task, resume=ckpt is not None) if study.select_best else None
        recorder.selected_round = keeper.round if keeper else None

        def after_round(server_round: int, ctx: LegacyContext) -> None:
            if keeper is not None:  # before the checkpoint, so a resumed run knows its best round
                keeper(server_round, ctx, recorder)
            checkpointer(server_round, ctx)

        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=study.rounds), strategy=strategy)
        fit_workflow = StrictSecAggPlus(params, timeout=study.secure.timeout_s) if params else None
        ResumableWorkflow(fit_workflow=fit_workflow, start_round=checkpointer.start_round, after_round=after_round)(tapped, legacy)
        weights = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
        if keeper is not None and keeper.weights is not None:  # the selected round's model, not the last
            weights = keeper.weights
            log.info("best-round selection: round %d of %d (validation %s %.4f)", keeper.round, study.rounds, keeper.metric, keeper.value)
        set_weights(model, weights, federated_keys(model))  # a personalized model's site-local parts stay at their initial values
        final_model = model
        torch.save(
            {"state_dict": model.state_dict(), "features": features, "labels": labels, "plan": plan.to_json(), "study": study.name},
            out_dir / "model.pt",
        )
        if len(recorder.rounds) < study.rounds:
            raise RuntimeError(f"only {len(recorder.rounds)} of {study.rounds} rounds completed")
    except Exception as err:  # the report must say what happened, then the run fails loudly
        status, error = "failed", err.line if isinstance(err, FedhelixError) else str(err)
        causes = [f"{f['site']}: {f['reason']}" for f in recorder.failures if f["reason"] not in error]
        if causes:  # e.g. a halted SecAgg+ round: say which sites failed and why
            error += " | site failures: " + "; ".join(dict.fromkeys(causes[-3:]))
        log.error("study '%s' failed: %s", study.name, err)
        raise
    finally:
        report = write_reports(out_dir, study, plan, sites, recorder, status=status, error=error, has_model=final_model is not None)
    return report


def _study_from_run_config(run_config: Mapping[str, Any], study: str | Path | None) -> StudyConfig:
    """The study a run carries (``fedhelix run``: the file itself, base64) or names (a path)."""
    encoded = str(run_config.get(STUDY_B64_KEY, "") or "")
    if study is None and encoded:
        text = decode_study(encoded).decode("utf-8")
        return parse_study(tomllib.loads(text), source="submitted study")
    return load_study(resolve_path(study or str(run_config.get("study", ""))))


def create_server_app(study: StudyConfig | str | Path | None = None, out_dir: str | Path | None = None, observe: Observer | None = None, resume: bool = False) -> ServerApp:
    """Build the ServerApp; arguments pin the study and output (else taken from run config).

    ``resume`` (or run config ``resume = "RUN_DIR"``) continues from the run directory's checkpoint.
    Under ``fedhelix server`` the run directory is ``RUNS/<study>/<nonce>`` (:mod:`server.run_store`)
    and run config ``resume`` only says to continue this run there.

    ``observe`` receives every (sent, replies) exchange of the coordinator (tests, audits).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nonlocal study
        if not isinstance(study, StudyConfig):
            study = _study_from_run_config(context.run_config, study)
        resume_dir = str(context.run_config.get("resume", "") or "")
        runs = runs_dir_from_env()
        if out_dir:
            out = Path(out_dir)
        elif runs is not None:  # deployed: the server's runs directory, never a path the admin chose (server.run_store)
            out, resumes = deployed_run_dir(runs, context.run_config, study.name)
            resume_dir = str(out) if resumes else ""
        else:
            out = resolve_path(resume_dir) if resume_dir else resolve_path(str(context.run_config.get("out", "runs"))) / study.name
        if STUDY_B64_KEY in context.run_config and context.run_config[STUDY_B64_KEY]:
            out.mkdir(parents=True, exist_ok=True)
            (out / "study.toml").write_bytes(decode_study(str(context.run_config[STUDY_B64_KEY])))  # what was run
        log.info("study '%s': %s, %s model, %s, %d rounds, %d sites -> %s", study.name, study.task, study.model, study.strategy, study.rounds, len(study.sites), out)
        started = time.time()
        run_study(grid, context, study, out, observe, resume=resume or bool(resume_dir))
        log.info("study '%s' finished in %.1f s; report in %s", study.name, time.time() - started, out / "report.html")

    return app


app = create_server_app()
