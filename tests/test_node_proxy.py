"""A node behind an outbound HTTP proxy: the route it picks, its pre-flight probe through a real proxy
process (proxy.py) to a real TLS listener, one line when the proxy will not tunnel, and the environment
that sends the SuperNode's Fleet traffic (httpx) through the proxy and its loopback traffic past it."""

from __future__ import annotations

import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.node import NodeKit, probe_server
from client.proxy import Proxy, ProxyError, choose_route, no_proxy_matches, parse_proxy
from server.provision import ConsortiumConfig, provision
from shared.errors import ConfigError
from shared.pki import CertificateError
from tests.e2e.connect_proxy import RunningProxy, start_proxy
from tests.e2e.deployed import free_port, write_site


@dataclass
class TlsServer:
    port: int
    kits: Path
    handshakes: list[str]

    def kit(self, kits: Path | None = None) -> NodeKit:
        return NodeKit((kits or self.kits) / "west", "proxied", "west", f"127.0.0.1:{self.port}")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """The consortium's server certificate served on loopback: completes TLS handshakes and counts them."""
    kits = tmp_path_factory.mktemp("proxied") / "kits"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    provision(ConsortiumConfig(name="proxied", server_address=f"127.0.0.1:{port}", sites=("west",), link_port=free_port()), kits)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(kits / "server" / "server.crt", kits / "server" / "server.key")
    server = TlsServer(port, kits, [])

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    server.handshakes.append(tls.version() or "")
            except (OSError, ssl.SSLError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server
    listener.close()


@pytest.fixture(scope="module")
def denied_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, denied_port: int) -> Iterator[RunningProxy]:
    running = start_proxy(tmp_path_factory.mktemp("proxy"), deny=[f"127.0.0.1:{denied_port}"])
    yield running
    running.stop()


def as_proxy(running: RunningProxy, credentials: str = "") -> Proxy:
    return parse_proxy(running.url.replace("http://", f"http://{credentials}"), "test")


def test_the_probe_tunnels_through_the_proxy_and_verifies_the_server_end_to_end(tls_server: TlsServer, proxy: RunningProxy) -> None:
    before, seen = len(tls_server.handshakes), len(proxy.requests())
    probe_server(tls_server.kit(), timeout=10, proxy=as_proxy(proxy))
    assert proxy.requests()[seen:] == [("CONNECT", f"127.0.0.1:{tls_server.port}")]  # the proxy saw only where, not what
    deadline = time.monotonic() + 10  # the listener records the handshake on its own thread
    while len(tls_server.handshakes) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(tls_server.handshakes) == before + 1 and tls_server.handshakes[-1].startswith("TLSv1.")


def test_a_server_certificate_from_another_ca_is_refused_through_the_tunnel(tls_server: TlsServer, proxy: RunningProxy, tmp_path: Path) -> None:
    provision(ConsortiumConfig(name="other", server_address=f"127.0.0.1:{tls_server.port}", sites=("west",)), tmp_path / "kits")
    with pytest.raises(CertificateError, match=rf"not issued by this kit's consortium CA .*if the proxy {proxy.url} inspects TLS"):
        probe_server(tls_server.kit(tmp_path / "kits"), timeout=10, proxy=as_proxy(proxy))


def test_a_refused_connect_is_one_line_naming_proxy_target_and_answer(tls_server: TlsServer, proxy: RunningProxy, denied_port: int) -> None:
    kit = NodeKit(tls_server.kits / "west", "proxied", "west", f"127.0.0.1:{denied_port}")
    with pytest.raises(ProxyError) as err:
        probe_server(kit, timeout=10, proxy=as_proxy(proxy))
    assert err.value.line == (
        f"the proxy {proxy.url} refused CONNECT to 127.0.0.1:{denied_port} (403 Forbidden); ask your network team to allow outbound TLS to that address"
    )


def test_a_proxy_that_cannot_reach_the_server_says_so(tls_server: TlsServer, proxy: RunningProxy) -> None:
    closed = free_port()
    kit = NodeKit(tls_server.kits / "west", "proxied", "west", f"127.0.0.1:{closed}")
    with pytest.raises(ProxyError, match=rf"^fedhelix: the proxy {proxy.url} could not open a tunnel to 127.0.0.1:{closed} \(502 Bad Gateway\); the server may be down"):
        probe_server(kit, timeout=10, proxy=as_proxy(proxy))


def test_an_unreachable_proxy_is_one_line(tls_server: TlsServer) -> None:
    down = Proxy("127.0.0.1", free_port())
    with pytest.raises(ProxyError, match=rf"^fedhelix: cannot reach the proxy http://127.0.0.1:{down.port} \(Connection refused\); check --proxy / HTTPS_PROXY"):
        probe_server(tls_server.kit(), timeout=5, proxy=down)


def test_a_proxy_that_wants_credentials(tls_server: TlsServer, tmp_path: Path) -> None:
    running = start_proxy(tmp_path / "auth", basic_auth="ward:s3cret")
    try:
        with pytest.raises(ProxyError, match=r"requires authentication for CONNECT .*\(407 Proxy Authentication Required\); put the credentials in the proxy URL"):
            probe_server(tls_server.kit(), timeout=10, proxy=as_proxy(running))
        with pytest.raises(ProxyError, match=r"\(407 .*\); its credentials were refused") as err:
            probe_server(tls_server.kit(), timeout=10, proxy=as_proxy(running, "ward:wrong@"))
        assert "wrong" not in err.value.line and "ward:***@" in err.value.line
        probe_server(tls_server.kit(), timeout=10, proxy=as_proxy(running, "ward:s3cret@"))
    finally:
        running.stop()


def test_the_option_wins_then_https_proxy_unless_no_proxy_names_the_server() -> None:
    env = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "lower:8080"}
    assert choose_route("http://cli:9000", "srv.example", 9092, env).proxy == Proxy("cli", 9000)
    assert choose_route(None, "srv.example", 9092, env).proxy == Proxy("lower", 8080)  # lowercase first, as urllib and curl
    assert choose_route(None, "srv.example", 9092, {"HTTPS_PROXY": "http://p:3128"}).describe() == "through the proxy http://p:3128 (from HTTPS_PROXY)"
    assert choose_route(None, "srv.example", 9092, {}).proxy is None
    assert choose_route(None, "srv.example", 9092, {**env, "NO_PROXY": "localhost,.example"}).describe() == "directly (NO_PROXY matches srv.example)"
    assert choose_route("http://cli:9000", "srv.example", 9092, {"NO_PROXY": "*"}).proxy is not None  # --proxy is explicit
    assert choose_route(None, "srv.example", 9092, {"HTTP_PROXY": "http://p:3128", "ALL_PROXY": "http://p:3128"}).proxy is None


@pytest.mark.parametrize(
    ("entry", "host", "port", "matches"),
    [
        ("*", "srv.example", 9092, True),
        ("srv.example", "srv.example", 9092, True),
        ("example", "srv.example", 9092, True),
        (".example", "srv.example", 9092, True),
        ("ample", "srv.example", 9092, False),
        ("srv.example:9092", "srv.example", 9092, True),
        ("srv.example:443", "srv.example", 9092, False),
        ("10.0.0.0/8", "10.1.2.3", 9092, True),
        ("10.0.0.0/8", "192.168.1.2", 9092, False),
        ("::1", "::1", 9092, True),
        ("[::1]:9092", "[::1]", 9092, True),
        (" , localhost ", "127.0.0.1", 9092, False),
    ],
)
def test_no_proxy_rules(entry: str, host: str, port: int, matches: bool) -> None:
    assert no_proxy_matches(entry, host, port) is matches


def test_only_http_proxies_and_passwords_never_shown() -> None:
    with pytest.raises(ConfigError, match=r"^fedhelix: HTTPS_PROXY: proxy 'socks5://u:\*\*\*@p:1080' is not an http:// proxy"):
        choose_route(None, "srv", 1, {"HTTPS_PROXY": "socks5://u:pw@p:1080"})
    with pytest.raises(ConfigError, match="--proxy: 'http://p:notaport' is not a proxy URL"):
        choose_route("http://p:notaport", "srv", 1, {})
    proxy = parse_proxy("http://ward%40icu:p%3Ass@proxy.h.org:3128/", "--proxy")
    assert (proxy.username, proxy.password, proxy.port) == ("ward@icu", "p:ss", 3128)
    assert str(proxy) == "http://ward@icu:***@proxy.h.org:3128" and parse_proxy(proxy.url, "x") == proxy
    assert parse_proxy("proxy.h.org", "x").port == 80  # as httpx, which the SuperNode uses


# Run with the node's child environment: what the SuperNode (Fleet, https) and the launcher (loopback, http) do with httpx.
HTTPX_LIKE_THE_NODE = """
import sys, httpx
https_url, http_url, ca = sys.argv[1:]
with httpx.Client(verify=ca) as c:  # trust_env, as Flower's ProtobufClient
    print(c.get(http_url).status_code)
    try:
        c.get(https_url)
    except httpx.HTTPError as err:  # the TLS listener closes after the handshake: no HTTP answer
        print(type(err).__name__)
"""


def test_the_supernode_env_sends_fleet_traffic_through_the_proxy_and_loopback_past_it(tls_server: TlsServer, proxy: RunningProxy) -> None:
    loopback = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=loopback.serve_forever, daemon=True).start()
    user_env = {**os.environ, "HTTP_PROXY": proxy.url, "ALL_PROXY": proxy.url, "NO_PROXY": "127.0.0.1", "https_proxy": "http://elsewhere:1"}
    env = choose_route(proxy.url, "127.0.0.1", tls_server.port, user_env).child_env(user_env)
    seen = len(proxy.requests())
    try:
        done = subprocess.run(
            [sys.executable, "-c", HTTPX_LIKE_THE_NODE, f"https://127.0.0.1:{tls_server.port}/v1/fleet", f"http://127.0.0.1:{loopback.server_port}/", str(tls_server.kits / "west" / "ca.crt")],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        loopback.shutdown()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "200"  # the node's own loopback API: direct
    assert proxy.requests()[seen:] == [("CONNECT", f"127.0.0.1:{tls_server.port}")]  # the server: only through the proxy


def test_fedhelix_node_behind_a_refusing_proxy_stops_before_starting_anything(tls_server: TlsServer, proxy: RunningProxy, denied_port: int, tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(ConsortiumConfig(name="refused", server_address=f"127.0.0.1:{denied_port}", sites=("west",), link_port=free_port()), kits)
    site = write_site(tmp_path, "west")
    env = {**os.environ, "HTTPS_PROXY": proxy.url, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "fedhelix.cli", "node", "--kit", str(kits / "west"), "--site", str(site), "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: the proxy {proxy.url} refused CONNECT to 127.0.0.1:{denied_port} (403 Forbidden); ask your network team to allow outbound TLS to that address"
    assert "SuperNode" not in done.stdout
