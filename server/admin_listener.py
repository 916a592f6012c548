"""The admin listener: the Control API for the consortium admin's certificate, and for nothing else.

The admin submits, watches and resumes studies from their own machine, so the Control API
must be reachable off the server host; Flower OSS gives it no authentication, so this
listener adds it with mutual TLS. The trust store of its TLS context is the admin's
certificate itself, with ``VERIFY_X509_PARTIAL_CHAIN``: OpenSSL then accepts exactly that
certificate (within its validity) and refuses every other one at the handshake, including
certificates the consortium CA issued (the server's own) and anything signed with a
site's node key. Trusting the CA instead would let any CA-issued certificate in.

It also serves, to that same certificate only, the result files of a run from the server's
runs directory (``GET /fedhelix/v1/runs/<nonce>/<file>``, :data:`server.run_store.RESULT_FILES`):
the ServerApp writes them on the server host, and ``fedhelix run`` fetches them from here.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from server.forwarder import Listener, PathRule, create_forwarder
from server.run_store import RESULTS_ROUTE, find_result
from shared.pki import check_issued_by, check_validity, load_certificate

CONTROL = PathRule(prefixes=("/v1/control/",), refusal="fedhelix admin listener: only the Control API (/v1/control/) and /health are served on this address")
DEFAULT_ADMIN_PORT = 9095


def admin_context(cert_file: Path, key_file: Path, admin_cert: Path, ca_file: Path) -> ssl.SSLContext:
    """Server TLS (the server certificate) that requires the client to present ``admin_cert`` itself.

    Refuses to start (:class:`shared.pki.CertificateError`) unless ``admin_cert`` was issued by the
    consortium CA and is valid now.
    """
    ca = load_certificate(ca_file)
    admin = load_certificate(admin_cert)
    check_issued_by(admin, ca, f"admin certificate {admin_cert}")
    check_validity(admin, f"admin certificate {admin_cert}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(admin_cert))  # the one trust anchor: this certificate
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def results_route(runs: Path) -> Route:
    """``GET /fedhelix/v1/runs/<nonce>/<file>``: one allow-listed file of one run under ``runs``; 404 for anything else."""

    async def serve(request: Request) -> Response:
        found = find_result(runs, str(request.path_params["nonce"]), str(request.path_params["name"]))
        if found is None:
            return JSONResponse({"detail": "fedhelix admin listener: no such run file"}, status_code=404)
        return FileResponse(found)

    return Route(RESULTS_ROUTE, serve, methods=["GET", "HEAD"])


def create_admin_app(upstream: str, ca_file: Path | None, transport: httpx.AsyncBaseTransport | None = None, runs: Path | None = None) -> Starlette:
    """Forwards the Control API to the SuperLink (a run's log stream may stay quiet for long: no read timeout); serves ``runs``' results."""
    verify = str(ca_file) if ca_file else True
    routes = [results_route(runs)] if runs is not None else []
    return create_forwarder(upstream, CONTROL, verify, timeout=httpx.Timeout(60.0, read=None), transport=transport, name="admin listener", routes=routes)


def admin_listener(host: str, port: int, upstream: str, ca_file: Path, cert_file: Path, key_file: Path, admin_cert: Path, runs: Path | None = None) -> Listener:
    """The admin listener as one of the gateway process's listeners (:func:`server.gateway.serve_listeners`)."""
    return Listener(host, port, create_admin_app(upstream, ca_file, runs=runs), admin_context(cert_file, key_file, admin_cert, ca_file))
