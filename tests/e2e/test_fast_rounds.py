"""A deployed study through the fast path as a hospital runs it: `fedhelix server`, three `fedhelix node`, `fedhelix run`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.round_overhead import SITES, Consortium, write_tiny_study  # noqa: E402

pytestmark = pytest.mark.e2e


def test_two_round_study_runs_through_woken_launchers_and_short_polls(tmp_path: Path) -> None:
    study = write_tiny_study(tmp_path / "sites", rounds=2)
    with Consortium(tmp_path / "deploy", fast=True, studies=[study]) as deployment:
        submission = deployment.run(study, tmp_path / "runs", timeout_s=300)
    report = json.loads((submission.out_dir / "report.json").read_text())
    assert report["status"] == "completed" and len(report["rounds"]) == 2
    assert report["final"]["mean"]["accuracy"] > 0.5
    # Every ClientApp ran in a process forked by the node's launcher: handshake + 2 x (train, evaluate).
    for name in SITES:
        log = (tmp_path / "deploy" / f"node-{name}.log").read_text(errors="replace")
        assert "and on each wake-up from the SuperNode" in log, log[-2000:]  # the SuperNode wakes it
        assert len(re.findall(r"ClientApp task process \d+ done", log)) >= 5, log[-2000:]
        assert "exited with" not in log
        assert f"study 'tiny' approved" in log  # the approval gate ran on this path
