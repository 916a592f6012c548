"""What a site approves and what the admin signs: the study file and the code that will run.

A run is identified by two digests. The *study digest* is the SHA-256 of the study
file's bytes. The *code digest* is the SHA-256 over every Python file of the Flower
App bundle (FAB) the node receives, path and content, in path order: it changes when
any line of code that could run at a site changes, and not when a README does.

The admin signs ``consortium | study digest | code digest`` with the admin key
(ECDSA P-384, SHA-384, via ``cryptography``); a node checks that signature against the
admin certificate in its kit before it checks its own approvals.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import FedhelixError

# Run-config keys that carry the study and its signature from `fedhelix run` to every node.
STUDY_B64_KEY = "study-b64"
SIGNATURE_KEY = "study-signature"
CONSORTIUM_KEY = "consortium"


class ApprovalError(FedhelixError):
    """A node refuses a run: unsigned, signed by someone else, or not approved by the site."""


def study_digest(study_bytes: bytes) -> str:
    return hashlib.sha256(study_bytes).hexdigest()


def code_digest_from_fab(fab: bytes) -> str:
    """Digest of the Python code inside a FAB (zip), independent of zip timestamps and order."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise ApprovalError("the app bundle received from the server is not a valid archive") from None
    digest = hashlib.sha256()
    for name in sorted(n for n in archive.namelist() if n.endswith(".py")):
        digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
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


@dataclass(frozen=True)
class RunManifest:
    """What the admin vouches for and a site approves."""

    consortium: str
    study_sha256: str
    code_sha256: str

    def message(self) -> bytes:
        return f"fedhelix-run-v1|{self.consortium}|{self.study_sha256}|{self.code_sha256}".encode()


def sign_manifest(manifest: RunManifest, key: ec.EllipticCurvePrivateKey) -> str:
    return base64.b64encode(key.sign(manifest.message(), ec.ECDSA(hashes.SHA384()))).decode()


def verify_manifest(manifest: RunManifest, signature_b64: str, admin_cert: x509.Certificate) -> None:
    """Raise :class:`ApprovalError` unless ``signature_b64`` is the admin's signature of ``manifest``."""
    public = admin_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ApprovalError("the admin certificate in this kit does not hold an EC key")
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), manifest.message(), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise ApprovalError(
            "the study was not signed by this consortium's admin (signature does not verify); the node will not run it"
        ) from None


def encode_study(study_bytes: bytes) -> str:
    return base64.b64encode(study_bytes).decode()


def decode_study(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ApprovalError("the run carries a study that is not valid base64") from None
