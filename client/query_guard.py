"""How often a coordinator may ask this site anything, fixed by the approved study.

A coordinator that may ask as often as it likes turns any answer into an oracle:
hundreds of evaluations with chosen weights recovered a feature of every test
patient, and repeated fits of one round average the DP noise away. So a site
answers, per run, at most: one handshake, one statistics round, one selection
round, one fit per round with rounds strictly increasing and never beyond the
study's ``rounds``, and one evaluation per round (the last round's is the final
model's). Every claim is written to a small SQLite file at the site *before*
the work starts, so a crash, a restart or a second process cannot reset it.

A run is Flower's run id: a resumed study is a new Flower run, and the node's
approval gate bounds how many of those one signed study may start.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from shared.errors import FedhelixError


class QueryRefused(FedhelixError):
    """The coordinator asked for more than the approved schedule allows; nothing was computed."""

    code = "E140"


ONCE_PER_RUN = ("handshake", "stats", "select")
PER_ROUND = ("fit", "evaluate")

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    run TEXT NOT NULL, kind TEXT NOT NULL, round INTEGER NOT NULL, study TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (run, kind, round)
);
"""


def guard_path(audit_log: Path, site: str) -> Path:
    """The guard lives beside the site's audit log (a simulation's own directory, or the node's)."""
    return Path(audit_log).with_name(f"{site}.queries.sqlite")


class QueryGuard:
    """Claims one answer at a time; a claim the schedule does not allow raises :class:`QueryRefused`."""

    def __init__(self, path: Path, site: str) -> None:
        self.path = Path(path)
        self.site = site
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # created owner-only: it tells what the site answered
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.executescript(SCHEMA)

    def claim(self, run: str, study: str, kind: str, server_round: int, rounds: int) -> None:
        """Record that this site answers ``kind`` for ``server_round`` of ``run``, or refuse."""
        if kind in ONCE_PER_RUN:
            server_round = 0
        elif kind not in PER_ROUND:
            raise ValueError(f"unknown query kind {kind!r}")
        elif not 1 <= server_round <= rounds:
            raise QueryRefused(f"site '{self.site}' refused {kind} for round {server_round} of study '{study}': the approved study has rounds 1..{rounds}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute("SELECT 1 FROM queries WHERE run=? AND kind=? AND round=?", (run, kind, server_round)).fetchone():
                what = f"a second {kind}" + (f" for round {server_round}" if kind in PER_ROUND else "")
                raise QueryRefused(f"site '{self.site}' refused {what} of study '{study}' in run {run}: the approved schedule allows one")
            if kind == "fit":
                last = self._db.execute("SELECT MAX(round) FROM queries WHERE run=? AND kind='fit'", (run,)).fetchone()[0]
                if last is not None and server_round <= last:
                    raise QueryRefused(f"site '{self.site}' refused fit for round {server_round} of study '{study}': it already trained round {last} of this run; rounds only increase")
            self._db.execute("INSERT INTO queries VALUES (?, ?, ?, ?, ?)", (run, kind, server_round, study, time.strftime("%Y-%m-%dT%H:%M:%S%z")))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def answered(self, run: str) -> list[tuple[str, int]]:
        """(kind, round) of every claim in ``run``, in claim order (tests, audits)."""
        return [(k, r) for k, r in self._db.execute("SELECT kind, round FROM queries WHERE run=? ORDER BY rowid", (run,))]

    def close(self) -> None:
        self._db.close()
