"""A hostile coordinator, for tests only: a ServerApp that attacks real sites.

It runs the honest handshake (a site answers that once per run), then sends each
crafted request of :data:`ATTACKS` and records what came back. An attack is
*refused* when every reply is a sealed error (a code and the fixed phrase, no
content) and nothing else left the site. The same ServerApp runs in a simulation
(:func:`run_in_simulation`) and, through :func:`attack`, on any grid.

The attacks are the ones an independent review tried against fedhelix as a
coordinator operator: plans that switch DP or secure aggregation off or change
the model, batch size or learning rate; rounds beyond the study, a second fit of
a round, rounds going backwards, evaluations beyond the schedule (the counting
oracle); category levels, feature lists and garbage that provoke errors which
used to carry the site's values; pooled statistics and weights that do not fit
the approved model; unknown stages.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, GetPropertiesIns, ndarrays_to_parameters
from flwr.common.constant import MessageTypeLegacy
from flwr.serverapp import Grid, ServerApp

from shared.config import StudyConfig
from shared.models import build_model
from shared.params import get_weights
from shared.plan import PLAN_KEY, ROUND_KEY, STAGE_KEY, TrainingPlan

SEALED = re.compile(r"^fedhelix: site '[\w.-]+' (E1\d\d): [^:]+; the details stay in the site's log$")


@dataclass
class Outcome:
    """What the sites answered to one attack."""

    name: str
    sent: int = 0
    codes: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)  # replies that were not sealed refusals

    @property
    def refused(self) -> bool:
        return self.sent > 0 and not self.leaked and len(self.codes) == self.sent


@dataclass
class Target:
    """What the coordinator knows after the honest handshake."""

    study: StudyConfig
    nodes: dict[int, str]  # node id -> site name
    plan: TrainingPlan  # the honest plan (agreed features and labels)
    weights: list


def _messages(target: Target, kind: str, config: dict, weights=None) -> list[Message]:
    params = ndarrays_to_parameters(target.weights if weights is None else weights)
    if kind == "fit":
        content, mtype = compat.fitins_to_recorddict(FitIns(params, config), keep_input=True), MessageType.TRAIN
    elif kind == "evaluate":
        content, mtype = compat.evaluateins_to_recorddict(EvaluateIns(params, config), keep_input=True), MessageType.EVALUATE
    else:
        content, mtype = compat.getpropertiesins_to_recorddict(GetPropertiesIns(config)), MessageTypeLegacy.GET_PROPERTIES
    return [Message(content=content, dst_node_id=node, message_type=mtype, group_id="hostile") for node in target.nodes]


def _crafted(target: Target, **changes) -> str:
    """The honest plan with ``changes`` applied (nested privacy fields as ``privacy={...}``)."""
    raw = json.loads(target.plan.to_json())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return json.dumps(raw, sort_keys=True)


def _send(grid: Grid, outcome: Outcome, messages: list[Message], must_not_contain: tuple[str, ...] = ()) -> None:
    for reply in grid.send_and_receive(messages, timeout=120):
        outcome.sent += 1
        if not reply.has_error():
            outcome.leaked.append(f"node {reply.metadata.src_node_id} answered with content: {list(reply.content.keys())}")
            continue
        reason = reply.error.reason
        match = SEALED.match(reason)
        if match is None or any(word in reason for word in must_not_contain):
            outcome.leaked.append(f"unsealed error: {reason[:200]}")
        else:
            outcome.codes.append(match.group(1))


Attack = Callable[[Grid, Target, Outcome], None]


def plan_dp_off(grid: Grid, t: Target, o: Outcome) -> None:
    """The reviewed attack: DP and SecAgg+ off, a logistic model, batch 1, learning rate 1, plain fit."""
    plan = _crafted(t, privacy={"dp": False}, secure_aggregation=False, model="logistic", batch_size=1, learning_rate=1.0, local_steps=1)
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: plan, ROUND_KEY: 1}))


def plan_higher_epsilon(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: _crafted(t, privacy={"target_epsilon": 1000.0}), ROUND_KEY: 1}))


def plan_more_rounds_in_handshake_plan(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: _crafted(t, rounds=10_000), ROUND_KEY: 1}))


def plan_reproducible_noise(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: _crafted(t, privacy={"reproducible_noise": True}), ROUND_KEY: 1}))


def plan_extra_field(grid: Grid, t: Target, o: Outcome) -> None:
    plan = json.loads(t.plan.to_json())
    plan["debug_return_rows"] = True
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: json.dumps(plan), ROUND_KEY: 1}))


def plan_not_json(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: "{not json", ROUND_KEY: 1}))


def plan_missing(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "evaluate", {ROUND_KEY: 1}))


def empty_category_levels(grid: Grid, t: Target, o: Outcome) -> None:
    """Used to make the contract error list the site's own category values."""
    categories = {name: [] for name in t.plan.categories} or {"anything": []}
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: _crafted(t, categories=categories), ROUND_KEY: 1}))


def unknown_feature(grid: Grid, t: Target, o: Outcome) -> None:
    """A feature list that provokes a contract error naming the site's columns: only the code may leave."""
    features = [*t.plan.features[:-1], "no_such_feature"]
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: _crafted(t, features=features), ROUND_KEY: 1}), must_not_contain=tuple(t.plan.features))


def pooled_scale_zero(grid: Grid, t: Target, o: Outcome) -> None:
    n = len(t.plan.features)
    plan = _crafted(t, normalization={"mean": [0.0] * n, "scale": [0.0] * n})
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: plan, ROUND_KEY: 1}))


def wrong_weight_shapes(grid: Grid, t: Target, o: Outcome) -> None:
    weights = [w[..., :1] if w.ndim else w for w in t.weights]
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: 1}, weights=weights))


def unknown_stage(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: 1, STAGE_KEY: "dump"}))


def second_handshake(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "properties", {PLAN_KEY: t.plan.to_json()}))


def round_beyond_study(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: t.study.rounds + 1}))


def round_zero(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: 0}))


def counting_oracle(grid: Grid, t: Target, o: Outcome) -> None:
    """Many evaluations of one round with chosen weights: the first is the schedule's, the rest are refused.

    The first evaluation of round ``rounds`` is answered (it is in the schedule), so it is sent
    outside this outcome; the 20 that follow must all be refused.
    """
    grid.send_and_receive(_messages(t, "evaluate", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: t.study.rounds}), timeout=120)
    for i in range(20):
        weights = [w + 0.01 * (i + 1) for w in t.weights]
        _send(grid, o, _messages(t, "evaluate", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: t.study.rounds}, weights=weights))


def repeated_fit(grid: Grid, t: Target, o: Outcome) -> None:
    """One fit of round 2 is in the schedule (sent outside this outcome); the same round again, and round 1 after it, are not."""
    grid.send_and_receive(_messages(t, "fit", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: 2}), timeout=120)
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: 2}))
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: 1}))


def fit_beyond_study(grid: Grid, t: Target, o: Outcome) -> None:
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: t.study.rounds + 1}))


def plain_fit_for_a_secure_study(grid: Grid, t: Target, o: Outcome) -> None:
    """The honest plan, but asking for the update without SecAgg+ (only attacks a secure study)."""
    _send(grid, o, _messages(t, "fit", {PLAN_KEY: t.plan.to_json(), ROUND_KEY: 1}))


ATTACKS: list[Attack] = [
    plan_dp_off, plan_higher_epsilon, plan_more_rounds_in_handshake_plan, plan_reproducible_noise, plan_extra_field,
    plan_not_json, plan_missing, empty_category_levels, unknown_feature, pooled_scale_zero, wrong_weight_shapes,
    unknown_stage, second_handshake, round_beyond_study, round_zero, counting_oracle, repeated_fit, fit_beyond_study,
]  # fmt: skip


def handshake_target(grid: Grid, study: StudyConfig) -> Target:
    """The honest handshake: which node is which site, and the agreed features."""
    import time

    while len(nodes := list(grid.get_node_ids())) < len(study.sites):
        time.sleep(0.1)
    plan = TrainingPlan.from_study(study)
    replies = grid.send_and_receive(_messages(Target(study, dict.fromkeys(nodes, ""), plan, []), "properties", {PLAN_KEY: plan.to_json()}), timeout=120)
    names, features, labels = {}, [], []
    for reply in replies:
        if reply.has_error():
            raise AssertionError(f"the honest handshake was refused: {reply.error.reason}")
        props = compat.recorddict_to_getpropertiesres(reply.content).properties
        names[reply.metadata.src_node_id] = str(props["site"])
        features, labels = json.loads(str(props["features"])), json.loads(str(props["labels"]))
    plan = TrainingPlan.from_study(study, features, labels)
    model = build_model(study.model, study.task, len(features), study.model_options, seed=study.seed)
    return Target(study, names, plan, get_weights(model))


def attack(grid: Grid, study: StudyConfig, attacks: list[Attack] | None = None) -> list[Outcome]:
    """Run the honest handshake, then every attack in turn; one :class:`Outcome` per attack."""
    target = handshake_target(grid, study)
    outcomes = []
    for run in attacks or ATTACKS:
        outcome = Outcome(run.__name__)
        run(grid, target, outcome)
        outcomes.append(outcome)
    return outcomes


def hostile_server_app(study: StudyConfig, outcomes: list[Outcome], attacks: list[Attack] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcomes.extend(attack(grid, study, attacks))

    return app


def run_in_simulation(study: StudyConfig, ledger_dir: str, audit_dir: str, attacks: list[Attack] | None = None) -> list[Outcome]:
    """Every attack against the study's real sites (the real ClientApp) in a Flower simulation."""
    from flwr.simulation import run_simulation

    from client.app import create_client_app

    outcomes: list[Outcome] = []
    run_simulation(
        server_app=hostile_server_app(study, outcomes, attacks),
        client_app=create_client_app(study, ledger_dir, audit_dir),
        num_supernodes=len(study.sites),
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )
    return outcomes


def wdbc_dp_study(root: Path, where: Path, *, secure: bool) -> Path:
    """A short copy of the bundled WDBC DP study (3 hospitals, epsilon 3), with or without SecAgg+."""
    base = where / "wdbc"
    shutil.copytree(root / "studies" / "wdbc", base)
    for path in (base / "sites").glob("*.toml"):
        path.write_text(path.read_text().replace("../../../data/wdbc", str(root / "data" / "wdbc")))
    study = base / "study-dp.toml"
    text = study.read_text().replace("rounds = 10", "rounds = 3").replace("local_steps = 20", "local_steps = 5")
    study.write_text(text.replace("seed = 42", f"seed = 42\nsecure_aggregation = {str(secure).lower()}"))
    return study
