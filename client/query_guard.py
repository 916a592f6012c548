"""How often a coordinator may ask this site anything, fixed by the approved study.

A coordinator that may ask as often as it likes turns any answer into an oracle:
hundreds of evaluations with chosen weights recovered a feature of every test
patient, and repeated fits of one round average the DP noise away. So a site
answers, per run, at most: one handshake, one statistics round, one selection
round, one fit per round with rounds strictly increasing and never beyond the
study's ``rounds``, and one evaluation per round (the last round's is the final
model's). Every claim is written to a small SQLite file at the site *before*
the work starts, so a crash, a restart or a second process cannot reset it.

A run is the signed run identity (deployment; Flower's run id in a simulation).
A resumed study is a new *attempt* of the same run (the admin signs each attempt and
the node's approval gate admits each once, up to the approval's ``resumes``): it may
answer again only the round that was in progress when the previous attempt stopped,
once, and the rounds after it. So one approved run answers at most
``rounds + resumes`` fits and evaluations, whatever the coordinator replays.
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


ONCE_PER_RUN = ("handshake", "stats", "select", "labels")
PER_ROUND = ("fit", "evaluate")

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    run TEXT NOT NULL, attempt INTEGER NOT NULL, kind TEXT NOT NULL, round INTEGER NOT NULL, study TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (run, attempt, kind, round)
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

    def claim(self, run: str, study: str, kind: str, server_round: int, rounds: int, attempt: int = 1) -> None:
        """Record that this site answers ``kind`` for ``server_round`` of ``run`` (attempt ``attempt``), or refuse."""
        if kind in ONCE_PER_RUN:
            server_round = 0
        elif kind not in PER_ROUND:
            raise ValueError(f"unknown query kind {kind!r}")
        elif not 1 <= server_round <= rounds:
            raise QueryRefused(f"site '{self.site}' refused {kind} for round {server_round} of study '{study}': the approved study has rounds 1..{rounds}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute("SELECT 1 FROM answers WHERE run=? AND attempt=? AND kind=? AND round=?", (run, attempt, kind, server_round)).fetchone():
                what = f"a second {kind}" + (f" for round {server_round}" if kind in PER_ROUND else "")
                raise QueryRefused(f"site '{self.site}' refused {what} of study '{study}' in run {run}: the approved schedule allows one")
            if kind in PER_ROUND:
                self._check_order(run, study, kind, server_round, attempt)
            now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._db.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?)", (run, attempt, kind, server_round, study, now))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _check_order(self, run: str, study: str, kind: str, server_round: int, attempt: int) -> None:
        """Rounds only increase within a run; a later attempt may repeat the round the last one stopped at."""
        last, last_attempt = self._db.execute("SELECT MAX(round), MAX(attempt) FROM answers WHERE run=? AND kind=? AND round=(SELECT MAX(round) FROM answers WHERE run=? AND kind=?)", (run, kind, run, kind)).fetchone()
        if last is None or server_round > last or (server_round == last and attempt > last_attempt):
            return
        raise QueryRefused(f"site '{self.site}' refused {kind} for round {server_round} of study '{study}': it already answered round {last} of this run; rounds only increase")

    def answered(self, run: str) -> list[tuple[str, int]]:
        """(kind, round) of every claim in ``run``, in claim order (tests, audits)."""
        return [(k, r) for k, r in self._db.execute("SELECT kind, round FROM answers WHERE run=? ORDER BY rowid", (run,))]

    def close(self) -> None:
        self._db.close()
