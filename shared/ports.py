"""Is a local port free to listen on? Asked before a Flower process is started on it.

Flower's SuperNode and SuperLink end in a traceback when their port is taken (two
nodes on one host with the default ``--port``, a second server from the same kit);
a bind test first turns that into one line naming the port and the setting to change.
"""

from __future__ import annotations

import errno
import socket

from shared.errors import ConfigError


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind test, as the server itself would bind).

    SO_REUSEADDR, as uvicorn sets it: connections of a stopped process left in TIME_WAIT do not
    count, only a socket still bound there.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE  # anything else (not a local address, a privileged port): the server says so itself
    return False


def require_free_port(host: str, port: int, guess: str, fix: str) -> None:
    """One line naming the port, a ``guess`` at who holds it and the ``fix``, when it is taken."""
    if port_in_use(host, port):
        raise ConfigError(f"port {port} on this host is in use ({guess}); {fix}")
