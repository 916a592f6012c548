"""A deployed study through the fast path: TLS SuperLink, authenticated fast SuperNodes, warm launchers."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.loopback import Loopback, write_tiny_study  # noqa: E402

pytestmark = pytest.mark.e2e


def test_two_round_study_runs_through_launchers_and_short_polls(tmp_path: Path) -> None:
    study, sites = write_tiny_study(tmp_path / "study", rounds=2)
    with Loopback(tmp_path / "deploy", sites, study, fast=True) as deployment:
        done = deployment.run(study, tmp_path / "runs", timeout=300)
        logs = deployment.logs()
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert done.returncode == 0 and report["status"] == "completed", done.stdout[-2000:] + logs
    assert len(report["rounds"]) == 2
    assert report["final"]["mean"]["accuracy"] > 0.5
    # Every ClientApp ran in a process forked by a launcher: handshake + 2 x (train, evaluate) per node.
    for index in range(len(sites)):
        launcher_log = (tmp_path / "deploy" / f"node{index}-launcher.log").read_text()
        assert len(re.findall(r"ClientApp task process \d+ done", launcher_log)) >= 5, launcher_log[-2000:]
        assert "exited with" not in launcher_log
