"""The repo is a valid Flower app: `flwr run .` runs the bundled study on Flower's local simulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.flower_env import apply_flower_env
from shared.paths import DEFAULT_STUDY

pytestmark = pytest.mark.e2e


def _stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves a detached local SuperLink running: stop the one this test started."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            os.kill(int(proc.name), signal.SIGTERM)


def test_flwr_run_dot_runs_the_bundled_study(root: Path, tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr_home"
    env = apply_flower_env(dict(os.environ))
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    out = tmp_path / "runs"
    command = [
        str(Path(sys.executable).parent / "flwr"), "run", ".", "local", "--stream",
        "--federation-config", "num-supernodes=6 client-resources-num-cpus=1",
        "--run-config", f"study='{DEFAULT_STUDY}' out='{out}'",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=420)
    finally:
        _stop_local_superlink(flwr_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "tcga-brca" / "report.json").read_text())
    assert report["status"] == "completed"
    assert len(report["rounds"]) == 5
    assert report["final"]["mean"]["c_index"] >= 0.80
