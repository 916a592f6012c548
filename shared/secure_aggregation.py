"""SecAgg+ numbers both sides agree on, and the mask PRG both sides use.

The coordinator derives the protocol parameters from the study; every site
derives the *same* numbers from the study it approved and refuses a round whose
setup differs (``client/secagg_mod.py``). Keeping the derivation here (shared/)
is what lets a site check the coordinator instead of trusting it.

Derivation (documented in docs/secure-aggregation.md):

* ``modulus_range`` M = 2^32 (Flower's default; masks are uniform below M).
* ``quantization_range`` Q = the largest power of two with n_sites x Q < M, so
  the sum of n quantised values in [0, Q] cannot wrap around (Flower does not check).
* ``clipping_range`` c = the study's per-coordinate ``update_bound``; each site
  clips its delta to [-c, c] *before* the protocol, so Flower's own clipping of
  ``delta x n_i / max_weight`` (n_i <= max_weight) never bites silently.
* ``max_weight`` W = the largest site's n_train, reported in the handshake.
* ``num_shares`` k = n (or n-1, kept odd: even values halt every round), capped
  at 2 ceil(log2 n) + 1 (at least 5) so cost stays flat as sites grow.
* ``reconstruction_threshold`` t = k - max(max_dropouts, 1) (Flower needs t < k),
  required > k/2 (a majority of a site's neighbours must cooperate to unmask
  anything) and >= 2. With max_dropouts = 0 the threshold alone would still let
  the coordinator recover one dropped site's masks; the *site* enforces 0 by
  never revealing a share of a dropped node's key (see client/secagg_mod.py).
* Quantisation error of the aggregated mean delta, per coordinate:
  |error| < n x (2c/Q) x W / sum(n_i)  (stochastic rounding, one step per site).

The mask PRG: Flower's ``pseudo_rand_gen`` XOR-folds the 32-byte shared secret
into a 32-bit ``np.random.RandomState`` seed, which an exhaustive search recovers
in minutes; :func:`mask_prg` keys ChaCha20 with HKDF-SHA256 of the *whole* seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import ConfigError, FedhelixError

MODULUS_RANGE = 2**32
MIN_QUANTIZATION_BITS = 16
MASK_PRG_INFO = b"fedhelix secagg+ mask prg v1 (chacha20)"
# Extra entries of a site's setup reply, relayed by the coordinator with the public keys.
AUTH_SIGNATURE_KEY = "fedhelix_sig"
AUTH_SITE_KEY = "fedhelix_site"


class ProtocolRefused(FedhelixError):
    """A site refused a SecAgg+ message that its approved study does not allow; nothing was sent."""

    code = "E150"


@dataclass(frozen=True)
class SecAggParams:
    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    def error_bound(self, n_sites: int, total_examples: int) -> float:
        """Largest per-coordinate quantisation error of the aggregated (mean) delta."""
        step = 2 * self.clipping_range / self.quantization_range
        return n_sites * step * self.max_weight / total_examples


def consistent_views_hold(shares: int, threshold: int, max_dropouts: int) -> bool:
    """Whether inconsistent dropout lists cannot unmask one site, by counting (no consistency round).

    To read site V's update a coordinator needs ``threshold`` shares of V's self-mask seed
    from sites told V is alive, and ``threshold`` shares of the mask key of every neighbour
    V masked against from sites told that neighbour dropped. V masks against at least
    ``shares - 1 - max_dropouts`` neighbours, and a site accepts at most ``max_dropouts``
    dropped nodes per list, so the ``shares`` sites holding shares offer at most
    ``shares * max_dropouts`` "dropped" declarations where the attack needs
    ``(shares - 1 - max_dropouts) * threshold``. When that is more than can be offered, no
    assignment of lists works; otherwise one may (a reviewer built one for 5 sites, 2 dropouts).
    A site that accepts no dropped node (``max_dropouts = 0``) never reveals a mask key.
    """
    return max_dropouts == 0 or (shares - 1 - max_dropouts) * threshold > shares * max_dropouts


def derive_params(n_sites: int, max_dropouts: int, update_bound: float, max_weight: int) -> SecAggParams:
    """SecAgg+ parameters for ``n_sites``; a configuration that cannot work is rejected here, before round 1."""
    if n_sites < 3:
        raise ConfigError(f"secure aggregation needs at least 3 sites (the study has {n_sites}); add sites or set [study] secure_aggregation = false")
    quant_bits = int(math.floor(math.log2((MODULUS_RANGE - 1) / n_sites)))
    if quant_bits < MIN_QUANTIZATION_BITS:
        raise ConfigError(f"{n_sites} sites leave only {quant_bits} quantisation bits under modulus 2^32; the sum would lose precision")
    shares = n_sites if n_sites % 2 == 1 else n_sites - 1
    shares = min(shares, max(5, 2 * math.ceil(math.log2(n_sites)) + 1))
    threshold = shares - max(max_dropouts, 1)
    if max_dropouts < 0 or threshold <= shares / 2 or threshold < 2:
        raise ConfigError(
            f"max_dropouts = {max_dropouts} is too many for {n_sites} sites: each site shares its keys with {shares} "
            f"neighbours and unmasking needs a majority (> {shares // 2}) of them; allow at most {math.ceil(shares / 2) - 1} dropouts"
        )
    if not consistent_views_hold(shares, threshold, max_dropouts):
        safe = max(m for m in range(max_dropouts) if consistent_views_hold(shares, shares - max(m, 1), m))
        raise ConfigError(
            f"max_dropouts = {max_dropouts} is too many for {n_sites} sites: a coordinator that shows sites different dropout "
            f"lists could collect, from honest sites, both kinds of share needed to unmask one site's update; allow at most {safe}"
        )
    if max_weight <= 0:
        raise ConfigError("max_weight must be positive (the largest site's number of training examples)")
    return SecAggParams(
        num_shares=shares,
        reconstruction_threshold=threshold,
        clipping_range=float(update_bound),
        quantization_range=2**quant_bits,
        modulus_range=MODULUS_RANGE,
        max_weight=float(max_weight),
    )


def mask_prg(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks for SecAgg+: int64 arrays of the given shapes, uniform in [0, num_range).

    Drop-in for Flower's ``pseudo_rand_gen`` (same arguments, same output types),
    but every bit of ``seed`` matters: the ChaCha20 key is HKDF-SHA256 of the full
    seed, so recovering a mask means finding a 256-bit key, not a 32-bit seed.
    The nonce is fixed at zero: each seed (a fresh self-mask seed or a pairwise
    shared secret of one protocol run) keys exactly one keystream.
    ``num_range`` must be a power of two <= 2^32, so reducing 32-bit words
    by masking their low bits keeps them uniform.
    """
    if num_range < 2 or num_range > 2**32 or num_range & (num_range - 1):
        raise ValueError(f"num_range must be a power of two in [2, 2^32], got {num_range}")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MASK_PRG_INFO).derive(bytes(seed))
    sizes = [math.prod(dims) for dims in dimensions_list]
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(4 * sum(sizes))), dtype="<u4").astype(np.int64)
    if num_range < 2**32:
        words &= num_range - 1
    out, start = [], 0
    for dims, size in zip(dimensions_list, sizes):
        out.append(words[start : start + size].reshape(tuple(dims)))
        start += size
    return out
