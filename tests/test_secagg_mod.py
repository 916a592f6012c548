"""SecAgg+ against a hostile coordinator: the full-seed mask PRG, masks that cancel, and every refusal.

The protocol runs in process: the real ``StrictSecAggPlus`` workflow talks through a
fake grid to five sites running ``make_secaggplus_mod``. The refusal tests play the
coordinator by hand (an honest run, then one crafted message) and check that the
site raises ``ProtocolRefused``, returns nothing, trains nothing and keeps no secret.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.app.message_type import MessageType
from flwr.app.metadata import Metadata
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supercore.task_identity import TaskIdentity
import flwr.compat.common.recorddict_compat as compat

from client.secagg_auth import key_statement, sign_keys
from client.secagg_mod import ABORTED, Requirements, SecAggPlusState, make_secaggplus_mod
from server.secure_aggregation import StrictSecAggPlus
from server.strategy import StudyAborted
from shared.pki import new_key, openssh_public
from shared.secure_aggregation import AUTH_SIGNATURE_KEY, AUTH_SITE_KEY, MASK_PRG_INFO, ProtocolRefused, derive_params, mask_prg

NODES = [101, 102, 103, 104, 105]
SHAPES = [(6, 4), (4,), (3,)]
WEIGHTS = {nid: 10 * (i + 1) for i, nid in enumerate(NODES)}  # 10 .. 50 examples
MAX_WEIGHT = 50


def requirements(max_dropouts: int = 0, n_sites: int = 5, **over) -> Requirements:
    params = derive_params(n_sites, max_dropouts, 0.5, MAX_WEIGHT)
    return replace(Requirements.from_params(params, min_sample=n_sites - max_dropouts, max_dropouts=max_dropouts, own_weight=MAX_WEIGHT), **over)


class Identities:
    """Each site's ECDSA node key and the run's roster {site name: OpenSSH public key} (None: no authentication)."""

    def __init__(self, auth: bool) -> None:
        self.keys = {nid: new_key() for nid in NODES} if auth else {}
        self.roster = {f"site{nid}": openssh_public(k).decode() for nid, k in self.keys.items()} if auth else None

    def of(self, req: Requirements, nid: int) -> Requirements:
        return replace(req, roster=self.roster, signing_key=self.keys[nid], site=f"site{nid}") if self.roster else req


def updates(seed: int = 0) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {nid: [rng.uniform(-0.4, 0.4, size=s) for s in SHAPES] for nid in NODES}


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's Message constructor reads the sender's identity (the ServerApp's, here)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# --- the mask PRG ---------------------------------------------------------------------------------


def test_mask_prg_depends_on_every_byte_of_the_seed_where_flowers_prg_folds_it_to_32_bits() -> None:
    rng = np.random.default_rng(1)
    seed = rng.bytes(32)
    words = [seed[i : i + 4] for i in range(0, 32, 4)]
    swapped = b"".join([words[1], words[0], *words[2:]])  # same XOR fold of the 4-byte words
    dims = [(1000,)]
    assert np.array_equal(pseudo_rand_gen(seed, 2**32, dims)[0], pseudo_rand_gen(swapped, 2**32, dims)[0])  # Flower: one seed
    assert not np.array_equal(mask_prg(seed, 2**32, dims)[0], mask_prg(swapped, 2**32, dims)[0])
    for position in (0, 3, 4, 8, 16, 31):  # a change in any byte, also beyond the first 4 or 8, changes the mask
        changed = bytearray(seed)
        changed[position] ^= 1
        assert np.mean(mask_prg(bytes(changed), 2**32, dims)[0] != mask_prg(seed, 2**32, dims)[0]) > 0.99
    longer = seed + b"\x00" * 12  # Flower's shared keys are 44 bytes (base64): the tail counts too
    assert not np.array_equal(mask_prg(longer, 2**32, dims)[0], mask_prg(longer[:-1] + b"\x01", 2**32, dims)[0])


def test_mask_prg_shapes_range_uniformity_and_a_fixed_known_answer() -> None:
    dims = [(3, 4), (), (50_000,)]
    a, b = mask_prg(b"\x07" * 32, 2**32, dims), mask_prg(b"\x07" * 32, 2**32, dims)
    assert [x.shape for x in a] == [(3, 4), (), (50_000,)] and all(x.dtype == np.int64 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # both sides draw the same masks
    big = a[2] / 2**32
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean() - 0.5) < 0.01 and abs(big.std() - 12**-0.5) < 0.01
    small = mask_prg(b"\x07" * 32, 2**8, [(50_000,)])[0]
    assert small.min() == 0 and small.max() == 255 and abs(small.mean() - 127.5) < 2
    # The stream is ChaCha20 (RFC 8439, counter 0, zero nonce) keyed by HKDF-SHA256 of the seed: checked
    # against a slow reference block function, so both sides of any release draw the same words.
    seed = bytes(range(44))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MASK_PRG_INFO).derive(seed)
    assert mask_prg(seed, 2**32, [(16,)])[0].tolist() == chacha20_block(key)
    for bad in (3, 2**33, 0, 1000):
        with pytest.raises(ValueError):
            mask_prg(bytes(32), bad, [(1,)])


def chacha20_block(key: bytes, counter: int = 0, nonce: bytes = bytes(12)) -> list[int]:
    """RFC 8439 section 2.3, written out: a test oracle only."""
    mask = 0xFFFFFFFF

    def rotl(v: int, n: int) -> int:
        return ((v << n) | (v >> (32 - n))) & mask

    def quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & mask; s[d] = rotl(s[d] ^ s[a], 16)  # noqa: E702
        s[c] = (s[c] + s[d]) & mask; s[b] = rotl(s[b] ^ s[c], 12)  # noqa: E702
        s[a] = (s[a] + s[b]) & mask; s[d] = rotl(s[d] ^ s[a], 8)  # noqa: E702
        s[c] = (s[c] + s[d]) & mask; s[b] = rotl(s[b] ^ s[c], 7)  # noqa: E702

    words = lambda b: [int.from_bytes(b[i : i + 4], "little") for i in range(0, len(b), 4)]  # noqa: E731
    initial = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *words(key), counter, *words(nonce)]
    state = list(initial)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15), (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(state, a, b, c, d)
    return [(x + y) & mask for x, y in zip(state, initial)]


# --- an in-process federation: StrictSecAggPlus <-> five sites ------------------------------------------


class Federation:
    """A grid that delivers the coordinator's messages to in-process sites running the mod."""

    def __init__(self, req: Requirements, values: dict[int, list[np.ndarray]], fail_in_training: tuple[int, ...] = (), auth: bool = False, tamper=None) -> None:
        self.req, self.values, self.fail, self.tamper = req, values, fail_in_training, tamper
        self.ids = Identities(auth)
        self.mod = make_secaggplus_mod(lambda msg, ctxt: self.ids.of(self.req, ctxt.node_id))
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in NODES}
        self.replies: list[Message] = []
        self.errors: list[str] = []

    def _train(self, msg: Message, ctxt: Context) -> Message:
        nid = msg.metadata.dst_node_id
        if nid in self.fail:
            raise RuntimeError(f"site {nid}: training diverged")
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(self.values[nid]), WEIGHTS[nid], {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if self.tamper:
                self.tamper(msg)
            try:
                reply = self.mod(msg, self.contexts[msg.metadata.dst_node_id], self._train)
            except Exception as err:  # noqa: BLE001 - what Flower would forward as an error reply
                self.errors.append(str(err))
                reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
            out.append(reply)
        self.replies.extend(out)
        return out


def run_round(fed: Federation, workflow) -> list[np.ndarray]:
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    manager = SimpleClientManager()
    for nid in NODES:
        manager.register(GridClientProxy(nid, fed, 1))
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=len(NODES), min_available_clients=len(NODES), fraction_evaluate=0.0)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters([np.zeros(s) for s in SHAPES]), keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1, WorkflowKey.START_TIME: 0.0})
    workflow(fed, legacy)
    return parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))


def weighted_mean(values: dict[int, list[np.ndarray]], nodes) -> list[np.ndarray]:
    total = sum(WEIGHTS[n] for n in nodes)
    return [sum(values[n][i] * WEIGHTS[n] for n in nodes) / total for i in range(len(SHAPES))]


def bound(req: Requirements, nodes) -> float:
    return len(nodes) * (2 * req.clipping_range / req.quantization_range) * MAX_WEIGHT / sum(WEIGHTS[n] for n in nodes)


def test_site_and_coordinator_masks_cancel_and_the_sum_is_the_weighted_mean() -> None:
    req, values = requirements(), updates()
    fed = Federation(req, values)
    got = run_round(fed, StrictSecAggPlus(derive_params(5, 0, 0.5, MAX_WEIGHT)))
    assert not fed.errors
    error = max(float(np.abs(g - w).max()) for g, w in zip(got, weighted_mean(values, NODES)))
    assert 0 < error <= bound(req, NODES), error
    masked = [bytes_to_ndarray(b) for r in fed.replies if r.has_content() for b in r.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])]
    flat = np.concatenate([m.ravel() for m in masked]) / 2**32
    assert len(masked) == 5 * (len(SHAPES) + 1) and abs(flat.mean() - 0.5) < 0.1  # what the coordinator saw: uniform noise


def test_flowers_own_unmasking_cannot_remove_the_sites_masks() -> None:
    """The contrast that shows the coordinator really uses mask_prg: Flower's stock unmasking leaves noise."""
    values = updates()
    p = derive_params(5, 0, 0.5, MAX_WEIGHT)
    stock = SecAggPlusWorkflow(p.num_shares, p.reconstruction_threshold, max_weight=p.max_weight, clipping_range=p.clipping_range, quantization_range=p.quantization_range, modulus_range=p.modulus_range)
    got = run_round(Federation(requirements(), values), stock)
    error = max(float(np.abs(g - w).max()) for g, w in zip(got, weighted_mean(values, NODES)))
    assert error > 1000 * bound(requirements(), NODES), error


def test_a_dropout_allowed_by_the_study_leaves_the_weighted_mean_of_the_survivors() -> None:
    req, values = requirements(max_dropouts=1), updates(2)
    fed = Federation(req, values, fail_in_training=(103,))
    got = run_round(fed, StrictSecAggPlus(derive_params(5, 1, 0.5, MAX_WEIGHT)))
    survivors = [n for n in NODES if n != 103]
    error = max(float(np.abs(g - w).max()) for g, w in zip(got, weighted_mean(values, survivors)))
    assert error <= bound(req, survivors), error
    assert len(fed.errors) == 1 and "diverged" in fed.errors[0]


def test_with_max_dropouts_0_a_dropout_halts_the_round_and_no_key_share_leaves_any_site() -> None:
    """Flower's threshold alone (4 of 5) would let the coordinator rebuild the dropped site's key."""
    fed = Federation(requirements(max_dropouts=0), updates(), fail_in_training=(103,))
    with pytest.raises(StudyAborted, match="unmask"):
        run_round(fed, StrictSecAggPlus(derive_params(5, 0, 0.5, MAX_WEIGHT)))
    unmask_replies = [r for r in fed.replies if r.has_content() and Key.SHARE_LIST in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert unmask_replies == []
    assert sum("listed as dropped, the approved study allows 0" in e for e in fed.errors) == 4


# --- one site, driven by a hand-played coordinator -------------------------------------------------------


class Trainer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message, ctxt: Context) -> Message:
        self.calls += 1
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(s, 0.1) for s in SHAPES]), WEIGHTS[msg.metadata.dst_node_id], {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def message(dst: int, configs: dict, group: str = "1") -> Message:
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst, reply_to_message_id="", group_id=group, created_at=0.0, ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), metadata=metadata)


class Coordinator:
    """Plays an honest coordinator stage by stage over five real sites; tests then craft one message."""

    def __init__(self, req: Requirements | None = None, auth: bool = False, group: str = "1") -> None:
        self.req, self.group = req or requirements(), group
        self.ids = Identities(auth)
        self.mod = make_secaggplus_mod(lambda msg, ctxt: self.ids.of(self.req, ctxt.node_id))
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in NODES}
        self.trainer = Trainer()
        self.keys: dict[int, list[bytes]] = {}
        self.forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in NODES}

    def send(self, nid: int, configs: dict, group: str | None = None) -> Message:
        return self.mod(message(nid, configs, group or self.group), self.contexts[nid], self.trainer)

    def setup_configs(self, **over) -> dict:
        p = self.req
        configs = {
            Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(NODES), Key.SHARE_NUMBER: p.num_shares, Key.THRESHOLD: p.reconstruction_threshold,
            Key.CLIPPING_RANGE: p.clipping_range, Key.TARGET_RANGE: p.quantization_range, Key.MOD_RANGE: p.modulus_range, Key.MAX_WEIGHT: float(MAX_WEIGHT),
        }
        return {**configs, **over}

    def setup(self) -> Coordinator:
        for nid in NODES:
            res = self.send(nid, self.setup_configs()).content.config_records[RECORD_KEY_CONFIGS]
            self.keys[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
            if AUTH_SIGNATURE_KEY in res:  # what StrictSecAggPlus relays
                self.keys[nid] += [res[AUTH_SIGNATURE_KEY], res[AUTH_SITE_KEY].encode()]
        return self

    def share_keys_configs(self, nodes=NODES) -> dict:
        return {Key.STAGE: Stage.SHARE_KEYS, **{str(n): self.keys[n] for n in nodes}}

    def share_keys(self) -> Coordinator:
        for nid in NODES:
            res = self.send(nid, self.share_keys_configs()).content.config_records[RECORD_KEY_CONFIGS]
            for dst, ctxt in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST]):
                self.forward[dst][0].append(nid)
                self.forward[dst][1].append(ctxt)
        return self

    def collect_configs(self, nid: int) -> dict:
        srcs, ctxts = self.forward[nid]
        return {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: list(srcs), Key.CIPHERTEXT_LIST: list(ctxts)}

    def collect(self, nodes=NODES) -> Coordinator:
        for nid in nodes:
            self.send(nid, self.collect_configs(nid))
        return self

    @staticmethod
    def unmask_configs(active, dead=()) -> dict:
        return {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(active), Key.DEAD_NODE_ID_LIST: list(dead)}

    def state(self, nid: int) -> SecAggPlusState:
        return SecAggPlusState(**self.contexts[nid].state.config_records[RECORD_KEY_STATE])


def refused(coord: Coordinator, nid: int, configs: dict, match: str, group: str | None = None) -> None:
    """The site raises, returns nothing, trains nothing more, and keeps no secret to reveal later."""
    calls = coord.trainer.calls
    with pytest.raises(ProtocolRefused, match=match):
        coord.send(nid, configs, group)
    assert coord.trainer.calls == calls
    state = coord.state(nid)
    assert state.current_stage == ABORTED
    assert not (state.sk1 or state.sk2 or state.rd_seed or state.rd_seed_share_dict or state.sk1_share_dict or state.ss2_dict)
    with pytest.raises(ProtocolRefused):  # the refused run cannot be resumed
        coord.send(nid, Coordinator.unmask_configs(NODES), group)


def test_an_honest_run_reveals_one_share_per_neighbour_and_then_forgets_every_secret() -> None:
    coord = Coordinator(requirements(max_dropouts=1)).setup().share_keys().collect([n for n in NODES if n != 105])
    res = coord.send(101, Coordinator.unmask_configs([101, 102, 103, 104], [105])).content.config_records[RECORD_KEY_CONFIGS]
    assert list(res[Key.NODE_ID_LIST]) == [101, 102, 103, 104, 105] and len(res[Key.SHARE_LIST]) == 5
    state = coord.state(101)
    assert state.current_stage == Stage.UNMASK and not (state.sk1 or state.rd_seed or state.rd_seed_share_dict or state.sk1_share_dict)
    with pytest.raises(ProtocolRefused, match="out of order"):  # asking again, e.g. for 105's self-mask share
        coord.send(101, Coordinator.unmask_configs([101, 102, 103, 104, 105]))
    coord.send(101, coord.setup_configs(), group="2")  # the next round starts afresh


SETUP_LIES = [
    ({Key.SHARE_NUMBER: 3}, "num_shares 3"),
    ({Key.THRESHOLD: 2}, "reconstruction_threshold 2"),
    ({Key.THRESHOLD: 4, Key.SHARE_NUMBER: 5}, None),  # the honest values: accepted (control)
    ({Key.CLIPPING_RANGE: 8.0}, "clipping_range 8.0"),
    ({Key.TARGET_RANGE: 2**20}, "quantization_range"),
    ({Key.MOD_RANGE: 2**31}, "modulus_range"),
    ({Key.MAX_WEIGHT: 49.0}, "max_weight 49 is below this site's weight 50"),
    ({Key.SAMPLE_NUMBER: 2}, "2 sites sampled, the approved study needs at least 5"),
    ({Key.SAMPLE_NUMBER: 4000}, "overflow"),
    ({Key.SHARE_NUMBER: True}, "malformed"),
]


@pytest.mark.parametrize(("lie", "match"), SETUP_LIES)
def test_a_setup_that_differs_from_the_approved_study_is_refused(lie: dict, match: str | None) -> None:
    coord = Coordinator(requirements(max_dropouts=0))
    configs = coord.setup_configs(**lie)
    if match is None:
        assert coord.send(101, configs).has_content()
    else:
        refused(coord, 101, configs, match)


SHARE_KEYS_LIES = {
    "own keys substituted": (lambda c, k: {**c, "101": [k, c["101"][1]]}, "own public keys are missing or altered"),
    "own keys left out": (lambda c, k: {**{n: v for n, v in c.items() if n != "101"}, "106": [k, k + b" "]}, "own public keys are missing"),
    "fewer neighbours than sampled": (lambda c, k: {n: v for n, v in c.items() if n != "105"}, "4 neighbours listed, the setup allows 5 to 5"),
    "more neighbours than shares": (lambda c, k: {**c, "106": [k, k + b" "]}, "6 neighbours listed"),
    "a key relayed twice": (lambda c, k: {**c, "105": c["104"]}, "identical"),
    "one key only": (lambda c, k: {**c, "103": [k]}, "malformed"),
}


@pytest.mark.parametrize("lie", SHARE_KEYS_LIES)
def test_share_keys_refuses_substituted_keys_wrong_neighbour_counts_and_duplicates(lie: str) -> None:
    coord = Coordinator().setup()
    craft, match = SHARE_KEYS_LIES[lie]
    refused(coord, 101, craft(coord.share_keys_configs(), public_key_to_bytes(generate_key_pairs()[1])), match)


def test_collect_refuses_strangers_repeats_forgeries_and_missing_shares_before_training() -> None:
    coord = Coordinator().setup().share_keys()
    srcs, ctxts = coord.forward[101]
    base = coord.collect_configs(101)
    refused(coord, 101, {**base, Key.SOURCE_LIST: [*srcs[:-1], 999]}, "not neighbours")
    coord = Coordinator().setup().share_keys()
    srcs, ctxts = coord.forward[101]
    refused(coord, 101, {**coord.collect_configs(101), Key.SOURCE_LIST: srcs[:3], Key.CIPHERTEXT_LIST: ctxts[:3]}, "shares from 3 of 4 neighbours")
    refused(coord, 102, {**coord.collect_configs(102), Key.SOURCE_LIST: [*coord.forward[102][0][:3], coord.forward[102][0][0]]}, "relayed twice")
    ctxts = list(coord.forward[103][1])
    ctxts[0] = ctxts[0][:-4] + b"AAAA"
    refused(coord, 103, {**coord.collect_configs(103), Key.CIPHERTEXT_LIST: ctxts}, "does not decrypt")
    relabelled = coord.collect_configs(104)  # two neighbours' shares swapped by the relay
    srcs = relabelled[Key.SOURCE_LIST]
    relabelled[Key.SOURCE_LIST] = [srcs[1], srcs[0], *srcs[2:]]
    refused(coord, 104, relabelled, "the share from node \\d+ does not decrypt")
    assert coord.trainer.calls == 0


def test_unmask_refuses_both_shares_too_many_dropped_strangers_and_itself_dropped() -> None:
    cases = [
        (requirements(max_dropouts=1), [101, 102, 103, 104, 105], [105], "listed both active and dropped"),
        (requirements(max_dropouts=0), [101, 102, 103, 104], [105], "1 neighbours listed as dropped, the approved study allows 0"),
        (requirements(max_dropouts=1), [101, 102, 103], [104, 105], "2 neighbours listed as dropped, the approved study allows 1"),
        (requirements(max_dropouts=1), [101, 102, 103, 104, 999], [], "nodes \\[999\\] were not among this site's neighbours"),
        (requirements(max_dropouts=1), [102, 103, 104, 105], [101], "this site is listed as dropped"),
        (requirements(max_dropouts=1), [101, 102, 103], [], "fewer than the threshold 4"),
        (requirements(max_dropouts=1), [101, 101, 102, 103, 104], [], "listed twice"),
    ]
    for req, active, dead, match in cases:
        coord = Coordinator(req).setup().share_keys().collect()
        refused(coord, 101, Coordinator.unmask_configs(active, dead), match)


def test_a_node_absent_from_share_keys_is_refused_in_unmask() -> None:
    """A node added after the key exchange (the coordinator's own) gets no share, of either kind."""
    req = requirements(max_dropouts=1, n_sites=7)  # 7 sites: 7 shares, threshold 6, 6..7 neighbours
    coord = Coordinator(replace(req, min_sample=5))
    for nid in NODES:
        coord.keys[nid] = [res for res in coord.send(nid, coord.setup_configs(**{Key.SAMPLE_NUMBER: 7})).content.config_records[RECORD_KEY_CONFIGS].values()]
    refused(coord, 101, coord.share_keys_configs(), "5 neighbours listed, the setup allows 6 to 7")


def test_stages_out_of_order_repeated_or_from_another_round_are_refused() -> None:
    coord = Coordinator()
    refused(coord, 101, {Key.STAGE: Stage.SHARE_KEYS, "101": [b"k1", b"k2"]}, "out of order")
    coord = Coordinator().setup()
    refused(coord, 101, Coordinator.unmask_configs(NODES), "out of order")
    refused(coord, 102, coord.setup_configs(), "setup repeated in round '1'")
    refused(coord, 103, coord.share_keys_configs(), "round '2' inside round '1'", group="2")
    refused(coord, 104, {Key.STAGE: "exfiltrate"}, "unknown SecAgg\\+ stage")
    coord = Coordinator().setup().share_keys().collect()
    refused(coord, 101, coord.collect_configs(101), "out of order")  # a second masked vector with the same masks
    assert coord.trainer.calls == 5


def test_an_abandoned_round_gives_way_to_a_new_round_with_fresh_keys() -> None:
    coord = Coordinator().setup().share_keys()
    old = coord.state(101).pk1
    assert coord.send(101, coord.setup_configs(), group="2").has_content()
    assert coord.state(101).pk1 != old and coord.state(101).rd_seed_share_dict == {}


def test_requirements_are_checked_on_every_message() -> None:
    coord = Coordinator().setup()
    coord.req = replace(coord.req, own_weight=60.0)  # e.g. the train message reveals a stricter context
    refused(coord, 101, coord.share_keys_configs(), "below this site's weight 60")


def test_a_train_message_without_secagg_configs_is_refused_and_others_pass_through() -> None:
    coord = Coordinator()
    msg = message(101, {})
    msg.content.config_records.clear()
    with pytest.raises(ProtocolRefused, match="without SecAgg"):
        coord.mod(msg, coord.contexts[101], coord.trainer)
    query = Message(RecordDict(), metadata=Metadata(1, "x", 0, 101, "", "1", 0.0, 60.0, MessageType.QUERY))
    assert coord.mod(query, coord.contexts[101], lambda m, c: "passed") == "passed"


def test_requirements_reject_an_inconsistent_study() -> None:
    with pytest.raises(ValueError, match="min_sample 2 < 3"):
        replace(requirements(), min_sample=2)
    with pytest.raises(ValueError, match="not a majority"):
        replace(requirements(), reconstruction_threshold=2)


# --- authenticated public keys ------------------------------------------------------------------------


def test_signed_keys_relayed_by_the_coordinator_give_the_weighted_mean() -> None:
    req, values = requirements(), updates(3)
    fed = Federation(req, values, auth=True)
    got = run_round(fed, StrictSecAggPlus(derive_params(5, 0, 0.5, MAX_WEIGHT)))
    assert not fed.errors
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, weighted_mean(values, NODES))) <= bound(req, NODES)


def test_a_coordinator_substituting_a_neighbours_keys_is_refused_by_every_site() -> None:
    """The man-in-the-middle of (d): the coordinator swaps its own keys in for node 102's."""
    fake = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]

    def swap(msg: Message) -> None:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if configs.get(Key.STAGE) == Stage.SHARE_KEYS and msg.metadata.dst_node_id != 102:
            configs["102"] = [*fake, *list(configs["102"])[2:]]

    fed = Federation(requirements(), updates(), auth=True, tamper=swap)
    with pytest.raises(StudyAborted, match="share-keys"):
        run_round(fed, StrictSecAggPlus(derive_params(5, 0, 0.5, MAX_WEIGHT)))
    assert sum("keys relayed for node 102 (site 'site102') are not signed by that site" in e for e in fed.errors) == 4
    # Without a roster the same substitution goes through: that is what authentication adds.
    unauthenticated = Federation(requirements(), updates(), auth=False, tamper=swap)
    with pytest.raises(StudyAborted):  # 102 cannot open shares sealed to the fake key; nothing checked the keys themselves
        run_round(unauthenticated, StrictSecAggPlus(derive_params(5, 0, 0.5, MAX_WEIGHT)))
    assert not any("signed" in e for e in unauthenticated.errors)


def stranger_entry(coord: Coordinator, nid: int, site: str) -> list[bytes]:
    """Keys of a node the roster does not know, signed by its own (unlisted) key."""
    pk1, pk2 = (public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2))
    sig = sign_keys(new_key(), run_id=1, group=coord.group, node_id=nid, site=site, pk1=pk1, pk2=pk2)
    return [pk1, pk2, sig, site.encode()]


AUTH_LIES = {
    "no signature": (lambda c: {**c.share_keys_configs(), "102": c.keys[102][:2]}, "node 102 carry no site signature"),
    "site not in roster": (lambda c: {**c.share_keys_configs(), "105": stranger_entry(c, 105, "mallory")}, "site 'mallory' is not in the run's roster"),
    "impostor of a roster site": (lambda c: {**c.share_keys_configs(), "105": stranger_entry(c, 105, "site105")}, "not signed by that site"),
    "two nodes, one site": (lambda c: {**c.share_keys_configs(), "105": [*c.keys[105][:3], b"site104"]}, "nodes 104 and 105 both claim site 'site104'"),
    "keys moved to another node id": (lambda c: {**c.share_keys_configs(), "105": c.keys[104], "104": c.keys[105]}, "not signed by that site"),
}


@pytest.mark.parametrize("lie", AUTH_LIES)
def test_share_keys_refuses_keys_the_roster_does_not_vouch_for(lie: str) -> None:
    coord = Coordinator(auth=True).setup()
    craft, match = AUTH_LIES[lie]
    refused(coord, 101, craft(coord), match)


def test_keys_signed_for_one_round_are_refused_in_another_and_replays_of_a_repeated_round_id() -> None:
    first = Coordinator(auth=True, group="0").setup()
    old = dict(first.keys)
    first.share_keys().collect()
    for nid in NODES:
        first.send(nid, Coordinator.unmask_configs(NODES))
    # Round 2 with 102's keys from round "0" relayed again: the signature binds the round.
    first.group = "2"
    first.setup()
    refused(first, 101, {**first.share_keys_configs(), "102": old[102]}, "not signed by that site for this round")
    # The pre-training secure rounds share round id "0": a key seen before is refused as a replay.
    first.group = "0"
    first.setup()
    refused(first, 103, {**first.share_keys_configs(), "102": old[102]}, "already used in an earlier round")


def test_without_a_roster_the_site_says_it_did_not_authenticate(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="fedhelix.client.secagg"):
        Coordinator().setup().share_keys()
    assert "NOT authenticated" in caplog.text and "no roster" in caplog.text


def test_the_signature_binds_run_round_node_and_site() -> None:
    base = dict(run_id=1, group="3", node_id=7, site="a", pk1=b"k1", pk2=b"k2")
    variants = [{**base, field: value} for field, value in (("run_id", 2), ("group", "4"), ("node_id", 8), ("site", "b"), ("pk1", b"k3"), ("pk2", b"k1"))]
    statements = {key_statement(**base)} | {key_statement(**v) for v in variants}
    assert len(statements) == 7
    assert key_statement(**{**base, "site": "a", "pk1": b"k1"}) != key_statement(**{**base, "site": "ak", "pk1": b"1"})  # no shifting of bytes between fields


def test_requirements_with_a_roster_must_hold_this_sites_own_key() -> None:
    ids = Identities(auth=True)
    with pytest.raises(ValueError, match="needs this site's signing_key"):
        replace(requirements(), roster=ids.roster)
    with pytest.raises(ValueError, match="does not list this site's signing key under 'site101'"):
        replace(requirements(), roster=ids.roster, signing_key=ids.keys[102], site="site101")
    assert ids.of(requirements(), 101).site == "site101"
