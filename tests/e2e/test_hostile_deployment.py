"""A hostile coordinator host on loopback: the real nodes refuse every SecAgg+ attack.

A provisioned consortium as in ``test_deployment.py`` (TLS, node authentication, three
nodes with their own TCGA-BRCA regions), a DP + SecAgg+ study approved by every site
and submitted by the admin with ``fedhelix run``'s own code (:func:`server.submit.submit_study`).
The FAB is the honest, approved one, so every node's gate admits the run; but the
operator of the coordinator host started ``fedhelix server`` with a test-only
``sitecustomize`` (``hostile_server/``) that, in the ServerApp process, replaces the
honest study with the attacks of ``hostile.py``. Every attack must be refused by every
node it targets with sealed codes only, each node's audit log must verify and hold the
refusals, the only ledger rows are the rounds of the schedule, and no update left a
node in the clear.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.approval import approve
from client.audit import audit_path, verify
from server.deployment import start_server
from server.provision import ConsortiumConfig, provision
from server.submit import submit_study
from shared.approval import code_digest_of_project
from shared.config import load_site
from shared.errors import FedhelixError
from shared.paths import PROJECT_ROOT

from .deployed import audit_entries, free_port, hazard_study, ledger_rows, site_error_text, start_node, stop_nodes, study_sites, write_site
from .hostile import SECAGG_ATTACKS, SECAGG_REASONS, Outcome, plain_fit_for_a_secure_study, plan_dp_off, secagg_reasons_logged
from .hostile_server.sitecustomize import ATTACKS_ENV, OUT_ENV

pytestmark = pytest.mark.e2e

SITES = ("northeast", "south", "west")
HOSTILE_SERVER = Path(__file__).resolve().parent / "hostile_server"
# Two plan attacks for contrast, then the SecAgg+ protocol attacks (three of which train rounds 1-3 honestly first).
ATTACKS = [plan_dp_off, plain_fit_for_a_secure_study, *SECAGG_ATTACKS]
STUDY = hazard_study("hostile-tcga", rounds=3, local_steps=10)


@dataclass
class Attacked:
    root: Path
    outcomes: list[Outcome]
    refusal: str  # what `fedhelix run` said of a run that left no report
    seconds: float

    def site_file(self, name: str) -> Path:
        return self.root / "sites" / f"{name}.toml"


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    root = tmp_path_factory.mktemp("hostile-consortium")
    gateway_port = free_port()
    provision(ConsortiumConfig(name="e2e", server_address=f"127.0.0.1:{gateway_port}", sites=SITES, link_port=free_port(), admin_address=f"127.0.0.1:{free_port()}"), root / "kits")
    (root / "sites").mkdir()
    study = root / "sites" / "study.toml"
    study.write_text(STUDY + study_sites(SITES))
    digest = code_digest_of_project(PROJECT_ROOT)
    for name in SITES:
        approve(study, load_site(write_site(root / "sites", name)), digest)
    out = root / "outcomes.json"
    with pytest.MonkeyPatch.context() as patch:  # only the server's processes get the hostile sitecustomize
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HOSTILE_SERVER), os.environ.get("PYTHONPATH", "")])))
        patch.setenv(OUT_ENV, str(out))
        patch.setenv(ATTACKS_ENV, ",".join(a.__name__ for a in ATTACKS))
        server_ = start_server(root / "kits" / "server")
    nodes: dict[str, subprocess.Popen] = {}
    try:
        for name in SITES:
            nodes[name] = start_node(root / "kits" / name, root / "sites" / f"{name}.toml", free_port(), root / f"node-{name}.log")
        started = time.monotonic()
        with pytest.raises(FedhelixError, match="ended without a report") as err:  # the hostile ServerApp writes no report
            submit_study(study, root / "kits" / "admin", root / "runs", timeout_s=600)
        seconds = time.monotonic() - started
        assert out.exists(), "the hostile ServerApp never ran: " + (root / "kits" / "server").joinpath("superlink.log").read_text()[-3000:]
        raw = json.loads(out.read_text())
        assert not (isinstance(raw, dict) and "error" in raw), raw
        yield Attacked(root, [Outcome(**o) for o in raw], str(err.value), seconds)
    finally:
        stop_nodes(nodes)
        server_.stop()


def test_every_attack_is_refused_by_every_node_with_sealed_codes_only(attacked: Attacked) -> None:
    tried = sum(o.sent for o in attacked.outcomes)
    refused = sum(len(o.codes) for o in attacked.outcomes if o.refused)
    print(f"\nloopback: refused {refused} of {tried} crafted requests ({len(attacked.outcomes)} attacks, 3 nodes) in {attacked.seconds:.0f} s")
    for o in attacked.outcomes:
        print(f"loopback {o.name:42s} sent {o.sent:2d} refused {len(o.codes):2d} codes {sorted(set(o.codes))} {(o.leaked + o.broken)[:1]}")
    assert [o.name for o in attacked.outcomes] == [a.__name__ for a in ATTACKS]
    for o in attacked.outcomes:
        assert o.refused, f"{o.name}: {o.leaked + o.broken or 'nothing sent'}"
        assert len(set(o.sites)) == (2 if o.name == "secagg_setup_two_of_three_sites" else 3) and set(o.sites) <= set(SITES), (o.name, o.sites)
    codes = {o.name: set(o.codes) for o in attacked.outcomes}
    assert codes["plan_dp_off"] == codes["plain_fit_for_a_secure_study"] == {"E130"}
    assert all(codes[name] == {"E150"} for name in SECAGG_REASONS)
    assert refused == tried


def test_each_node_logged_each_refusal_for_the_attacks_own_reason(attacked: Attacked) -> None:
    assert not secagg_reasons_logged(attacked.outcomes, lambda site: site_error_text(attacked.site_file(site)))
    for name in SITES:
        text = site_error_text(attacked.site_file(name))
        assert text.count("this update was requested without SecAgg+") >= 2, name  # both plain fits, the DP-off plan's included
        summary = verify(audit_path(name, attacked.site_file(name)))  # the hash chain holds
        targeted = sum(o.sites.count(name) for o in attacked.outcomes)
        errors = [e for e in audit_entries(attacked.site_file(name)) if e["kind"] == "error"]
        assert summary.kinds.get("error") == len(errors) == targeted, (name, len(errors), targeted)


def test_no_ledger_row_beyond_the_schedule_and_nothing_in_the_clear(attacked: Attacked) -> None:
    for name in SITES:
        # The only fits: the honest SecAgg+ part of rounds 1-3 that preceded each unmask attack; each masked.
        assert [(row.study, row.round) for row in ledger_rows(attacked.site_file(name))] == [("hostile-tcga", r) for r in (1, 2, 3)]
        updates = [e for e in audit_entries(attacked.site_file(name)) if e["kind"] == "update"]
        assert [u["round"] for u in updates] == [1, 2, 3] and all(u["masked"] for u in updates), name
        assert [e["kind"] for e in audit_entries(attacked.site_file(name))].count("handshake") == 1
