"""What a site approves and what the admin signs: the study, the code, and one run of them.

A run is identified by two digests. The *study digest* is the SHA-256 of the study
file's bytes. The *code digest* is the SHA-256 over EVERY file of the Flower App bundle
(FAB) the node receives, path and content, in path order: Flower unpacks and imports
whatever the FAB holds (a ``.pyc`` beside a ``.py`` runs instead of it), so nothing in it
may escape the digest. Flower's own ``.info/CONTENT`` (its list of the other files'
hashes) is deterministic and covered too. A node also refuses a FAB holding any file
outside :func:`unapproved_files`' allow-list (``pyproject.toml`` and ``*.py`` under the
app packages), whatever its digest, so a site never approves a bundle it cannot read.

The admin signs a :class:`RunManifest` (ECDSA P-384, SHA-384, via ``cryptography``):
consortium, both digests, the run's identity (a random 128-bit nonce chosen by
``fedhelix run`` and an attempt number, 1 for a new run, +1 per resume), an expiry, and
the digest of the consortium roster (site name -> node public key). Every field travels
in the run config and is bound by the signature, so a signed config cannot be replayed
as a new run beyond what each site allows (:mod:`client.approval`) nor after it expires.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import re
import secrets
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import FedhelixError

# Run-config keys that carry the signed run from `fedhelix run` to every node (declared in pyproject.toml).
STUDY_B64_KEY = "study-b64"
SIGNATURE_KEY = "study-signature"
CONSORTIUM_KEY = "consortium"
NONCE_KEY = "run-nonce"  # 32 hex digits: the run identity, fixed across resumes
ATTEMPT_KEY = "run-attempt"  # int: 1 for a new run, +1 per `fedhelix run --resume`
EXPIRES_KEY = "run-expires"  # UTC ISO 8601: no node admits the run after this time
ROSTER_KEY = "roster-b64"  # base64 of a JSON map {site name: OpenSSH public key text}

MANIFEST_VERSION = "fedhelix-run-v2"
APP_PACKAGES = ("client", "server", "shared")
FLOWER_CONTENT = ".info/CONTENT"  # written by flwr's build_fab_from_files; deterministic
DEFAULT_VALID_HOURS = 24.0
_NONCE = re.compile(r"[0-9a-f]{32}")


class ApprovalError(FedhelixError):
    """A node refuses a run: unsigned, signed by someone else, or not approved by the site."""

    code = "E190"


class SignatureError(ApprovalError):
    """The run is unsigned, signed by another key or another fedhelix, or its signed fields were changed."""


class ExpiredError(ApprovalError):
    """The admin's signature of the run has expired."""


class UnapprovedFilesError(ApprovalError):
    """The app bundle holds a file no site approves (not pyproject.toml, not *.py of the app packages)."""


class NotApprovedError(ApprovalError):
    """The site has not approved this study file with this code."""


class RunLimitError(ApprovalError):
    """The run identity was replayed, or goes beyond the runs or resumes the site approved."""


def study_digest(study_bytes: bytes) -> str:
    return hashlib.sha256(study_bytes).hexdigest()


def fab_entries(fab: bytes) -> dict[str, bytes]:
    """Every entry of a FAB (zip) by name; a duplicated name (the last one wins on unpacking) is refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = archive.namelist()
            if len(set(names)) != len(names):
                raise UnapprovedFilesError("the app bundle holds the same path twice; the node will not run it")
            return {name: archive.read(name) for name in names}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError):
        raise UnapprovedFilesError("the app bundle received from the server is not a valid archive") from None


def unapproved_files(names: Iterable[str]) -> list[str]:
    """Names a FAB may not hold: anything but pyproject.toml, Flower's CONTENT list and app-package *.py files."""

    def allowed(name: str) -> bool:
        if name in ("pyproject.toml", FLOWER_CONTENT):
            return True
        parts = name.split("/")
        return (
            len(parts) >= 2
            and parts[0] in APP_PACKAGES
            and parts[-1].endswith(".py")
            and all(p.isidentifier() and p != "__pycache__" for p in [*parts[:-1], parts[-1][: -len(".py")]])
        )

    return sorted(name for name in names if not allowed(name))


def check_fab_files(fab: bytes) -> dict[str, bytes]:
    """The FAB's entries, or :class:`UnapprovedFilesError` naming the first file outside the allow-list."""
    entries = fab_entries(fab)
    extra = unapproved_files(entries)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise UnapprovedFilesError(
            f"the app bundle holds '{extra[0]}'{more}, outside the approved file set (pyproject.toml and *.py of "
            f"{', '.join(APP_PACKAGES)}); the node will not run it, whatever was approved"
        )
    return entries


def code_digest_from_fab(fab: bytes) -> str:
    """Digest of every file inside a FAB (zip), path and content, independent of zip timestamps and order."""
    digest = hashlib.sha256()
    for name, content in sorted(fab_entries(fab).items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


SKIPPED_DIRS = {".venv", "venv", ".git", "runs", "__pycache__", ".pytest_cache", "node_modules", "build", ".flwr"}


def app_files(root: Path) -> dict[str, Path]:
    """Files Flower's FAB rules may keep, without walking virtual environments and run outputs."""
    root = Path(root).resolve()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[path.relative_to(root).as_posix()] = path
    return files


def build_app_fab(root: Path) -> bytes:
    """The FAB of the app at ``root``, built by Flower's own rules (what `flwr run` ships)."""
    from flwr.cli.build import build_fab_from_files  # heavy import, only when asked

    return build_fab_from_files(app_files(root))[0]


def code_digest_of_project(root: Path) -> str:
    """The code digest of the FAB built from ``root``."""
    return code_digest_from_fab(build_app_fab(root))


def new_run_nonce() -> str:
    """A fresh run identity: 128 random bits, hex."""
    return secrets.token_hex(16)


def expiry_after(hours: float, now: dt.datetime | None = None) -> str:
    """The UTC ISO time ``hours`` after ``now``, to the second."""
    start = now or dt.datetime.now(dt.UTC)
    return (start.astimezone(dt.UTC) + dt.timedelta(hours=hours)).isoformat(timespec="seconds")


def parse_expiry(text: str) -> dt.datetime:
    """An expiry time from the run config; one without a time zone is refused (never read as local time)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SignatureError(f"the run's expiry '{text[:40]}' is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise SignatureError(f"the run's expiry '{text[:40]}' has no time zone")
    return when


def encode_roster(roster: Mapping[str, str]) -> str:
    """Canonical base64 JSON of the roster: the same map always gives the same text (and digest)."""
    return base64.b64encode(json.dumps(dict(roster), sort_keys=True, separators=(",", ":")).encode()).decode()


def decode_roster(text: str) -> dict[str, str]:
    """The roster a run carries, ``{site name: OpenSSH public key text}``; only trust it after the run's signature checked."""
    try:
        roster = json.loads(base64.b64decode(text, validate=True))
    except ValueError:
        raise SignatureError("the run carries a roster that is not base64 JSON") from None
    if not isinstance(roster, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in roster.items()):
        raise SignatureError("the run's roster is not a map of site names to public keys")
    return roster


@dataclass(frozen=True)
class RunManifest:
    """What the admin vouches for and each site checks: which study, which code, which run, until when."""

    consortium: str
    study_sha256: str
    code_sha256: str
    nonce: str
    attempt: int
    expires: str
    roster_sha256: str

    def message(self) -> bytes:
        """Canonical JSON: no field can bleed into the next, whatever characters a name holds."""
        return json.dumps({"version": MANIFEST_VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(manifest: RunManifest, key: ec.EllipticCurvePrivateKey) -> str:
    """``fedhelix-run-v2:<base64 signature>``: the prefix lets a node tell an older fedhelix's signature apart."""
    signature = base64.b64encode(key.sign(manifest.message(), ec.ECDSA(hashes.SHA384()))).decode()
    return f"{MANIFEST_VERSION}:{signature}"


def signature_of(signature: str) -> str:
    """The base64 part of a ``fedhelix-run-v2:`` signature; an older or unknown version is refused by name."""
    version, _, signature_b64 = signature.rpartition(":")
    if version != MANIFEST_VERSION:
        if not version:  # v1 signatures were bare base64
            raise SignatureError("the run was signed with an older fedhelix (manifest v1); re-submit it with this version's `fedhelix run`")
        raise SignatureError(f"the run was signed as '{version[:30]}', this node checks {MANIFEST_VERSION}; use the same fedhelix release everywhere")
    return signature_b64


def verify_manifest(manifest: RunManifest, signature: str, admin_cert: x509.Certificate) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is the admin's signature of ``manifest``."""
    signature_b64 = signature_of(signature)
    public = admin_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise SignatureError("the admin certificate in this kit does not hold an EC key")
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), manifest.message(), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise SignatureError(
            "the run was not signed by this consortium's admin as it arrived (signature does not verify: another key, "
            "or a signed field such as the study, code, run identity, expiry or roster was changed); the node will not run it"
        ) from None


def signed_run_config(
    study_bytes: bytes,
    fab: bytes,
    consortium: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    nonce: str,
    attempt: int,
    expires: str,
    roster: Mapping[str, str],
) -> tuple[RunManifest, dict[str, str | int]]:
    """The manifest and the run-config entries that carry it; what ``fedhelix run`` submits."""
    roster_b64 = encode_roster(roster)
    manifest = RunManifest(
        consortium, study_digest(study_bytes), code_digest_from_fab(fab), nonce, attempt, expires, hashlib.sha256(base64.b64decode(roster_b64)).hexdigest()
    )
    return manifest, {
        STUDY_B64_KEY: encode_study(study_bytes),
        SIGNATURE_KEY: sign_manifest(manifest, key),
        CONSORTIUM_KEY: consortium,
        NONCE_KEY: nonce,
        ATTEMPT_KEY: attempt,
        EXPIRES_KEY: expires,
        ROSTER_KEY: roster_b64,
    }


def manifest_of_run(consortium: str, run_config: Mapping[str, object], fab: bytes) -> RunManifest:
    """The manifest a run claims, from its run config and the FAB as received; checked by :func:`verify_manifest`."""
    nonce = str(run_config.get(NONCE_KEY, "") or "")
    if not _NONCE.fullmatch(nonce):
        raise SignatureError("the run carries no valid run identity (run-nonce); submit it with this version's `fedhelix run`")
    attempt = run_config.get(ATTEMPT_KEY)
    if isinstance(attempt, str) and attempt.isdigit():
        attempt = int(attempt)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise SignatureError(f"the run's attempt number '{str(attempt)[:20]}' is not a positive integer")
    expires = str(run_config.get(EXPIRES_KEY, "") or "")
    parse_expiry(expires)
    roster_b64 = str(run_config.get(ROSTER_KEY, "") or "")
    decode_roster(roster_b64)
    study_sha256 = study_digest(decode_study(str(run_config.get(STUDY_B64_KEY, "") or "")))
    return RunManifest(consortium, study_sha256, code_digest_from_fab(fab), nonce, attempt, expires, hashlib.sha256(base64.b64decode(roster_b64)).hexdigest())


def encode_study(study_bytes: bytes) -> str:
    return base64.b64encode(study_bytes).decode()


def decode_study(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise SignatureError("the run carries a study that is not valid base64") from None
