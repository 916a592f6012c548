"""``fedhelix run``: sign a study with the admin key and submit it to the consortium's SuperLink.

The study file travels inside the run config (base64), beside the admin's signature of a
manifest v2 (:class:`shared.approval.RunManifest`): consortium, study digest, code digest,
run identity (nonce and attempt), expiry and roster; every node checks it before it trains
(:mod:`client.node_gate`). The app bundle is staged from exactly the files Flower's own
FAB rules keep, so the digest signed here is the digest each node computes.

The run identity is written to ``RUN_DIR/run-identity.json`` before anything is sent: a
resume (``--resume``) or a restart (``--retry``) of that run re-signs the same nonce with
the next attempt number, which each site admits up to the resumes it approved; a new
``fedhelix run`` is a new nonce, one of the runs a site approved.

The ServerApp writes its results on the server host, in the server kit's runs directory under
the run's nonce (:mod:`server.run_store`); when the run ends they are fetched over the admin
listener into ``RUN_DIR`` (:func:`server.admin_tunnel.fetch_results`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from server.admin_tunnel import AdminKit, control_home, fetch_results, flwr_json, load_admin_kit  # noqa: F401 - AdminKit, load_admin_kit: re-exported
from server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from server.deployment import CONNECTION, flower_env
from server.run_store import study_dirname
from shared.approval import (
    DEFAULT_VALID_HOURS,
    RunManifest,
    build_app_fab,
    expiry_after,
    new_run_nonce,
    signed_run_config,
    study_digest,
)
from shared.config import load_study
from shared.errors import ConfigError, FedhelixError
from shared.paths import PROJECT_ROOT
from shared.pki import check_issued_by, check_owner_only, check_validity, load_certificate, load_identity


log = logging.getLogger("fedhelix.admin")

IDENTITY_FILE = "run-identity.json"
ROSTER_FILE = "roster.json"
MAX_VALID_HOURS = 30 * 24.0


def load_roster(kit_path: Path) -> dict[str, str]:
    """``{site: OpenSSH public key}`` from the admin kit's roster.json; ``{}`` for a kit provisioned before rosters."""
    path = Path(kit_path) / ROSTER_FILE
    if not path.is_file():
        return {}
    try:
        roster = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); re-create it with `fedhelix provision --add-site` or from kits/server/nodes") from None
    if not isinstance(roster, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in roster.items()):
        raise ConfigError(f"{path} must map site names to OpenSSH public keys")
    return roster


@dataclass(frozen=True)
class RunIdentity:
    """What a run directory remembers of its signed run, so a resume re-signs the same identity."""

    nonce: str
    attempt: int
    study_sha256: str


def read_run_identity(run_dir: Path) -> RunIdentity:
    path = Path(run_dir) / IDENTITY_FILE
    try:
        doc = json.loads(path.read_text())
        return RunIdentity(str(doc["nonce"]), int(doc["attempt"]), str(doc["study_sha256"]))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} holds no {IDENTITY_FILE} (not started by this fedhelix's `fedhelix run`); start the study afresh") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); start the study afresh") from None


def write_run_identity(run_dir: Path, identity: RunIdentity, expires: str) -> None:
    """Written before the run is sent: a crash after the sites admitted it must not reuse its attempt number."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps({**identity.__dict__, "expires": expires}, indent=2) + "\n")
    tmp.replace(run_dir / IDENTITY_FILE)


@dataclass(frozen=True)
class Submission:
    run_id: int | None
    out_dir: Path
    manifest: RunManifest
    returncode: int
    report_here: bool = True  # False: the results stayed on the server host (an admin kit from before the admin listener)


def stage_app(fab: bytes, into: Path) -> Path:
    """Unpack the FAB so `flwr run` ships exactly these files (and nothing else in the checkout)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        archive.extractall(into)
    return into


def submit_study(
    study_path: Path,
    kit_path: Path,
    out_dir: Path,
    *,
    app_dir: Path = PROJECT_ROOT,
    on_line: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
    resume: Path | None = None,
    retry: Path | None = None,
    valid_hours: float = DEFAULT_VALID_HOURS,
    run_config: Mapping[str, str | int | float] | None = None,
) -> Submission:
    """Sign and submit; streams Flower's log lines to ``on_line``; returns when the run ends.

    ``resume``: an interrupted run directory of this study (here, holding its run-identity.json); the
    ServerApp continues that run (its nonce) from the last round checkpointed on the server host.
    ``retry``: a run directory of this study that failed before any checkpoint; it starts again
    from round 1. Both re-sign the run's identity with the next attempt number.
    ``valid_hours``: the sites admit the signed run until this many hours from now.
    ``run_config``: unsigned ServerApp settings sent beside the signed ones (e.g. ``poll-interval``); they
    cannot replace a signed key.
    """
    if resume is not None and retry is not None:
        raise ConfigError("--resume and --retry both name a run to continue; give one")
    if not 0 < valid_hours <= MAX_VALID_HOURS:
        raise ConfigError(f"--valid-hours must be more than 0 and at most {MAX_VALID_HOURS:g} (got {valid_hours:g})")
    kit = load_admin_kit(kit_path)
    study = load_study(study_path)  # a broken study file fails here, not at the sites
    check_owner_only(kit.path / "admin.key", "admin key")
    admin = load_identity(kit.path / "admin.crt", kit.path / "admin.key")
    ca = load_certificate(kit.path / "ca.crt")
    check_issued_by(admin.cert, ca, f"admin certificate {kit.path / 'admin.crt'}")
    check_validity(admin.cert, f"admin certificate {kit.path / 'admin.crt'}")
    study_bytes = Path(study_path).read_bytes()
    out_dir = Path(out_dir).resolve()
    run_dir = out_dir / study.name
    note = None
    if resume is not None:
        run_dir = Path(resume).resolve()
        if (run_dir / CHECKPOINT_FILE).exists():  # a checkpoint visible here (a run dir shared with an older server): checked now
            done = load_checkpoint(run_dir, study)
            note = f"resuming study '{study.name}' after round {done.round} of {study.rounds} from {run_dir}"
        else:  # the checkpoint is on the server host, and the ServerApp checks it before any site is asked
            note = f"resuming study '{study.name}' ({run_dir}); the server checks its checkpoint"
    elif retry is not None:
        run_dir = Path(retry).resolve()
        if run_dir.name != study.name:
            raise ConfigError(f"--retry {run_dir} is not a run directory of study '{study.name}' (it would be named {study.name})")
        out_dir = run_dir.parent
        note = f"restarting study '{study.name}' from round 1 in {run_dir}"
    if resume is not None or retry is not None:
        previous = read_run_identity(run_dir)
        if previous.study_sha256 != study_digest(study_bytes):
            raise ConfigError(f"{run_dir} ran another version of the study file; continue it with the file that started it")
        identity = RunIdentity(previous.nonce, previous.attempt + 1, previous.study_sha256)
    else:
        identity = RunIdentity(new_run_nonce(), 1, study_digest(study_bytes))
    roster = load_roster(kit.path)
    if not roster:
        message = f"admin kit {kit.path} has no {ROSTER_FILE} (provisioned by an older fedhelix): study '{study.name}' carries an empty roster"
        log.warning(message)
        if on_line is not None:
            on_line(message)
    fab = build_app_fab(app_dir)
    expires = expiry_after(valid_hours)
    manifest, signed = signed_run_config(
        study_bytes, fab, kit.consortium, admin.key, nonce=identity.nonce, attempt=identity.attempt, expires=expires, roster=roster
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    clash = sorted(set(run_config or {}) & (set(signed) | {"out", "resume"}))
    if clash:
        raise ConfigError(f"run config key(s) {', '.join(clash)} are set by `fedhelix run` itself")
    config: dict[str, str | int | float] = {**(run_config or {}), **signed, "out": str(out_dir)}
    if resume is not None:  # the run to continue: its nonce (an older kit's admin, on the server host: the path)
        config["resume"] = identity.nonce if kit.admin_address is not None else str(run_dir)
    write_run_identity(run_dir, identity, expires)
    (run_dir / "report.json").unlink(missing_ok=True)  # an earlier attempt's verdict is not this one's
    if on_line is not None:
        if note:
            on_line(note)
        on_line(f"study '{study.name}': signed as run identity {identity.nonce}, attempt {identity.attempt}, valid until {expires}")
    with tempfile.TemporaryDirectory(prefix="fedhelix-app-") as tmp, control_home(kit, Path(tmp)) as home:
        app = stage_app(fab, Path(tmp) / "app")
        command = [
            str(Path(sys.executable).parent / "flwr"), "run", str(app), CONNECTION, "--stream",
            "--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in config.items()),
        ]  # fmt: skip
        proc = subprocess.Popen(command, env=flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = None
        assert proc.stdout is not None
        for line in proc.stdout:
            match = re.search(r"run (?:ID )?(\d{6,})", line, flags=re.IGNORECASE)
            if run_id is None and match:
                run_id = int(match.group(1))
            if on_line is not None:
                on_line(line.rstrip("\n"))
        code = proc.wait(timeout=timeout_s)
        fetched = fetch_results(kit, identity.nonce, run_dir) if code == 0 else []  # from the server's runs directory
        if fetched and on_line is not None:
            on_line(f"study '{study.name}': fetched {', '.join(fetched)} from the server into {run_dir}")
        remote_status = None  # the run's status on the server, when its report is not on this machine
        if code == 0 and not (run_dir / "report.json").exists() and run_id is not None:
            runs = flwr_json(home, ["ls", "--run-id", str(run_id)], f"reading the status of run {run_id}", kit.address).get("runs", [])
            remote_status = str(runs[0].get("status", "unknown")) if runs else "unknown"
    if code != 0:
        raise FedhelixError(f"submitting study '{study.name}' to {kit.address} failed (flwr exit code {code}); see the lines above")
    # `flwr run --stream` exits 0 even when the ServerApp failed: the report is the verdict.
    report_path = run_dir / "report.json"
    where = f"on the server host in the server kit's runs/{study_dirname(study.name)}/{identity.nonce}"
    if not report_path.exists() and remote_status is not None and kit.admin_address is None:  # an older kit: results stay on the server
        if remote_status == "finished:completed":
            if on_line is not None:
                on_line(f"study '{study.name}' completed (run {run_id}); report.json, report.html and model.pt are {where}")
            return Submission(run_id, run_dir, manifest, code, report_here=False)
        raise FedhelixError(f"study '{study.name}' ended {remote_status} (run {run_id}); its report is {where}")
    if not report_path.exists():  # the server wrote none to fetch (or, on the server host, here)
        status = f"run status {remote_status}" if remote_status else "no run status"
        raise FedhelixError(f"study '{study.name}' ended without a report ({status}); see the server's superlink.log")
    report = json.loads(report_path.read_text())
    if report.get("status") != "completed":
        raise FedhelixError(f"study '{study.name}' {report.get('status')}: {report.get('error') or 'see report.html'}")
    return Submission(run_id, run_dir, manifest, code)
