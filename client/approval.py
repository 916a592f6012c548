"""The site's approvals: which study files and which code this node agreed to run.

``fedhelix approve STUDY.toml --site SITE.toml`` appends one record (study digest,
code digest, who and when) to ``<site name>.approvals.json`` beside the site file.
Before a node runs anything for a new study it checks, in order: the run carries a
study signed by the consortium admin, and this site approved that exact study file
with that exact code. Either failure is one line, logged at the site and sent to the
server as the site's error reply; nothing is trained.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from shared.approval import (
    CONSORTIUM_KEY,
    SIGNATURE_KEY,
    STUDY_B64_KEY,
    ApprovalError,
    RunManifest,
    code_digest_from_fab,
    decode_study,
    study_digest,
    verify_manifest,
)
from shared.config import SiteConfig, parse_study
from shared.errors import ConfigError


@dataclass(frozen=True)
class Approval:
    study: str
    study_sha256: str
    code_sha256: str
    approved_at: str
    approved_by: str


def approvals_path(site: SiteConfig) -> Path:
    base = site.path.parent if site.path is not None else Path.cwd()
    return base / f"{site.name}.approvals.json"


def read_approvals(path: Path) -> list[Approval]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
        return [Approval(**row) for row in rows]
    except (ValueError, TypeError) as err:
        raise ConfigError(f"approvals file {path} is unreadable ({err}); restore it from backup or approve the studies again") from None


def approve(study_path: Path, site: SiteConfig, code_sha256: str) -> Approval:
    """Record this site's approval of the study file (as it is now) with this code."""
    study_bytes = Path(study_path).read_bytes()
    study = parse_study(tomllib.loads(study_bytes.decode()), source=str(study_path), base_dir=Path(study_path).parent)
    record = Approval(
        study=study.name,
        study_sha256=study_digest(study_bytes),
        code_sha256=code_sha256,
        approved_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        approved_by=getpass.getuser(),
    )
    path = approvals_path(site)
    rows = [asdict(a) for a in read_approvals(path)] + [asdict(record)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)
    return record


def check_run(
    site: str,
    consortium: str,
    run_config: Mapping[str, object],
    fab_content: bytes,
    admin_cert: x509.Certificate,
    approvals: list[Approval],
) -> Approval:
    """The approval that lets this run go ahead, or :class:`ApprovalError` saying why not."""
    study_b64 = str(run_config.get(STUDY_B64_KEY, "") or "")
    signature = str(run_config.get(SIGNATURE_KEY, "") or "")
    if not study_b64 or not signature:
        raise ApprovalError(f"site '{site}' refuses the run: it carries no signed study (submit studies with `fedhelix run`)")
    study_bytes = decode_study(study_b64)
    manifest = RunManifest(consortium=consortium, study_sha256=study_digest(study_bytes), code_sha256=code_digest_from_fab(fab_content))
    if str(run_config.get(CONSORTIUM_KEY, "")) != consortium:
        raise ApprovalError(f"site '{site}' refuses the run: it was submitted for consortium '{run_config.get(CONSORTIUM_KEY)}', not '{consortium}'")
    try:
        verify_manifest(manifest, signature, admin_cert)
    except ApprovalError as err:
        raise ApprovalError(f"site '{site}' refuses the run: {err.line}") from None
    for approval in approvals:
        if approval.study_sha256 == manifest.study_sha256 and approval.code_sha256 == manifest.code_sha256:
            return approval
    same_study = [a for a in approvals if a.study_sha256 == manifest.study_sha256]
    what = "this version of the fedhelix code" if same_study else "this study file"
    raise ApprovalError(
        f"site '{site}' has not approved {what} (study sha256 {manifest.study_sha256[:12]}, code sha256 "
        f"{manifest.code_sha256[:12]}); the site's IT runs `fedhelix approve STUDY.toml --site SITE.toml` after review"
    )
