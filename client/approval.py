"""The site's approvals: which study files, which code, and how many runs of them this node agreed to.

``fedhelix approve STUDY.toml --site SITE.toml [--runs N] [--resumes M]`` appends one
record (study digest, code digest, runs, resumes, who and when, and the study's task, model
and categories, which the node checks its data against at start) to
``<site name>.approvals.json`` beside the site file. Before a node runs anything for a new
Flower run it checks, in order: the app bundle holds only approvable files; the run carries
a study signed by the consortium admin (manifest v2: study, code, run identity, expiry,
roster); this site approved that exact study file with that exact code; the signature has
not expired; and the run identity is within what the approval allows. The last check is
what stops a signed config being replayed: ``<site name>.runs.json`` remembers, per run
identity (nonce), which approval it was charged to and which Flower run each attempt ran
as. A new nonce takes one of the approval's ``runs``; a resume must carry a higher attempt
number, at most ``resumes``. Both files are written 0600 and atomically, under a lock.
Every refusal is one line, logged at the site; the server gets only a fixed phrase
(:mod:`client.node_gate`).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
import secrets
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from shared.approval import (
    CONSORTIUM_KEY,
    SIGNATURE_KEY,
    STUDY_B64_KEY,
    ApprovalError,
    ExpiredError,
    NotApprovedError,
    RunLimitError,
    RunManifest,
    SignatureError,
    check_fab_files,
    manifest_of_run,
    parse_expiry,
    signature_of,
    study_digest,
    verify_manifest,
)
from shared.config import SiteConfig, parse_study
from shared.errors import ConfigError

DEFAULT_RUNS = 1
DEFAULT_RESUMES = 3


@dataclass(frozen=True)
class Approval:
    study: str
    study_sha256: str
    code_sha256: str
    approved_at: str
    approved_by: str
    runs: int = DEFAULT_RUNS  # distinct run identities (nonces) this approval admits
    resumes: int = DEFAULT_RESUMES  # attempts per run identity (1 = no resume)
    id: str = ""  # records written before ids existed get a stable one from their fields
    # What the node checks its data against at start (records written before these existed have none).
    task: str = ""
    model: str = ""
    categories: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """What the runs file charges a run identity to."""
        if self.id:
            return self.id
        core = [self.study_sha256, self.code_sha256, self.approved_at, self.approved_by]
        return hashlib.sha256("|".join(core).encode()).hexdigest()[:16]


def approvals_path(site: SiteConfig) -> Path:
    base = site.path.parent if site.path is not None else Path.cwd()
    return base / f"{site.name}.approvals.json"


def runs_path(approvals_file: Path) -> Path:
    """The site's record of admitted run identities, beside its approvals: SITE.runs.json."""
    name = approvals_file.name.removesuffix(".approvals.json").removesuffix(".json")
    return approvals_file.with_name(f"{name}.runs.json")


def read_approvals(path: Path) -> list[Approval]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
        approvals = [Approval(**row) for row in rows]
    except (ValueError, TypeError) as err:
        raise ConfigError(f"approvals file {path} is unreadable ({err}); restore it from backup or approve the studies again") from None
    for a in approvals:
        if not (isinstance(a.runs, int) and isinstance(a.resumes, int) and a.runs >= 1 and a.resumes >= 1):
            raise ConfigError(f"approvals file {path}: study '{a.study}' has runs={a.runs!r}, resumes={a.resumes!r}; both must be integers >= 1")
    return approvals


def write_private_json(path: Path, value: object) -> None:
    """Replace ``path`` atomically with JSON in a file created 0600 (never readable by others, not even briefly)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(value, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (two node processes or an approve racing a run)."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def approve(study_path: Path, site: SiteConfig, code_sha256: str, *, runs: int = DEFAULT_RUNS, resumes: int = DEFAULT_RESUMES) -> Approval:
    """Record this site's approval of the study file (as it is now) with this code, for ``runs`` runs of ``resumes`` attempts."""
    if runs < 1 or resumes < 1:
        raise ConfigError(f"--runs and --resumes must be at least 1 (got {runs} and {resumes})")
    study_bytes = Path(study_path).read_bytes()
    study = parse_study(tomllib.loads(study_bytes.decode()), source=str(study_path), base_dir=Path(study_path).parent)
    record = Approval(
        study=study.name,
        study_sha256=study_digest(study_bytes),
        code_sha256=code_sha256,
        approved_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        approved_by=getpass.getuser(),
        runs=runs,
        resumes=resumes,
        id=secrets.token_hex(8),
        task=study.task,
        model=study.model,
        categories={k: list(v) for k, v in study.categories.items()},
    )
    path = approvals_path(site)
    with locked(path):
        write_private_json(path, [asdict(a) for a in read_approvals(path)] + [asdict(record)])
    return record


def read_runs(path: Path) -> dict[str, dict[str, Any]]:
    """Run identities this site admitted: ``{nonce: {approval, study_sha256, code_sha256, attempts: {attempt: flower run id}}}``."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        runs = doc["runs"]
        if doc.get("format") != 1 or not isinstance(runs, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"runs file {path} is unreadable ({err}); restore it from backup (deleting it would allow replays)") from None
    return runs


def verify_run(consortium: str, run_config: Mapping[str, object], fab_content: bytes, admin_cert: x509.Certificate, approvals: list[Approval]) -> tuple[RunManifest, list[Approval]]:
    """The run's manifest once its files and signature check out, with the approvals that cover it (none: refused)."""
    study_b64 = str(run_config.get(STUDY_B64_KEY, "") or "")
    signature = str(run_config.get(SIGNATURE_KEY, "") or "")
    if not study_b64 or not signature:
        raise SignatureError("it carries no signed study (submit studies with `fedhelix run`)")
    check_fab_files(fab_content)
    signature_of(signature)  # an older fedhelix's signature is named as such, before its missing fields are
    if str(run_config.get(CONSORTIUM_KEY, "")) != consortium:
        raise SignatureError(f"it was submitted for consortium '{str(run_config.get(CONSORTIUM_KEY))[:60]}', not '{consortium}'")
    manifest = manifest_of_run(consortium, run_config, fab_content)
    verify_manifest(manifest, signature, admin_cert)
    covering = [a for a in approvals if a.study_sha256 == manifest.study_sha256 and a.code_sha256 == manifest.code_sha256]
    if not covering:
        same_study = [a for a in approvals if a.study_sha256 == manifest.study_sha256]
        what = "this version of the fedhelix code" if same_study else "this study file"
        raise NotApprovedError(
            f"the site has not approved {what} (study sha256 {manifest.study_sha256[:12]}, code sha256 "
            f"{manifest.code_sha256[:12]}); the site's IT runs `fedhelix approve STUDY.toml --site SITE.toml` after review"
        )
    return manifest, covering


def admit_run(runs: dict[str, dict[str, Any]], manifest: RunManifest, covering: list[Approval], flower_run_id: int, now: dt.datetime) -> Approval:
    """The approval this Flower run is charged to, recording it in ``runs``; :class:`ApprovalError` if it may not run.

    The same Flower run asking again (a node restart, a re-pull) is admitted as before, even
    after expiry: the expiry bounds when a signed run may start, not how long it may take.
    """
    nonce, attempt, ident = manifest.nonce, manifest.attempt, f"run identity {manifest.nonce[:12]}"
    entry = runs.get(nonce)
    attempts: dict[str, int] = entry["attempts"] if entry else {}
    by_key = {a.key: a for a in covering}
    if entry and (entry["study_sha256"], entry["code_sha256"]) != (manifest.study_sha256, manifest.code_sha256):
        raise RunLimitError(f"{ident} already ran another study or code at this site; a run identity is never reused")
    if attempts.get(str(attempt)) == flower_run_id:
        if entry["approval"] not in by_key:
            raise NotApprovedError(f"{ident} was admitted under an approval this site has since withdrawn")
        return by_key[entry["approval"]]
    for other_nonce, other in runs.items():
        if flower_run_id in other["attempts"].values():
            raise RunLimitError(f"Flower run {flower_run_id} already ran here as another attempt or run identity ({other_nonce[:12]})")
    if parse_expiry(manifest.expires) <= now:
        raise ExpiredError(f"the admin's signature expired at {manifest.expires}; the admin re-submits (`fedhelix run`, or `--resume RUN_DIR`)")
    if str(attempt) in attempts:
        raise RunLimitError(f"{ident} attempt {attempt} already ran here as Flower run {attempts[str(attempt)]}: a replayed signed run")
    if attempts and attempt <= max(int(a) for a in attempts):
        raise RunLimitError(f"{ident} attempt {attempt} is not after attempt {max(int(a) for a in attempts)}, which already ran here")
    if entry:
        if entry["approval"] not in by_key:
            raise NotApprovedError(f"{ident} was admitted under an approval this site has since withdrawn")
        approval = by_key[entry["approval"]]
    else:
        used = {key: sum(1 for r in runs.values() if r["approval"] == key) for key in by_key}
        free = [a for a in covering if used[a.key] < a.runs]
        if not free:
            allowed = sum(a.runs for a in covering)
            raise RunLimitError(
                f"{ident} would be run {allowed + 1} of study '{covering[0].study}', and the site approved {allowed}; "
                "the site's IT approves again (`fedhelix approve --runs N`) to allow more"
            )
        approval = free[0]
    if attempt > approval.resumes:
        raise RunLimitError(f"{ident} attempt {attempt} is beyond the {approval.resumes} attempt(s) per run the site approved")
    if entry is None:
        entry = runs[nonce] = {"approval": approval.key, "study_sha256": manifest.study_sha256, "code_sha256": manifest.code_sha256, "attempts": {}}
    entry["attempts"][str(attempt)] = flower_run_id
    return approval


def check_run(
    site: str,
    consortium: str,
    run_config: Mapping[str, object],
    fab_content: bytes,
    admin_cert: x509.Certificate,
    approvals_file: Path,
    flower_run_id: int,
    *,
    now: dt.datetime | None = None,
) -> Approval:
    """The approval that lets Flower run ``flower_run_id`` go ahead (recorded in the runs file), or :class:`ApprovalError`."""
    try:
        manifest, covering = verify_run(consortium, run_config, fab_content, admin_cert, read_approvals(approvals_file))
        path = runs_path(approvals_file)
        with locked(path):
            runs = read_runs(path)
            approval = admit_run(runs, manifest, covering, flower_run_id, now or dt.datetime.now(dt.UTC))
            write_private_json(path, {"format": 1, "runs": runs})
        return approval
    except ApprovalError as err:
        raise type(err)(f"site '{site}' refuses the run: {err.line}") from None
