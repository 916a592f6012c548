"""The real network path on loopback: provisioned kits, TLS gateway, SuperLink with node
authentication, three SuperNodes with their own data (one reaching the server only through an
HTTP CONNECT proxy), a signed and approved study with SecAgg+ and DP, and each way in
which a node or a request must be turned away: an unapproved study, a completed run's
signed config replayed as a new run, a bundle with an extra .pyc."""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import server.submit
from client.approval import approve
from client.audit import audit_path, verify
from client.node import prepare_node, probe_server
from server.deployment import RunningServer, flower_env, flwr_home_for, start_server
from server.provision import ConsortiumConfig, add_site, provision
from server.admin_tunnel import load_admin_kit
from server.submit import load_roster, submit_study
from shared.approval import NONCE_KEY, ROSTER_KEY, build_app_fab, code_digest_of_project, decode_roster, expiry_after, new_run_nonce, signed_run_config
from shared.config import load_site
from shared.errors import FedhelixError
from shared.paths import PROJECT_ROOT
from shared.pki import CertificateError, load_identity

from .connect_proxy import RunningProxy, start_proxy
from .deployed import free_port, hazard_study, ledger_rows, run_fab_as_is, start_node, stop_nodes, study_sites, write_site

pytestmark = pytest.mark.e2e

SITES = ("northeast", "south", "west")
PROXIED = "west"  # this node reaches the server only through an HTTP CONNECT proxy (`fedhelix node --proxy`)
STUDY = hazard_study("deployed-tcga", rounds=2, local_steps=100)


def study_text(sites: tuple[str, ...] = SITES, extra: str = "") -> str:
    return STUDY + extra + study_sites(sites)


@dataclass
class Consortium:
    root: Path
    kits: Path
    server: RunningServer
    gateway_port: int
    study: Path
    code_digest: str
    nodes: dict[str, subprocess.Popen]
    signed: list[dict]  # every run config `fedhelix run` signed in this module, in order
    completed: dict | None = None  # the signed config of a run that completed
    proxy: RunningProxy | None = None  # the outbound proxy of PROXIED

    def site_file(self, name: str) -> Path:
        return self.root / "sites" / f"{name}.toml"

    def node_log(self, name: str) -> str:
        return (self.root / f"node-{name}.log").read_text()


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("consortium")
    gateway_port = free_port()
    config = ConsortiumConfig(name="e2e", server_address=f"127.0.0.1:{gateway_port}", sites=SITES, link_port=free_port(), admin_address=f"127.0.0.1:{free_port()}")
    kits = root / "kits"
    provision(config, kits)
    (root / "sites").mkdir()
    study = root / "sites" / "study.toml"
    study.write_text(study_text())
    digest = code_digest_of_project(PROJECT_ROOT)
    for name in SITES:
        approve(study, load_site(write_site(root / "sites", name)), digest)
    signed: list[dict] = []
    sign = server.submit.signed_run_config

    def recording(*args, **kwargs):  # keeps each signed config, so a test can replay it
        manifest, config = sign(*args, **kwargs)
        signed.append(dict(config))
        return manifest, config

    server_ = start_server(kits / "server")
    proxy = start_proxy(root / "proxy")
    nodes = {}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(server.submit, "signed_run_config", recording)
            for name in SITES:
                extra = ["--proxy", proxy.url] if name == PROXIED else []
                nodes[name] = start_node(kits / name, root / "sites" / f"{name}.toml", free_port(), root / f"node-{name}.log", extra=extra)
            yield Consortium(root, kits, server_, gateway_port, study, digest, nodes, signed, proxy=proxy)
    finally:
        stop_nodes(nodes)
        proxy.stop()
        server_.stop()


def ledger_entries(c: Consortium, name: str) -> int:
    return len(ledger_rows(c.site_file(name)))


def run_to_completion(c: Consortium) -> tuple[server.submit.Submission, dict]:
    submission = submit_study(c.study, c.kits / "admin", c.root / "runs", timeout_s=900)
    report = json.loads((submission.out_dir / "report.json").read_text())
    assert report["status"] == "completed", report.get("error")
    c.completed = c.signed[-1]
    return submission, report


def test_signed_approved_study_runs_with_secagg_and_dp(consortium: Consortium) -> None:
    submission, report = run_to_completion(consortium)
    assert decode_roster(str(consortium.completed[ROSTER_KEY])) == load_roster(consortium.kits / "admin")  # carried, signed
    assert set(load_roster(consortium.kits / "admin")) >= set(SITES)
    identity = json.loads((submission.out_dir / "run-identity.json").read_text())
    assert (identity["nonce"], identity["attempt"]) == (submission.manifest.nonce, 1)
    assert sorted(report["final"]["sites"]) == sorted(SITES)
    assert len(report["rounds"]) == 2
    assert report["final"]["mean"]["c_index"] > 0.6  # 2 DP rounds of 100 steps: learning (0.86 after 5 rounds in bench)
    for name in SITES:
        privacy = report["privacy"][name]
        assert 0 < privacy["epsilon"] <= 8.0 + 1e-6
        assert ledger_entries(consortium, name) == 2  # one ledger row per round, at the site
    for name in SITES:  # the site's own record of what left it: intact, and naming this study's updates
        summary = verify(audit_path(name, consortium.site_file(name)))
        assert summary.kinds.get("update", 0) == 2 and summary.kinds.get("handshake", 0) >= 1
    assert (submission.out_dir / "study.toml").read_bytes() == consortium.study.read_bytes()  # what was run
    assert (submission.out_dir / "report.html").exists() and (submission.out_dir / "model.pt").exists()
    # The ServerApp wrote on the server host, in the server kit's runs directory under the run's nonce, never in the
    # admin's --out; what the admin holds was fetched over the admin listener.
    on_server = consortium.server.kit.runs_dir / "deployed-tcga" / submission.manifest.nonce
    assert on_server.resolve().is_relative_to((consortium.kits / "server" / "runs").resolve())
    for name in ("report.json", "report.html", "metrics.jsonl", "model.pt", "study.toml"):
        assert (submission.out_dir / name).read_bytes() == (on_server / name).read_bytes(), name
    assert (on_server / "checkpoint.pt").exists() and not (submission.out_dir / "checkpoint.pt").exists()  # server-side only
    assert sorted(p.name for p in submission.out_dir.iterdir()) == ["metrics.jsonl", "model.pt", "report.html", "report.json", "run-identity.json", "study.toml"]


def test_the_proxied_node_reaches_the_server_only_through_its_proxy(consortium: Consortium) -> None:
    """PROXIED trained in the study above like the others; here: its every outbound connection was a CONNECT to the server."""
    assert consortium.proxy is not None
    server = f"127.0.0.1:{consortium.gateway_port}"
    deadline = time.monotonic() + 120  # run alone, the node may still be starting
    while len(consortium.proxy.requests()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    requests = consortium.proxy.requests()
    assert len(requests) >= 2 and set(requests) == {("CONNECT", server)}  # the probe, then the SuperNode; no loopback traffic
    assert f"outbound: {server} through the proxy {consortium.proxy.url} (from --proxy)" in consortium.node_log(PROXIED)
    assert all("through the proxy" not in consortium.node_log(name) for name in SITES if name != PROXIED)


def test_unapproved_study_is_refused_by_every_site_and_nothing_is_trained(consortium: Consortium) -> None:
    changed = consortium.root / "sites" / "study-changed.toml"
    changed.write_text(consortium.study.read_text().replace("learning_rate = 0.1", "learning_rate = 0.5"))
    before = {name: ledger_entries(consortium, name) for name in SITES}
    with pytest.raises(FedhelixError, match="3 site\\(s\\) could not join the study.*E-APPROVAL-NOT-APPROVED") as err:
        submit_study(changed, consortium.kits / "admin", consortium.root / "runs-changed", timeout_s=600)
    assert "northeast" not in str(err.value)  # the server learns a fixed phrase; the reason stays at the site
    assert all(f"site '{name}' refuses the run: the site has not approved this study file" in consortium.node_log(name) for name in SITES)
    assert {name: ledger_entries(consortium, name) for name in SITES} == before


def refused_everywhere(c: Consortium, fab: bytes, config: dict, workdir: Path, code: str) -> dict:
    """Send ``fab`` with ``config`` as a new run; every node must refuse it with ``code`` and train nothing."""
    before = {name: ledger_entries(c, name) for name in SITES}
    out = workdir / "runs"
    done = run_fab_as_is(c.kits / "admin", fab, {**config, "out": str(out)}, workdir)  # `out` is not signed, and a deployed server ignores it
    assert not out.exists()  # the ServerApp writes in the server's runs directory, under the run's nonce
    written = sorted((c.server.kit.runs_dir / "deployed-tcga").glob(f"{config[NONCE_KEY]}*/report.json"), key=lambda p: p.stat().st_mtime)
    report = json.loads(written[-1].read_text()) if written else {}
    assert report.get("status") == "failed", done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{len(SITES)} site(s) could not join the study" in report["error"] and code in report["error"], report["error"]
    assert {name: ledger_entries(c, name) for name in SITES} == before
    return report


def test_a_completed_runs_signed_config_replayed_as_a_new_run_is_refused_by_every_node(consortium: Consortium, tmp_path: Path) -> None:
    if consortium.completed is None:  # run alone: complete a run first
        run_to_completion(consortium)
    assert consortium.completed is not None
    refused_everywhere(consortium, build_app_fab(PROJECT_ROOT), consortium.completed, tmp_path, "E-APPROVAL-REPLAY")
    original = consortium.server.kit.runs_dir / "deployed-tcga" / str(consortium.completed[NONCE_KEY]) / "report.json"
    assert json.loads(original.read_text())["status"] == "completed"  # the replay wrote beside the completed run, not over it
    assert all("a replayed signed run" in consortium.node_log(name) for name in SITES)


def test_a_bundle_with_an_extra_pyc_is_refused_by_every_node_even_when_signed(consortium: Consortium, tmp_path: Path) -> None:
    import io
    import zipfile

    buffer = io.BytesIO(build_app_fab(PROJECT_ROOT))
    with zipfile.ZipFile(buffer, "a") as fab:  # Python would import this instead of client/app.py
        fab.writestr("client/__pycache__/app.cpython-311.pyc", b"\x00" * 16)
    tampered = buffer.getvalue()
    admin = load_identity(consortium.kits / "admin" / "admin.crt", consortium.kits / "admin" / "admin.key")
    _, config = signed_run_config(
        consortium.study.read_bytes(), tampered, "e2e", admin.key,
        nonce=new_run_nonce(), attempt=1, expires=expiry_after(1), roster=load_roster(consortium.kits / "admin"),
    )  # fmt: skip  # the admin's own signature over the tampered bundle: the file rule still refuses it
    refused_everywhere(consortium, tampered, config, tmp_path, "E-APPROVAL-FILES")
    assert all("client/__pycache__/app.cpython-311.pyc" in consortium.node_log(name) for name in SITES)


def test_control_api_is_not_reachable_from_the_site_facing_address(consortium: Consortium, tmp_path: Path) -> None:
    context = ssl.create_default_context(cafile=str(consortium.kits / "ca" / "ca.crt"))
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node"):
        request = urllib.request.Request(f"https://127.0.0.1:{consortium.gateway_port}{path}", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, context=context, timeout=10)
        assert err.value.code == 403
    # Flower's own CLI pointed at the site-facing address cannot list or submit runs.
    home = flwr_home_for(consortium.kits / "ca" / "ca.crt", f"127.0.0.1:{consortium.gateway_port}", tmp_path / "flwr")
    listed = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "fedhelix"], env=flower_env(home), capture_output=True, text=True, timeout=120)
    assert listed.returncode != 0
    # While the Control API answers on the loopback link for the admin.
    with urllib.request.urlopen(f"https://127.0.0.1:{consortium.server.kit.link_port}/health", context=context, timeout=10) as reply:
        assert reply.status == 200


def test_admin_status_and_runs_go_through_the_admin_listener(consortium: Consortium, tmp_path: Path) -> None:
    admin = load_admin_kit(consortium.kits / "admin")
    admin_port = int(str(admin.admin_address).rsplit(":", 1)[1])
    assert admin.control_address is None and admin_port not in (consortium.server.kit.link_port, consortium.gateway_port)  # never the loopback link
    if consortium.completed is None:  # run alone: complete a run first (submit_study: the same path as `fedhelix run`)
        run_to_completion(consortium)
    fedhelix = str(Path(sys.executable).parent / "fedhelix")
    done = subprocess.run([fedhelix, "status", "--kit", str(consortium.kits / "admin"), "--runs", str(consortium.root / "runs")], capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"via {admin.admin_address}: 3 site(s) in the roster, 3 node(s) registered, 3 online" in done.stdout, done.stdout
    assert "finished:completed" in done.stdout
    assert "deployed-tcga: completed, round 2 done; mean over sites: " in done.stdout and " c_index " in done.stdout, done.stdout  # the fetched metrics
    # Flower's own CLI, pointed at the admin listener with the CA but without the admin's certificate: refused at the handshake.
    home = flwr_home_for(consortium.kits / "ca" / "ca.crt", str(admin.admin_address), tmp_path / "flwr")
    listed = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "fedhelix"], env=flower_env(home), capture_output=True, text=True, timeout=120)
    assert listed.returncode != 0 and "finished:completed" not in listed.stdout
    # The site-facing gateway with the admin's certificate is still Fleet-only.
    context = ssl.create_default_context(cafile=str(consortium.kits / "ca" / "ca.crt"))
    context.load_cert_chain(str(consortium.kits / "admin" / "admin.crt"), str(consortium.kits / "admin" / "admin.key"))
    request = urllib.request.Request(f"https://127.0.0.1:{consortium.gateway_port}/v1/control/list-runs", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, context=context, timeout=10)
    assert err.value.code == 403


def test_unregistered_node_key_is_refused(consortium: Consortium) -> None:
    kit = add_site(consortium.kits, "latecomer")  # provisioned after the server registered its allow-list
    site = write_site(consortium.root / "sites", "latecomer", data="midwest")
    log = consortium.root / "node-latecomer.log"
    proc = start_node(kit, site, free_port(), log, extra=["--rejoin-wait", "4"])
    try:
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    assert code == 2
    text = log.read_text()
    assert "retrying for another" in text  # a refused activation is retried first (a restart after a crash looks the same)
    assert "not on the consortium's allow-list" in text


def test_plaintext_node_cannot_connect(consortium: Consortium) -> None:
    command = [
        str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{consortium.gateway_port}",
        "--auth-supernode-private-key", str(consortium.kits / "south" / "node.key"), "--port", str(free_port()),
        "--max-retries", "1", "--max-wait-time", "20",
    ]  # fmt: skip
    done = subprocess.run(command, env=flower_env(consortium.root / "flwr-plain"), capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "SuperNode ID" not in done.stdout + done.stderr  # never registered with the SuperLink


def test_node_with_a_kit_from_another_consortium_refuses_the_server(consortium: Consortium, tmp_path: Path) -> None:
    other = ConsortiumConfig(name="other", server_address=f"127.0.0.1:{consortium.gateway_port}", sites=("northeast",))
    provision(other, tmp_path / "kits")
    with pytest.raises(CertificateError, match="not issued by this kit's consortium CA"):
        prepare_node(tmp_path / "kits" / "northeast", consortium.site_file("northeast"))


def test_expired_server_certificate_is_refused_by_server_and_node(tmp_path: Path) -> None:
    port = free_port()
    config = ConsortiumConfig(name="old", server_address=f"127.0.0.1:{port}", sites=("northeast",), link_port=free_port(), certificate_days=30)
    provision(config, tmp_path / "kits", now=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(CertificateError, match=r"server certificate .* expired on 2024-01-31"):
        start_server(tmp_path / "kits" / "server")
    # A server that presents it anyway (here: the gateway alone) is refused by the node's TLS check.
    kit = tmp_path / "kits" / "server"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "server.gateway", "127.0.0.1", str(port), "https://127.0.0.1:9", str(kit / "ca.crt"), str(kit / "server.crt"), str(kit / "server.key")],
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        from client.node import load_node_kit

        node_kit = load_node_kit(tmp_path / "kits" / "northeast")
        deadline = time.monotonic() + 60
        while True:
            try:
                probe_server(node_kit, timeout=5)
            except CertificateError as err:
                assert "expired certificate" in err.line
                break
            except FedhelixError:  # not listening yet
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.5)
            else:
                pytest.fail("an expired server certificate was accepted")
    finally:
        gateway.kill()


def test_stopping_the_server_stops_every_process_it_started(tmp_path: Path) -> None:
    import psutil

    config = ConsortiumConfig(name="stop", server_address=f"127.0.0.1:{free_port()}", sites=("northeast",), link_port=free_port())
    provision(config, tmp_path / "kits")
    running = start_server(tmp_path / "kits" / "server")
    try:
        started = [p for proc in (running.superlink, running.gateway) for p in psutil.Process(proc.pid).children(recursive=True)]
        assert any("superexec" in " ".join(p.cmdline()) for p in started), [p.cmdline() for p in started]  # Flower's, outside the link's group
    finally:
        running.stop()
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
