"""A node runs only what the admin signed and the site approved: every file of the bundle, one run at a time.

Each guarantee has a test that tries to break it: a .pyc slipped into a real FAB, a changed
pyproject.toml, an expired or forged manifest, a replayed signed config, more runs or
attempts than the site approved.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import stat
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from client.approval import Approval, approvals_path, approve, check_run, read_approvals, read_runs, runs_path
from shared.approval import (
    ATTEMPT_KEY,
    CONSORTIUM_KEY,
    EXPIRES_KEY,
    NONCE_KEY,
    ROSTER_KEY,
    SIGNATURE_KEY,
    STUDY_B64_KEY,
    ApprovalError,
    ExpiredError,
    NotApprovedError,
    RunLimitError,
    SignatureError,
    UnapprovedFilesError,
    build_app_fab,
    check_fab_files,
    code_digest_from_fab,
    decode_roster,
    encode_roster,
    encode_study,
    expiry_after,
    new_run_nonce,
    signed_run_config,
    unapproved_files,
)
from shared.config import load_site
from shared.errors import ConfigError
from shared.paths import PROJECT_ROOT
from shared.pki import create_ca, issue_certificate

STUDY = PROJECT_ROOT / "studies" / "consortium-demo" / "study.toml"
NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
ROSTER = {"northeast": "ecdsa-sha2-nistp384 AAAAE2VjZHNh demo/northeast", "south": "ecdsa-sha2-nistp384 AAAAE2VjZHNi demo/south"}


@pytest.fixture(scope="module")
def real_fab() -> bytes:
    """The FAB `fedhelix run` ships from this checkout."""
    return build_app_fab(PROJECT_ROOT)


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


def with_files(fab: bytes, extra: dict[str, bytes]) -> bytes:
    """The FAB with files added or replaced (a sender tampering with a real bundle)."""
    source = zipfile.ZipFile(io.BytesIO(fab))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in source.namelist():
            if name not in extra:
                archive.writestr(name, source.read(name))
        for name, content in extra.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def signed(admin, fab: bytes, *, nonce: str | None = None, attempt: int = 1, expires: str | None = None, study: bytes | None = None, consortium: str = "demo") -> dict:
    return signed_run_config(
        study if study is not None else STUDY.read_bytes(), fab, consortium, admin.key,
        nonce=nonce or new_run_nonce(), attempt=attempt, expires=expires or expiry_after(24, NOW), roster=ROSTER,
    )[1]  # fmt: skip


def check(admin, site, config: dict, fab: bytes, run_id: int, now: dt.datetime = NOW) -> Approval:
    return check_run("northeast", "demo", config, fab, admin.cert, approvals_path(site), run_id, now=now)


# --------------------------------------------------------------------------- what the FAB holds


def test_fab_holds_exactly_pyproject_and_the_app_packages_python(real_fab: bytes) -> None:
    names = set(zipfile.ZipFile(io.BytesIO(real_fab)).namelist())
    on_disk = {
        p.relative_to(PROJECT_ROOT).as_posix()
        for package in ("client", "server", "shared")
        for p in (PROJECT_ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts and not p.name.startswith("test_") and not p.name.endswith("_test.py")
    }
    assert names == {"pyproject.toml", ".info/CONTENT", *on_disk}
    assert not {n.split("/")[0] for n in names} & {"bench", "tests", "data", "docs", "studies", "deploy", "fedhelix", "README.md"}
    assert unapproved_files(names) == [] and check_fab_files(real_fab)


def test_apps_import_nothing_outside_the_fab() -> None:
    """server.app and client.app run from the FAB alone: a fresh interpreter that sees only the FAB's packages imports them."""
    from shared.paths import PROJECT_ROOT as root

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('fedhelix', 'bench', 'tests'): raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import server.app, client.app\n"
    )
    done = subprocess.run([os.sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_code_digest_covers_every_file_and_ignores_zip_order(real_fab: bytes) -> None:
    reordered = io.BytesIO()
    source = zipfile.ZipFile(io.BytesIO(real_fab))
    with zipfile.ZipFile(reordered, "w", zipfile.ZIP_STORED) as archive:
        for name in reversed(source.namelist()):
            archive.writestr(name, source.read(name))
    assert code_digest_from_fab(reordered.getvalue()) == code_digest_from_fab(real_fab)
    pyproject = source.read("pyproject.toml").replace(b'clientapp = "client.app:app"', b'clientapp = "client.evil:app"')
    for change in ({"pyproject.toml": pyproject}, {"client/__pycache__/app.cpython-311.pyc": b"\x00"}, {".info/CONTENT": b"x"}):
        assert code_digest_from_fab(with_files(real_fab, change)) != code_digest_from_fab(real_fab), change


@pytest.mark.parametrize(
    "name",
    [
        "client/__pycache__/app.cpython-311.pyc",
        "client/app.pyc",
        "client/_native.cpython-311-x86_64-linux-gnu.so",
        "shared/evil.pth",
        "data/regions.csv",
        "fedhelix/cli.py",
        "sitecustomize.py",
        "client/__pycache__/app.py",
        "client/my-module.py",
        "client/../x.py",
        "client/",
    ],
)
def test_a_file_outside_the_allow_list_is_refused_even_if_approved_and_signed(admin, site, real_fab: bytes, name: str) -> None:
    tampered = with_files(real_fab, {name: b"import os\n"})
    approve(STUDY, site, code_digest_from_fab(tampered))  # the site even approved the tampered digest
    with pytest.raises(UnapprovedFilesError, match=r"site 'northeast' refuses the run: the app bundle holds .* outside the approved file set"):
        check(admin, site, signed(admin, tampered), tampered, 1)
    assert not runs_path(approvals_path(site)).exists()  # nothing admitted, nothing recorded


def test_a_fab_naming_one_path_twice_is_refused(admin, site, real_fab: bytes) -> None:
    buffer = io.BytesIO(real_fab)
    with zipfile.ZipFile(buffer, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("client/app.py", b"print('shadow')\n")  # extracted last: this one would run
    with pytest.raises(UnapprovedFilesError, match="same path twice"):
        check_fab_files(buffer.getvalue())


def test_changed_pyproject_is_refused_by_digest(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab))
    pyproject = zipfile.ZipFile(io.BytesIO(real_fab)).read("pyproject.toml").replace(b'clientapp = "client.app:app"', b'clientapp = "client.trainer:app"')
    changed = with_files(real_fab, {"pyproject.toml": pyproject})
    with pytest.raises(NotApprovedError, match="has not approved this version of the fedhelix code"):
        check(admin, site, signed(admin, changed), changed, 1)


# --------------------------------------------------------------------------- signature


def test_approved_signed_run_passes_and_is_recorded(admin, site, real_fab: bytes) -> None:
    approval = approve(STUDY, site, code_digest_from_fab(real_fab))
    config = signed(admin, real_fab)
    assert check(admin, site, config, real_fab, 11) == approval
    assert check(admin, site, config, real_fab, 11) == approval  # the gate may ask again for the same Flower run
    runs = read_runs(runs_path(approvals_path(site)))
    assert runs == {config[NONCE_KEY]: {"approval": approval.key, "study_sha256": approval.study_sha256, "code_sha256": approval.code_sha256, "attempts": {"1": 11}}}
    assert decode_roster(config[ROSTER_KEY]) == ROSTER


def test_changed_study_is_refused(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab))
    changed = STUDY.read_bytes().replace(b"rounds = 3", b"rounds = 30")
    with pytest.raises(NotApprovedError, match="has not approved this study file"):
        check(admin, site, signed(admin, real_fab, study=changed), real_fab, 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (NONCE_KEY, "0" * 32),
        (ATTEMPT_KEY, 2),
        (EXPIRES_KEY, "2099-01-01T00:00:00+00:00"),
        (ROSTER_KEY, encode_roster({**ROSTER, "mallory": "ecdsa-sha2-nistp384 AAAAmallory"})),
        (ROSTER_KEY, encode_roster({})),
        (STUDY_B64_KEY, encode_study(STUDY.read_bytes().replace(b"rounds = 3", b"rounds = 4"))),
    ],
)
def test_a_signed_field_changed_without_re_signing_is_refused(admin, site, real_fab: bytes, field: str, value: object) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab), runs=5)
    config = {**signed(admin, real_fab), field: value}
    with pytest.raises(SignatureError, match="not signed by this consortium's admin as it arrived"):
        check(admin, site, config, real_fab, 1)


def test_unsigned_foreign_old_and_malformed_runs_are_refused(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab))
    config = signed(admin, real_fab)
    with pytest.raises(SignatureError, match="carries no signed study"):
        check(admin, site, {STUDY_B64_KEY: config[STUDY_B64_KEY]}, real_fab, 1)
    impostor = issue_certificate(create_ca("demo"), "demo admin", client=True)  # same names, another CA's key
    with pytest.raises(SignatureError, match="not signed by this consortium's admin"):
        check(admin, site, signed(impostor, real_fab), real_fab, 1)
    with pytest.raises(SignatureError, match="submitted for consortium 'other'"):
        check(admin, site, signed(admin, real_fab, consortium="other"), real_fab, 1)
    v1 = config[SIGNATURE_KEY].split(":", 1)[1]  # a bare base64 signature, as fedhelix-run-v1 wrote them
    with pytest.raises(SignatureError, match="signed with an older fedhelix .*re-submit"):
        check(admin, site, {STUDY_B64_KEY: config[STUDY_B64_KEY], SIGNATURE_KEY: v1, CONSORTIUM_KEY: "demo"}, real_fab, 1)
    for field, value, message in ((NONCE_KEY, "xyz", "no valid run identity"), (ATTEMPT_KEY, 0, "not a positive integer"), (EXPIRES_KEY, "2030-01-01T00:00:00", "no time zone"), (ROSTER_KEY, "!!", "not base64 JSON")):
        with pytest.raises(SignatureError, match=message):
            check(admin, site, {**config, field: value}, real_fab, 1)
    assert not runs_path(approvals_path(site)).exists()


def test_an_expired_signature_is_refused_but_an_admitted_run_may_finish(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab), runs=2)
    with pytest.raises(ExpiredError, match="expired at"):
        check(admin, site, signed(admin, real_fab, expires=expiry_after(-1, NOW)), real_fab, 1)
    config = signed(admin, real_fab, expires=expiry_after(1, NOW))
    check(admin, site, config, real_fab, 2)
    later = NOW + dt.timedelta(hours=3)
    check(admin, site, config, real_fab, 2, now=later)  # the node restarted mid-run: the same Flower run continues
    with pytest.raises(ExpiredError):
        check(admin, site, config, real_fab, 3, now=later)


# --------------------------------------------------------------------------- replays, runs and resumes


def test_a_replayed_signed_run_is_refused(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab), runs=3)
    config = signed(admin, real_fab)
    check(admin, site, config, real_fab, 100)
    with pytest.raises(RunLimitError, match="attempt 1 already ran here as Flower run 100: a replayed signed run"):
        check(admin, site, config, real_fab, 101)


def test_new_run_identities_are_limited_by_runs(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab))  # runs = 1
    check(admin, site, signed(admin, real_fab), real_fab, 1)
    with pytest.raises(RunLimitError, match="would be run 2 of study 'demo-tcga', and the site approved 1"):
        check(admin, site, signed(admin, real_fab), real_fab, 2)
    approve(STUDY, site, code_digest_from_fab(real_fab), runs=2)  # a new approval: two more runs
    check(admin, site, signed(admin, real_fab), real_fab, 3)
    check(admin, site, signed(admin, real_fab), real_fab, 4)
    with pytest.raises(RunLimitError, match="the site approved 3"):
        check(admin, site, signed(admin, real_fab), real_fab, 5)


def test_runs_two_admits_a_second_identity(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab), runs=2)
    first, second = check(admin, site, signed(admin, real_fab), real_fab, 1), check(admin, site, signed(admin, real_fab), real_fab, 2)
    assert first == second and len(read_runs(runs_path(approvals_path(site)))) == 2


def test_resume_attempts_must_increase_and_stay_within_resumes(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab), resumes=3)
    nonce = new_run_nonce()
    check(admin, site, signed(admin, real_fab, nonce=nonce), real_fab, 1)
    resume = signed(admin, real_fab, nonce=nonce, attempt=2)  # `fedhelix run --resume`: same identity, next attempt
    check(admin, site, resume, real_fab, 2)
    with pytest.raises(RunLimitError, match="attempt 2 already ran here as Flower run 2"):
        check(admin, site, resume, real_fab, 3)
    with pytest.raises(RunLimitError, match="attempt 1 already ran here"):
        check(admin, site, signed(admin, real_fab, nonce=nonce, attempt=1), real_fab, 4)
    check(admin, site, signed(admin, real_fab, nonce=nonce, attempt=3), real_fab, 5)
    with pytest.raises(RunLimitError, match="attempt 4 is beyond the 3 attempt"):
        check(admin, site, signed(admin, real_fab, nonce=nonce, attempt=4), real_fab, 6)
    other = new_run_nonce()  # a skipped attempt number never lets an older one back in
    approve(STUDY, site, code_digest_from_fab(real_fab))
    check(admin, site, signed(admin, real_fab, nonce=other, attempt=3), real_fab, 7)
    with pytest.raises(RunLimitError, match="attempt 2 is not after attempt 3"):
        check(admin, site, signed(admin, real_fab, nonce=other, attempt=2), real_fab, 8)
    with pytest.raises(RunLimitError, match="Flower run 5 already ran here"):  # one Flower run is one attempt
        check(admin, site, signed(admin, real_fab, nonce=other, attempt=3), real_fab, 5)


def test_a_run_identity_never_covers_another_study(admin, site, real_fab: bytes, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(STUDY.read_text().replace("rounds = 3", "rounds = 4"))
    approve(STUDY, site, code_digest_from_fab(real_fab))
    approve(other, site, code_digest_from_fab(real_fab))
    nonce = new_run_nonce()
    check(admin, site, signed(admin, real_fab, nonce=nonce), real_fab, 1)
    with pytest.raises(RunLimitError, match="already ran another study"):
        check(admin, site, signed(admin, real_fab, nonce=nonce, attempt=2, study=other.read_bytes()), real_fab, 2)


def test_racing_runs_cannot_both_take_the_last_approved_run(admin, site, real_fab: bytes) -> None:
    approve(STUDY, site, code_digest_from_fab(real_fab))
    configs = [signed(admin, real_fab) for _ in range(4)]
    outcomes: list[str] = []

    def attempt(i: int) -> None:
        try:
            check(admin, site, configs[i], real_fab, 1000 + i)
            outcomes.append("admitted")
        except RunLimitError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["admitted", "refused", "refused", "refused"]
    assert len(read_runs(runs_path(approvals_path(site)))) == 1


# --------------------------------------------------------------------------- site files


def test_approvals_and_runs_files_are_created_owner_only(admin, site, real_fab: bytes) -> None:
    path = approvals_path(site)
    path.write_text("[]")
    os.chmod(path, 0o644)  # a file left world-readable by an older fedhelix
    old = os.umask(0)  # even with a permissive umask
    try:
        approve(STUDY, site, code_digest_from_fab(real_fab))
        check(admin, site, signed(admin, real_fab), real_fab, 1)
    finally:
        os.umask(old)
    for file in (path, runs_path(path)):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert runs_path(path).name == "northeast.runs.json"
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("northeast") or ".tmp" in p.name) == ["northeast.approvals.json", "northeast.runs.json", "northeast.toml"]


def test_approval_records_carry_runs_and_resumes_and_old_records_still_load(site, real_fab: bytes) -> None:
    record = approve(STUDY, site, code_digest_from_fab(real_fab), runs=4, resumes=2)
    assert (record.runs, record.resumes) == (4, 2) and len(record.id) == 16
    path = approvals_path(site)
    rows = json.loads(path.read_text())
    old = {k: v for k, v in rows[0].items() if k not in ("runs", "resumes", "id")}  # written by fedhelix-run-v1
    path.write_text(json.dumps([old]))
    (loaded,) = read_approvals(path)
    assert (loaded.runs, loaded.resumes) == (1, 3) and loaded.key == read_approvals(path)[0].key
    with pytest.raises(ConfigError, match="at least 1"):
        approve(STUDY, site, "x", runs=0)
    path.write_text(json.dumps([{**old, "runs": "many"}]))
    with pytest.raises(ConfigError, match="must be integers >= 1"):
        read_approvals(path)


def test_corrupt_approvals_or_runs_file_is_a_clear_error(admin, site, real_fab: bytes) -> None:
    approvals_path(site).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        read_approvals(approvals_path(site))
    approve_path = approvals_path(site)
    approve_path.unlink()
    approve(STUDY, site, code_digest_from_fab(real_fab))
    runs_path(approve_path).write_text("[]")
    with pytest.raises(ConfigError, match="deleting it would allow replays"):
        check(admin, site, signed(admin, real_fab), real_fab, 1)


# --------------------------------------------------------------------------- the gate in the SuperNode


def test_gate_refuses_with_a_fixed_phrase_for_the_server_and_the_full_line_in_the_site_log(admin, site, real_fab: bytes, monkeypatch, caplog) -> None:
    from flwr.supercore.fab import Fab
    from flwr.supernode import start_client_internal as sci

    from client import node_gate

    approve(STUDY, site, code_digest_from_fab(real_fab))
    config = signed(admin, real_fab, expires=expiry_after(24))
    fabs = {"good": real_fab, "pyc": with_files(real_fab, {"client/__pycache__/app.cpython-311.pyc": b"\x00"})}

    class Run:
        override_config = config

    def pull(**kwargs):  # stands in for Flower's loop: fetch the FAB, then verify it as Flower does
        fab = kwargs["get_fab"](kwargs["fab_hash"], kwargs["run_id"])
        return sci._verify_fab(fab, kwargs["trusted_entities"])

    monkeypatch.setattr(sci, "_pull_and_store_message", pull)
    monkeypatch.setattr(sci, "_verify_fab", sci._verify_fab)
    monkeypatch.setattr(sci, "FAB_VERIFICATION_ERROR", sci.FAB_VERIFICATION_ERROR)
    node_gate.install("northeast", "demo", approvals_path(site), admin.cert)

    def gate(which: str, run_id: int) -> bool:
        return sci._pull_and_store_message(get_fab=lambda h, r: Fab(h, fabs[h], {}), get_run=lambda r: Run(), fab_hash=which, run_id=run_id)

    assert gate("good", 1) is True
    assert gate("good", 1) is True  # asked again for the same run
    for which, run_id, code in (("good", 2, "E-APPROVAL-REPLAY"), ("pyc", 3, "E-APPROVAL-FILES")):
        caplog.clear()
        assert gate(which, run_id) is False
        reason = sci.FAB_VERIFICATION_ERROR.reason
        assert reason.startswith(f"fedhelix: {code} ") and "northeast" not in reason and config[NONCE_KEY][:12] not in reason
        (record,) = [r for r in caplog.records if r.name == "fedhelix.node"]
        assert "site 'northeast' refuses the run" in record.getMessage() and "\n" not in record.getMessage()
    runs_path(approvals_path(site)).write_text("garbage")  # anything unexpected: refused, never admitted
    assert gate("good", 4) is False and sci.FAB_VERIFICATION_ERROR.reason.startswith("fedhelix: E-APPROVAL ")


def test_the_gate_checks_the_very_run_config_the_clientapp_gets(admin, site, real_fab: bytes, monkeypatch) -> None:
    """A hostile SuperLink answering Flower's GetRun and the gate's differently must not get a ClientApp run."""
    from flwr.supercore.fab import Fab
    from flwr.supernode import start_client_internal as sci

    from client import node_gate

    approve(STUDY, site, code_digest_from_fab(real_fab))
    signed_config = signed(admin, real_fab, expires=expiry_after(24))
    forged = {k: v for k, v in signed_config.items() if k != ROSTER_KEY}  # e.g. drop the roster

    class Run:
        def __init__(self, config):
            self.override_config = config

    answers = iter([Run(forged), Run(signed_config)])  # Flower asks first, then (before the fix) the gate again
    seen: list[dict] = []

    def pull(**kwargs):  # Flower's order: GetRun for the context, then the FAB (which the gate checks)
        run = kwargs["get_run"](kwargs["run_id"])
        fab = kwargs["get_fab"](kwargs["fab_hash"], kwargs["run_id"])
        seen.append(dict(run.override_config))
        return sci._verify_fab(fab, kwargs["trusted_entities"])

    monkeypatch.setattr(sci, "_pull_and_store_message", pull)
    monkeypatch.setattr(sci, "_verify_fab", sci._verify_fab)
    monkeypatch.setattr(sci, "FAB_VERIFICATION_ERROR", sci.FAB_VERIFICATION_ERROR)
    node_gate.install("northeast", "demo", approvals_path(site), admin.cert)
    admitted = sci._pull_and_store_message(get_fab=lambda h, r: Fab(h, real_fab, {}), get_run=lambda r: next(answers), fab_hash="h", run_id=9)
    assert admitted is False, "the forged config reached the ClientApp while the gate checked the signed one"
    assert seen == [forged]


def test_gate_targets_exist_in_the_installed_flower() -> None:
    from flwr.supernode import start_client_internal as sci

    from client import node_gate

    assert all(hasattr(sci, name) for name in node_gate._TARGETS)


def test_every_refusal_kind_has_its_own_fixed_code() -> None:
    from client.node_gate import coordinator_reason

    kinds = [UnapprovedFilesError, SignatureError, ExpiredError, NotApprovedError, RunLimitError, ApprovalError, ConfigError]
    reasons = [coordinator_reason(kind("site 'x' refuses: secret detail")) for kind in kinds]
    assert len(set(reasons)) == len(kinds) - 1  # ConfigError: the generic code, like a bare ApprovalError
    assert all("secret" not in r and r.startswith("fedhelix: E-APPROVAL") for r in reasons)


# --------------------------------------------------------------------------- what `fedhelix run` signs


def test_fedhelix_run_signs_a_fresh_identity_and_retry_re_signs_it_with_the_next_attempt(site, real_fab: bytes, tmp_path: Path, monkeypatch) -> None:
    import server.submit as submit
    from server.provision import ConsortiumConfig, provision
    from shared.pki import load_certificate

    provision(ConsortiumConfig(name="demo", server_address="127.0.0.1:8000", sites=("northeast", "south")), tmp_path / "kits")
    sent: list[dict] = []

    class Started:  # `flwr run` that starts the run and ends; no ServerApp writes a report
        def __init__(self) -> None:
            self.stdout = iter(["Successfully started run 4242424242\n"])

        def wait(self, timeout: float | None = None) -> int:
            return 0

    def popen(command: list[str], **_kwargs: object) -> Started:
        pairs = command[command.index("--run-config") + 1].split(" ")
        sent.append({k: json.loads(v) for k, v in (pair.split("=", 1) for pair in pairs)})
        return Started()

    monkeypatch.setattr(submit.subprocess, "Popen", popen)
    fetched: list[str] = []  # the run nonces whose results `fedhelix run` fetched from the server once the run ended
    monkeypatch.setattr(submit, "fetch_results", lambda kit, nonce, into: fetched.append(nonce) or [])
    monkeypatch.setattr(submit, "flwr_json", lambda *args: {"runs": [{"status": "finished:failed"}]})
    lines: list[str] = []

    def run(**kwargs: object) -> dict:
        with pytest.raises(submit.FedhelixError, match="ended without a report \\(run status finished:failed\\)"):
            submit.submit_study(STUDY, tmp_path / "kits" / "admin", tmp_path / "runs", on_line=lines.append, **kwargs)
        return sent[-1]

    admin_cert = load_certificate(tmp_path / "kits" / "admin" / "admin.crt")
    approve(STUDY, site, code_digest_from_fab(real_fab))  # runs = 1
    first = run()
    run_dir = tmp_path / "runs" / "demo-tcga"
    assert json.loads((run_dir / "run-identity.json").read_text())["nonce"] == first[NONCE_KEY] and first[ATTEMPT_KEY] == 1
    assert fetched == [first[NONCE_KEY]]
    assert set(decode_roster(first[ROSTER_KEY])) == {"northeast", "south"}
    expires = dt.datetime.fromisoformat(first[EXPIRES_KEY])
    assert dt.timedelta(hours=23.9) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=24)
    check_run("northeast", "demo", first, real_fab, admin_cert, approvals_path(site), 1)  # what the node receives passes

    retried = run(retry=run_dir, valid_hours=2)
    assert (retried[NONCE_KEY], retried[ATTEMPT_KEY]) == (first[NONCE_KEY], 2) and any("restarting study" in line for line in lines)
    check_run("northeast", "demo", retried, real_fab, admin_cert, approvals_path(site), 2)
    again = run()  # a new `fedhelix run`: a new identity, beyond runs = 1
    assert again[NONCE_KEY] != first[NONCE_KEY] and again[ATTEMPT_KEY] == 1
    with pytest.raises(RunLimitError):
        check_run("northeast", "demo", again, real_fab, admin_cert, approvals_path(site), 3)
    tuned = run(run_config={"poll-interval": 0})  # an unsigned ServerApp setting travels beside the signed keys
    assert tuned["poll-interval"] == 0 and tuned[NONCE_KEY] not in (first[NONCE_KEY], again[NONCE_KEY])
    for clash in (NONCE_KEY, "out"):  # but never replaces one
        with pytest.raises(ConfigError, match="set by `fedhelix run` itself"):
            submit.submit_study(STUDY, tmp_path / "kits" / "admin", tmp_path / "runs", run_config={clash: "x"})

    (tmp_path / "kits" / "admin" / "roster.json").unlink()  # an admin kit from before rosters still submits
    assert decode_roster(run()[ROSTER_KEY]) == {} and any("has no roster.json" in line for line in lines)
    with pytest.raises(ConfigError, match="--valid-hours"):
        submit.submit_study(STUDY, tmp_path / "kits" / "admin", tmp_path / "runs", valid_hours=0)
    (run_dir / "run-identity.json").unlink()
    with pytest.raises(ConfigError, match="holds no run-identity.json"):
        submit.submit_study(STUDY, tmp_path / "kits" / "admin", tmp_path / "runs", retry=run_dir)

    # An admin kit from before the admin listener (control_address on the server host): nothing to fetch,
    # so a completed run's results are named where they stay, and a failed one says its status.
    (tmp_path / "kits" / "admin" / "admin.toml").write_text('[admin]\nconsortium = "demo"\ncontrol_address = "127.0.0.1:9093"\n')
    monkeypatch.setattr(submit, "flwr_json", lambda *args: {"runs": [{"status": "finished:completed"}]})
    kept = submit.submit_study(STUDY, tmp_path / "kits" / "admin", tmp_path / "runs-old", on_line=lines.append)
    assert not kept.report_here and any("are on the server host in the server kit's runs/" in line for line in lines)
    monkeypatch.setattr(submit, "flwr_json", lambda *args: {"runs": [{"status": "finished:failed"}]})
    with pytest.raises(submit.FedhelixError, match="ended finished:failed \\(run 4242424242\\); its report is on the server host"):
        submit.submit_study(STUDY, tmp_path / "kits" / "admin", tmp_path / "runs-old", on_line=lines.append)
