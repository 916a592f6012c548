"""The doors of the server host: the site gateway (Fleet API only) and the admin listener (Control API only).

Flower OSS serves the Fleet API (nodes), the Control API (submit runs, register nodes)
and the Runtime API on one port, and the Control API has no authentication: whoever
reaches it can start code that then runs at every hospital. So the SuperLink listens on
loopback only, and this one process serves two listeners in front of it:

* the **site gateway** on the site-facing address forwards ``/v1/fleet/...`` and ``/health``
  and answers 403 to everything else;
* the **admin listener** (:mod:`server.admin_listener`, on the kit's ``admin_listen``)
  forwards ``/v1/control/...`` and ``/health``, and only to a client that presents the
  admin's own certificate (mutual TLS; any other certificate fails the handshake); it also
  serves a finished run's result files from the server's runs directory (:mod:`server.run_store`).

Both use :mod:`server.forwarder`; both stop together (one signal handler for the two).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
from starlette.applications import Starlette

from server.admin_listener import admin_listener
from server.forwarder import Listener, PathRule, create_forwarder, serve_listeners, server_context

log = logging.getLogger("fedhelix.gateway")

FLEET = PathRule(prefixes=("/v1/fleet/",), refusal="fedhelix gateway: only the Fleet API (/v1/fleet/) and /health are served on this address")
ALLOWED_PREFIXES = FLEET.prefixes
ALLOWED_PATHS = FLEET.paths
REFUSED = {"detail": FLEET.refusal}


def is_allowed(path: str) -> bool:
    """Whether a request path may pass to the SuperLink from a site (exact prefixes, no traversal tricks)."""
    return FLEET.allows(path)


def create_gateway(upstream: str, ca_file: Path | None, timeout_s: float = 600.0, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The site gateway: forwards the Fleet API to ``upstream`` (``https://127.0.0.1:PORT``), verified against ``ca_file``."""
    return create_forwarder(upstream, FLEET, str(ca_file) if ca_file else True, timeout=timeout_s, transport=transport, name="gateway")


def serve_gateway(
    listen_host: str, listen_port: int, upstream: str, ca_file: Path, cert_file: Path, key_file: Path, admin: tuple[str, int, Path, Path | None] | None = None
) -> None:
    """Run the site gateway (and the admin listener, ``admin`` = host, port, admin certificate, runs directory) in the foreground."""
    listeners = [Listener(listen_host, listen_port, create_gateway(upstream, ca_file), server_context(str(cert_file), str(key_file)))]
    if admin is not None:
        host, port, admin_cert, runs = admin
        listeners.append(admin_listener(host, port, upstream, ca_file, cert_file, key_file, admin_cert, runs))
    asyncio.run(serve_listeners(listeners))


if __name__ == "__main__":  # python -m server.gateway HOST PORT UPSTREAM CA CERT KEY [ADMIN_HOST ADMIN_PORT ADMIN_CERT [RUNS_DIR]] (`fedhelix server`)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s fedhelix-gateway: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is noise
    host, port, upstream, ca, cert, key = sys.argv[1:7]
    runs_arg = Path(sys.argv[10]) if len(sys.argv) >= 11 else None
    admin_args = (sys.argv[7], int(sys.argv[8]), Path(sys.argv[9]), runs_arg) if len(sys.argv) >= 10 else None
    from shared.errors import FedhelixError

    try:
        serve_gateway(host, int(port), upstream, Path(ca), Path(cert), Path(key), admin_args)
    except FedhelixError as err:  # one line in gateway.log, not a traceback
        log.error("%s", err.line)
        sys.exit(2)
