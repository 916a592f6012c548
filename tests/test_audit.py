"""The site's audit log: what left the site, hash-chained; any edit, removal or reordering is found."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.app import SiteClient
from client.audit import AuditError, AuditLog, audit_path, dp_rounds, payload_digest, verify
from shared.config import load_site, parse_study
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan


def fill(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path, "site-a")
    for i in range(n):
        arrays = [np.full((2, 3), i, dtype=np.float32), np.zeros(3, dtype=np.float32)]
        log.append(study="s", server_round=i, kind="update", arrays=arrays, metrics={"site": "site-a"}, l2_norm=float(i), epsilon=0.1 * i)
    return log


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_an_intact_log_verifies_with_a_summary(tmp_path: Path) -> None:
    fill(tmp_path / "a.jsonl")
    summary = verify(tmp_path / "a.jsonl")
    assert summary.entries == 5 and summary.kinds == {"update": 5} and summary.sites == ("site-a",)
    first = json.loads(lines(tmp_path / "a.jsonl")[0])
    assert first["shapes"] == [[2, 3], [3]] and first["prev"] == "0" * 64 and first["masked"] is False
    assert first["payload_sha256"] == payload_digest([np.zeros((2, 3), np.float32), np.zeros(3, np.float32)], {"site": "site-a"})


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda ls: ls[:2] + [ls[2].replace('"l2_norm": 2.0', '"l2_norm": 0.5')] + ls[3:], "entry 3 was edited"),
        (lambda ls: ls[:1] + ls[2:], "entry 3 where entry 2 was expected"),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "entry 3 where entry 2 was expected"),
        (lambda ls: ls[:-1], "newest entries removed"),
        (lambda ls: ls[:2] + ["{not json"] + ls[3:], "line 3: not an audit entry"),
    ],
    ids=["edited", "removed", "reordered", "truncated", "garbage"],
)
def test_tampering_is_detected_at_the_first_bad_entry(tmp_path: Path, tamper, expected: str) -> None:
    path = tmp_path / "a.jsonl"
    fill(path)
    path.write_text("\n".join(tamper(lines(path))) + "\n")
    with pytest.raises(AuditError, match=expected):
        verify(path)


def test_a_renumbered_entry_that_hides_a_removal_breaks_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path)
    kept = [json.loads(x) for x in lines(path)]
    del kept[1]
    for i, entry in enumerate(kept, start=1):
        entry["seq"] = i  # renumbered, but the hashes and links no longer match
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))
    with pytest.raises(AuditError, match="entry 2 does not follow entry 1"):
        verify(path)


def test_appends_continue_the_chain_across_log_objects(tmp_path: Path) -> None:
    fill(tmp_path / "a.jsonl", 2)
    AuditLog(tmp_path / "a.jsonl", "site-a").append(study="s", server_round=9, kind="metrics", metrics={"auc": 0.9})
    assert verify(tmp_path / "a.jsonl").entries == 3


def test_unwritable_log_refuses_to_send(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(AuditError, match="nothing was sent"):
        AuditLog(tmp_path / "dir", "site-a").append(study="s", server_round=1, kind="update")


def test_audit_path_prefers_simulation_dir_then_node_config_then_site_file(tmp_path: Path) -> None:
    assert audit_path("a", tmp_path / "a.toml", tmp_path / "sim") == tmp_path / "sim" / "a.audit.jsonl"
    assert audit_path("a", tmp_path / "a.toml", None, {"audit-log": str(tmp_path / "x.jsonl")}) == tmp_path / "x.jsonl"
    assert audit_path("a", tmp_path / "a.toml") == tmp_path / "a.audit.jsonl"


def test_every_reply_of_the_client_is_logged_with_norm_and_hash(root: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(root / "data" / "wdbc" / "hospital_a.csv")
    frame.to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "a.toml").write_text('[site]\nname = "a"\n[data]\npath = "a.csv"\nlabel = "malignant"\ndrop = ["patient_id"]\n')
    site = load_site(tmp_path / "a.toml")
    study = parse_study({"study": {"name": "audit", "task": "binary", "model": "logistic", "secure_aggregation": False, "local_steps": 3}, "sites": [{"name": "a", "config": "a.toml"}]})
    client = SiteClient(site)
    props = client.get_properties({PLAN_KEY: TrainingPlan.from_study(study).to_json()})
    plan = TrainingPlan.from_study(study, json.loads(props["features"]))
    weights = [np.zeros((1, 30), np.float32), np.zeros(1, np.float32)]
    delta, _, metrics = client.fit(weights, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})
    client.evaluate(weights, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})

    summary = verify(tmp_path / "a.audit.jsonl")
    assert summary.kinds == {"handshake": 1, "update": 1, "metrics": 1} and summary.studies == ("audit",)
    update = json.loads(lines(tmp_path / "a.audit.jsonl")[1])
    assert update["round"] == 1 and update["shapes"] == [[1, 30], [1]]
    assert update["l2_norm"] == pytest.approx(float(np.sqrt(sum((d.astype(np.float64) ** 2).sum() for d in delta))))
    assert update["payload_sha256"] == payload_digest(delta, metrics)


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path)
    ok = subprocess.run([sys.executable, "-m", "fedhelix.cli", "audit", "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "5 entries intact" in " ".join(ok.stdout.split())
    path.write_text("\n".join(lines(path)[:1] + lines(path)[2:]) + "\n")
    bad = subprocess.run([sys.executable, "-m", "fedhelix.cli", "audit", "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "line 2" in bad.stderr and "removed or reordered" in " ".join(bad.stderr.split())


def test_a_new_log_and_its_head_are_owner_only_even_with_an_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        fill(tmp_path / "a.jsonl", 2)
    finally:
        os.umask(old)
    for name in ("a.jsonl", "a.jsonl.head"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.head"]  # no temporary head left


def test_an_existing_log_keeps_working_and_keeps_its_mode(tmp_path: Path) -> None:
    """A log written before logs were owner-only: appends continue, nobody's access changes under them."""
    path = tmp_path / "a.jsonl"
    fill(path, 2)
    path.chmod(0o644)
    (tmp_path / "a.jsonl.head").chmod(0o640)
    (tmp_path / "a.jsonl.head.tmp").write_text("stale")  # left by a crash
    AuditLog(path, "site-a").append(study="s", server_round=3, kind="metrics")
    assert verify(path).entries == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and stat.S_IMODE((tmp_path / "a.jsonl.head").stat().st_mode) == 0o640


def test_dp_rounds_counts_this_sites_dp_updates_only(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    assert dp_rounds(path, "site-a") == 0  # no log yet
    fill(path, 3)  # DP updates (epsilon set)
    log = AuditLog(path, "site-a")
    log.append(study="s", server_round=4, kind="update")  # not DP
    log.append(study="s", server_round=4, kind="metrics", epsilon=1.0)  # not an update
    AuditLog(path, "site-b").append(study="s", server_round=1, kind="update", epsilon=0.2)  # another site
    assert dp_rounds(path, "site-a") == 3 and dp_rounds(path, "site-b") == 1 and dp_rounds(path, "site-c") == 0
    path.write_text(path.read_text() + "{torn line\n")
    with pytest.raises(AuditError, match="line 7: not an audit entry"):
        dp_rounds(path, "site-a")
