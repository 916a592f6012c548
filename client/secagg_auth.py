"""Authenticated SecAgg+ public keys: each site signs its keys, every neighbour checks them against the run's roster.

Without this the coordinator relays the sites' public keys unchecked, so it can
hand a site keys of its own making for every neighbour: it then knows every
pairwise mask of that site, asks for its self-mask shares as if all were well,
and reads its update. Here each site signs (pk1, pk2) together with the run id,
the round (group id), its node id and its site name with its ECDSA node key, and a
site accepts a neighbour only if the signature verifies under the key the roster
(from the approved run) lists for the claimed site. Composition only: ECDSA with
SHA-384 from ``cryptography``, as for the node keys in ``shared/pki.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.pki import SIGNATURE_HASH
from shared.secure_aggregation import ProtocolRefused

STATEMENT_TAG = b"fedhelix secagg+ public keys v1"
AUTH_KEY = "auth-key"  # node config: the node's provisioned private key, which signs its SecAgg+ keys


def key_statement(*, run_id: int, group: str, node_id: int, site: str, pk1: bytes, pk2: bytes) -> bytes:
    """The bytes a site signs: every field length-prefixed, so no two field lists share an encoding."""
    fields = [STATEMENT_TAG, str(run_id).encode(), group.encode(), str(node_id).encode(), site.encode(), pk1, pk2]
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def sign_keys(key: ec.EllipticCurvePrivateKey, *, run_id: int, group: str, node_id: int, site: str, pk1: bytes, pk2: bytes) -> bytes:
    """This site's signature over its public keys for one SecAgg+ run."""
    statement = key_statement(run_id=run_id, group=group, node_id=node_id, site=site, pk1=pk1, pk2=pk2)
    return key.sign(statement, ec.ECDSA(SIGNATURE_HASH))


def roster_key(roster: Mapping[str, str], site: str) -> ec.EllipticCurvePublicKey:
    """The public key the roster lists for ``site`` (OpenSSH text), or a refusal naming the site."""
    if site not in roster:
        raise ProtocolRefused(f"refused SecAgg+ share-keys: site '{site}' is not in the run's roster")
    try:
        key = serialization.load_ssh_public_key(roster[site].encode())
    except (ValueError, TypeError):
        raise ProtocolRefused(f"refused SecAgg+ share-keys: the roster's key for site '{site}' is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProtocolRefused(f"refused SecAgg+ share-keys: the roster's key for site '{site}' is not an ECDSA key")
    return key


def same_public_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    """True when two EC public keys are the same point on the same curve."""
    raw = serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    return a.curve.name == b.curve.name and a.public_bytes(*raw) == b.public_bytes(*raw)


def verify_neighbours(roster: Mapping[str, str], entries: Mapping[int, tuple[bytes, ...]], *, run_id: int, group: str) -> None:
    """Check every neighbour's (pk1, pk2, signature, site) against the roster; refuse on the first problem.

    Refused: an entry without a signature, a site not in the roster, two node ids
    claiming one site, a signature that does not verify for this run, round and node id.
    """
    seen: dict[str, int] = {}
    for nid, entry in entries.items():
        if len(entry) != 4:
            raise ProtocolRefused(f"refused SecAgg+ share-keys: the keys of node {nid} carry no site signature")
        pk1, pk2, signature, site_bytes = entry
        try:
            site = site_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolRefused(f"refused SecAgg+ share-keys: node {nid} names no readable site") from None
        if site in seen:
            raise ProtocolRefused(f"refused SecAgg+ share-keys: nodes {seen[site]} and {nid} both claim site '{site}'")
        seen[site] = nid
        statement = key_statement(run_id=run_id, group=group, node_id=nid, site=site, pk1=pk1, pk2=pk2)
        try:
            roster_key(roster, site).verify(signature, statement, ec.ECDSA(SIGNATURE_HASH))
        except InvalidSignature:
            raise ProtocolRefused(f"refused SecAgg+ share-keys: the keys relayed for node {nid} (site '{site}') are not signed by that site for this round") from None


def key_digest(pk: bytes) -> bytes:
    """A short fingerprint of a public key, to recognise one relayed again in a later run."""
    return hashlib.sha256(pk).digest()[:16]
