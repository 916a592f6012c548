"""The site's privacy ledger: persistence, composition, refusal, tamper evidence, and DP rounds at the client."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import client.app as client_app
import client.cli as cli
from client.app import SiteClient
from client.audit import AuditLog
from client.cli import ledger_show_command
from client.privacy.budget import open_ledger
from client.privacy.ledger import SCHEMA, BudgetRefused, LedgerEntry, LedgerError, PrivacyLedger, _digest, _head, _legacy_digest, default_key_path
from rich.console import Console
from shared.accounting import epsilon
from shared.config import SiteConfig, load_site, parse_site, parse_study
from shared.errors import ConfigError, FedhelixError
from shared.models import build_model
from shared.params import get_weights
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan

DELTA = 1e-5
# Noise multipliers >= 3 keep Opacus's RDP accountant fast.
STEP_A = (3.0, 0.1, 20)
STEP_B = (4.0, 0.05, 40)


@pytest.fixture(autouse=True, scope="module")
def _warm_torch():
    """The first optimiser of a process imports torch._dynamo (~1.5 s); keep it out of the timed tests."""
    import torch

    torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    yield


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def entry(study: str, rnd: int, step=STEP_A, eps: float = 0.0) -> LedgerEntry:
    sigma, q, steps = step
    return LedgerEntry(study, rnd, steps, q, sigma, 1.0, "rdp", DELTA, eps)


def log_dp_rounds(path: Path, site: str, n: int, epsilon: float | None = 0.5, kind: str = "update") -> None:
    log = AuditLog(path, site)
    for r in range(1, n + 1):
        log.append(study="study-a", server_round=r, kind=kind, epsilon=epsilon)


def filled(path: Path, site: str = "st-anne", n: int = 3) -> None:
    ledger = PrivacyLedger(path, site)
    for r in range(1, n + 1):
        ledger.record(entry("study-a", r))
    ledger.close()


# ----------------------------------------------------------------------------- creation and persistence


def test_created_on_first_use_with_a_log_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "nested" / "dir" / "st-anne.ledger.sqlite"
    with caplog.at_level(logging.INFO, logger="fedhelix.ledger"):
        ledger = PrivacyLedger(path, "st-anne")
    assert path.is_file()
    assert ledger.entries == [] and ledger.spent(DELTA) == 0.0
    assert any("created privacy ledger" in r.getMessage() and "st-anne" in r.getMessage() for r in caplog.records)
    ledger.close()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedhelix.ledger"):
        PrivacyLedger(path, "st-anne").close()  # reopening creates nothing
    assert not any("created privacy ledger" in r.getMessage() for r in caplog.records)


def test_record_then_reopen_keeps_entries_and_spending(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    ledger = PrivacyLedger(path, "st-anne")
    first = entry("study-a", 1, eps=0.5)
    ledger.record(first)
    ledger.record(entry("study-a", 2, eps=0.7))
    spent = ledger.spent(DELTA)
    ledger.close()

    reopened = PrivacyLedger(path, "st-anne")  # a restart: a fresh process, nothing in memory
    assert [(e.study, e.round) for e in reopened.entries] == [("study-a", 1), ("study-a", 2)]
    got = reopened.entries[0]
    assert got.created  # stamped on record
    assert dataclasses.replace(got, created="") == first
    assert reopened.spent(DELTA) == pytest.approx(spent)
    assert spent == pytest.approx(epsilon([STEP_A, STEP_A], DELTA)) and spent > 0
    reopened.close()


def test_spending_composes_across_studies(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    ledger = PrivacyLedger(path, "st-anne")
    ledger.record(entry("study-a", 1, STEP_A))
    ledger.record(entry("study-a", 2, STEP_A))
    after_a = ledger.spent(DELTA)
    assert ledger.would_spend(STEP_B, DELTA) == pytest.approx(epsilon([STEP_A, STEP_A, STEP_B], DELTA))
    ledger.record(entry("study-b", 1, STEP_B))
    ledger.close()

    both = PrivacyLedger(path, "st-anne").spent(DELTA)
    assert both == pytest.approx(epsilon([STEP_A, STEP_A, STEP_B], DELTA))
    assert both > after_a
    assert both > epsilon([STEP_B], DELTA)
    assert both > max(after_a, epsilon([STEP_B], DELTA)) + 0.01


# ----------------------------------------------------------------------------- budget check


def test_check_returns_the_epsilon_after_the_round_within_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite", "st-anne")
    ledger.record(entry("study-a", 1))
    after = ledger.check("study-a", 2, STEP_A, DELTA, "rdp", budget=100.0)
    assert after == pytest.approx(epsilon([STEP_A, STEP_A], DELTA))
    assert len(ledger.entries) == 1  # checking records nothing
    # a budget exactly at the would-spend value is still allowed
    assert ledger.check("study-a", 2, STEP_A, DELTA, "rdp", budget=after) == after
    ledger.close()


def test_check_over_budget_refuses_in_one_line_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = PrivacyLedger(path, "st-anne")
    ledger.record(entry("study-a", 1))
    would = epsilon([STEP_A, STEP_B], DELTA)
    budget = would - 0.05
    with pytest.raises(BudgetRefused) as info:
        ledger.check("study-b", 7, STEP_B, DELTA, "rdp", budget=budget)
    message = str(info.value)
    assert "\n" not in message and message.startswith("fedhelix:")
    assert "site 'st-anne'" in message
    assert "round 7" in message
    assert "study 'study-b'" in message
    assert f"epsilon={would:.3f}" in message
    assert f"budget {budget:g}" in message
    assert "nothing was trained or sent" in message
    assert len(ledger.entries) == 1
    ledger.close()
    assert len(PrivacyLedger(path, "st-anne").entries) == 1


# ----------------------------------------------------------------------------- tamper evidence


def tamper(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    for sql in statements:
        db.execute(sql)
    db.close()


TAMPERS = {
    "edit a body": ["UPDATE entries SET body = replace(body, '\"noise_multiplier\": 3.0', '\"noise_multiplier\": 30.0') WHERE seq = 2"],
    "edit a body and forge its hash": [
        "UPDATE entries SET body = replace(body, '\"steps\": 20', '\"steps\": 2') WHERE seq = 1",
        "UPDATE entries SET hash = '" + "f" * 64 + "' WHERE seq = 1",
    ],
    "delete the last entry": ["DELETE FROM entries WHERE seq = 3"],
    "delete the last entry and fix the count": ["DELETE FROM entries WHERE seq = 3", "UPDATE meta SET value = '2' WHERE key = 'count'"],
    "delete the last entry and fix count and head": [  # the old, unkeyed ledger's stated limit
        "DELETE FROM entries WHERE seq = 3",
        "UPDATE meta SET value = '2' WHERE key = 'count'",
        "UPDATE meta SET value = (SELECT hash FROM entries WHERE seq = 2) WHERE key = 'head'",
    ],
    "delete the first entry": ["DELETE FROM entries WHERE seq = 1", "UPDATE meta SET value = '2' WHERE key = 'count'"],
    "delete every entry": ["DELETE FROM entries", "UPDATE meta SET value = '0' WHERE key = 'count'"],
    "drop the entries table": ["DROP TABLE entries"],
    "reorder seq values": [
        "UPDATE entries SET seq = 100 WHERE seq = 1",
        "UPDATE entries SET seq = 1 WHERE seq = 2",
        "UPDATE entries SET seq = 2 WHERE seq = 100",
    ],
    "renumber seq values": ["UPDATE entries SET seq = seq + 10"],
    "remove the site": ["DELETE FROM meta WHERE key = 'site'"],
    "change the site": ["UPDATE meta SET value = 'st-other' WHERE key = 'site'"],
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampering_is_an_error_never_a_reset(tmp_path: Path, case: str) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    tamper(path, *TAMPERS[case])
    with pytest.raises(LedgerError) as info:
        PrivacyLedger(path, "st-anne")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    # still refused on the next attempt: nothing was reset or repaired
    with pytest.raises(LedgerError):
        PrivacyLedger(path, "st-anne")


def rechain(path: Path, digest, head, edit=lambda body: body) -> None:
    """What the attacker did: edit bodies, recompute every link and the stored head and count."""
    db = sqlite3.connect(path, isolation_level=None)
    site = db.execute("SELECT value FROM meta WHERE key = 'site'").fetchone()[0]
    prev = "0" * 64
    rows = db.execute("SELECT seq, body FROM entries ORDER BY seq").fetchall()
    for seq, body in rows:
        body = edit(body)
        h = digest(prev, body)
        db.execute("UPDATE entries SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?", (body, prev, h, seq))
        prev = h
    db.execute("UPDATE meta SET value = ? WHERE key = 'head'", (head(site, len(rows), prev),))
    db.close()


def fewer_steps(body: str) -> str:
    edited = body.replace('"steps": 20', '"steps": 1')
    assert edited != body
    return edited


def test_the_attack_edit_and_rechain_with_plain_sha256_is_refused(tmp_path: Path) -> None:
    """The reviewer's attack: every entry edited down and the chain recomputed with SHA-256."""
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    spent = PrivacyLedger(path, "st-anne").spent(DELTA)
    rechain(path, _legacy_digest, lambda site, n, last: last, fewer_steps)
    with pytest.raises(LedgerError, match="modified at entry 1") as info:
        PrivacyLedger(path, "st-anne")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # the same re-chain without editing anything is refused too: only the key makes a valid chain
    filled(other := tmp_path / "other" / "st-anne.ledger.sqlite")
    rechain(other, _legacy_digest, lambda site, n, last: last)
    with pytest.raises(LedgerError):
        PrivacyLedger(other, "st-anne")
    assert spent > 0


def test_the_attack_with_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    wrong = bytes(32)
    rechain(path, lambda prev, body: _digest(wrong, prev, body), lambda site, n, last: _head(wrong, site, n, last), fewer_steps)
    with pytest.raises(LedgerError, match="modified at entry 1"):
        PrivacyLedger(path, "st-anne")


def test_the_same_rechain_under_the_right_key_verifies(tmp_path: Path) -> None:
    """Control for the two attacks above: the rechain helper itself builds valid chains given the key."""
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    key = bytes.fromhex(default_key_path(path).read_text())
    rechain(path, lambda prev, body: _digest(key, prev, body), lambda site, n, last: _head(key, site, n, last), fewer_steps)
    assert [e.steps for e in PrivacyLedger(path, "st-anne").entries] == [1, 1, 1]


def test_truncation_with_a_reused_old_head_is_refused(tmp_path: Path) -> None:
    """Removing the newest entry and restoring the head the ledger had before it: the head binds the count."""
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path, n=2)
    db = sqlite3.connect(path)
    old_head = db.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()[0]
    db.close()
    ledger = PrivacyLedger(path, "st-anne")
    ledger.record(entry("study-a", 3))
    ledger.close()
    tamper(path, "DELETE FROM entries WHERE seq = 3", "UPDATE meta SET value = '2' WHERE key = 'count'", f"UPDATE meta SET value = '{old_head}' WHERE key = 'head'")
    assert len(PrivacyLedger(path, "st-anne").entries) == 2  # an exact earlier state verifies on its own...
    audit = tmp_path / "st-anne.audit.jsonl"
    log_dp_rounds(audit, "st-anne", 3)
    with pytest.raises(LedgerError, match="holds 2 entries while the audit log .* records 3 DP round"):
        PrivacyLedger(path, "st-anne", audit_log=audit)  # ...but not against the audit log


def test_tampering_between_open_and_record_is_caught_at_record(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    ledger = PrivacyLedger(path, "st-anne")
    tamper(path, "DELETE FROM entries WHERE seq = 3")
    with pytest.raises(LedgerError):
        ledger.record(entry("study-a", 4))
    ledger.close()
    with pytest.raises(LedgerError):
        PrivacyLedger(path, "st-anne")


@pytest.mark.parametrize("content", [b"this is not a database\n" * 50, bytes(range(256)) * 16])
def test_a_garbage_file_is_an_error_and_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    path.write_bytes(content)
    with pytest.raises(LedgerError) as info:
        PrivacyLedger(path, "st-anne")
    message = str(info.value)
    assert "st-anne" in message and str(path) in message and "never delete" in message
    assert path.read_bytes() == content


def test_an_empty_file_is_not_a_fresh_ledger(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    path.write_bytes(b"")
    with pytest.raises(LedgerError):
        PrivacyLedger(path, "st-anne")


def test_a_ledger_of_another_site_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shared.ledger.sqlite"
    filled(path, site="st-anne")
    with pytest.raises(LedgerError) as info:
        PrivacyLedger(path, "st-bart")
    assert "st-anne" in str(info.value) and "st-bart" in str(info.value)
    assert len(PrivacyLedger(path, "st-anne").entries) == 3  # the owner's ledger is intact


def test_an_untouched_ledger_verifies(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path, n=4)
    assert [e.round for e in PrivacyLedger(path, "st-anne").entries] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- SiteClient.fit under DP


def write_binary_site(tmp_path: Path, name: str = "st-clare", n: int = 100, privacy: dict | None = None):
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    frame["y"] = (frame["a"] - frame["b"] + 0.5 * rng.normal(size=n) > 0).astype(int)
    frame.to_csv(tmp_path / f"{name}.csv", index=False)
    doc = {"site": {"name": name}, "data": {"path": f"{name}.csv", "label": "y"}}
    if privacy is not None:
        doc["privacy"] = privacy
    return parse_site(doc, source=f"{name}.toml", base_dir=tmp_path)


def dp_plan(name: str = "dp-study", rounds: int = 2, target: float = 1.0) -> TrainingPlan:
    study = parse_study(
        {
            "study": {
                "name": name, "task": "binary", "model": "logistic", "rounds": rounds,
                "local_steps": 25, "batch_size": 8, "learning_rate": 0.1, "seed": 3,
            },
            "privacy": {"dp": True, "target_epsilon": target, "max_grad_norm": 1.0, "reproducible_noise": True},
            "sites": [{"name": "st-clare", "config": "st-clare.toml"}],
        },
        source="study.toml",
    )  # fmt: skip
    return TrainingPlan.from_study(study)


def site_audit(directory: Path) -> AuditLog:
    """The test's own audit log: a site parsed without a file would log into the working directory."""
    return AuditLog(directory / "st-clare.audit.jsonl", "st-clare")


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = client_app.train

    def spy(model, data, plan, server_round, dp=None):
        calls.append(server_round)
        return real(model, data, plan, server_round, dp=dp)

    monkeypatch.setattr(client_app, "train", spy)
    return calls


def ledger_rows(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    finally:
        db.close()


def test_dp_fit_records_each_round_and_refuses_past_the_budget(tmp_path: Path, train_calls: list[int]) -> None:
    site = write_binary_site(tmp_path, privacy={"ledger": "ledgers/st-clare.sqlite", "epsilon_budget": 1.0, "delta": 1e-5})
    ledger_path = tmp_path / "ledgers" / "st-clare.sqlite"
    assert site.privacy.ledger == ledger_path.resolve()
    plan = dp_plan(rounds=2, target=1.0)
    weights = get_weights(build_model("logistic", "binary", 3, seed=1))

    results = []
    for rnd in (1, 2):
        delta, n, metrics = SiteClient(site, simulation=True, audit=site_audit(tmp_path)).fit([w.copy() for w in weights], {PLAN_KEY: plan.to_json(), ROUND_KEY: rnd})
        assert ledger_rows(ledger_path) == rnd  # exactly one entry per round
        assert n == 80
        assert any(np.abs(d).sum() > 0 for d in delta)
        assert "train_loss" not in metrics  # no un-noised statistic of the private rows
        results.append(metrics)
    assert train_calls == [1, 2]
    eps = [m["epsilon"] for m in results]
    assert 0 < eps[0] < eps[1] <= 1.0
    assert eps[1] >= 0.95  # the planned rounds use (nearly) the whole target
    sigma = results[0]["noise_multiplier"]
    assert sigma > 0 and results[1]["noise_multiplier"] == sigma
    assert all(m["sample_rate"] == pytest.approx(8 / 80) and m["delta"] == 1e-5 and m["epsilon_budget"] == 1.0 for m in results)

    ledger = PrivacyLedger(ledger_path, "st-clare")
    assert [(e.study, e.round, e.steps) for e in ledger.entries] == [("dp-study", 1, 25), ("dp-study", 2, 25)]
    assert [e.epsilon_after for e in ledger.entries] == pytest.approx(eps)
    assert ledger.spent(1e-5) == pytest.approx(eps[1])
    ledger.close()

    # a third round (beyond the plan) would exceed the site's budget: refused before training
    with pytest.raises(BudgetRefused) as info:
        SiteClient(site, simulation=True, audit=site_audit(tmp_path)).fit([w.copy() for w in weights], {PLAN_KEY: plan.to_json(), ROUND_KEY: 3})
    message = str(info.value)
    assert "site 'st-clare'" in message and "round 3" in message and "study 'dp-study'" in message
    assert ledger_rows(ledger_path) == 2
    assert train_calls == [1, 2]

    # another study at the same site composes with the first: its very first round is refused
    other = dp_plan(name="other-study", rounds=2, target=1.0)
    with pytest.raises(BudgetRefused) as info:
        SiteClient(site, simulation=True, audit=site_audit(tmp_path)).fit([w.copy() for w in weights], {PLAN_KEY: other.to_json(), ROUND_KEY: 1})
    assert "study 'other-study'" in str(info.value) and "round 1" in str(info.value)
    assert ledger_rows(ledger_path) == 2
    assert train_calls == [1, 2]


def test_dp_fit_is_reproducible_with_reproducible_noise(tmp_path: Path) -> None:
    plan = dp_plan(rounds=2, target=1.0)
    weights = get_weights(build_model("logistic", "binary", 3, seed=1))
    deltas = []
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        site = write_binary_site(tmp_path / sub, privacy={"epsilon_budget": 5.0, "delta": 1e-5})
        assert site.privacy.ledger == (tmp_path / sub / "st-clare.ledger.sqlite").resolve()  # the default name
        deltas.append(SiteClient(site, simulation=True, audit=site_audit(tmp_path / sub)).fit(weights, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})[0])
        assert ledger_rows(site.privacy.ledger) == 1
    assert all(np.array_equal(a, b) for a, b in zip(*deltas))


def test_dp_study_at_a_site_without_privacy_section_is_a_config_error(tmp_path: Path, train_calls: list[int]) -> None:
    site = write_binary_site(tmp_path, privacy=None)
    plan = dp_plan()
    weights = get_weights(build_model("logistic", "binary", 3, seed=1))
    with pytest.raises(ConfigError) as info:
        SiteClient(site, simulation=True, audit=site_audit(tmp_path)).fit(weights, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})
    message = str(info.value)
    assert "site 'st-clare'" in message and "[privacy]" in message and "epsilon_budget" in message
    assert "\n" not in message
    assert train_calls == []
    assert not list(tmp_path.rglob("*.sqlite"))


# ----------------------------------------------------------------------------- study config under DP


def survival_study(model: str, dp: bool = True, time_bins: list | None = None) -> dict:
    doc = {
        "study": {"name": "surv", "task": "survival", "model": model},
        "privacy": {"dp": dp},
        "sites": [{"name": "a", "config": "a.toml"}],
    }
    if time_bins is not None:
        doc["model"] = {"time_bins": time_bins}
    return doc


@pytest.mark.parametrize("model", ["cox", "mlp"])
def test_dp_survival_with_a_risk_set_model_is_refused(model: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_study(survival_study(model), source="surv.toml")
    message = str(info.value)
    assert "surv.toml" in message and f"'{model}'" in message
    assert "risk set" in message
    assert 'model = "hazard"' in message
    assert "\n" not in message
    parse_study(survival_study(model, dp=False), source="surv.toml")  # fine without DP


def test_hazard_needs_time_bins() -> None:
    for dp in (True, False):
        with pytest.raises(ConfigError, match="time_bins"):
            parse_study(survival_study("hazard", dp=dp), source="surv.toml")


def test_dp_hazard_with_time_bins_parses() -> None:
    study = parse_study(survival_study("hazard", time_bins=[365, 730, 1825]), source="surv.toml")
    assert study.model == "hazard" and study.privacy.dp
    assert study.model_options.time_bins == (365.0, 730.0, 1825.0)
    plan = TrainingPlan.from_json(TrainingPlan.from_study(study).to_json())
    assert plan.model_options.time_bins == (365.0, 730.0, 1825.0) and plan.privacy.dp


def test_reproducible_noise_is_refused_outside_a_simulation(tmp_path: Path, train_calls: list[int]) -> None:
    """The coordinator could predict (and subtract) seeded noise: a real node refuses before training."""
    site = write_binary_site(tmp_path, privacy={"epsilon_budget": 5.0, "delta": 1e-5})
    weights = get_weights(build_model("logistic", "binary", 3, seed=1))
    with pytest.raises(ConfigError, match="reproducible DP noise"):
        SiteClient(site, audit=site_audit(tmp_path)).fit(weights, {PLAN_KEY: dp_plan().to_json(), ROUND_KEY: 1})
    assert train_calls == [] and not site.privacy.ledger.exists()


# ----------------------------------------------------------------------------- the key, the audit log, file modes


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """A umask of 0: the files must be 0600 by how they are created, not by the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_ledger_key_and_journals_are_owner_only_even_with_an_open_umask(tmp_path: Path, open_umask) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path, n=1)
    key = tmp_path / "st-anne.ledger.sqlite.key"
    assert default_key_path(path) == key
    assert mode(path) == 0o600 and mode(key) == 0o600
    assert len(bytes.fromhex(key.read_text())) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, key.name]  # no temporary file left behind
    db = sqlite3.connect(path, isolation_level=None)  # a write in progress: SQLite's rollback journal
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO meta VALUES ('probe', 'x')")
    journal = tmp_path / (path.name + "-journal")
    assert journal.exists() and mode(journal) == 0o600
    db.execute("ROLLBACK")
    db.execute("PRAGMA journal_mode=WAL")
    ledger = PrivacyLedger(path, "st-anne")
    ledger.record(entry("study-a", 2))
    wal = tmp_path / (path.name + "-wal")
    assert wal.exists() and mode(wal) == 0o600
    ledger.close()
    db.close()


def test_two_ledgers_get_two_keys(tmp_path: Path) -> None:
    filled(tmp_path / "a" / "l.sqlite")
    filled(tmp_path / "b" / "l.sqlite")
    assert (tmp_path / "a" / "l.sqlite.key").read_text() != (tmp_path / "b" / "l.sqlite.key").read_text()


def test_a_missing_key_is_refused_and_never_regenerated(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    key = default_key_path(path)
    key.unlink()
    for _ in range(2):
        with pytest.raises(LedgerError) as info:
            PrivacyLedger(path, "st-anne")
        message = str(info.value)
        assert str(key) in message and "missing" in message and "restore the key" in message and "\n" not in message
        assert not key.exists()


def test_an_empty_ledger_without_its_key_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    PrivacyLedger(path, "st-anne").close()
    default_key_path(path).unlink()
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger(path, "st-anne")


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    key = default_key_path(path)
    key.chmod(0o644)
    with pytest.raises(LedgerError, match=f"readable by other users; run `chmod 600 {key}`"):
        PrivacyLedger(path, "st-anne")
    key.chmod(0o640)
    with pytest.raises(LedgerError, match="readable by other users"):
        PrivacyLedger(path, "st-anne")
    key.chmod(0o600)
    assert len(PrivacyLedger(path, "st-anne").entries) == 3


def test_a_group_readable_key_is_not_used_to_create_a_ledger(tmp_path: Path) -> None:
    key = tmp_path / "st-anne.ledger.sqlite.key"
    key.write_text(bytes(32).hex())
    key.chmod(0o644)
    with pytest.raises(LedgerError, match="readable by other users"):
        PrivacyLedger(tmp_path / "st-anne.ledger.sqlite", "st-anne")
    assert not (tmp_path / "st-anne.ledger.sqlite").exists()


@pytest.mark.parametrize("content", ["", "zz" * 32, "00" * 16])
def test_a_malformed_key_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    key = default_key_path(path)
    key.write_text(content)
    with pytest.raises(LedgerError, match="not a fedhelix ledger key"):
        PrivacyLedger(path, "st-anne")


def test_another_key_for_the_same_ledger_is_refused(tmp_path: Path) -> None:
    """A key swapped in (a new key, or another site's) cannot verify the ledger."""
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    filled(tmp_path / "other" / "st-anne.ledger.sqlite")
    default_key_path(path).write_text((tmp_path / "other" / "st-anne.ledger.sqlite.key").read_text())
    with pytest.raises(LedgerError, match="modified at entry 1"):
        PrivacyLedger(path, "st-anne")


def test_a_key_elsewhere_is_used_and_none_is_made_beside_the_ledger(tmp_path: Path) -> None:
    path, key = tmp_path / "ledgers" / "l.sqlite", tmp_path / "keys" / "l.key"
    ledger = PrivacyLedger(path, "st-anne", key)
    ledger.record(entry("study-a", 1))
    ledger.close()
    assert key.is_file() and mode(key) == 0o600 and not default_key_path(path).exists()
    assert len(PrivacyLedger(path, "st-anne", key).entries) == 1
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger(path, "st-anne")  # the default place holds no key: never a fresh one for an existing ledger


def test_a_deleted_ledger_is_refused_while_the_audit_log_records_dp_rounds(tmp_path: Path) -> None:
    path, audit = tmp_path / "st-anne.ledger.sqlite", tmp_path / "st-anne.audit.jsonl"
    filled(path, n=2)
    log_dp_rounds(audit, "st-anne", 2)
    assert len(PrivacyLedger(path, "st-anne", audit_log=audit).entries) == 2
    path.unlink()
    default_key_path(path).unlink()  # the key gone too: still no fresh start
    for _ in range(2):
        with pytest.raises(LedgerError) as info:
            PrivacyLedger(path, "st-anne", audit_log=audit)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and str(audit) in message
        assert "missing while the audit log" in message and "records 2 DP round(s)" in message and "restore" in message
        assert not path.exists() and not default_key_path(path).exists()  # nothing created


def test_a_fresh_site_starts_with_no_or_an_empty_or_a_non_dp_audit_log(tmp_path: Path) -> None:
    audit = tmp_path / "st-anne.audit.jsonl"
    PrivacyLedger(tmp_path / "1.sqlite", "st-anne", audit_log=audit).close()  # no log at all
    audit.write_text("")
    PrivacyLedger(tmp_path / "2.sqlite", "st-anne", audit_log=audit).close()  # an empty log
    log_dp_rounds(audit, "st-anne", 2, epsilon=None)  # updates without DP
    log_dp_rounds(audit, "st-anne", 1, epsilon=None, kind="handshake")
    log_dp_rounds(audit, "st-bart", 3)  # DP rounds of another site sharing the file
    PrivacyLedger(tmp_path / "3.sqlite", "st-anne", audit_log=audit).close()
    log_dp_rounds(audit, "st-anne", 1)  # control: one DP round of this site is enough to refuse
    with pytest.raises(LedgerError, match="records 1 DP round"):
        PrivacyLedger(tmp_path / "4.sqlite", "st-anne", audit_log=audit)


def test_an_unreadable_audit_log_refuses_a_fresh_ledger(tmp_path: Path) -> None:
    audit = tmp_path / "st-anne.audit.jsonl"
    audit.write_text("{not json\n")
    with pytest.raises(FedhelixError, match="cannot be counted"):
        PrivacyLedger(tmp_path / "l.sqlite", "st-anne", audit_log=audit)
    assert not (tmp_path / "l.sqlite").exists()


# ----------------------------------------------------------------------------- ledgers written before the key


def write_old_format(path: Path, site: str = "st-anne", n: int = 3) -> list[LedgerEntry]:
    """A ledger as the previous fedhelix wrote it: plain SHA-256 chain, no key, no format."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA)
    prev, entries = "0" * 64, []
    for r in range(1, n + 1):
        e = dataclasses.replace(entry("study-a", r), created=f"2024-01-0{r}T00:00:00+0000")
        body = json.dumps(dataclasses.asdict(e), sort_keys=True)
        digest = _legacy_digest(prev, body)
        db.execute("INSERT INTO entries VALUES (?, ?, ?, ?)", (r, body, prev, digest))
        prev, entries = digest, [*entries, e]
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("site", site), ("head", prev), ("count", str(n))])
    db.close()
    return entries


def test_an_old_format_ledger_is_verified_then_rekeyed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    old = write_old_format(path)
    with caplog.at_level(logging.WARNING, logger="fedhelix.ledger"):
        ledger = PrivacyLedger(path, "st-anne")
    assert ledger.entries == old
    assert any("re-keyed" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    key = default_key_path(path)
    assert key.is_file() and mode(key) == 0o600
    ledger.record(entry("study-a", 4))
    ledger.close()
    assert [e.round for e in PrivacyLedger(path, "st-anne").entries] == [1, 2, 3, 4]
    # now keyed: the old unkeyed chain is no longer accepted
    rechain(path, _legacy_digest, lambda site, n, last: last)
    with pytest.raises(LedgerError):
        PrivacyLedger(path, "st-anne")


def test_a_tampered_old_format_ledger_is_refused_and_not_rekeyed(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    write_old_format(path)
    tamper(path, "UPDATE entries SET body = replace(body, '\"steps\": 20', '\"steps\": 2') WHERE seq = 2")
    with pytest.raises(LedgerError, match="modified at entry 2"):
        PrivacyLedger(path, "st-anne")
    assert not default_key_path(path).exists()


def test_an_old_format_ledger_beside_an_existing_key_is_refused(tmp_path: Path) -> None:
    """Downgrading a keyed ledger to an unkeyed copy while the key is there is not a migration."""
    path = tmp_path / "st-anne.ledger.sqlite"
    filled(path)
    key = default_key_path(path).read_text()
    path.unlink()
    write_old_format(path, n=1)
    with pytest.raises(LedgerError, match="old-format"):
        PrivacyLedger(path, "st-anne")
    assert default_key_path(path).read_text() == key


def test_a_rolled_back_old_format_ledger_is_refused_against_the_audit_log(tmp_path: Path) -> None:
    """Key deleted and an older unkeyed copy put back: the audit log still counts the rounds."""
    path, audit = tmp_path / "st-anne.ledger.sqlite", tmp_path / "st-anne.audit.jsonl"
    write_old_format(path, n=1)
    log_dp_rounds(audit, "st-anne", 3)
    with pytest.raises(LedgerError, match="holds 1 entries while the audit log"):
        PrivacyLedger(path, "st-anne", audit_log=audit)


def test_read_only_open_neither_creates_nor_rekeys(tmp_path: Path) -> None:
    path = tmp_path / "st-anne.ledger.sqlite"
    with pytest.raises(LedgerError, match="not found"):
        PrivacyLedger(path, "st-anne", readonly=True)
    assert not path.exists() and not default_key_path(path).exists()
    old = write_old_format(path)
    before = path.read_bytes()
    ledger = PrivacyLedger(path, "st-anne", readonly=True)
    assert ledger.entries == old
    with pytest.raises(LedgerError, match="read-only"):
        ledger.record(entry("study-a", 4))
    ledger.close()
    assert path.read_bytes() == before and not default_key_path(path).exists()


# ----------------------------------------------------------------------------- site file, open_ledger, ledger show


def test_ledger_key_in_the_site_file_is_relative_to_it(tmp_path: Path) -> None:
    site = write_binary_site(tmp_path, privacy={"epsilon_budget": 5.0, "delta": 1e-5, "ledger_key": "secrets/clare.key"})
    assert site.privacy.ledger_key == (tmp_path / "secrets" / "clare.key").resolve()
    assert write_binary_site(tmp_path, privacy={"epsilon_budget": 5.0, "delta": 1e-5}).privacy.ledger_key is None
    with pytest.raises(ConfigError, match="ledger_key"):
        write_binary_site(tmp_path, privacy={"epsilon_budget": 5.0, "delta": 1e-5, "ledger_key": 3})


def site_file(tmp_path: Path, extra: str = "") -> SiteConfig:
    (tmp_path / "st-anne.toml").write_text(
        f'[site]\nname = "st-anne"\n[data]\npath = "d.csv"\nlabel = "y"\n[privacy]\nepsilon_budget = 5.0\ndelta = 1e-5\n{extra}'
    )
    return load_site(tmp_path / "st-anne.toml")


def test_open_ledger_uses_the_configured_key_and_the_audit_log_beside_the_site_file(tmp_path: Path) -> None:
    site = site_file(tmp_path, 'ledger_key = "keys/anne.key"\n')
    ledger, budget = open_ledger(site)
    ledger.record(entry("study-a", 1))
    ledger.close()
    assert budget == 5.0 and (tmp_path / "keys" / "anne.key").is_file() and not default_key_path(site.privacy.ledger).exists()
    log_dp_rounds(tmp_path / "st-anne.audit.jsonl", "st-anne", 1)  # where the node writes it by default
    open_ledger(site)[0].close()
    site.privacy.ledger.unlink()
    with pytest.raises(LedgerError, match="missing while the audit log"):
        open_ledger(site)


def test_open_ledger_in_a_simulation_checks_the_simulations_audit_log(tmp_path: Path) -> None:
    site = site_file(tmp_path)
    log_dp_rounds(tmp_path / "st-anne.audit.jsonl", "st-anne", 2)  # the real site's log: not the simulation's business
    run = tmp_path / "run"
    ledger, _ = open_ledger(site, run / "ledgers", run / "audit" / "st-anne.audit.jsonl")
    ledger.record(entry("study-a", 1))
    ledger.close()
    assert (run / "ledgers" / "st-anne.ledger.sqlite.key").is_file()  # a relocated ledger keeps its own key
    assert not site.privacy.ledger.exists() and not default_key_path(site.privacy.ledger).exists()
    log_dp_rounds(run / "audit" / "st-anne.audit.jsonl", "st-anne", 1)
    (run / "ledgers" / "st-anne.ledger.sqlite").unlink()
    with pytest.raises(LedgerError, match="missing while the audit log"):
        open_ledger(site, run / "ledgers", run / "audit" / "st-anne.audit.jsonl")
    open_ledger(site, run / "ledgers")[0].close()  # the old call without the log: relocated ledgers are not checked


def test_ledger_show_reads_the_keyed_ledger(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=300))
    site = site_file(tmp_path, 'ledger_key = "anne.key"\n')
    ledger, _ = open_ledger(site)
    ledger.record(entry("study-a", 1))
    ledger.close()
    ledger_show_command(site.path)
    out = capsys.readouterr().out
    assert "study-a" in out and "spent epsilon" in out
    (tmp_path / "anne.key").chmod(0o644)
    with pytest.raises(LedgerError, match="readable by other users"):
        ledger_show_command(site.path)
    (tmp_path / "anne.key").chmod(0o600)
    log_dp_rounds(tmp_path / "st-anne.audit.jsonl", "st-anne", 1)
    site.privacy.ledger.unlink()
    with pytest.raises(LedgerError, match="missing while the audit log"):  # never "no ledger yet, nothing spent"
        ledger_show_command(site.path)
