"""A consortium across separate hosts: each role in its own network namespace.

The test builds a server host, an admin host and three hospital hosts on a private LAN
("wan"), plus a proxy host that also sits on a second LAN ("clinic") whose only other
member is the third hospital: that hospital reaches the server only through the proxy's
HTTP CONNECT. Every process runs the product's own command on its host (``fedhelix
server``, ``fedhelix node``, ``fedhelix run``, ``fedhelix status``); kits and site files
are written once, as the consortium admin and each hospital's IT would. What must hold:

* the server certificate names the server's address and the nodes dial that address;
* nothing listens on a hospital host beyond its own loopback;
* the SuperLink and its Control API are unreachable from hospital hosts;
* the study completes across the hosts, submitted and watched from the admin host.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from client.approval import approve
from server.provision import ConsortiumConfig, provision
from shared.approval import code_digest_of_project
from shared.config import load_site
from shared.paths import PROJECT_ROOT
from shared.pki import san_hosts, load_certificate

from .connect_proxy import RunningProxy, start_proxy
from .deployed import hazard_study, study_sites, write_site
from .hosts import Host, Network, namespaces_unavailable

pytestmark = pytest.mark.e2e

WHY_NOT = namespaces_unavailable()
if WHY_NOT:
    pytestmark = [pytest.mark.e2e, pytest.mark.skip(reason=WHY_NOT)]

HOSPITALS = ("northeast", "south", "west")
BEHIND_PROXY = "west"  # on the clinic LAN: its only way out is the proxy
GATEWAY_PORT, LINK_PORT, ADMIN_PORT = 9092, 9093, 9095
FEDHELIX = str(Path(sys.executable).parent / "fedhelix")


@dataclass
class Hosts:
    network: Network
    server: Host
    admin: Host
    hospitals: dict[str, Host]
    proxy: RunningProxy
    root: Path
    kits: Path
    study: Path
    server_log: Path
    run: subprocess.CompletedProcess | None = None

    def node_log(self, site: str) -> str:
        return (self.root / f"node-{site}.log").read_text()


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s" + (f"; log:\n{log.read_text()[-3000:]}" if log and log.exists() else ""))
        time.sleep(0.5)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("hosts")
    with Network() as net:
        net.lan("wan")
        net.lan("clinic")
        server = net.host("server", wan=2)
        admin = net.host("admin", wan=3)
        hospitals = {name: net.host(name, wan=11 + i) for i, name in enumerate(HOSPITALS) if name != BEHIND_PROXY}
        hospitals[BEHIND_PROXY] = net.host(BEHIND_PROXY, clinic=11)
        proxy_host = net.host("proxy", wan=20, clinic=20)
        proxy = start_proxy(root / "proxy", host=proxy_host.addresses["clinic"], argv=proxy_host.argv)
        config = ConsortiumConfig(
            name="multihost", server_address=f"{server.address}:{GATEWAY_PORT}", sites=HOSPITALS, link_port=LINK_PORT, admin_address=f"{server.address}:{ADMIN_PORT}"
        )
        kits = root / "kits"
        provision(config, kits)
        sites = root / "sites"
        sites.mkdir()
        study = sites / "study.toml"
        study.write_text(hazard_study("multihost-tcga", rounds=2, local_steps=30) + study_sites(HOSPITALS))
        digest = code_digest_of_project(PROJECT_ROOT)
        for name in HOSPITALS:  # each hospital's IT approves the study on its own host's files
            approve(study, load_site(write_site(sites, name)), digest)
        server_log = root / "server.log"
        server_proc = server.popen([FEDHELIX, "server", "--kit", str(kits / "server")], server_log)
        wait_for(lambda: "registered sites" in server_log.read_text(), 120, "the server did not start", server_log)
        nodes = {
            name: host.popen(
                [FEDHELIX, "node", "--kit", str(kits / name), "--site", str(sites / f"{name}.toml"), *(["--proxy", proxy.url] if name == BEHIND_PROXY else [])],
                root / f"node-{name}.log",
                cwd=sites,
            )
            for name, host in hospitals.items()
        }
        try:
            yield Hosts(net, server, admin, hospitals, proxy, root, kits, study, server_log)
        finally:
            proxy.stop()
            for proc in (*nodes.values(), server_proc):
                proc.terminate()
            for proc in (*nodes.values(), server_proc):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_the_server_certificate_names_the_servers_address_and_nodes_dial_it(hosts: Hosts) -> None:
    cert: x509.Certificate = load_certificate(hosts.kits / "server" / "server.crt")
    assert hosts.server.address in san_hosts(cert)
    for name in HOSPITALS:
        assert f'server_address = "{hosts.server.address}:{GATEWAY_PORT}"' in (hosts.kits / name / "node.toml").read_text()


def test_the_admin_sees_every_site_online_from_the_admin_host(hosts: Hosts) -> None:
    deadline = time.monotonic() + 180
    while True:  # nodes join within a minute of the server (their first connection backs off)
        done = hosts.admin.run([FEDHELIX, "status", "--kit", str(hosts.kits / "admin"), "--runs", str(hosts.root / "runs")], timeout=300, cwd=hosts.root)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        if "3 online" in done.stdout or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert "3 online" in done.stdout, done.stdout


def test_the_study_runs_across_the_hosts_submitted_from_the_admin_host(hosts: Hosts) -> None:
    out = hosts.root / "runs"
    done = hosts.admin.run([FEDHELIX, "run", str(hosts.study), "--kit", str(hosts.kits / "admin"), "--out", str(out)], timeout=900, cwd=hosts.root)
    hosts.run = done
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads((out / "multihost-tcga" / "report.json").read_text())
    assert report["status"] == "completed"
    assert sorted(report["final"]["sites"]) == sorted(HOSPITALS)
    assert len(report["rounds"]) == 2
    for name in HOSPITALS:  # each hospital trained under DP on its own host
        assert 0 < report["privacy"][name]["epsilon"] <= 8.0 + 1e-6


def test_nothing_listens_on_a_hospital_host_beyond_its_loopback(hosts: Hosts) -> None:
    for name, host in hosts.hospitals.items():
        listening = host.listeners()
        assert listening, f"{name}: its node's Runtime API should listen on loopback"
        assert all(addr.startswith(("127.0.0.1:", "[::1]:", "localhost:")) for addr in listening), (name, listening)


def test_the_superlink_is_unreachable_from_hospital_hosts(hosts: Hosts) -> None:
    for name, host in hosts.hospitals.items():
        assert host.reachable(hosts.server.address, GATEWAY_PORT) == (name != BEHIND_PROXY)  # the site-facing gateway is (but through the proxy)
        assert not host.reachable(hosts.server.address, LINK_PORT)  # the SuperLink (Fleet, Control, Runtime) is not
    assert not hosts.admin.reachable(hosts.server.address, LINK_PORT)  # nor from the admin host: the admin listener is the way in


# From a hospital host: the Control API through the site gateway (403), and through the admin
# listener without the admin's certificate (refused at the handshake, or on the first read under TLS 1.3).
CONTROL_PROBE = """
import ssl, sys, urllib.error, urllib.request
host, gateway, admin, ca = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=ca)
request = urllib.request.Request(f"https://{host}:{gateway}/v1/control/list-runs", data=b"{}", method="POST")
try:
    urllib.request.urlopen(request, context=context, timeout=10)
    print("gateway: served")
except urllib.error.HTTPError as err:
    print(f"gateway: {err.code}")
request = urllib.request.Request(f"https://{host}:{admin}/v1/control/list-runs", data=b"{}", method="POST")
try:
    urllib.request.urlopen(request, context=context, timeout=10)
    print("admin: served")
except urllib.error.HTTPError as err:
    print(f"admin: http {err.code}")
except (OSError, ssl.SSLError) as err:
    print(f"admin: refused ({type(err).__name__})")
"""


def test_the_control_api_is_refused_to_hospital_hosts(hosts: Hosts) -> None:
    for name in (n for n in HOSPITALS if n != BEHIND_PROXY):
        done = hosts.hospitals[name].run(
            [sys.executable, "-c", CONTROL_PROBE, hosts.server.address, str(GATEWAY_PORT), str(ADMIN_PORT), str(hosts.kits / name / "ca.crt")]
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "gateway: 403", lines
        assert lines[1].startswith("admin: refused"), lines


def test_a_hospital_behind_a_proxy_joins_only_through_it(hosts: Hosts) -> None:
    west = hosts.hospitals[BEHIND_PROXY]
    assert not west.reachable(hosts.server.address, GATEWAY_PORT)  # no route to the server but the proxy
    target = f"{hosts.server.address}:{GATEWAY_PORT}"
    requests = hosts.proxy.requests()
    assert ("CONNECT", target) in requests, requests
    assert all(req == ("CONNECT", target) for req in requests), requests  # TLS end to end: the proxy sees only where
    assert f"through the proxy {hosts.proxy.url}" in hosts.node_log(BEHIND_PROXY)
