"""A hostile coordinator, for tests only: a ServerApp that attacks real sites.

It runs the honest handshake (a site answers that once per run), then sends each
crafted request of :data:`ATTACKS` and records what came back. An attack is
*refused* when every reply is a sealed error (a code and the fixed phrase, no
content) and nothing else left the site. The same ServerApp runs in a simulation
(:func:`run_in_simulation`) and, through :func:`attack`, on any grid (the loopback
deployment test runs it inside a real ServerApp process, ``hostile_server/``).

The attacks are the ones an independent review tried against fedhelix as a
coordinator operator: plans that switch DP or secure aggregation off or change
the model, batch size or learning rate; rounds beyond the study, a second fit of
a round, rounds going backwards, evaluations beyond the schedule (the counting
oracle); category levels, feature lists and garbage that provoke errors which
used to carry the site's values; pooled statistics and weights that do not fit
the approved model; unknown stages. And, against a secure study, the SecAgg+
protocol itself (:data:`SECAGG_ATTACKS`): setups whose parameters differ from
what the approved study derives, unmask requests that would reveal both shares of
a node or a dropped node's key, a second unmask, and neighbour keys the coordinator
substituted, stripped of their signature or relayed under another node. For
these the coordinator plays Flower's ``SecAggPlusWorkflow`` by hand (same
messages: TRAIN, ``secaggplus_configs``, group id = round), honest until the attack.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, GetPropertiesIns, ndarrays_to_parameters
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

from shared.config import StudyConfig
from shared.models import build_model
from shared.params import get_weights
from shared.plan import PLAN_KEY, ROUND_KEY, STAGE_KEY, TrainingPlan
from shared.secure_aggregation import AUTH_SIGNATURE_KEY, AUTH_SITE_KEY, SecAggParams, derive_params

SEALED = re.compile(r"^fedhelix: site '[\w.-]+' (E1\d\d): [^:]+; the details stay in the site's log$")


@dataclass
class Outcome:
    """What the sites answered to one attack."""

    name: str
    sent: int = 0
    codes: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)  # replies that were not sealed refusals (or no reply at all)
    broken: list[str] = field(default_factory=list)  # honest steps before the attack that did not go through
    sites: list[str] = field(default_factory=list)  # the sites the crafted requests went to

    @property
    def refused(self) -> bool:
        """Every crafted request came back as a sealed refusal, after honest preliminaries that all went through."""
        return self.sent > 0 and not self.leaked and not self.broken and len(self.codes) == self.sent


@dataclass
class Target:
    """What the coordinator knows after the honest handshake."""

    study: StudyConfig
    nodes: dict[int, str]  # node id -> site name
    plan: TrainingPlan  # the honest plan (agreed features and labels)
    weights: list
    n_train: dict[int, int] = field(default_factory=dict)  # node id -> its site's training examples (SecAgg+ max_weight)
    groups: int = 100  # the last SecAgg+ group id handed out to a run that trains nothing (see next_group)

    def next_group(self) -> str:
        """A fresh group id for a SecAgg+ run that trains nothing.

        A site refuses a second setup within one group while a run is unfinished, so an
        attack reusing the group of the one before would be refused for that, not for itself.
        """
        self.groups += 1
        return str(self.groups)


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
    """Send crafted requests and judge every reply; a node that does not answer counts as not refused."""
    replies = list(grid.send_and_receive(messages, timeout=120))
    outcome.sent += len(messages)
    outcome.sites.extend(str(m.metadata.dst_node_id) for m in messages)  # node ids; attack() names the sites
    silent = sorted({m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies})
    if silent:
        outcome.leaked.append(f"no reply from nodes {silent}")
    for reply in replies:
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


# --- SecAgg+ protocol attacks (a secure study only) ------------------------------------------------------
#
# The coordinator drives Flower's SecAgg+ stages itself, in Flower's message format, honestly
# until the attack. An honest step that fails is recorded in ``Outcome.broken``: the attack
# after it would be refused for the wrong reason, so the outcome does not count as refused.


class _Broken(Exception):
    """An honest step before an attack did not go through (recorded in the outcome)."""


def secagg_params(t: Target) -> SecAggParams:
    """The parameters an honest coordinator derives for the study (``server/app.py`` does the same)."""
    site_level = t.study.privacy.dp and t.study.privacy.level == "site"
    max_weight = 1 if site_level else max(t.n_train.values(), default=1)
    return derive_params(len(t.study.sites), t.study.secure.max_dropouts, t.study.update_bound, max_weight)


def _secagg(node: int, group: str, configs: dict, content: RecordDict | None = None) -> Message:
    """One SecAgg+ stage message as Flower's workflow builds it: TRAIN, ``secaggplus_configs``, group id = round."""
    content = RecordDict() if content is None else content
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=group)


def _setup_configs(params: SecAggParams, sample: int, **changes) -> dict:
    """Flower's setup stage configs for ``params`` (``changes``: attribute name -> crafted value)."""
    configs = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: sample,
        Key.SHARE_NUMBER: params.num_shares,
        Key.THRESHOLD: params.reconstruction_threshold,
        Key.CLIPPING_RANGE: float(params.clipping_range),
        Key.TARGET_RANGE: params.quantization_range,
        Key.MOD_RANGE: params.modulus_range,
        Key.MAX_WEIGHT: float(params.max_weight),
    }
    configs.update(changes)
    return configs


def _honest(grid: Grid, o: Outcome, stage: str, messages: list[Message]) -> list[Message]:
    """Send an honest stage; every node must answer with content, else the attack after it is void."""
    replies = list(grid.send_and_receive(messages, timeout=120))
    errors = [r.error.reason[:160] for r in replies if r.has_error()]
    if errors or len(replies) != len(messages):
        o.broken.append(f"the honest {stage} stage failed ({len(replies)} of {len(messages)} replies): {errors}")
        raise _Broken(stage)
    return replies


Keys = dict[int, list[bytes]]  # node id -> [pk1, pk2, signature, site] as relayed in share-keys


def _honest_setup(grid: Grid, t: Target, o: Outcome, group: str) -> Keys:
    """The approved setup to every node; returns each node's public keys with its signature and site."""
    configs = _setup_configs(secagg_params(t), len(t.nodes))
    keys: Keys = {}
    for reply in _honest(grid, o, "setup", [_secagg(node, group, dict(configs)) for node in t.nodes]):
        c = reply.content.config_records[RECORD_KEY_CONFIGS]
        entry = [bytes(c[Key.PUBLIC_KEY_1]), bytes(c[Key.PUBLIC_KEY_2])]
        if AUTH_SIGNATURE_KEY in c and AUTH_SITE_KEY in c:
            entry += [bytes(c[AUTH_SIGNATURE_KEY]), str(c[AUTH_SITE_KEY]).encode()]
        keys[reply.metadata.src_node_id] = entry
    return keys


def _share_keys_messages(t: Target, group: str, keys_for: Callable[[int], Keys]) -> list[Message]:
    """Share-keys to every node; ``keys_for(dst)`` is what the coordinator relays to ``dst`` (all nodes are neighbours)."""
    return [_secagg(dst, group, {Key.STAGE: Stage.SHARE_KEYS, **{str(n): list(k) for n, k in keys_for(dst).items()}}) for dst in t.nodes]


def _honest_until_masked(grid: Grid, t: Target, o: Outcome, server_round: int) -> str:
    """Setup, share-keys and collect-masked-vectors of ``server_round``, all honest: each site trains and masks its update.

    Returns the group id. The fit is in the approved schedule (one per round); what follows is the attack.
    """
    group = str(server_round)
    keys = _honest_setup(grid, t, o, group)
    forwarded: dict[int, tuple[list[int], list[bytes]]] = {node: ([], []) for node in t.nodes}
    for reply in _honest(grid, o, "share-keys", _share_keys_messages(t, group, lambda dst: keys)):
        c = reply.content.config_records[RECORD_KEY_CONFIGS]
        for dst, ciphertext in zip(c[Key.DESTINATION_LIST], c[Key.CIPHERTEXT_LIST], strict=True):
            forwarded[int(dst)][0].append(reply.metadata.src_node_id)
            forwarded[int(dst)][1].append(bytes(ciphertext))
    config = {PLAN_KEY: t.plan.to_json(), ROUND_KEY: server_round}
    messages = []
    for node in t.nodes:
        fitins = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(t.weights), config), keep_input=True)
        srcs, ciphertexts = forwarded[node]
        messages.append(_secagg(node, group, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: srcs}, fitins))
    for reply in _honest(grid, o, "collect-masked-vectors", messages):
        if Key.MASKED_PARAMETERS not in reply.content.config_records[RECORD_KEY_CONFIGS]:
            o.broken.append(f"node {reply.metadata.src_node_id} sent no masked vector")
            raise _Broken("collect-masked-vectors")
        if reply.content.array_records and any(len(a) for a in reply.content.array_records.values()):
            o.leaked.append(f"node {reply.metadata.src_node_id} sent its update's arrays beside the masked vector")
    return group


def _unmask(t: Target, group: str, lists: Callable[[int], tuple[list[int], list[int]]]) -> list[Message]:
    """Unmask to every node; ``lists(dst)`` gives the (active, dropped) node ids the coordinator claims to ``dst``."""
    messages = []
    for dst in t.nodes:
        active, dead = lists(dst)
        messages.append(_secagg(dst, group, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}))
    return messages


def _others(t: Target, node: int) -> list[int]:
    return sorted(n for n in t.nodes if n != node)


def _crafted_setup(grid: Grid, t: Target, o: Outcome, nodes: list[int] | None = None, **changes) -> None:
    nodes = list(t.nodes) if nodes is None else nodes
    group = t.next_group()
    configs = _setup_configs(secagg_params(t), len(nodes), **changes)
    _send(grid, o, [_secagg(node, group, dict(configs)) for node in nodes])


def secagg_setup_lower_threshold(grid: Grid, t: Target, o: Outcome) -> None:
    """Threshold 1: any one share (e.g. the coordinator's own node's) would rebuild a site's mask."""
    _crafted_setup(grid, t, o, **{Key.THRESHOLD: 1})


def secagg_setup_fewer_shares(grid: Grid, t: Target, o: Outcome) -> None:
    """Two shares, threshold 1: fewer neighbours hold a site's secrets, and one of them suffices to unmask it."""
    _crafted_setup(grid, t, o, **{Key.SHARE_NUMBER: 2, Key.THRESHOLD: 1})


def secagg_setup_wider_clipping(grid: Grid, t: Target, o: Outcome) -> None:
    """A clipping range 100 times the study's update bound: the sum would describe larger (less private) updates."""
    _crafted_setup(grid, t, o, **{Key.CLIPPING_RANGE: float(secagg_params(t).clipping_range * 100)})


def secagg_setup_two_of_three_sites(grid: Grid, t: Target, o: Outcome) -> None:
    """A sample of 2, addressing only two nodes: the coordinator would learn each one's update from the sum and its own."""
    _crafted_setup(grid, t, o, nodes=sorted(t.nodes)[:2])


def secagg_unmask_active_and_dropped(grid: Grid, t: Target, o: Outcome) -> None:
    """After an honest round 1 to the masked vectors: a neighbour listed active *and* dropped, to get both of its shares."""
    group = _honest_until_masked(grid, t, o, 1)
    _send(grid, o, _unmask(t, group, lambda dst: (sorted(t.nodes), _others(t, dst)[:1])))


def secagg_unmask_more_dropped_than_allowed(grid: Grid, t: Target, o: Outcome) -> None:
    """After an honest round 2 to the masked vectors (all arrived): one more neighbour declared dropped than max_dropouts allows.

    Its key shares would rebuild its pairwise masks while its self-mask share is revealed too: its update in the clear.
    """
    group = _honest_until_masked(grid, t, o, 2)
    dropped = t.study.secure.max_dropouts + 1
    _send(grid, o, _unmask(t, group, lambda dst: ([dst, *_others(t, dst)[dropped:]], _others(t, dst)[:dropped])))


def secagg_second_unmask(grid: Grid, t: Target, o: Outcome) -> None:
    """An honest round 3, unmask included (answered, outside the outcome), then a second unmask claiming a neighbour dropped."""
    group = _honest_until_masked(grid, t, o, 3)
    _honest(grid, o, "unmask", _unmask(t, group, lambda dst: (sorted(t.nodes), [])))
    _send(grid, o, _unmask(t, group, lambda dst: ([dst, *_others(t, dst)[1:]], _others(t, dst)[:1])))


def _coordinator_keys() -> list[bytes]:
    (_, pk1), (_, pk2) = generate_key_pairs(), generate_key_pairs()
    return [public_key_to_bytes(pk1), public_key_to_bytes(pk2)]


def _relayed(grid: Grid, t: Target, o: Outcome, tamper: Callable[[int, Keys], Keys]) -> None:
    """An honest setup, then share-keys in which ``tamper(dst, keys)`` is what ``dst`` receives."""
    group = t.next_group()
    keys = _honest_setup(grid, t, o, group)
    _send(grid, o, _share_keys_messages(t, group, lambda dst: tamper(dst, {n: list(k) for n, k in keys.items()})))


def secagg_substituted_neighbour_keys(grid: Grid, t: Target, o: Outcome) -> None:
    """A neighbour's public keys replaced by the coordinator's (its signature and site kept): it would know that pairwise mask."""

    def tamper(dst: int, keys: Keys) -> Keys:
        victim = _others(t, dst)[0]
        keys[victim] = _coordinator_keys() + keys[victim][2:]
        return keys

    _relayed(grid, t, o, tamper)


def secagg_unsigned_neighbour_keys(grid: Grid, t: Target, o: Outcome) -> None:
    """The coordinator's keys for every neighbour, without any signature (what Flower's own mod accepts)."""

    def tamper(dst: int, keys: Keys) -> Keys:
        return {n: (k if n == dst else _coordinator_keys()) for n, k in keys.items()}

    _relayed(grid, t, o, tamper)


def secagg_keys_relayed_under_another_node(grid: Grid, t: Target, o: Outcome) -> None:
    """The two neighbours' genuine signed keys swapped between their node ids (signatures bind the node id)."""

    def tamper(dst: int, keys: Keys) -> Keys:
        a, b = _others(t, dst)[:2]
        keys[a], keys[b] = keys[b], keys[a]
        return keys

    _relayed(grid, t, o, tamper)


SECAGG_ATTACKS: list[Attack] = [
    secagg_setup_lower_threshold, secagg_setup_fewer_shares, secagg_setup_wider_clipping, secagg_setup_two_of_three_sites,
    secagg_unmask_active_and_dropped, secagg_unmask_more_dropped_than_allowed, secagg_second_unmask,
    secagg_substituted_neighbour_keys, secagg_unsigned_neighbour_keys, secagg_keys_relayed_under_another_node,
]  # fmt: skip
SECAGG_CODES = frozenset({"E150", "E130"})  # the only refusals that count for a SecAgg+ attack
# What each SecAgg+ attack must be refused *for*, in the full line every targeted site keeps in SITE.errors.log.
SECAGG_REASONS: dict[str, str] = {
    "secagg_setup_lower_threshold": r"refused SecAgg\+ setup: reconstruction_threshold 1 ",
    "secagg_setup_fewer_shares": r"refused SecAgg\+ setup: num_shares 2 .*reconstruction_threshold 1 ",
    "secagg_setup_wider_clipping": r"refused SecAgg\+ setup: clipping_range ",
    "secagg_setup_two_of_three_sites": r"refused SecAgg\+ setup: 2 sites sampled",
    "secagg_unmask_active_and_dropped": r"refused SecAgg\+ unmask: nodes \[\d+\] listed both active and dropped",
    "secagg_unmask_more_dropped_than_allowed": r"refused SecAgg\+ unmask: \d+ neighbours listed as dropped, the approved study allows",
    "secagg_second_unmask": r"SecAgg\+ stage unmask out of order",
    "secagg_substituted_neighbour_keys": r"refused SecAgg\+ share-keys: the keys relayed for node \d+ .* are not signed by that site",
    "secagg_unsigned_neighbour_keys": r"refused SecAgg\+ share-keys: the keys of node \d+ carry no site signature",
    "secagg_keys_relayed_under_another_node": r"refused SecAgg\+ share-keys: the keys relayed for node \d+ .* are not signed by that site",
}
# Every attack on a secure study: the plan and schedule attacks (a plain fit stands for the repeated one,
# which SecAgg+ refuses before the schedule is consulted), then the protocol's own.
SECURE_ATTACKS: list[Attack] = [
    *(a for a in ATTACKS if a.__name__ != "repeated_fit"), plain_fit_for_a_secure_study, *SECAGG_ATTACKS,
]  # fmt: skip


def secagg_reasons_logged(outcomes: list[Outcome], errors_log: Callable[[str], str]) -> list[str]:
    """The SecAgg+ attacks some targeted site's log does not show refused for the attack's own reason.

    ``errors_log(site)`` is that site's ``SITE.errors.log`` text. Empty when every one is there.
    """
    missing = []
    for o in outcomes:
        reason = SECAGG_REASONS.get(o.name)
        if reason is None:
            continue
        for site in sorted(set(o.sites)):
            if not re.search(r"^E150 train run \d+: .*" + reason, errors_log(site), flags=re.M):
                missing.append(f"{o.name}: site '{site}'")
    return missing


def handshake_target(grid: Grid, study: StudyConfig) -> Target:
    """The honest handshake: which node is which site, and the agreed features."""
    import time

    while len(nodes := list(grid.get_node_ids())) < len(study.sites):
        time.sleep(0.1)
    plan = TrainingPlan.from_study(study)
    replies = grid.send_and_receive(_messages(Target(study, dict.fromkeys(nodes, ""), plan, []), "properties", {PLAN_KEY: plan.to_json()}), timeout=120)
    names, n_train, features, labels = {}, {}, [], []
    for reply in replies:
        if reply.has_error():
            raise AssertionError(f"the honest handshake was refused: {reply.error.reason}")
        props = compat.recorddict_to_getpropertiesres(reply.content).properties
        names[reply.metadata.src_node_id] = str(props["site"])
        n_train[reply.metadata.src_node_id] = int(props["n_train"])
        features, labels = json.loads(str(props["features"])), json.loads(str(props["labels"]))
    plan = TrainingPlan.from_study(study, features, labels)
    model = build_model(study.model, study.task, len(features), study.model_options, seed=study.seed)
    return Target(study, names, plan, get_weights(model), n_train)


def attack(grid: Grid, study: StudyConfig, attacks: list[Attack] | None = None) -> list[Outcome]:
    """Run the honest handshake, then every attack in turn; one :class:`Outcome` per attack.

    A SecAgg+ attack answered with any code but E150/E130 is not refused (another code
    would mean the site failed for some other reason, not that it checked the protocol).
    """
    target = handshake_target(grid, study)
    outcomes = []
    for run in attacks or ATTACKS:
        outcome = Outcome(run.__name__)
        try:
            run(grid, target, outcome)
        except _Broken:
            pass  # recorded in outcome.broken
        if run in SECAGG_ATTACKS and not set(outcome.codes) <= SECAGG_CODES:
            outcome.leaked.append(f"codes {sorted(set(outcome.codes) - SECAGG_CODES)} are not SecAgg+ refusals")
        outcome.sites = [target.nodes.get(int(node), node) for node in outcome.sites]
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
