# Copyright 2025 Flower Labs GmbH. All Rights Reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
# Derived from flwr 1.42.0 flwr/client/mod/secure_aggregation/secaggplus_mod.py.
# Modified for fedhelix: masks from shared.secure_aggregation.mask_prg (full-seed
# ChaCha20) instead of pseudo_rand_gen; every coordinator message checked against
# the site's approved study (Requirements) and refused when it differs; strict
# stage order; secrets wiped after the unmask stage.
"""The site's SecAgg+ protocol, checked against its approved study: a hostile coordinator is refused.

Flower's ``secaggplus_mod`` believes whatever the coordinator says: the number of
shares, the threshold, the sample, which neighbours dropped. A coordinator that
lies can then learn one site's update: declare a site dropped after its masked
vector arrived and ask its neighbours for both the self-mask seed share and the
key share; lower the threshold; sample one honest site among its own nodes. This
mod follows the same protocol (it interoperates with Flower's ``SecAggPlusWorkflow``
given the same PRG) but compares every message with :class:`Requirements`, what the
site's approved study allows, and raises :class:`ProtocolRefused` (nothing is sent)
when the coordinator asks for more. The refusal's text names counts and node ids only:
Flower forwards it to the coordinator.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.typing import ConfigRecordValues
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Parameters, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from client.secagg_auth import key_digest, roster_key, same_public_key, sign_keys, verify_neighbours
from shared.config import StudyConfig
from shared.secure_aggregation import AUTH_SIGNATURE_KEY, AUTH_SITE_KEY, ProtocolRefused, SecAggParams, derive_params, mask_prg

log = logging.getLogger("fedhelix.client.secagg")

ABORTED = "aborted"  # the stage a refusal leaves: only a new round's setup is accepted after it
SEEN_KEYS_KEPT = 4096  # fingerprints of neighbours' keys remembered per run, to refuse a replayed key
_NEXT = {Stage.SETUP: Stage.SHARE_KEYS, Stage.SHARE_KEYS: Stage.COLLECT_MASKED_VECTORS, Stage.COLLECT_MASKED_VECTORS: Stage.UNMASK}


@dataclass(frozen=True)
class Requirements:
    """What the site's approved study allows in one SecAgg+ round; anything else is refused.

    ``num_shares`` .. ``modulus_range`` must equal the coordinator's setup exactly
    (derive them with :func:`shared.secure_aggregation.derive_params` from the study).
    ``min_sample``: fewest sites the coordinator may sample (>= 3 and >= the study's
    min_sites), so a site's update is never summed with too few others.
    ``max_dropouts``: most neighbours the site accepts as dropped; with 0 it never
    reveals a share of a neighbour's mask key, so no dropped site is ever unmasked.
    ``own_weight``: the weight this site sends (its n_train; 1 under site-level DP):
    the coordinator's ``max_weight`` must be at least that, else the weight overflows.
    ``roster`` ({site name: OpenSSH public key} of the approved run), ``signing_key``
    (this site's ECDSA node key) and ``site`` (its name in the roster): every
    neighbour's keys must be signed by a roster site; ``None`` (legacy simulation)
    skips that check and logs that it did.
    """

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    min_sample: int
    max_dropouts: int
    own_weight: float
    roster: Mapping[str, str] | None = None
    signing_key: ec.EllipticCurvePrivateKey | None = None
    site: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.min_sample < 3:
            problems.append(f"min_sample {self.min_sample} < 3")
        if self.max_dropouts < 0:
            problems.append(f"max_dropouts {self.max_dropouts} < 0")
        if not 2 * self.reconstruction_threshold > self.num_shares > self.reconstruction_threshold:
            problems.append(f"threshold {self.reconstruction_threshold} is not a majority of {self.num_shares} shares below all of them")
        if self.modulus_range > 2**32 or self.modulus_range & (self.modulus_range - 1) or self.quantization_range >= self.modulus_range:
            problems.append("modulus_range must be a power of two <= 2^32 above quantization_range")
        if self.own_weight <= 0:
            problems.append("own_weight must be positive")
        if self.roster is not None:
            if self.signing_key is None or self.site is None:
                problems.append("a roster needs this site's signing_key and site name")
            elif self.site not in self.roster or not same_public_key(roster_key(self.roster, self.site), self.signing_key.public_key()):
                problems.append(f"the roster does not list this site's signing key under '{self.site}'")
        if problems:
            raise ValueError("inconsistent SecAgg+ requirements: " + "; ".join(problems))

    @classmethod
    def from_params(cls, params: SecAggParams, *, min_sample: int, max_dropouts: int, own_weight: float, **auth: Any) -> Requirements:
        """Requirements from the parameters the site derives from its approved study (``params.max_weight`` is ignored).

        ``auth``: ``roster``, ``signing_key`` and ``site``, as in the class.
        """
        return cls(
            num_shares=params.num_shares,
            reconstruction_threshold=params.reconstruction_threshold,
            clipping_range=params.clipping_range,
            quantization_range=params.quantization_range,
            modulus_range=params.modulus_range,
            min_sample=min_sample,
            max_dropouts=max_dropouts,
            own_weight=own_weight,
            **auth,
        )


def study_requirements(study: StudyConfig, *, n_train: int, group_id: str, **auth: Any) -> Requirements:
    """The requirements an approved study sets for the SecAgg+ run of round ``group_id``.

    Round "0" is a pre-training secure round (federated statistics or feature
    selection, ``server/federated_stats.py``): values are bounded by ``stats_bound``
    and weighted by n_train. Training rounds clip to the study's ``update_bound`` and
    weigh by n_train, or 1 under site-level DP. A coordinator that mislabels the
    round only changes the clipping range (precision), never what is revealed.
    ``auth``: ``roster``, ``signing_key``, ``site`` (see :class:`Requirements`).
    """
    stats_round = group_id == "0"
    params = derive_params(len(study.sites), study.secure.max_dropouts, study.secure.stats_bound if stats_round else study.update_bound, max_weight=1)
    site_level = study.privacy.dp and study.privacy.level == "site" and not stats_round
    return Requirements.from_params(
        params, min_sample=max(3, study.required_sites), max_dropouts=study.secure.max_dropouts, own_weight=1 if site_level else n_train, **auth
    )


@dataclass
# pylint: disable-next=too-many-instance-attributes
class SecAggPlusState:
    """State of the SecAgg+ protocol at one site, kept in the node's context between messages."""

    current_stage: str = Stage.UNMASK
    group: str = ""  # the coordinator's round (group id) of the protocol run in progress

    nid: int = 0
    sample_num: int = 0
    share_num: int = 0
    threshold: int = 0
    clipping_range: float = 0.0
    target_range: int = 0
    mod_range: int = 0
    max_weight: float = 0.0

    # Secret key (sk) and public key (pk)
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""

    # Random seed for generating the private mask
    rd_seed: bytes = b""

    rd_seed_share_dict: dict[int, bytes] = field(default_factory=dict)
    sk1_share_dict: dict[int, bytes] = field(default_factory=dict)
    # The dict of the shared secrets from sk2
    ss2_dict: dict[int, bytes] = field(default_factory=dict)
    public_keys_dict: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    # Fingerprints of neighbours' pk1 seen in earlier runs of this Flower run (kept across rounds).
    seen_pk1: list[bytes] = field(default_factory=list)

    def __init__(self, **kwargs: ConfigRecordValues) -> None:
        for name, f in self.__dataclass_fields__.items():
            setattr(self, name, f.default_factory() if callable(f.default_factory) else f.default)
        for k, v in kwargs.items():
            if k.endswith(":V"):
                continue
            new_v: Any = v
            if k.endswith(":K"):
                k = k[:-2]
                keys = cast(list[int], v)
                values = cast(list[bytes], kwargs[f"{k}:V"])
                if len(values) > len(keys):
                    updated_values = [tuple(values[i : i + 2]) for i in range(0, len(values), 2)]
                    new_v = dict(zip(keys, updated_values, strict=True))
                else:
                    new_v = dict(zip(keys, values, strict=True))
            self.__setattr__(k, new_v)

    def to_dict(self) -> dict[str, ConfigRecordValues]:
        """Convert the state to a dictionary."""
        ret = dict(vars(self))
        for k in list(ret.keys()):
            if isinstance(ret[k], dict):
                # Replace dict with two lists
                v = cast(dict[str, Any], ret.pop(k))
                ret[f"{k}:K"] = list(v.keys())
                if k == "public_keys_dict":
                    v_list: list[bytes] = []
                    for b1_b2 in cast(list[tuple[bytes, bytes]], v.values()):
                        v_list.extend(b1_b2)
                    ret[f"{k}:V"] = v_list
                else:
                    ret[f"{k}:V"] = list(v.values())
        return ret

    def forget_secrets(self) -> None:
        """Drop every key, seed and share: after unmasking (or a refusal) nothing more may be revealed."""
        self.sk1 = self.sk2 = self.rd_seed = b""
        self.rd_seed_share_dict, self.sk1_share_dict, self.ss2_dict = {}, {}, {}


def make_secaggplus_mod(requirements: Callable[[Message, Context], Requirements]) -> Mod:
    """A Flower mod running SecAgg+ for this site, refusing what its approved study does not allow.

    ``requirements(msg, ctxt)`` is called for every SecAgg+ message and returns what
    the site's approved study allows (it may raise a ``FedhelixError`` to refuse).
    Non-train messages pass through; a train message without SecAgg+ configs is
    refused (the caller decides which studies go through this mod).
    """

    def secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            raise ProtocolRefused("refused: a train message without SecAgg+ configs reached the SecAgg+ protocol")
        req = requirements(msg, ctxt)
        if RECORD_KEY_STATE not in ctxt.state.config_records:
            ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
        state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        try:
            out_content, res = _step(state, req, msg, configs, ctxt, call_next)
        except ProtocolRefused:
            # A refused run is over: a later message of it is refused too, and nothing is left to reveal.
            state.current_stage = ABORTED
            state.forget_secrets()
            ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
            raise
        ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
        out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)
        return Message(out_content, reply_to=msg)

    return secaggplus_mod


def _step(
    state: SecAggPlusState, req: Requirements, msg: Message, configs: ConfigRecord, ctxt: Context, call_next: ClientAppCallable
) -> tuple[RecordDict, dict[str, ConfigRecordValues]]:
    """Run the stage ``configs`` asks for, after checking it is the one due."""
    stage = configs.get(Key.STAGE)
    check_stage(state, stage, msg.metadata.group_id)
    try:
        check_configs(stage, configs)
    except (KeyError, TypeError) as err:
        raise ProtocolRefused(f"refused a malformed SecAgg+ {stage} message: {err}") from None
    state.current_stage = stage
    if stage == Stage.SETUP:
        state.group = msg.metadata.group_id
        state.nid = msg.metadata.dst_node_id
        return RecordDict(), _setup(state, req, configs, msg.metadata.run_id)
    _check_unchanged(state, req)
    if stage == Stage.SHARE_KEYS:
        return RecordDict(), _share_keys(state, req, configs, msg.metadata.run_id)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        srcs = _receive_shares(state, req, configs)
        out_msg = call_next(msg, ctxt)
        out_content = out_msg.content
        fitres = compat.recorddict_to_fitres(out_content, keep_input=True)
        res = _collect_masked_vectors(state, srcs, fitres.num_examples, fitres.parameters)
        for arr_record in out_content.array_records.values():
            arr_record.clear()
        return out_content, res
    res = _unmask(state, req, configs)
    state.forget_secrets()
    return RecordDict(), res


def check_stage(state: SecAggPlusState, next_stage: Any, group: str) -> None:
    """Refuse a stage that is not the one due: each stage once, in order, within one round.

    A repeated collect stage would mask a second input with the same masks (their
    difference leaks), a repeated unmask could ask for the other kind of share. A
    setup starts a fresh run with fresh keys: accepted after a completed run, or for
    another round when the previous one was abandoned, never twice in one round.
    """
    if next_stage not in Stage.all():
        raise ProtocolRefused(f"refused: unknown SecAgg+ stage {next_stage!r}")
    if next_stage == Stage.SETUP:
        if state.current_stage != Stage.UNMASK and group == state.group:
            raise ProtocolRefused(f"refused: SecAgg+ setup repeated in round {group!r} (stage {state.current_stage} was due next)")
        if state.current_stage != Stage.UNMASK:
            log.warning("SecAgg+ round %r was abandoned at stage %s; starting round %r with fresh keys", state.group, state.current_stage, group)
        return
    expected = _NEXT.get(state.current_stage)
    if next_stage != expected:
        due = f"{expected} was due" if expected else "a new setup was due"
        raise ProtocolRefused(f"refused: SecAgg+ stage {next_stage} out of order ({due})")
    if group != state.group:
        raise ProtocolRefused(f"refused: SecAgg+ stage {next_stage} for round {group!r} inside round {state.group!r}")


def check_configs(stage: str, configs: ConfigRecord) -> None:
    """Check the keys and value types a stage's message must carry (Flower's checks, made exhaustive)."""
    if stage == Stage.SETUP:
        pairs = [
            (Key.SAMPLE_NUMBER, int),
            (Key.SHARE_NUMBER, int),
            (Key.THRESHOLD, int),
            (Key.CLIPPING_RANGE, float),
            (Key.TARGET_RANGE, int),
            (Key.MOD_RANGE, int),
            (Key.MAX_WEIGHT, float),
        ]
        for key, expected_type in pairs:
            if key not in configs:
                raise KeyError(f"the required key '{key}' is missing")
            # pylint: disable-next=unidiomatic-typecheck
            if type(configs[key]) is not expected_type:  # bool is an int
                raise TypeError(f"'{key}' must be of type {expected_type.__name__}")
    elif stage == Stage.SHARE_KEYS:
        for key, value in configs.items():
            if key == Key.STAGE:
                continue
            if not key.isdecimal() or not isinstance(value, list) or len(value) not in (2, 4) or not all(isinstance(v, bytes) for v in value):
                raise TypeError(f"entry '{key}' must map a node id to [pk1, pk2] or [pk1, pk2, signature, site]")
    else:
        pairs = (
            [(Key.CIPHERTEXT_LIST, bytes), (Key.SOURCE_LIST, int)]
            if stage == Stage.COLLECT_MASKED_VECTORS
            else [(Key.ACTIVE_NODE_ID_LIST, int), (Key.DEAD_NODE_ID_LIST, int)]
        )
        for key, expected_type in pairs:
            if key not in configs:
                raise KeyError(f"the required key '{key}' is missing")
            value = configs[key]
            # pylint: disable-next=unidiomatic-typecheck
            if not isinstance(value, list) or any(type(elm) is not expected_type for elm in value):
                raise TypeError(f"'{key}' must be a list of {expected_type.__name__}")


def _check_unchanged(state: SecAggPlusState, req: Requirements) -> None:
    """Every message of a run is checked against the requirements again (they may depend on the message)."""
    _check_params(state.share_num, state.threshold, state.clipping_range, state.target_range, state.mod_range, state.max_weight, req)


def _check_params(share_num: int, threshold: int, clipping: float, target: int, mod: int, max_weight: float, req: Requirements) -> None:
    wrong = [
        f"{name} {got} (the approved study gives {want})"
        for name, got, want in (
            ("num_shares", share_num, req.num_shares),
            ("reconstruction_threshold", threshold, req.reconstruction_threshold),
            ("clipping_range", clipping, req.clipping_range),
            ("quantization_range", target, req.quantization_range),
            ("modulus_range", mod, req.modulus_range),
        )
        if got != want
    ]
    if wrong:
        raise ProtocolRefused("refused SecAgg+ setup: " + ", ".join(wrong))
    if max_weight < req.own_weight:
        raise ProtocolRefused(f"refused SecAgg+ setup: max_weight {max_weight:g} is below this site's weight {req.own_weight:g} (its weight would overflow)")


def _setup(state: SecAggPlusState, req: Requirements, configs: ConfigRecord, run_id: int) -> dict[str, ConfigRecordValues]:
    sample = cast(int, configs[Key.SAMPLE_NUMBER])
    _check_params(
        cast(int, configs[Key.SHARE_NUMBER]),
        cast(int, configs[Key.THRESHOLD]),
        cast(float, configs[Key.CLIPPING_RANGE]),
        cast(int, configs[Key.TARGET_RANGE]),
        cast(int, configs[Key.MOD_RANGE]),
        cast(float, configs[Key.MAX_WEIGHT]),
        req,
    )
    if sample < req.min_sample:
        raise ProtocolRefused(f"refused SecAgg+ setup: {sample} sites sampled, the approved study needs at least {req.min_sample}")
    if sample * req.quantization_range >= req.modulus_range:
        raise ProtocolRefused(f"refused SecAgg+ setup: {sample} sites would overflow the modulus (more than the study has)")
    state.sample_num = sample
    state.share_num = cast(int, configs[Key.SHARE_NUMBER])
    state.threshold = cast(int, configs[Key.THRESHOLD])
    state.clipping_range = cast(float, configs[Key.CLIPPING_RANGE])
    state.target_range = cast(int, configs[Key.TARGET_RANGE])
    state.mod_range = cast(int, configs[Key.MOD_RANGE])
    state.max_weight = cast(float, configs[Key.MAX_WEIGHT])
    state.forget_secrets()
    state.public_keys_dict = {}

    # Two key pairs: one for the pairwise masks, one to encrypt the shares sent to neighbours.
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state.sk1, state.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
    state.sk2, state.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    log.debug("node %d: SecAgg+ setup accepted (%d sampled), uploading public keys", state.nid, sample)
    reply: dict[str, ConfigRecordValues] = {Key.PUBLIC_KEY_1: state.pk1, Key.PUBLIC_KEY_2: state.pk2}
    if req.signing_key is not None and req.site is not None:
        reply[AUTH_SIGNATURE_KEY] = sign_keys(req.signing_key, run_id=run_id, group=state.group, node_id=state.nid, site=req.site, pk1=state.pk1, pk2=state.pk2)
        reply[AUTH_SITE_KEY] = req.site
    return reply


def _share_keys(state: SecAggPlusState, req: Requirements, configs: ConfigRecord, run_id: int) -> dict[str, ConfigRecordValues]:
    entries = {int(nid): tuple(cast(list[bytes], keys)) for nid, keys in configs.items() if nid != Key.STAGE}
    key_dict = {nid: (entry[0], entry[1]) for nid, entry in entries.items()}
    n = len(key_dict)
    # Flower's coordinator gives each node min(sample, num_shares) neighbours (itself included).
    fewest = min(state.sample_num, state.share_num) - req.max_dropouts
    if n > state.share_num or n > state.sample_num or n < max(fewest, state.threshold):
        raise ProtocolRefused(
            f"refused SecAgg+ share-keys: {n} neighbours listed, the setup allows {max(fewest, state.threshold)} to {min(state.share_num, state.sample_num)}"
        )
    if key_dict.get(state.nid) != (state.pk1, state.pk2):
        raise ProtocolRefused("refused SecAgg+ share-keys: this site's own public keys are missing or altered")
    pk_list = [pk for pair in key_dict.values() for pk in pair]
    if len(set(pk_list)) != len(pk_list):
        raise ProtocolRefused("refused SecAgg+ share-keys: some public keys are identical")
    if req.roster is None:
        log.warning("node %d: SecAgg+ neighbour keys NOT authenticated: the approved run has no roster (legacy simulation)", state.nid)
    else:
        verify_neighbours(req.roster, entries, run_id=run_id, group=state.group)
    # Keys are fresh in every run: one seen before is a replay (a round id can repeat, e.g. "0").
    digests = [key_digest(pk1) for nid, (pk1, _) in key_dict.items() if nid != state.nid]
    if set(digests) & set(state.seen_pk1):
        raise ProtocolRefused("refused SecAgg+ share-keys: a neighbour's public key was already used in an earlier round")
    state.seen_pk1 = (state.seen_pk1 + digests)[-SEEN_KEYS_KEPT:]
    state.public_keys_dict = key_dict

    # The private mask seed, and shares of it and of sk1 for every neighbour.
    state.rd_seed = os.urandom(32)
    b_shares = create_shares(state.rd_seed, state.threshold, state.share_num)
    sk1_shares = create_shares(state.sk1, state.threshold, state.share_num)

    dsts, ciphertexts = [], []
    for idx, (nid, (_, pk2)) in enumerate(state.public_keys_dict.items()):
        if nid == state.nid:
            state.rd_seed_share_dict[state.nid] = b_shares[idx]
            state.sk1_share_dict[state.nid] = sk1_shares[idx]
        else:
            shared_key = generate_shared_key(bytes_to_private_key(state.sk2), bytes_to_public_key(pk2))
            state.ss2_dict[nid] = shared_key
            plaintext = share_keys_plaintext_concat(state.nid, nid, b_shares[idx], sk1_shares[idx])
            dsts.append(nid)
            ciphertexts.append(encrypt(shared_key, plaintext))
    log.debug("node %d: SecAgg+ shares encrypted for %d neighbours", state.nid, len(dsts))
    return {Key.DESTINATION_LIST: dsts, Key.CIPHERTEXT_LIST: ciphertexts}


def _receive_shares(state: SecAggPlusState, req: Requirements, configs: ConfigRecord) -> list[int]:
    """Check and store the neighbours' shares *before* training: known senders, distinct, enough, authentic."""
    srcs = cast(list[int], configs[Key.SOURCE_LIST])
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    if len(srcs) != len(ciphertexts):
        raise ProtocolRefused("refused SecAgg+ collect stage: source and ciphertext lists differ in length")
    neighbours = set(state.public_keys_dict) - {state.nid}
    strangers = sorted(set(srcs) - neighbours)
    if strangers:
        raise ProtocolRefused(f"refused SecAgg+ collect stage: shares from nodes {strangers} that are not neighbours")
    if len(set(srcs)) != len(srcs):
        raise ProtocolRefused("refused SecAgg+ collect stage: shares from one node relayed twice")
    if len(srcs) + 1 < state.threshold or len(srcs) < len(neighbours) - req.max_dropouts:
        raise ProtocolRefused(f"refused SecAgg+ collect stage: shares from {len(srcs)} of {len(neighbours)} neighbours, more missing than the study's max_dropouts {req.max_dropouts}")
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        try:
            plaintext = decrypt(state.ss2_dict[src], ciphertext)
        except Exception:  # noqa: BLE001 - Fernet's InvalidToken: forged or corrupted
            raise ProtocolRefused(f"refused SecAgg+ collect stage: the share from node {src} does not decrypt") from None
        actual_src, dst, rd_seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        if actual_src != src or dst != state.nid:
            raise ProtocolRefused(f"refused SecAgg+ collect stage: a share relayed as {src} -> {state.nid} was sealed for {actual_src} -> {dst}")
        state.rd_seed_share_dict[src] = rd_seed_share
        state.sk1_share_dict[src] = sk1_share
    return srcs


# pylint: disable-next=too-many-locals
def _collect_masked_vectors(state: SecAggPlusState, srcs: list[int], num_examples: int, updated_parameters: Parameters) -> dict[str, ConfigRecordValues]:
    if num_examples > state.max_weight:
        raise ProtocolRefused(f"refused SecAgg+ collect stage: this site's weight {num_examples} exceeds max_weight {state.max_weight:g}")
    ratio = num_examples / state.max_weight
    q_ratio = round(ratio * state.target_range)
    dq_ratio = q_ratio / state.target_range

    parameters = parameters_to_ndarrays(updated_parameters)
    parameters = parameters_multiply(parameters, dq_ratio)
    quantized_parameters = quantize(parameters, state.clipping_range, state.target_range)
    quantized_parameters = factor_combine(q_ratio, quantized_parameters)
    dimensions_list: list[tuple[int, ...]] = [a.shape for a in quantized_parameters]

    # Private (self) mask, then one pairwise mask per neighbour whose shares arrived.
    private_mask = mask_prg(state.rd_seed, state.mod_range, dimensions_list)
    quantized_parameters = parameters_addition(quantized_parameters, private_mask)
    for node_id in srcs:
        shared_key = generate_shared_key(bytes_to_private_key(state.sk1), bytes_to_public_key(state.public_keys_dict[node_id][0]))
        pairwise_mask = mask_prg(shared_key, state.mod_range, dimensions_list)
        if state.nid > node_id:
            quantized_parameters = parameters_addition(quantized_parameters, pairwise_mask)
        else:
            quantized_parameters = parameters_subtraction(quantized_parameters, pairwise_mask)
    quantized_parameters = parameters_mod(quantized_parameters, state.mod_range)
    log.debug("node %d: SecAgg+ masked vector ready", state.nid)
    return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(arr) for arr in quantized_parameters]}


def _unmask(state: SecAggPlusState, req: Requirements, configs: ConfigRecord) -> dict[str, ConfigRecordValues]:
    """Reveal one share per listed neighbour: its self-mask share if active, its key share if dropped, never both."""
    active = cast(list[int], configs[Key.ACTIVE_NODE_ID_LIST])
    dead = cast(list[int], configs[Key.DEAD_NODE_ID_LIST])
    both = sorted(set(active) & set(dead))
    if both:
        raise ProtocolRefused(f"refused SecAgg+ unmask: nodes {both} listed both active and dropped (that would reveal both of their shares)")
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise ProtocolRefused("refused SecAgg+ unmask: a node is listed twice")
    strangers = sorted((set(active) | set(dead)) - set(state.public_keys_dict))
    if strangers:
        raise ProtocolRefused(f"refused SecAgg+ unmask: nodes {strangers} were not among this site's neighbours in the share-keys stage")
    if state.nid in dead:
        raise ProtocolRefused("refused SecAgg+ unmask: this site is listed as dropped")
    if len(dead) > req.max_dropouts:
        raise ProtocolRefused(f"refused SecAgg+ unmask: {len(dead)} neighbours listed as dropped, the approved study allows {req.max_dropouts}")
    if len(active) < state.threshold:
        raise ProtocolRefused(f"refused SecAgg+ unmask: {len(active)} active neighbours, fewer than the threshold {state.threshold}")
    unheld = sorted(nid for nid in active + dead if nid not in state.rd_seed_share_dict)
    if unheld:
        raise ProtocolRefused(f"refused SecAgg+ unmask: no shares held for nodes {unheld} (they sent none in the share-keys stage)")
    shares = [state.rd_seed_share_dict[nid] for nid in active] + [state.sk1_share_dict[nid] for nid in dead]
    log.debug("node %d: SecAgg+ unmask, %d self-mask and %d key shares", state.nid, len(active), len(dead))
    return {Key.NODE_ID_LIST: active + dead, Key.SHARE_LIST: shares}
