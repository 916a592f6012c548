"""One HTTP reverse proxy, used for every door fedhelix puts in front of the SuperLink.

The site gateway (Fleet API only), the server's admin listener (Control API only, mutual
TLS with the admin's certificate) and the admin host's local tunnel (the flwr CLI's way to
that listener) all forward the same way: a path rule decides, hop-by-hop headers stay
behind, bodies stream both ways. Built from Starlette (routing), httpx (upstream) and
uvicorn (TLS termination), all already Flower's own dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# Hop-by-hop headers (RFC 9110 7.6.1) are per connection and never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@dataclass(frozen=True)
class PathRule:
    """Which request paths a door forwards: exact paths and prefixes, nothing that could traverse."""

    prefixes: tuple[str, ...]
    paths: tuple[str, ...] = ("/health",)
    refusal: str = "fedhelix gateway: this path is not served on this address"

    def allows(self, path: str) -> bool:
        if ".." in path or "//" in path or "%" in path:
            return False
        return path in self.paths or any(path.startswith(prefix) for prefix in self.prefixes)


def create_forwarder(
    upstream: str,
    rule: PathRule,
    verify: ssl.SSLContext | str | bool,
    *,
    timeout: httpx.Timeout | float = 600.0,
    transport: httpx.AsyncBaseTransport | None = None,
    name: str = "gateway",
    routes: Sequence[Route] = (),
) -> Starlette:
    """An ASGI app forwarding the paths ``rule`` allows to ``upstream`` (``https://HOST:PORT``); 403 for the rest.

    ``verify`` checks the upstream's certificate (an ``SSLContext`` may also carry a client
    certificate); ``transport`` replaces the network (tests); ``routes`` are served here, ahead of forwarding.
    """
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=timeout, transport=transport)
    log = logging.getLogger(f"fedhelix.{name.replace(' ', '-')}")

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not rule.allows(path):
            log.warning("%s refused %s %s from %s", name, request.method, path, request.client.host if request.client else "?")
            return JSONResponse({"detail": rule.refusal}, status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream_request = client.build_request(request.method, path, params=request.query_params, headers=headers, content=await request.body())
        try:
            reply = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as err:
            log.error("%s: upstream %s unreachable for %s: %s", name, upstream, path, err)
            return JSONResponse({"detail": f"fedhelix {name}: the server behind this address is not answering"}, status_code=502)
        reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.aiter_raw():
                    yield chunk
            except httpx.HTTPError as err:  # upstream gone mid-stream: one line, and the client's connection is cut
                log.error("%s: upstream %s broke off %s: %s", name, upstream, path, err or type(err).__name__)
                raise

        return StreamingResponse(body(), status_code=reply.status_code, headers=reply_headers, background=BackgroundTask(reply.aclose))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[*routes, Route("/{path:path}", forward, methods=METHODS)], lifespan=lifespan)


def uvicorn_server(app: Starlette, context: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn ``Server`` terminating TLS with ``context`` as given (uvicorn would otherwise build its own)."""
    factory: Callable[..., ssl.SSLContext] = lambda _config, _default: context  # noqa: E731
    config = uvicorn.Config(app, host=host, port=port, ssl_context_factory=factory, log_level=log_level, log_config=None, access_log=False, lifespan="on", ws="none")
    return uvicorn.Server(config)


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS for a listener that asks no client certificate (the site gateway, the admin's local tunnel)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket (port 0: the OS picks one), so the caller knows the port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@dataclass(frozen=True)
class Listener:
    """One address this process serves, with its app and its TLS context."""

    host: str
    port: int
    app: Starlette
    context: ssl.SSLContext


async def serve_listeners(listeners: list[Listener]) -> None:
    """Serve every listener until SIGTERM/SIGINT (or until one of them stops, e.g. cannot bind: then all stop)."""
    servers = [uvicorn_server(item.app, item.context, item.host, item.port) for item in listeners]

    def stop_all() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)

    async def serve(server: uvicorn.Server) -> None:
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # one handler above stops both
        try:
            await server.serve()
        finally:
            stop_all()
            if not server.started:  # could not bind: the whole gateway fails
                raise SystemExit(1)

    await asyncio.gather(*(serve(server) for server in servers))


@contextlib.contextmanager
def serving_in_background(app: Starlette, context: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Serve ``app`` from a thread of this process for the block's duration; yields the bound port (``port`` 0: any free one).

    uvicorn's own tracebacks stay off the terminal (the forwarder logs one line per failure).
    """
    sock = bound_socket(host, port)
    server = uvicorn_server(app, context, host, sock.getsockname()[1], log_level="critical")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"fedhelix-forwarder-{sock.getsockname()[1]}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise OSError(f"a forwarder on {host} did not start")
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
