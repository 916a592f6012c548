"""A hostile coordinator against real sites in a Flower simulation: every attack refused at the site.

The ServerApp of :mod:`tests.e2e.hostile` sends crafted plans, extra rounds, fits and
evaluations, error-provoking configs and malformed weights to the real ClientApp of
each site of the WDBC DP study. Each attack must come back as sealed refusals only
(a code and a fixed phrase from every site, no content, none of the site's column
names), each refusal must be in the site's audit log, and no privacy budget may be
spent beyond the one fit the schedule allows. Against a secure study the coordinator
also attacks the SecAgg+ protocol itself: each such attack must be refused by every
targeted site with E150 for the attack's own reason (the site's full log says which),
and the only updates that left were masked, one per round of the schedule.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from client.audit import verify
from client.privacy.ledger import PrivacyLedger
from shared.config import load_study

from .hostile import ATTACKS, SECAGG_REASONS, SECURE_ATTACKS, Outcome, run_in_simulation, secagg_reasons_logged, wdbc_dp_study

pytestmark = pytest.mark.e2e


def _check(outcomes: list[Outcome], sites: list[str], audit_dir: Path) -> None:
    assert outcomes, "no attack ran"
    for outcome in outcomes:
        assert outcome.refused, f"{outcome.name}: {outcome.leaked or 'nothing sent'}"
        assert all(code.startswith("E1") for code in outcome.codes)
    tried = sum(o.sent for o in outcomes)
    for site in sites:
        log = audit_dir / f"{site}.audit.jsonl"
        summary = verify(log)
        errors = [json.loads(line) for line in log.read_text().splitlines() if json.loads(line)["kind"] == "error"]
        assert len(errors) >= tried // len(sites), f"{site}: {len(errors)} refusals logged for {tried // len(sites)} attacks"
        assert summary.kinds.get("error") == len(errors)
        full = (audit_dir / f"{site}.errors.log").read_text()
        assert re.search(r"E130 .*site '[\w]+' refused", full), "the site's own log keeps the whole line"


def test_hostile_coordinator_against_a_plain_dp_study(root: Path, tmp_path: Path) -> None:
    study = load_study(wdbc_dp_study(root, tmp_path, secure=False))
    outcomes = run_in_simulation(study, str(tmp_path / "ledgers"), str(tmp_path / "audit"), ATTACKS)
    sites = [s.name for s in study.sites]
    _check(outcomes, sites, tmp_path / "audit")
    by_name = {o.name: o for o in outcomes}
    assert set(by_name["plan_dp_off"].codes) == {"E130"}
    full = (tmp_path / "audit" / f"{sites[0]}.errors.log").read_text()
    assert re.search(r"E130 .*differs from the approved study in .*privacy", full), "the site's log names what differed"
    assert set(by_name["repeated_fit"].codes) == {"E140"} and by_name["repeated_fit"].sent == 2 * len(sites)
    assert set(by_name["counting_oracle"].codes) == {"E140"} and by_name["counting_oracle"].sent == 20 * len(sites)
    for site in sites:  # the one scheduled fit was charged; nothing else
        ledger = PrivacyLedger(tmp_path / "ledgers" / f"{site}.ledger.sqlite", site)
        assert [(e.study, e.round) for e in ledger.entries] == [(study.name, 2)]
        ledger.close()


def test_hostile_coordinator_against_a_secure_dp_study(root: Path, tmp_path: Path) -> None:
    study = load_study(wdbc_dp_study(root, tmp_path, secure=True))
    audit = tmp_path / "audit"
    outcomes = run_in_simulation(study, str(tmp_path / "ledgers"), str(audit), SECURE_ATTACKS)
    sites = [s.name for s in study.sites]
    _check(outcomes, sites, audit)
    by_name = {o.name: o for o in outcomes}
    assert set(by_name["plain_fit_for_a_secure_study"].codes) == {"E130"}
    assert set(SECAGG_REASONS) <= set(by_name), "every SecAgg+ attack ran"
    for name in SECAGG_REASONS:
        outcome = by_name[name]
        assert set(outcome.codes) == {"E150"}, (name, outcome.codes)
        targeted = set(outcome.sites)  # every site, but for the sample of two
        assert targeted <= set(sites) and len(targeted) == (2 if name == "secagg_setup_two_of_three_sites" else 3), (name, targeted)
    assert not secagg_reasons_logged(outcomes, lambda site: (audit / f"{site}.errors.log").read_text())
    for site in sites:
        # The only fits answered: the honest SecAgg+ part of rounds 1-3 the coordinator drove before each unmask attack.
        ledger = PrivacyLedger(tmp_path / "ledgers" / f"{site}.ledger.sqlite", site)
        assert [(e.study, e.round) for e in ledger.entries] == [(study.name, 1), (study.name, 2), (study.name, 3)]
        ledger.close()
        updates = [e for e in map(json.loads, (audit / f"{site}.audit.jsonl").read_text().splitlines()) if e["kind"] == "update"]
        assert [u["round"] for u in updates] == [1, 2, 3] and all(u["masked"] for u in updates), "no update may leave in the clear"


def test_sealed_errors_carry_no_site_values(root: Path, tmp_path: Path) -> None:
    """A contract error provoked by the coordinator names columns at the site, never in the reply."""
    study = dataclasses.replace(load_study(wdbc_dp_study(root, tmp_path, secure=False)))
    from .hostile import unknown_feature

    outcomes = run_in_simulation(study, str(tmp_path / "ledgers"), str(tmp_path / "audit"), [unknown_feature])
    assert outcomes[0].refused and set(outcomes[0].codes) == {"E120"}
    full = "\n".join((tmp_path / "audit" / f"{s.name}.errors.log").read_text() for s in study.sites)
    assert "no_such_feature" in full  # the site's IT sees exactly what was wrong
