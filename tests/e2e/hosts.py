"""Separate hosts for multi-host tests: Linux network namespaces on private bridges.

Each :class:`Host` is a network namespace with its own loopback and one address per
private LAN it joins; a LAN is a bridge in the test's own namespace that carries no
address of its own, so the test process itself is on none of them. Nothing routes
between LANs (IP forwarding is off in a new namespace): a host on two LANs, such as a
proxy, joins them only through what it runs. :class:`Network` creates everything and
removes it again, processes included, even when a test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be built here (``None`` when they can)."""
    if os.geteuid() != 0:
        return "multi-host tests build Linux network namespaces (ip netns), which needs root"
    if shutil.which("ip") is None or shutil.which("ss") is None:
        return "multi-host tests need iproute2 (ip, ss)"
    probe = f"fhprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    bridge = f"fhprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a bridge here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One machine: a network namespace and its addresses, ``{lan: address}``."""

    name: str
    netns: str
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """Its address on the first LAN it joined."""
        return next(iter(self.addresses.values()))

    def argv(self, command: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *command]

    def run(self, command: Sequence[str], timeout: float = 120, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command), capture_output=True, text=True, timeout=timeout, env=dict(env or os.environ), cwd=cwd)

    def popen(self, command: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``command`` on this host, its output appended to ``log`` (``ip netns exec`` execs it: the pid is the command's)."""
        return subprocess.Popen(self.argv(command), stdout=log.open("ab"), stderr=subprocess.STDOUT, env=dict(env or os.environ), cwd=cwd)

    def listeners(self) -> list[str]:
        """Every listening TCP socket on this host, as ``address:port``."""
        out = self.run(["ss", "-ltnH"]).stdout
        return [line.split()[3] for line in out.splitlines() if line.strip()]

    def reachable(self, address: str, port: int, timeout: float = 3.0) -> bool:
        """Whether a TCP connection from this host to ``address:port`` opens."""
        code = f"import socket; socket.create_connection(({address!r}, {port}), timeout={timeout}).close()"
        return self.run([sys.executable, "-c", code], timeout=timeout + 30).returncode == 0


class Network:
    """Private LANs and hosts for one test; ``close()`` (or ``with``) removes them all."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self._net = 200 + secrets.randbelow(50)  # 10.2xx.LAN.0/24, random so parallel runs do not meet
        self.lans: dict[str, str] = {}  # name -> bridge
        self.hosts: dict[str, Host] = {}

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def lan(self, name: str) -> str:
        """A new private LAN (a bridge without an address); returns its subnet prefix, e.g. ``10.213.1``."""
        bridge = f"fh{self.tag}b{len(self.lans)}"
        _ip("link", "add", bridge, "type", "bridge")
        self.lans[name] = bridge
        _ip("link", "set", bridge, "up")
        return self.prefix(name)

    def prefix(self, lan: str) -> str:
        return f"10.{self._net}.{list(self.lans).index(lan)}"

    def host(self, name: str, **lans: int) -> Host:
        """A host joining each LAN given as ``lan=last_octet`` (its address there is ``PREFIX.last_octet``)."""
        netns = f"fh{self.tag}-{name}"
        _ip("netns", "add", netns)
        host = Host(name, netns)
        self.hosts[name] = host
        _ip("netns", "exec", netns, "ip", "link", "set", "lo", "up")
        for i, (lan, octet) in enumerate(lans.items()):
            outside, inside = f"fh{self.tag}{len(self.hosts)}v{i}", f"eth{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
            _ip("link", "set", outside, "master", self.lans[lan])
            _ip("link", "set", outside, "up")
            address = f"{self.prefix(lan)}.{octet}"
            _ip("netns", "exec", netns, "ip", "addr", "add", f"{address}/24", "dev", inside)
            _ip("netns", "exec", netns, "ip", "link", "set", inside, "up")
            host.addresses[lan] = address
        return host

    def close(self) -> None:
        """Kill every process left on the hosts, then remove the namespaces (their veths go with them) and the bridges."""
        for host in self.hosts.values():
            pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        for bridge in self.lans.values():
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        self.hosts.clear()
        self.lans.clear()
