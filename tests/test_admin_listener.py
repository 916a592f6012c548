"""The admin listener lets in the admin's certificate and nothing else, over real TLS on loopback.

Each door runs in this process (uvicorn in a thread) in front of a stand-in SuperLink
(httpx's MockTransport, which records what reached it); the TLS handshakes are real.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from server.admin_listener import admin_context, create_admin_app
from server.admin_tunnel import admin_tunnel, load_admin_kit
from server.deployment import check_server_kit, load_server_kit
from server.forwarder import server_context, serving_in_background
from server.gateway import create_gateway
from server.provision import ConsortiumConfig, provision
from shared.errors import ConfigError
from shared.paths import PROJECT_ROOT
from shared.pki import (
    CertificateError,
    Identity,
    cert_pem,
    issue_certificate,
    key_pem,
    load_identity,
    load_ssh_private_key,
    self_signed_server,
    write_private,
    write_public,
)

from tests.e2e.deployed import free_port

ADMIN_PORT = 9095  # only written into the kit; every listener here binds its own free port


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("admin-kits")
    provision(ConsortiumConfig(name="adm", server_address="127.0.0.1:8000", sites=("northeast",), link_port=9093, admin_address=f"127.0.0.1:{ADMIN_PORT}"), out / "ours")
    provision(ConsortiumConfig(name="other", server_address="127.0.0.1:8000", sites=("northeast",)), out / "other")
    return out


class _Body(httpx.AsyncByteStream):
    """A streamed upstream body, as the SuperLink sends it."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self):  # type: ignore[override]
        yield self._data


@pytest.fixture(scope="module")
def reached() -> list[str]:
    return []


@pytest.fixture(scope="module")
def superlink(reached: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        reached.append(request.url.path)
        return httpx.Response(200, stream=_Body(b"superlink:" + request.url.path.encode()))

    return httpx.MockTransport(handler)


NONCE = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server's runs directory holding one finished run, a server-only checkpoint and, beside it, a secret."""
    root = tmp_path_factory.mktemp("server-host")
    run = root / "runs" / "study-a" / NONCE
    run.mkdir(parents=True)
    (run / "report.json").write_text('{"status": "completed"}')
    (run / "metrics.jsonl").write_text('{"round": 1, "evaluate": {"mean": {"c_index": 0.6}}}\n{"round": 2, "evaluate": {"mean": {"c_index": 0.7}}}\n')
    (run / "model.pt").write_bytes(bytes(range(256)) * 64)
    (run / "checkpoint.pt").write_bytes(b"server only")
    (root / "secret.txt").write_text("not for the admin")
    return root / "runs"


@pytest.fixture(scope="module")
def admin_port(kits: Path, superlink: httpx.MockTransport, runs: Path) -> Iterator[int]:
    s = kits / "ours" / "server"
    context = admin_context(s / "server.crt", s / "server.key", s / "admin.crt", s / "ca.crt")
    with serving_in_background(create_admin_app("https://127.0.0.1:9093", None, transport=superlink, runs=runs), context) as port:
        yield port


@pytest.fixture(scope="module")
def site_port(kits: Path, superlink: httpx.MockTransport) -> Iterator[int]:
    s = kits / "ours" / "server"
    with serving_in_background(create_gateway("https://127.0.0.1:9093", None, transport=superlink), server_context(str(s / "server.crt"), str(s / "server.key"))) as port:
        yield port


def save(identity: Identity, directory: Path, name: str) -> tuple[str, str]:
    write_public(directory / f"{name}.crt", cert_pem(identity.cert))
    write_private(directory / f"{name}.key", key_pem(identity.key))
    return str(directory / f"{name}.crt"), str(directory / f"{name}.key")


def call(port: int, kits: Path, path: str, cert: tuple[str, str] | None) -> httpx.Response:
    """A request to a listener on loopback, checking its certificate against our CA, presenting ``cert``."""
    context = ssl.create_default_context(cafile=str(kits / "ours" / "ca" / "ca.crt"))
    if cert is not None:
        context.load_cert_chain(*cert)
    with httpx.Client(verify=context, timeout=10) as client:
        return client.post(f"https://127.0.0.1:{port}{path}", content=b"{}")


def admin_pair(kits: Path) -> tuple[str, str]:
    return str(kits / "ours" / "admin" / "admin.crt"), str(kits / "ours" / "admin" / "admin.key")


def test_the_admin_certificate_reaches_the_control_api(kits: Path, admin_port: int, reached: list[str]) -> None:
    reply = call(admin_port, kits, "/v1/control/list-runs", admin_pair(kits))
    assert reply.status_code == 200 and reply.content == b"superlink:/v1/control/list-runs"
    assert reached[-1] == "/v1/control/list-runs"
    assert call(admin_port, kits, "/health", admin_pair(kits)).status_code == 200


def node_key_certificates(kits: Path, tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Certificates over a site's node key: self-signed, and even one issued by the consortium CA itself."""
    node_key = load_ssh_private_key(kits / "ours" / "northeast" / "node.key")
    ca = load_identity(kits / "ours" / "ca" / "ca.crt", kits / "ours" / "ca" / "ca.key")
    issued = issue_certificate(ca, "adm admin", client=True)  # same subject as the admin's, another key...
    name = x509.Name.from_rfc4514_string("CN=northeast")
    self_signed = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(node_key, hashes.SHA384())
    )  # fmt: skip
    ca_issued_node = (
        x509.CertificateBuilder().subject_name(name).issuer_name(ca.cert.subject).public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA384())
    )  # fmt: skip
    return {
        "another key with the admin's name, from the consortium CA": save(issued, tmp_path, "ca-issued"),
        "the site's node key, self-signed": save(Identity(node_key, self_signed), tmp_path, "node-self"),
        "the site's node key, issued by the consortium CA": save(Identity(node_key, ca_issued_node), tmp_path, "node-ca"),
    }


def refused_certificates(kits: Path, tmp_path: Path) -> dict[str, tuple[str, str] | None]:
    return {
        "no certificate": None,
        "a self-signed certificate": save(self_signed_server("127.0.0.1"), tmp_path, "self"),
        "the server's own certificate": (str(kits / "ours" / "server" / "server.crt"), str(kits / "ours" / "server" / "server.key")),
        "another consortium's admin certificate": (str(kits / "other" / "admin" / "admin.crt"), str(kits / "other" / "admin" / "admin.key")),
        **node_key_certificates(kits, tmp_path),
    }


def test_every_other_client_is_refused_at_the_handshake(kits: Path, admin_port: int, reached: list[str], tmp_path: Path) -> None:
    before = len(reached)
    for what, cert in refused_certificates(kits, tmp_path).items():
        with pytest.raises(httpx.TransportError):  # no HTTP reply at all: the TLS handshake failed
            call(admin_port, kits, "/v1/control/start-run", cert)
            pytest.fail(f"{what} was let in")
    assert len(reached) == before  # the SuperLink saw none of them
    assert call(admin_port, kits, "/health", admin_pair(kits)).status_code == 200  # and the door still works


def test_the_fleet_api_is_refused_on_the_admin_listener(kits: Path, admin_port: int, reached: list[str]) -> None:
    before = len(reached)
    for path in ("/v1/fleet/pull-messages", "/v1/runtime/pull-messages", "/v1/control/../fleet/x", "/docs"):
        reply = call(admin_port, kits, path, admin_pair(kits))
        assert reply.status_code == 403 and "only the Control API" in reply.json()["detail"], path
    assert len(reached) == before


def test_the_control_api_is_refused_on_the_site_gateway_even_with_the_admin_certificate(kits: Path, site_port: int, reached: list[str]) -> None:
    before = len(reached)
    for cert in (None, admin_pair(kits)):
        reply = call(site_port, kits, "/v1/control/start-run", cert)
        assert reply.status_code == 403 and "only the Fleet API" in reply.json()["detail"]
    assert len(reached) == before
    assert call(site_port, kits, "/v1/fleet/pull-messages", None).status_code == 200


def test_the_tunnel_reaches_the_control_api_with_the_admin_certificate(kits: Path, admin_port: int, reached: list[str], tmp_path: Path) -> None:
    admin = tmp_path / "admin-kit"
    admin.mkdir()
    for name in ("admin.crt", "admin.key", "ca.crt", "admin.toml"):
        (admin / name).write_bytes((kits / "ours" / "admin" / name).read_bytes())
    os.chmod(admin / "admin.key", 0o600)
    (admin / "admin.toml").write_text(f'[admin]\nconsortium = "adm"\nadmin_address = "127.0.0.1:{admin_port}"\n')
    kit = load_admin_kit(admin)
    with admin_tunnel(kit, tmp_path) as (address, trusted):
        assert address.startswith("127.0.0.1:")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(trusted)), timeout=10) as client:  # what the flwr CLI trusts
            reply = client.post(f"https://{address}/v1/control/list-nodes", content=b"x")
            assert reply.status_code == 200 and reached[-1] == "/v1/control/list-nodes"
            assert client.post(f"https://{address}/v1/fleet/pull-messages", content=b"x").status_code == 403
        with pytest.raises(httpx.TransportError):  # the throwaway certificate is not the consortium's
            call(int(address.rsplit(":", 1)[1]), kits, "/health", None)
    os.chmod(admin / "admin.key", 0o640)
    with pytest.raises(CertificateError, match="readable by other users"):  # the key stays private
        with admin_tunnel(kit, tmp_path):
            pass


def test_the_listener_refuses_to_start_with_an_admin_certificate_from_another_ca_or_expired(kits: Path, tmp_path: Path) -> None:
    s = kits / "ours" / "server"
    with pytest.raises(CertificateError, match="not issued by this consortium's CA"):
        admin_context(s / "server.crt", s / "server.key", kits / "other" / "admin" / "admin.crt", s / "ca.crt")
    ca = load_identity(kits / "ours" / "ca" / "ca.crt", kits / "ours" / "ca" / "ca.key")
    old = issue_certificate(ca, "adm admin", client=True, days=1, not_before=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    cert, _ = save(old, tmp_path, "old")
    with pytest.raises(CertificateError, match="expired on 2024-01-02"):
        admin_context(s / "server.crt", s / "server.key", Path(cert), s / "ca.crt")


def test_server_kit_with_admin_listen_needs_the_consortiums_admin_certificate(kits: Path, tmp_path: Path) -> None:
    import shutil

    kit = tmp_path / "server"
    shutil.copytree(kits / "ours" / "server", kit)
    check_server_kit(load_server_kit(kit))  # as provisioned
    assert load_server_kit(kit).admin_listen == f"0.0.0.0:{ADMIN_PORT}"
    (kit / "admin.crt").write_bytes((kits / "other" / "admin" / "admin.crt").read_bytes())
    with pytest.raises(CertificateError, match="admin certificate .* not issued by this consortium's CA"):
        check_server_kit(load_server_kit(kit))
    (kit / "admin.crt").unlink()
    with pytest.raises(ConfigError, match="admin.crt is missing"):
        check_server_kit(load_server_kit(kit))
    (kit / "server.toml").write_text((kit / "server.toml").read_text().replace(f'admin_listen = "0.0.0.0:{ADMIN_PORT}"\n', ""))
    assert load_server_kit(kit).admin_listen is None  # a kit from before the admin listener still starts (Control on loopback)
    check_server_kit(load_server_kit(kit))


def test_the_gateway_process_serves_both_listeners_and_stops_on_sigterm(kits: Path) -> None:
    s = kits / "ours" / "server"
    site, admin = free_port(), free_port()
    command = [sys.executable, "-m", "server.gateway", "127.0.0.1", str(site), "https://127.0.0.1:9", str(s / "ca.crt"), str(s / "server.crt"), str(s / "server.key"), "127.0.0.1", str(admin), str(s / "admin.crt")]
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = call(admin, kits, "/health", admin_pair(kits))
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        assert reply.status_code == 502  # through the handshake; no SuperLink behind it here
        assert call(site, kits, "/v1/control/list-runs", None).status_code == 403
        with pytest.raises(httpx.TransportError):
            call(admin, kits, "/health", None)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # both listeners stopped on one signal
    finally:
        proc.kill()


def test_provision_points_the_admin_at_the_listener_and_names_it_in_the_certificate(tmp_path: Path) -> None:
    from server.provision import parse_consortium
    from shared.pki import load_certificate, san_hosts

    provision(ConsortiumConfig(name="x", server_address="fl.example.org:8000", sites=("a",), admin_address="admin.example.org:9443"), tmp_path)
    assert 'admin_address = "admin.example.org:9443"' in (tmp_path / "admin" / "admin.toml").read_text()
    assert 'admin_listen = "0.0.0.0:9443"' in (tmp_path / "server" / "server.toml").read_text()
    assert "admin.example.org" in san_hosts(load_certificate(tmp_path / "server" / "server.crt"))
    assert not (tmp_path / "server" / "admin.key").exists()  # the server holds the admin's certificate only
    default = parse_consortium({"consortium": {"name": "d", "server_address": "fl.example.org:8000", "sites": ["a"]}})
    assert default.admin_endpoint == "fl.example.org:9095"
    with pytest.raises(ConfigError, match="admin_address port \\(8000\\) must differ"):
        parse_consortium({"consortium": {"name": "d", "server_address": "h:8000", "sites": ["a"], "admin_address": "h:8000"}})


def test_an_admin_kit_from_before_the_listener_still_dials_the_loopback_link(tmp_path: Path) -> None:
    from server.admin_tunnel import control_home

    (tmp_path / "admin.toml").write_text('[admin]\nconsortium = "adm"\ncontrol_address = "127.0.0.1:9093"\n')
    kit = load_admin_kit(tmp_path)
    assert (kit.admin_address, kit.address) == (None, "127.0.0.1:9093")
    with control_home(kit, tmp_path / "work") as home:
        config = (home / "config.toml").read_text()
    assert 'address = "127.0.0.1:9093"' in config and str(tmp_path / "ca.crt") in config  # no tunnel: the CA-verified link
    (tmp_path / "admin.toml").write_text('[admin]\nconsortium = "adm"\n')
    with pytest.raises(ConfigError, match="admin_address is missing"):
        load_admin_kit(tmp_path)


def test_status_reads_the_newest_run_directory_visible_here(tmp_path: Path) -> None:
    import json

    from server.status import newest_local_run

    assert newest_local_run(tmp_path) is None
    old, new = tmp_path / "old-study", tmp_path / "new-study"
    for run in (old, new):
        run.mkdir()
        (run / "run-identity.json").write_text("{}")
    (old / "report.json").write_text('{"status": "completed"}')
    rounds = [{"round": r, "evaluate": {"mean": {"c_index": 0.5 + r / 10, "n": None}}} for r in (1, 2)]
    (new / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    os.utime(old / "report.json", (time.time() - 600, time.time() - 600))
    os.utime(old / "run-identity.json", (time.time() - 600, time.time() - 600))
    local = newest_local_run(tmp_path)
    assert local is not None and local.path == new
    assert (local.rounds_done, local.mean, local.status) == (2, {"c_index": 0.7}, "running or interrupted")


def get(port: int, kits: Path, path: str, cert: tuple[str, str] | None) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(kits / "ours" / "ca" / "ca.crt"))
    if cert is not None:
        context.load_cert_chain(*cert)
    with httpx.Client(verify=context, timeout=10) as client:
        return client.get(f"https://127.0.0.1:{port}{path}")


def test_the_admin_fetches_a_runs_allowed_result_files_and_nothing_else(kits: Path, admin_port: int, runs: Path, reached: list[str]) -> None:
    before = len(reached)
    run = runs / "study-a" / NONCE
    for name in ("report.json", "model.pt"):
        reply = get(admin_port, kits, f"/fedhelix/v1/runs/{NONCE}/{name}", admin_pair(kits))
        assert reply.status_code == 200 and reply.content == (run / name).read_bytes(), name
    refused = [
        f"/fedhelix/v1/runs/{NONCE}/checkpoint.pt",  # on disk, not on the allow-list
        f"/fedhelix/v1/runs/{NONCE}/report.html",  # allowed, not written
        f"/fedhelix/v1/runs/{NONCE.upper()}/report.json",  # not the nonce's form
        f"/fedhelix/v1/runs/{NONCE[:-1]}/report.json",
        "/fedhelix/v1/runs/*/report.json",
        f"/fedhelix/v1/runs/{NONCE}/..%2F..%2F..%2Fsecret.txt",
        f"/fedhelix/v1/runs/{NONCE}/%2E%2E",
        "/fedhelix/v1/runs/..%2F..%2Fsecret.txt/report.json",
    ]
    for path in refused:
        reply = get(admin_port, kits, path, admin_pair(kits))
        assert reply.status_code in (403, 404) and b"not for the admin" not in reply.content and b"server only" not in reply.content, path
        assert reply.status_code == 404 or "%" in path, (path, reply.status_code)  # the forwarder's rule refuses encoded paths outright
    assert len(reached) == before  # none of it went to the SuperLink


def test_run_results_need_the_admin_certificate_and_the_site_gateway_never_serves_them(kits: Path, admin_port: int, site_port: int, reached: list[str], tmp_path: Path) -> None:
    path = f"/fedhelix/v1/runs/{NONCE}/report.json"
    for what, cert in {"no certificate": None, "the server's own certificate": refused_certificates(kits, tmp_path)["the server's own certificate"]}.items():
        with pytest.raises(httpx.TransportError):
            get(admin_port, kits, path, cert)
            pytest.fail(f"{what} was let in")
    before = len(reached)
    for cert in (None, admin_pair(kits)):
        reply = get(site_port, kits, path, cert)
        assert reply.status_code == 403 and "only the Fleet API" in reply.json()["detail"]
    assert len(reached) == before


def remote_admin_kit(kits: Path, admin_port: int, tmp_path: Path) -> Path:
    """The admin kit as it sits on the admin's own machine: its identity and the admin listener's address."""
    admin = tmp_path / "admin-kit"
    admin.mkdir()
    for name in ("admin.crt", "admin.key", "ca.crt"):
        (admin / name).write_bytes((kits / "ours" / "admin" / name).read_bytes())
    os.chmod(admin / "admin.key", 0o600)
    (admin / "admin.toml").write_text(f'[admin]\nconsortium = "adm"\nadmin_address = "127.0.0.1:{admin_port}"\n')
    return admin


def test_the_admin_side_fetch_copies_the_runs_files_into_the_local_run_directory(kits: Path, admin_port: int, runs: Path, tmp_path: Path) -> None:
    from server.admin_tunnel import fetch_results

    admin = remote_admin_kit(kits, admin_port, tmp_path)
    local = tmp_path / "runs" / "study-a"
    assert fetch_results(load_admin_kit(admin), NONCE, local) == ["report.json", "metrics.jsonl", "model.pt"]
    assert (local / "model.pt").read_bytes() == (runs / "study-a" / NONCE / "model.pt").read_bytes()
    assert sorted(p.name for p in local.iterdir()) == ["metrics.jsonl", "model.pt", "report.json"]  # no checkpoint, no partial files
    assert fetch_results(load_admin_kit(admin), "f" * 32, tmp_path / "none") == []  # an unknown run: nothing


def test_status_brings_the_newest_local_run_up_to_date_from_the_server(kits: Path, admin_port: int, tmp_path: Path) -> None:
    import json

    from server.status import newest_local_run, refresh_from_server

    admin = remote_admin_kit(kits, admin_port, tmp_path)
    local = tmp_path / "runs" / "study-a"
    local.mkdir(parents=True)
    (local / "run-identity.json").write_text(json.dumps({"nonce": NONCE, "attempt": 1, "study_sha256": "x"}))
    before = newest_local_run(tmp_path / "runs")
    assert before is not None and (before.rounds_done, before.status) == (0, "running or interrupted")  # nothing fetched yet
    assert refresh_from_server(load_admin_kit(admin), local) == ["metrics.jsonl", "report.json"]  # never the model, for a status
    after = newest_local_run(tmp_path / "runs")
    assert after is not None and (after.rounds_done, after.mean, after.status) == (2, {"c_index": 0.7}, "completed")
    assert not (local / "model.pt").exists()
