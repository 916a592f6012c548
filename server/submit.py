"""``fedhelix run``: sign a study with the admin key and submit it to the consortium's SuperLink.

The study file travels inside the run config (base64), beside the admin's signature of
``(consortium, study digest, code digest)``; every node checks both before it trains
(:mod:`client.node_gate`). The app bundle is staged from exactly the files Flower's own
FAB rules keep, so the digest signed here is the digest each node computes.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.checkpoint import load_checkpoint
from server.deployment import CONNECTION, flower_env, flwr_home_for
from shared.approval import (
    CONSORTIUM_KEY,
    SIGNATURE_KEY,
    STUDY_B64_KEY,
    RunManifest,
    build_app_fab,
    code_digest_from_fab,
    encode_study,
    sign_manifest,
    study_digest,
)
from shared.config import load_study
from shared.errors import FedhelixError
from shared.kits import read_kit
from shared.paths import PROJECT_ROOT
from shared.pki import check_issued_by, check_validity, load_certificate, load_identity


@dataclass(frozen=True)
class AdminKit:
    path: Path
    consortium: str
    control_address: str


def load_admin_kit(path: Path) -> AdminKit:
    path, a = read_kit(path, "admin.toml", "admin", ("consortium", "control_address"))
    return AdminKit(path, str(a["consortium"]), str(a["control_address"]))


@dataclass(frozen=True)
class Submission:
    run_id: int | None
    out_dir: Path
    manifest: RunManifest
    returncode: int


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
) -> Submission:
    """Sign and submit; streams Flower's log lines to ``on_line``; returns when the run ends.

    ``resume``: an interrupted run directory of this study; the ServerApp continues it from its
    last checkpointed round (the admin runs this on the server host, beside the run directories).
    """
    kit = load_admin_kit(kit_path)
    study = load_study(study_path)  # a broken study file fails here, not at the sites
    admin = load_identity(kit.path / "admin.crt", kit.path / "admin.key")
    ca = load_certificate(kit.path / "ca.crt")
    check_issued_by(admin.cert, ca, f"admin certificate {kit.path / 'admin.crt'}")
    check_validity(admin.cert, f"admin certificate {kit.path / 'admin.crt'}")
    study_bytes = Path(study_path).read_bytes()
    fab = build_app_fab(app_dir)
    manifest = RunManifest(kit.consortium, study_digest(study_bytes), code_digest_from_fab(fab))
    signature = sign_manifest(manifest, admin.key)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        STUDY_B64_KEY: encode_study(study_bytes),
        SIGNATURE_KEY: signature,
        CONSORTIUM_KEY: kit.consortium,
        "out": str(out_dir),
    }
    run_dir = out_dir / study.name
    if resume is not None:
        run_dir = Path(resume).resolve()
        done = load_checkpoint(run_dir, study)  # no checkpoint, or another study's: one line, before anything is sent
        run_config["resume"] = str(run_dir)
        if on_line is not None:
            on_line(f"resuming study '{study.name}' after round {done.round} of {study.rounds} from {run_dir}")
    with tempfile.TemporaryDirectory(prefix="fedhelix-app-") as tmp:
        app = stage_app(fab, Path(tmp) / "app")
        home = flwr_home_for(kit.path / "ca.crt", kit.control_address, Path(tmp) / "flwr-home")
        command = [
            str(Path(sys.executable).parent / "flwr"), "run", str(app), CONNECTION, "--stream",
            "--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items()),
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
    if code != 0:
        raise FedhelixError(f"submitting study '{study.name}' to {kit.control_address} failed (flwr exit code {code}); see the lines above")
    # `flwr run --stream` exits 0 even when the ServerApp failed: the report is the verdict.
    report_path = run_dir / "report.json"
    if not report_path.exists():
        raise FedhelixError(f"study '{study.name}' ended without a report in {report_path.parent}; see the server's superlink.log")
    report = json.loads(report_path.read_text())
    if report.get("status") != "completed":
        raise FedhelixError(f"study '{study.name}' {report.get('status')}: {report.get('error') or 'see report.html'}")
    return Submission(run_id, run_dir, manifest, code)
