"""Cryptographically strong randomness for DP-SGD: Gaussian noise and Poisson batches.

Why not torch or NumPy generators: ``torch.Generator().manual_seed(s)`` on CPU keeps
only the low 32 bits of ``s``, and Mersenne Twister / PCG are not cryptographic, so a
coordinator that sees a noised update could search the seed space, replay the noise
and subtract it. Here every random bit comes from the ChaCha20 keystream of the
``cryptography`` package (a vetted stream cipher used as a CSPRNG; nothing is
hand-rolled) under a 256-bit key, either fresh from ``os.urandom`` (real sites) or
SHA-256 of named parts (reproducible simulations only, never a real node).

One encryptor is kept per instance and ``update`` is called repeatedly, so the
stream position only moves forward: consecutive calls never reuse keystream.
An instance is not thread-safe, and an OS-keyed instance refuses to run in a
process forked after it was created (parent and child would replay one stream).
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_DOMAIN = b"fedhelix/dp-randomness/v1"
_TWO_PI_2_32 = 2.0 * math.pi * 2.0**-32


class SecureRandom:
    """Standard normals and Poisson subsets from a ChaCha20 keystream (256-bit key)."""

    def __init__(self, key: bytes, *, fork_guard: bool = True) -> None:
        """Prefer :meth:`from_os` or :meth:`from_seed`; ``key`` must be 32 bytes."""
        if len(key) != 32:
            raise ValueError("SecureRandom needs a 32-byte (256-bit) key")
        # The key is single-use, so a fixed all-zero nonce/counter is safe (RFC 8439 needs unique (key, nonce)).
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._zeros = bytes(0)
        self._buf = bytearray(0)
        self._pid = os.getpid() if fork_guard else None

    @classmethod
    def from_os(cls) -> SecureRandom:
        """Fresh 256-bit key from the OS CSPRNG: what every real site uses."""
        return cls(os.urandom(32))

    @classmethod
    def from_seed(cls, *parts: object) -> SecureRandom:
        """Key = SHA-256 of ``parts`` (e.g. study seed, site, round, purpose): simulations only.

        Each part is length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` give different keys.
        Anyone who knows the parts can replay the noise; a real node must never use this.
        """
        digest = hashlib.sha256(_DOMAIN)
        for part in parts:
            data = str(part).encode()
            digest.update(len(data).to_bytes(8, "little") + data)
        return cls(digest.digest(), fork_guard=False)

    def random_bytes(self, n: int) -> np.ndarray:
        """The next ``n`` keystream bytes as a uint8 array (a copy: later calls never alias it)."""
        return self._keystream(n).copy()

    def _keystream(self, n: int) -> np.ndarray:
        """The next ``n`` keystream bytes as a view into a reused buffer (valid until the next call)."""
        if self._pid is not None and os.getpid() != self._pid:
            raise RuntimeError("a SecureRandom from the OS must not be used across fork (both processes would draw the same stream)")
        if n > len(self._zeros):  # grow once; reused so no per-call allocation or page faults
            self._zeros = bytes(max(n, 2 * len(self._zeros)))
            self._buf = bytearray(len(self._zeros))
        view = memoryview(self._buf)[:n]
        self._stream.update_into(memoryview(self._zeros)[:n], view)
        return np.frombuffer(self._buf, dtype=np.uint8, count=n)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms on (0, 1], 53 random bits each (never 0, so ``log`` is finite)."""
        return torch.from_numpy(self._uniform53(self._keystream(8 * n), np.float64))

    @staticmethod
    def _uniform53(raw: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
        """Keystream words as ``(k + 1) / 2^53`` for 53-bit k: uniform on (0, 1], smallest value 2^-53.

        In float32 the value is rounded to 24 significant bits, but the smallest ones
        stay exact (float32 reaches 2^-126), which is what the Gaussian tail needs.
        """
        ints = (raw.view(np.uint64) >> np.uint64(11)).view(np.int64)  # < 2^53: int64 converts fast, uint64 does not
        ints += 1
        u = ints.astype(dtype)
        u *= dtype(2.0**-53)
        return u

    def normal(self, n: int) -> torch.Tensor:
        """``n`` float32 standard normals by Box–Muller, 12 keystream bytes per pair.

        The radius ``sqrt(-2 ln u)`` takes a 53-bit uniform u on (0, 1]: its smallest
        value 2^-53 is exact in float32, so ``|z|`` reaches ``sqrt(2 * 53 * ln 2) = 8.57``
        (a Gaussian's mass beyond is ~1e-17; 32-bit uniforms would stop at 6.66, whose
        missing tail, ~1e-10 per coordinate, is not negligible against delta over
        thousands of steps of 85k coordinates). torch's own CPU ``randn`` uses 24-bit
        uniforms (5.8). The angle takes a 32-bit uniform. The arithmetic is float32
        (a float64 radius measured 1.2x slower for no difference in float32 output) and NumPy's,
        single-threaded: a chain of torch ops, each with a 2-thread OpenMP region, cost
        up to 10x on a loaded machine.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        pairs = (n + 1) // 2
        raw = self._keystream(12 * pairs)
        radius = self._uniform53(raw[: 8 * pairs], np.float32)
        np.log(radius, out=radius)
        radius *= np.float32(-2.0)
        np.sqrt(radius, out=radius)
        angle = raw[8 * pairs :].view(np.uint32).astype(np.float32)
        angle *= np.float32(_TWO_PI_2_32)
        out = np.empty(2 * pairs, dtype=np.float32)
        np.multiply(np.cos(angle), radius, out=out[:pairs])
        np.multiply(np.sin(angle), radius, out=out[pairs:])
        return torch.from_numpy(out[:n])

    def poisson_indices(self, n: int, q: float) -> torch.Tensor:
        """Sorted int64 indices of the rows of ``range(n)`` that each join independently with probability ``q``.

        Independent Bernoulli(q) flips are the same as i.i.d. Geometric(q) gaps between
        chosen rows, and a gap is ``floor(ln U / ln(1 - q))`` for U uniform on (0, 1]
        (P(gap >= k) = P(U <= (1-q)^k) = (1-q)^k). So a batch costs O(q n) keystream,
        not O(n): about 50 us instead of 260 us (uint64 word per row) at n = 100k, q = 0.00256.
        Float rounding moves a gap only when ``ln U / ln(1-q)`` lies within ~1e-16
        (relative) of an integer; gaps above ``36.7 / q`` (U < 2^-53) cannot occur,
        which has probability ~1e-16 per gap.
        """
        if not 0.0 <= q <= 1.0 or math.isnan(q):
            raise ValueError("sampling probability q must lie in [0, 1]")
        if n <= 0 or q == 0.0:
            return torch.empty(0, dtype=torch.int64)
        if q == 1.0:
            return torch.arange(n, dtype=torch.int64)
        log_miss = math.log1p(-q)
        chosen: list[np.ndarray] = []
        last = -1  # index of the last chosen row
        while True:
            left = n - 1 - last
            k = int(left * q + 6.0 * math.sqrt(left * q) + 16)  # enough gaps to pass the end, almost always in one draw
            gaps = np.floor(np.log(self._uniform53(self._keystream(8 * k), np.float64)) / log_miss)
            positions = last + np.cumsum(np.minimum(gaps, n).astype(np.int64) + 1)  # capped: no int64 overflow
            inside = positions[positions < n]
            chosen.append(inside)
            if len(inside) < k:  # a position passed the end: every row up to n - 1 has had its flip
                return torch.from_numpy(np.concatenate(chosen))
            last = int(inside[-1])
