"""The site's privacy ledger: every DP training round on this dataset, hash-chained.

The ledger is a SQLite file the hospital owns. Each round that trained on the
site's data appends one entry (study, round, steps, sample rate, noise
multiplier, clipping norm, accountant, epsilon after the round). The
accountant's history is rebuilt from *all* entries, so spending composes
across rounds, studies and process restarts (Flower starts a fresh ClientApp
process per message: nothing in memory survives).

Every entry carries the SHA-256 of its content and of the previous entry, and
the head of the chain is kept beside the entries: an edited, removed or
reordered entry, or a file that is not a ledger, is an error, never a silent
reset to zero spent. Limits, stated plainly: the chain lives in the same file,
so someone who deletes the newest entries *and* rewrites the stored head and
count consistently is not detected by the file alone; this guards against
accidents, partial copies and casual edits, and the hospital, which owns the
file, is trusted not to roll back its own ledger (back it up like any record).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.accounting import Step, epsilon
from shared.errors import FedhelixError

log = logging.getLogger("fedhelix.ledger")

GENESIS = "0" * 64
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


class BudgetRefused(FedhelixError):
    """Training this round would take the site past its privacy budget: nothing was trained or sent."""


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


def _digest(prev_hash: str, body: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


class PrivacyLedger:
    """Open (or create, on first use) the ledger at ``path`` and verify its chain."""

    def __init__(self, path: Path, site: str) -> None:
        self.path = Path(path)
        self.site = site
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.executescript(SCHEMA)
            if created:
                self._db.execute("INSERT INTO meta VALUES ('site', ?), ('head', ?), ('count', '0')", (site, GENESIS))
                log.info("site '%s': created privacy ledger %s", site, self.path)
            self._entries = self._verify()
        except LedgerError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"privacy ledger {self.path} of site '{site}' is unreadable ({err}); restore it from backup, never delete it") from None

    def _verify(self) -> list[LedgerEntry]:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("site") != self.site:
            raise LedgerError(f"privacy ledger {self.path} belongs to site '{meta.get('site')}', not '{self.site}'")
        prev = GENESIS
        entries = []
        rows = self._db.execute("SELECT seq, body, prev_hash, hash FROM entries ORDER BY seq").fetchall()
        for expected_seq, (seq, body, prev_hash, digest) in enumerate(rows, start=1):
            if seq != expected_seq or prev_hash != prev or _digest(prev_hash, body) != digest:
                raise LedgerError(f"privacy ledger {self.path} was modified at entry {expected_seq}; restore it from backup")
            entries.append(LedgerEntry(**json.loads(body)))
            prev = digest
        if meta.get("head") != prev or int(meta.get("count", -1)) != len(rows):
            raise LedgerError(f"privacy ledger {self.path} was modified (entries removed or head changed); restore it from backup")
        return entries

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
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._entries = self._verify()  # another process may have appended meanwhile
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
            prev = self._db.execute("SELECT value FROM meta WHERE key='head'").fetchone()[0]
            digest = _digest(prev, body)
            seq = len(self._entries) + 1
            self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?)", (seq, body, prev, digest))
            self._db.execute("UPDATE meta SET value=? WHERE key='head'", (digest,))
            self._db.execute("UPDATE meta SET value=? WHERE key='count'", (str(seq),))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._entries.append(entry)
        return entry

    def close(self) -> None:
        self._db.close()
