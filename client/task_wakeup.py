"""A wake-up from the SuperNode to its launcher when a message arrives, so the launcher need not poll fast.

The launcher learns of a new ClientApp task by polling the node's Runtime API
(``AcquireTask``). Polling fast costs CPU all the time; polling slowly adds up to
the interval to every message. Instead the SuperNode sends one datagram to the
launcher right after it stored a message (and created its task), and the launcher
waits on that socket with its idle poll as the timeout. The datagram carries
nothing: it is only a hint to poll now. Tasks are still taken with the
authenticated ``AcquireTask``, so a stray or forged datagram costs one extra poll,
and a lost one costs at most one idle interval.

Linux abstract-namespace UNIX sockets (no file, no path-length limit, gone with
the process); elsewhere there is no wake-up and the launcher polls as before.
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import sys

log = logging.getLogger("fedhelix.launcher")

SUPPORTED = sys.platform.startswith("linux")


def new_wake_name() -> str:
    """A fresh, unguessable socket name for one node's SuperNode and launcher."""
    return f"fedhelix-wake-{secrets.token_hex(16)}"


def _address(name: str) -> str:
    return "\0" + name  # Linux abstract namespace


class WakeListener:
    """The launcher's end: :meth:`wait` returns early (True) when the SuperNode signalled a new task."""

    def __init__(self, name: str | None) -> None:
        self._sock: socket.socket | None = None
        if not name or not SUPPORTED:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(_address(name))
        except OSError as err:  # taken by another process: poll without wake-ups
            sock.close()
            log.warning("task wake-up socket unavailable (%s); polling only", err)
            return
        sock.setblocking(False)
        self._sock = sock

    @property
    def active(self) -> bool:
        return self._sock is not None

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if woken (every pending wake-up is consumed)."""
        if self._sock is None:
            select.select([], [], [], timeout)
            return False
        ready, _, _ = select.select([self._sock], [], [], timeout)
        woken = False
        while ready:
            try:
                self._sock.recv(64)
                woken = True
            except BlockingIOError:
                break
        return woken

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class WakeSender:
    """The SuperNode's end: :meth:`wake` never blocks and never fails (a lost wake-up only delays a poll)."""

    def __init__(self, name: str | None) -> None:
        self._address = _address(name) if name and SUPPORTED else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self._address else None
        if self._sock is not None:
            self._sock.setblocking(False)

    def wake(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(b"\x01", self._address)
        except OSError:  # launcher not listening (yet), or its queue is full: it polls anyway
            pass
