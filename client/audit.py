"""The site's audit log: every message that leaves the site, hash-chained, append-only.

The hospital's answer to "what left our building?". One JSON line per reply the
node sends (handshake counts, statistics, model updates, evaluation metrics):
study, round, kind, tensor shapes, the L2 norm of what was sent *before*
SecAgg+ masking, epsilon spent so far, and the SHA-256 of the payload.

Each line carries the SHA-256 of its own content and of the previous line,
and a small ``.head`` file beside the log holds the number of entries and the
last hash, so an edited, removed, reordered or truncated entry is found by :func:`verify`.
Limits, stated plainly: someone who rewrites the whole chain *and* the head
consistently is not detected by the files alone; copy the head to another
system (or print it) to anchor it. The log is written before the reply leaves:
a reply that cannot be logged is not sent. New logs and heads are owner-only
(0600). The privacy ledger counts this log's DP updates (:func:`dp_rounds`)
to refuse a deleted or rolled-back ledger.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import FedhelixError

GENESIS = "0" * 64
FIELDS = ("seq", "time", "site", "study", "round", "kind", "shapes", "l2_norm", "epsilon", "payload_sha256", "masked", "prev")


class AuditError(FedhelixError):
    """The audit log cannot be written, or it was edited, truncated or reordered."""

    code = "E180"


@dataclass(frozen=True)
class AuditSummary:
    """What :func:`verify` found in an intact log."""

    path: Path
    entries: int
    head: str
    sites: tuple[str, ...]
    studies: tuple[str, ...]
    kinds: dict[str, int]


def payload_digest(arrays: Sequence[np.ndarray] = (), metrics: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over the arrays' dtype, shape and bytes, then the metrics as canonical JSON."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(json.dumps(dict(metrics or {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


class AuditLog:
    """Appends entries to the JSONL log at ``path`` under an exclusive file lock.

    Several processes may append (Flower may start a fresh ClientApp process per
    message, a simulation runs many sites): the lock serialises them and each
    append re-reads the current head from the file itself.
    """

    def __init__(self, path: str | Path, site: str) -> None:
        self.path = Path(path)
        self.site = site

    def append(
        self,
        *,
        study: str,
        server_round: int,
        kind: str,
        arrays: Sequence[np.ndarray] = (),
        metrics: Mapping[str, Any] | None = None,
        l2_norm: float | None = None,
        epsilon: float | None = None,
        masked: bool = False,
    ) -> dict[str, Any]:
        """Record one outgoing message; raise :class:`AuditError` if it cannot be recorded."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a new log is owner-only from its first byte; an existing one keeps its mode
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a+", encoding="utf-8") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    seq, prev = _tail(self.path)
                    entry = {
                        "seq": seq + 1,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "site": self.site,
                        "study": study,
                        "round": int(server_round),
                        "kind": kind,
                        "shapes": [list(np.shape(a)) for a in arrays],
                        "l2_norm": None if l2_norm is None else float(l2_norm),
                        "epsilon": None if epsilon is None else float(epsilon),
                        "payload_sha256": payload_digest(arrays, metrics),
                        "masked": bool(masked),
                        "prev": prev,
                    }
                    body = json.dumps(entry, sort_keys=True)
                    entry["hash"] = _digest(body)
                    fh.write(json.dumps(entry, sort_keys=True) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                    _write_head(self.path, entry["seq"], entry["hash"])
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        except OSError as err:
            raise AuditError(f"site '{self.site}': cannot write the audit log {self.path} ({err.strerror or err}); nothing was sent") from None
        return entry


def _tail(path: Path) -> tuple[int, str]:
    """(sequence number, hash) of the log's last entry; the chain continues from there."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65536))
        lines = [line for line in fh.read().splitlines() if line.strip()]
    if not lines:
        return 0, GENESIS
    try:
        last = json.loads(lines[-1])
        return int(last["seq"]), str(last["hash"])
    except (ValueError, KeyError, TypeError):
        raise AuditError(f"audit log {path}: the last entry is corrupted; run 'fedhelix audit verify {path}' and restore it from backup") from None


def _write_head(path: Path, entries: int, digest: str) -> None:
    """Replace the head atomically (called under the log's lock); a new head is 0600, an existing one keeps its mode."""
    head = _head_path(path)
    tmp = head.with_name(head.name + ".tmp")
    try:
        mode = head.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    tmp.unlink(missing_ok=True)  # a stale one from a crash would keep its old mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"entries": entries, "head": digest}))
    os.replace(tmp, head)


def verify(path: str | Path) -> AuditSummary:
    """Check the whole chain; raise :class:`AuditError` naming the first bad entry."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit log {path} not found")
    prev, count = GENESIS, 0
    sites: dict[str, None] = {}
    studies: dict[str, None] = {}
    kinds: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"audit log {path}, line {lineno}"
            try:
                entry = json.loads(line)
                claimed = entry.pop("hash")
                seq = entry["seq"]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise AuditError(f"{where}: not an audit entry (edited or corrupted); restore the log from backup") from None
            if set(entry) != set(FIELDS):
                raise AuditError(f"{where}: entry {seq} has fields added or removed (edited); restore the log from backup")
            if seq != count + 1:
                raise AuditError(f"{where}: entry {seq} where entry {count + 1} was expected (entries removed or reordered)")
            if entry["prev"] != prev:
                raise AuditError(f"{where}: entry {seq} does not follow entry {count} (entries removed or reordered)")
            if _digest(json.dumps(entry, sort_keys=True)) != claimed:
                raise AuditError(f"{where}: entry {seq} was edited (its hash does not match its content)")
            prev, count = claimed, seq
            sites.setdefault(str(entry["site"]))
            studies.setdefault(str(entry["study"]))
            kinds[str(entry["kind"])] = kinds.get(str(entry["kind"]), 0) + 1
    head = _head_path(path)
    if not head.exists():
        raise AuditError(f"audit log {path}: head file {head.name} is missing; the newest entries cannot be checked")
    try:
        stored = json.loads(head.read_text())
        entries, digest = int(stored["entries"]), str(stored["head"])
    except (ValueError, KeyError, TypeError):
        raise AuditError(f"audit log {path}: head file {head.name} is corrupted") from None
    if entries > count or (entries == count and digest != prev):
        raise AuditError(f"audit log {path}: the head records {entries} entries but the log ends at entry {count} (newest entries removed)")
    if entries < count:
        raise AuditError(f"audit log {path}: the head records {entries} entries but the log has {count} (an append was interrupted, or the head was restored from an old copy)")
    return AuditSummary(path, count, prev, tuple(sites), tuple(studies), kinds)


def dp_rounds(path: str | Path, site: str) -> int:
    """How many DP model updates ``site`` sent according to the log (0 without a log).

    The privacy ledger records each DP round before its update is logged, so a
    ledger never holds fewer entries than this: a missing or shorter ledger was
    deleted or rolled back. Counts lines only; :func:`verify` checks the chain.
    """
    path = Path(path)
    if not path.exists():
        return 0
    count = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    ours = entry["site"] == site and entry["kind"] == "update" and entry["epsilon"] is not None
                except (ValueError, KeyError, TypeError):
                    raise AuditError(f"audit log {path}, line {lineno}: not an audit entry, so its DP rounds cannot be counted; restore the log from backup") from None
                count += ours
    except OSError as err:
        raise AuditError(f"audit log {path} is unreadable ({err.strerror or err}); its DP rounds cannot be counted") from None
    return count


AUDIT_LOG_KEY = "audit-log"  # node config key: where this node writes its audit log


def audit_path(site_name: str, site_file: Path | None, audit_dir: str | Path | None = None, node_config: Mapping[str, Any] | None = None) -> Path:
    """Where a site's audit log lives: the simulation's directory, the node config, or beside the site file."""
    if audit_dir is not None:
        return Path(audit_dir) / f"{site_name}.audit.jsonl"
    if node_config and AUDIT_LOG_KEY in node_config:
        return Path(str(node_config[AUDIT_LOG_KEY])).expanduser().resolve()
    base = Path(site_file).parent if site_file is not None else Path.cwd()
    return base / f"{site_name}.audit.jsonl"
