"""The only door sites see: a TLS reverse proxy that forwards the Fleet API and nothing else.

Flower OSS serves the Fleet API (nodes), the Control API (submit runs, register nodes)
and the Runtime API on one port, and the Control API has no authentication: whoever
reaches it can start code that then runs at every hospital. So the SuperLink listens on
loopback only, and this gateway, on the site-facing address, forwards ``/v1/fleet/...``
and ``/health`` and answers 403 to everything else. Control stays reachable from the
server host alone (``fedhelix run`` there).

Built from Starlette (routing), httpx (upstream, TLS verified against the consortium CA)
and uvicorn (TLS termination with the server certificate), all already Flower's own
dependencies.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("fedhelix.gateway")

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
# Hop-by-hop headers (RFC 9110 7.6.1) are per connection and never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"}
REFUSED = {"detail": "fedhelix gateway: only the Fleet API (/v1/fleet/) and /health are served on this address"}


def is_allowed(path: str) -> bool:
    """Whether a request path may pass to the SuperLink (exact prefixes, no traversal tricks)."""
    if ".." in path or "//" in path or "%" in path:
        return False
    return path in ALLOWED_PATHS or any(path.startswith(prefix) for prefix in ALLOWED_PREFIXES)


def create_gateway(upstream: str, ca_file: Path | None, timeout_s: float = 600.0, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """An ASGI app forwarding allowed paths to ``upstream`` (``https://127.0.0.1:PORT``).

    ``transport`` replaces the network (tests); ``ca_file`` verifies the SuperLink's certificate.
    """
    client = httpx.AsyncClient(base_url=upstream, verify=str(ca_file) if ca_file else True, timeout=timeout_s, transport=transport)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not is_allowed(path):
            log.warning("refused %s %s from %s", request.method, path, request.client.host if request.client else "?")
            return JSONResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream_request = client.build_request(request.method, path, params=request.query_params, headers=headers, content=await request.body())
        try:
            reply = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as err:
            log.error("upstream SuperLink unreachable for %s: %s", path, err)
            return JSONResponse({"detail": "fedhelix gateway: the SuperLink behind this gateway is not answering"}, status_code=502)
        reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=reply_headers, background=BackgroundTask(reply.aclose))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve_gateway(listen_host: str, listen_port: int, upstream: str, ca_file: Path, cert_file: Path, key_file: Path) -> None:
    """Run the gateway in the foreground with TLS (uvicorn)."""
    import uvicorn

    uvicorn.run(
        create_gateway(upstream, ca_file),
        host=listen_host,
        port=listen_port,
        ssl_certfile=str(cert_file),
        ssl_keyfile=str(key_file),
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":  # python -m server.gateway HOST PORT UPSTREAM CA CERT KEY (used by `fedhelix server`)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s fedhelix-gateway: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is noise
    host, port, upstream, ca, cert, key = sys.argv[1:7]
    serve_gateway(host, int(port), upstream, Path(ca), Path(cert), Path(key))
