"""A hospital node behind an outbound HTTP proxy: which proxy, a CONNECT tunnel, and the SuperNode's environment.

Hospital hosts often reach the internet only through an HTTP proxy. TLS stays end to end:
the proxy sees ``CONNECT host:port`` and then opaque bytes. The node decides the route once
(``--proxy``, else ``https_proxy``/``HTTPS_PROXY`` unless ``NO_PROXY`` names the server) and
hands the SuperNode exactly that decision in its environment: Flower 1.42's Fleet client is
httpx, which reads these variables. So the pre-flight probe and the SuperNode take the same
path, and the node's loopback traffic (the launcher and ClientApps talking to the node's own
plaintext APIs on 127.0.0.1) never goes to the proxy.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from shared.errors import ConfigError, FedhelixError

# Variables httpx (and urllib, curl) read for proxies; the SuperNode gets only ours.
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")
# The node's own APIs are plaintext HTTP on loopback; the server is HTTPS (even on loopback in tests).
LOOPBACK_NO_PROXY = "http://127.0.0.1,http://localhost,http://[::1]"
MAX_ANSWER_BYTES = 64 * 1024


class ProxyError(FedhelixError):
    """The proxy cannot be reached or will not open a tunnel to the server; nothing started."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy that tunnels with CONNECT (``http://[user:password@]host:port``)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The full URL, credentials included (for the SuperNode's environment only)."""
        if self.username is None:
            return f"http://{self.hostport}"
        return f"http://{quote(self.username, safe='')}:{quote(self.password or '', safe='')}@{self.hostport}"

    def __str__(self) -> str:  # never prints a password
        return f"http://{self.username}:***@{self.hostport}" if self.username is not None else f"http://{self.hostport}"


@dataclass(frozen=True)
class Route:
    """How the node reaches the server: ``proxy`` (None: directly) and where that choice came from."""

    proxy: Proxy | None
    source: str

    def describe(self) -> str:
        if self.proxy is None:
            return f"directly ({self.source})"
        return f"through the proxy {self.proxy} (from {self.source})"

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with exactly this route's proxy variables: the SuperNode then dials as the probe did."""
        out = {key: value for key, value in env.items() if key not in PROXY_VARIABLES}
        if self.proxy is not None:
            out["https_proxy"] = out["HTTPS_PROXY"] = self.proxy.url
        out["no_proxy"] = out["NO_PROXY"] = LOOPBACK_NO_PROXY
        return out


def parse_proxy(text: str, source: str) -> Proxy:
    """``http://[user:password@]host[:port]`` or ``host:port`` into a :class:`Proxy` (port 80 by default, as httpx)."""
    value = text.strip()
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme != "http":
        raise ConfigError(f"{source}: proxy '{_redact(value)}' is not an http:// proxy; the node tunnels through an HTTP proxy with CONNECT (e.g. http://proxy.hospital.org:3128)")
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if not parts.hostname or not 0 < port < 65536 or parts.path not in ("", "/"):
        raise ConfigError(f"{source}: '{_redact(value)}' is not a proxy URL like http://proxy.hospital.org:3128")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(parts.hostname, port, username, password)


def choose_route(option: str | None, server_host: str, server_port: int, environ: Mapping[str, str] | None = None) -> Route:
    """``--proxy`` wins; else ``https_proxy`` (then ``HTTPS_PROXY``) unless ``no_proxy``/``NO_PROXY`` matches the server."""
    env = os.environ if environ is None else environ
    if option:
        return Route(parse_proxy(option, "--proxy"), "--proxy")
    name = next((n for n in ("https_proxy", "HTTPS_PROXY") if env.get(n, "").strip()), None)
    if name is None:
        return Route(None, "no --proxy, HTTPS_PROXY not set")
    no_name = next((n for n in ("no_proxy", "NO_PROXY") if env.get(n, "").strip()), None)
    if no_name is not None and no_proxy_matches(env[no_name], server_host, server_port):
        return Route(None, f"{no_name} matches {server_host}")
    return Route(parse_proxy(env[name], name), name)


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """curl's rules: ``*``; a name and its subdomains (a leading dot is ignored); an IP or CIDR range; optional ``:port``."""
    host = host.strip("[]").lower().rstrip(".")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.count(":") == 1 or entry.startswith("["):  # host:port or [v6]:port
            head, _, tail = entry.rpartition(":")
            if tail.isdigit() and head:
                name, entry_port = head, int(tail)
        name = name.strip("[]").lstrip(".").rstrip(".")
        if entry_port is not None and entry_port != port:
            continue
        if _ip_match(name, host) or host == name or host.endswith("." + name):
            return True
    return False


def _ip_match(entry: str, host: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


def open_tunnel(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    """A socket to ``host:port`` through ``proxy`` (HTTP CONNECT), ready for TLS; one line when the proxy will not."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except OSError as err:
        raise ProxyError(
            f"cannot reach the proxy {proxy} ({err.strerror or err}); check --proxy / HTTPS_PROXY and that this host may open TCP {proxy.port} to it"
        ) from None
    try:
        status, reason = _connect(sock, proxy, target)
    except OSError as err:
        sock.close()
        what = "did not answer" if isinstance(err, TimeoutError) else f"failed ({err.strerror or err})"
        raise ProxyError(f"the proxy {proxy} {what} when asked to CONNECT to {target}; is it an HTTP proxy?") from None
    except ValueError as err:
        sock.close()
        raise ProxyError(f"the proxy {proxy} answered CONNECT to {target} with {err}; is it an HTTP proxy?") from None
    if 200 <= status < 300:
        return sock
    sock.close()
    answer = f"{status} {reason}".strip()
    if status == 407:
        fix = "its credentials were refused" if proxy.username is not None else "put the credentials in the proxy URL (http://USER:PASSWORD@host:port)"
        raise ProxyError(f"the proxy {proxy} requires authentication for CONNECT to {target} ({answer}); {fix}")
    if status >= 500:
        raise ProxyError(
            f"the proxy {proxy} could not open a tunnel to {target} ({answer}); the server may be down or unreachable from the proxy: "
            "ask your network team to allow outbound TLS to that address"
        )
    raise ProxyError(f"the proxy {proxy} refused CONNECT to {target} ({answer}); ask your network team to allow outbound TLS to that address")


def _connect(sock: socket.socket, proxy: Proxy, target: str) -> tuple[int, str]:
    """Send CONNECT, read the answer's head: (status, reason). ValueError for an answer that is not HTTP."""
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "User-Agent: fedhelix-node"]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    answer = b""
    while b"\r\n\r\n" not in answer:  # byte by byte: what follows the head belongs to the server (TLS)
        chunk = sock.recv(1)
        if not chunk:
            raise ValueError("a closed connection" if not answer else "a cut-off answer")
        answer += chunk
        if len(answer) > MAX_ANSWER_BYTES:
            raise ValueError("an oversized answer")
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not code.isdigit():
        raise ValueError(f"'{status_line[:60]}'")
    return int(code), reason.strip()


def _redact(value: str) -> str:
    """A proxy URL fit for an error line: any password replaced by ***."""
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.password is None:
        return value
    return value.replace(f":{parts.password}@", ":***@", 1)
