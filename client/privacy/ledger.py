"""The site's privacy ledger: every DP training round on this dataset, in a keyed chain.

The ledger is a SQLite file the hospital owns. Each round that trained on the
site's data appends one entry (study, round, steps, sample rate, noise
multiplier, clipping norm, accountant, epsilon after the round). The
accountant's history is rebuilt from *all* entries, so spending composes
across rounds, studies and process restarts (Flower starts a fresh ClientApp
process per message: nothing in memory survives).

Every entry carries an HMAC-SHA256, under a per-site secret key, of its content
and of the previous entry's MAC; the stored head is an HMAC of the site, the
entry count and the last MAC. The key lives in its own owner-only file
(``LEDGER.key`` by default, or ``[privacy] ledger_key``), never in the ledger:
someone who can write the ledger but not read the key cannot edit, remove,
reorder or re-chain entries (a plain SHA-256 re-chain, or one under another key,
is an error), and a missing key is an error, never a fresh start. A missing
ledger is refused when the site's audit log records DP rounds, and a ledger
with fewer entries than the audit log's DP rounds is refused (a rollback).

Limits, stated plainly: whoever can read the key (the node's own account) can
rewrite the ledger consistently; deleting the ledger, its key *and* the audit
log together starts afresh; restoring an older backup of ledger and audit log
together is not detected. Back the key up with the ledger: without it the
ledger cannot be verified. Ledgers written before the key existed (plain
SHA-256 chain) are verified once under that chain and re-keyed, with a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from client.audit import dp_rounds
from shared.accounting import Step, epsilon
from shared.errors import FedhelixError
from shared.pki import CertificateError, check_owner_only

log = logging.getLogger("fedhelix.ledger")

GENESIS = "0" * 64
FORMAT = "hmac-sha256-v1"  # meta 'format'; ledgers without it are the old plain SHA-256 chain
KEY_BYTES = 32
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""


class LedgerError(FedhelixError):
    """The ledger file is corrupt, tampered with, or not a fedhelix ledger."""

    code = "E170"


class BudgetRefused(FedhelixError):
    """Training this round would take the site past its privacy budget: nothing was trained or sent."""

    code = "E160"


@dataclass(frozen=True)
class LedgerEntry:
    study: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    delta: float
    epsilon_after: float
    created: str = ""

    @property
    def step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _digest(key: bytes, prev_hash: str, body: str) -> str:
    return hmac.new(key, f"{prev_hash}\n{body}".encode(), hashlib.sha256).hexdigest()


def _head(key: bytes, site: str, count: int, last: str) -> str:
    """The stored head binds the site and the count: truncating needs the key too."""
    return hmac.new(key, f"head\n{site}\n{count}\n{last}".encode(), hashlib.sha256).hexdigest()


def _legacy_digest(prev_hash: str, body: str) -> str:
    """The unkeyed chain of ledgers written before the key existed (read once, to migrate)."""
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def default_key_path(ledger: Path) -> Path:
    """``LEDGER.key`` beside the ledger, unless the site file names ``[privacy] ledger_key``."""
    ledger = Path(ledger)
    return ledger.with_name(ledger.name + ".key")


def _unique_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _publish(tmp: Path, path: Path) -> bool:
    """Give the finished ``tmp`` its final name unless that name exists; False if another process won.

    A hard link is atomic and never replaces: two processes starting at once
    agree on one key and one ledger, and a reader never sees a half-written file.
    """
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _create_key(path: Path) -> bool:
    """A fresh random key, mode 0600 from the moment it exists; an existing key is kept (False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if not _publish(tmp, path):
        return False
    log.info("created privacy ledger key %s: back it up with the ledger; without it the ledger cannot be verified", path)
    return True


def _read_key(path: Path, ledger: Path) -> bytes:
    """The key's bytes; refuses a missing, group/other-readable or malformed key file."""
    if not path.exists():
        raise LedgerError(
            f"privacy ledger {ledger} exists but its key {path} is missing; restore the key from the ledger's backup "
            "(a new key cannot verify the entries, and the ledger is never started afresh)"
        )
    try:
        check_owner_only(path, "privacy ledger key")
        text = path.read_text().strip()
    except CertificateError as err:
        raise LedgerError(err.line) from None
    except OSError as err:
        raise LedgerError(f"privacy ledger key {path} is unreadable ({err.strerror or err}); run the node as the key's owner") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise LedgerError(f"privacy ledger key {path} is not a fedhelix ledger key ({KEY_BYTES} bytes in hex); restore it from backup")
    return key


class PrivacyLedger:
    """Open (or create, on first use) the ledger at ``path`` and verify its chain under the site's key.

    ``key`` is the key file (default ``LEDGER.key``). With ``audit_log``, the
    site's audit log is consulted: a missing ledger is not created, and an
    existing one is refused, when the log records more DP rounds than the
    ledger holds. ``readonly`` (for showing) creates no ledger or key and does
    not re-key an old-format ledger.
    """

    def __init__(self, path: Path, site: str, key: Path | None = None, *, audit_log: Path | None = None, readonly: bool = False) -> None:
        self.path = Path(path)
        self.site = site
        self.key_path = Path(key) if key is not None else default_key_path(self.path)
        self.readonly = readonly
        sent = dp_rounds(audit_log, site) if audit_log is not None else 0
        if not self.path.exists():
            if sent:
                raise LedgerError(
                    f"privacy ledger {self.path} of site '{site}' is missing while the audit log {audit_log} records "
                    f"{sent} DP round(s); restore the ledger (and its key) from backup, never start it afresh"
                )
            if readonly:
                raise LedgerError(f"privacy ledger {self.path} of site '{site}' not found")
            self._create()
        self._key = b""
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"privacy ledger {self.path} of site '{site}' cannot be opened ({err})") from None
        try:
            self._db.executescript(SCHEMA)
            self._load()
        except LedgerError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise LedgerError(f"privacy ledger {self.path} of site '{site}' is unreadable ({err}); restore it from backup, never delete it") from None
        if len(self._entries) < sent:
            self._db.close()
            raise LedgerError(
                f"privacy ledger {self.path} of site '{site}' holds {len(self._entries)} entries while the audit log "
                f"{audit_log} records {sent} DP round(s) sent (entries removed or an old copy restored); restore the latest backup"
            )

    def _create(self) -> None:
        """Build a complete, empty ledger under a temporary name (mode 0600), then publish it."""
        if not self.key_path.exists():
            _create_key(self.key_path)
        key = _read_key(self.key_path, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unique_sibling(self.path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # SQLite keeps the mode, journals copy it
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.executescript(SCHEMA)
                meta = [("site", self.site), ("format", FORMAT), ("count", "0"), ("head", _head(key, self.site, 0, GENESIS))]
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
            finally:
                db.close()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if _publish(tmp, self.path):
            log.info("site '%s': created privacy ledger %s (key %s)", self.site, self.path, self.key_path)

    def _load(self) -> None:
        """Verify in one read transaction; settle an old-format ledger under the write lock."""
        self._db.execute("BEGIN")
        try:
            meta = self._meta()
            self._entries = self._verify(meta)
        finally:
            self._db.execute("COMMIT")
        if meta.get("format") is None and not (self.readonly and not self.key_path.exists()):
            self._migrate()  # another process may be re-keying it right now: decide under the lock

    def _meta(self) -> dict[str, str]:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("site") != self.site:
            raise LedgerError(f"privacy ledger {self.path} belongs to site '{meta.get('site')}', not '{self.site}'")
        if meta.get("format") not in (None, FORMAT):
            raise LedgerError(f"privacy ledger {self.path} has format '{meta['format']}', which this fedhelix cannot read; upgrade fedhelix")
        return meta

    def _verify(self, meta: dict[str, str]) -> list[LedgerEntry]:
        """Check every link and the head, under the key (or the old plain SHA-256 chain)."""
        if meta.get("format") == FORMAT:
            key = self._key = _read_key(self.key_path, self.path)
            digest = lambda prev, body: _digest(key, prev, body)  # noqa: E731
        else:
            key, digest = None, _legacy_digest
        prev = GENESIS
        entries = []
        rows = self._db.execute("SELECT seq, body, prev_hash, hash FROM entries ORDER BY seq").fetchall()
        for expected_seq, (seq, body, prev_hash, claimed) in enumerate(rows, start=1):
            if seq != expected_seq or prev_hash != prev or not hmac.compare_digest(digest(prev_hash, body), claimed):
                raise LedgerError(f"privacy ledger {self.path} was modified at entry {expected_seq}; restore it from backup")
            entries.append(LedgerEntry(**json.loads(body)))
            prev = claimed
        head = _head(key, self.site, len(rows), prev) if key is not None else prev
        if not hmac.compare_digest(str(meta.get("head")), head) or meta.get("count") != str(len(rows)):
            raise LedgerError(f"privacy ledger {self.path} was modified (entries removed or head changed); restore it from backup")
        return entries

    def _migrate(self) -> None:
        """Re-chain a verified old-format ledger under a new key, in one write transaction.

        Only while no key exists: an unkeyed ledger beside its key is an old copy
        put back (a downgrade), never a ledger to adopt.
        """
        self._db.execute("BEGIN IMMEDIATE")
        created = False
        try:
            meta = self._meta()
            self._entries = self._verify(meta)  # another process may have migrated meanwhile
            if meta.get("format") == FORMAT:
                self._db.execute("COMMIT")
                return
            if self.key_path.exists():
                raise LedgerError(
                    f"privacy ledger {self.path} has an unkeyed (old-format) chain although its key {self.key_path} exists: "
                    "an old copy replaced it, or its migration was interrupted; restore the ledger from backup"
                )
            if self.readonly:
                self._db.execute("COMMIT")
                return
            created = _create_key(self.key_path)
            key = self._key = _read_key(self.key_path, self.path)
            prev = GENESIS
            for seq, body in self._db.execute("SELECT seq, body FROM entries ORDER BY seq").fetchall():
                digest = _digest(key, prev, body)
                self._db.execute("UPDATE entries SET prev_hash=?, hash=? WHERE seq=?", (prev, digest, seq))
                prev = digest
            self._db.execute("UPDATE meta SET value=? WHERE key='head'", (_head(key, self.site, len(self._entries), prev),))
            self._db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            if created:  # the ledger is still old-format: a key beside it would make it unreadable
                self.key_path.unlink(missing_ok=True)
            raise
        log.warning(
            "site '%s': privacy ledger %s (%d entries) verified under its old SHA-256 chain and re-keyed with HMAC-SHA256 under %s; back up the key with the ledger",
            self.site, self.path, len(self._entries), self.key_path,
        )  # fmt: skip

    # ------------------------------------------------------------------ reading
    @property
    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    def spent(self, delta: float, accountant: str = "rdp") -> float:
        """epsilon spent so far on this dataset, all studies composed."""
        return epsilon([e.step for e in self._entries], delta, accountant)

    def would_spend(self, step: Step, delta: float, accountant: str = "rdp") -> float:
        """epsilon after one more mechanism ``step``."""
        return epsilon([e.step for e in self._entries] + [step], delta, accountant)

    # ------------------------------------------------------------------ writing
    def check(self, study: str, server_round: int, step: Step, delta: float, accountant: str, budget: float) -> float:
        """The epsilon this round would reach; raise :class:`BudgetRefused` past the budget."""
        after = self.would_spend(step, delta, accountant)
        if after > budget + 1e-9:
            raise BudgetRefused(
                f"site '{self.site}' refused round {server_round} of study '{study}': would spend "
                f"epsilon={after:.3f} (delta={delta:g}), budget {budget:g}, already spent {self.spent(delta, accountant):.3f}; "
                "nothing was trained or sent"
            )
        return after

    def record(self, entry: LedgerEntry, budget: float | None = None) -> LedgerEntry:
        """Append one entry atomically (entry, chain head and count in one transaction).

        With ``budget``, the budget is checked again inside the transaction against
        the ledger as it is *now*: another study may have spent at this site while
        this round trained. The stored epsilon is recomputed on the same history.
        """
        if self.readonly:
            raise LedgerError(f"privacy ledger {self.path} was opened read-only")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            meta = self._meta()
            self._entries = self._verify(meta)  # another process may have appended meanwhile
            if meta.get("format") != FORMAT:
                raise LedgerError(f"privacy ledger {self.path} was replaced by an old-format copy while open; restore it from backup")
            if budget is not None:
                after = epsilon([e.step for e in self._entries] + [entry.step], entry.delta, entry.accountant)
                if after > budget + 1e-9:
                    raise BudgetRefused(
                        f"site '{self.site}' refused round {entry.round} of study '{entry.study}': another study spent "
                        f"meanwhile, this round would reach epsilon={after:.3f}, budget {budget:g}; nothing was sent"
                    )
                entry = LedgerEntry(**{**asdict(entry), "epsilon_after": after})
            entry = LedgerEntry(**{**asdict(entry), "created": entry.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            body = json.dumps(asdict(entry), sort_keys=True)
            last = self._db.execute("SELECT hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            prev = last[0] if last else GENESIS
            digest = _digest(self._key, prev, body)
            seq = len(self._entries) + 1
            self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?)", (seq, body, prev, digest))
            self._db.execute("UPDATE meta SET value=? WHERE key='head'", (_head(self._key, self.site, seq, digest),))
            self._db.execute("UPDATE meta SET value=? WHERE key='count'", (str(seq),))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._entries.append(entry)
        return entry

    def close(self) -> None:
        self._db.close()
