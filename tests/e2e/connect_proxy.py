"""A real HTTP CONNECT proxy for tests: proxy.py (a dev dependency) with a plugin that records every request and refuses chosen targets.

``python -m tests.e2e.connect_proxy --listen HOST:PORT [--deny HOST:PORT ...] [--log FILE] [--basic-auth USER:PASSWORD]``

Each request is logged as ``fedhelix-test-proxy: METHOD HOST:PORT`` the moment it arrives (proxy.py's own
access log is written only when a tunnel closes), so a test can show which traffic went through it.
A denied target is answered ``403 Forbidden``; with ``--basic-auth`` a request without the credentials
gets ``407``. It listens on any given address (a network namespace's too).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.common.utils import text_
from proxy.http.exception import HttpRequestRejected
from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin

from shared.paths import PROJECT_ROOT

DENY_ENV = "FEDHELIX_TEST_PROXY_DENY"  # comma-separated HOST:PORT targets the plugin refuses (read in every acceptor)
MARK = "fedhelix-test-proxy:"
_LOGGED = re.compile(re.escape(MARK) + r" (\S+) (\S+)")
log = logging.getLogger(__name__)


class RecordAndDeny(HttpProxyBasePlugin):
    """Logs each request's method and target before proxy.py connects upstream; refuses the denied ones."""

    def before_upstream_connection(self, request: HttpParser) -> HttpParser | None:
        host = text_(request.host) if request.host else ""
        target = f"[{host}]:{request.port}" if ":" in host else f"{host}:{request.port}"
        log.info("%s %s %s", MARK, text_(request.method), target)
        if target in os.environ.get(DENY_ENV, "").split(","):
            raise HttpRequestRejected(status_code=403, reason=b"Forbidden")
        return request


@dataclass
class RunningProxy:
    process: subprocess.Popen
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def requests(self) -> list[tuple[str, str]]:
        """Every request so far, in order: (method, target)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [(m.group(1), m.group(2)) for m in _LOGGED.finditer(text)]

    def stop(self) -> None:
        """SIGTERM proxy.py and its acceptor processes (their own process group), SIGKILL after 10 s."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_proxy(
    workdir: Path,
    host: str = "127.0.0.1",
    deny: Sequence[str] = (),
    basic_auth: str | None = None,
    timeout: float = 60,
    argv: Callable[[list[str]], list[str]] = list,
) -> RunningProxy:
    """Start the proxy as its own process on ``host`` and a free port; returns once it listens.

    ``argv`` wraps the command, e.g. ``Host.argv`` of :mod:`tests.e2e.hosts` to run it in a network namespace.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port_file, log_file = workdir / "proxy.port", workdir / "proxy.log"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "tests.e2e.connect_proxy", "--listen", f"{host}:0", "--port-file", str(port_file), "--log", str(log_file)]
    command += [arg for target in deny for arg in ("--deny", target)] + (["--basic-auth", basic_auth] if basic_auth else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]))}
    process = subprocess.Popen(argv(command), cwd=PROJECT_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=(workdir / "proxy.err").open("ab"))
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            RunningProxy(process, host, 0, log_file).stop()
            raise RuntimeError(f"the test proxy did not start: {(workdir / 'proxy.err').read_text()[-2000:]}")
        time.sleep(0.05)
    return RunningProxy(process, host, int(port_file.read_text().split()[0]), log_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.connect_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (PORT 0: any free port, see --port-file)")
    parser.add_argument("--deny", action="append", default=[], help="HOST:PORT to refuse with 403 (repeatable)")
    parser.add_argument("--log", help="log file (default: stderr)")
    parser.add_argument("--port-file", help="write the port listened on here")
    parser.add_argument("--basic-auth", help="USER:PASSWORD a client must present (else 407)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    os.environ[DENY_ENV] = ",".join(args.deny)
    from proxy import Proxy, sleep_loop

    flags = ["--hostname", host.strip("[]"), "--port", port, "--num-acceptors", "1", "--plugins", f"{__name__ if __name__ != '__main__' else 'tests.e2e.connect_proxy'}.RecordAndDeny"]
    flags += (["--log-file", args.log] if args.log else []) + (["--port-file", args.port_file] if args.port_file else [])
    flags += ["--basic-auth", args.basic_auth] if args.basic_auth else []
    with Proxy(flags) as running:
        sleep_loop(running)


if __name__ == "__main__":
    main()
