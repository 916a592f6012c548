"""``fedhelix node``: a hospital's SuperNode, checked before it dials out.

Order matters: every check that can fail locally (kit, certificates, the site's data
against the contract, the server's TLS certificate) runs before the node registers,
so a problem is one line at the site and nothing is sent. The node then runs Flower's
SuperNode in a child process with TLS, the site's node key (SuperNode authentication)
and the approval gate of :mod:`client.node_gate`; probe and SuperNode both go through the
hospital's outbound HTTP proxy when one is set (:mod:`client.proxy`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from client.secagg_auth import AUTH_KEY
from client.approval import Approval, approvals_path, read_approvals
from client.proxy import Proxy, Route, choose_route, open_tunnel
from shared.config import SiteConfig, check_format, load_site
from shared.contract import load_site_data
from shared.errors import ConfigError, FedhelixError
from shared.flower_env import flower_process_env
from shared.kits import read_kit
from shared.ports import require_free_port
from shared.pki import (
    CertificateError,
    check_issued_by,
    check_owner_only,
    check_validity,
    load_certificate,
    load_ssh_private_key,
    split_address,
)

# Flower logs this when the SuperLink does not activate the node (its process exits with status 1):
# an unregistered key, or a key whose previous session it still counts as online.
FLOWER_NOT_ACTIVATED = b"Exit Code: 305"
# After a crash the SuperLink keeps the node's old session online until it misses
# HEARTBEAT_PATIENCE heartbeats (2 x 10 s on the fast node, 2 x 30 s on Flower's stock one)
# and refuses a new one meanwhile; the wait covers the stock case with a margin.
REJOIN_WAIT_S = 75.0
REJOIN_RETRY_S = 5.0
DIRECT = Route(None, "no proxy")


@dataclass(frozen=True)
class NodeKit:
    """A site kit as written by ``fedhelix provision``."""

    path: Path
    consortium: str
    site: str
    server_address: str

    @property
    def ca(self) -> Path:
        return self.path / "ca.crt"

    @property
    def key(self) -> Path:
        return self.path / "node.key"

    @property
    def admin_cert(self) -> Path:
        return self.path / "admin.crt"


def load_node_kit(path: Path) -> NodeKit:
    path, node = read_kit(path, "node.toml", "node", ("consortium", "site", "server_address"))
    return NodeKit(path, str(node["consortium"]), str(node["site"]), str(node["server_address"]))


def check_kit(kit: NodeKit) -> x509.Certificate:
    """The kit's key, CA and admin certificate are usable; returns the admin certificate."""
    check_owner_only(kit.key, "node key")
    load_ssh_private_key(kit.key)
    ca = load_certificate(kit.ca)
    check_validity(ca, f"consortium CA {kit.ca}")
    admin = load_certificate(kit.admin_cert)
    check_issued_by(admin, ca, f"admin certificate {kit.admin_cert}")
    check_validity(admin, f"admin certificate {kit.admin_cert}")
    return admin


def probe_server(kit: NodeKit, timeout: float = 10.0, proxy: Proxy | None = None) -> None:
    """Open one TLS connection to the server (through ``proxy`` with CONNECT, if any) and verify its certificate against the kit's CA."""
    host, port = split_address(kit.server_address, f"{kit.path}/node.toml server_address")
    context = ssl.create_default_context(cafile=str(kit.ca))
    try:
        raw = open_tunnel(proxy, host, port, timeout) if proxy is not None else socket.create_connection((host, port), timeout=timeout)
        with raw, context.wrap_socket(raw, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as err:
        reason = err.verify_message or str(err)
        if "expired" in reason:
            raise CertificateError(f"the server at {kit.server_address} presented an expired certificate; the consortium admin must renew it") from None
        if "issuer" in reason or "self-signed" in reason or "self signed" in reason:
            inspecting = f"; if the proxy {proxy} inspects TLS, ask your network team to exempt that address" if proxy is not None else ""
            raise CertificateError(
                f"the server at {kit.server_address} presented a certificate not issued by this kit's consortium CA ({kit.ca}); "
                f"refusing to connect (wrong server, or a kit from another consortium){inspecting}"
            ) from None
        raise CertificateError(f"the server at {kit.server_address} failed TLS verification: {reason}") from None
    except ssl.SSLError as err:
        raise CertificateError(f"TLS with the server at {kit.server_address} failed ({err.reason or err}); is it a fedhelix server?") from None
    except OSError as err:
        raise FedhelixError(f"cannot reach the server at {kit.server_address} ({err.strerror or err}); check the address and the firewall (outbound TCP {port})") from None


def check_site_data(site: SiteConfig, approvals: list[Approval]) -> None:
    """The site's data against the task, model and categories of every study it approved.

    With no approval that records them yet (none, or records from before they were kept),
    only the task-independent part of the contract is checked: the node cannot know which
    task its data will serve, and guessing one refuses data that fits its study.
    """
    studies: dict[tuple[str, str, str], str] = {}
    for a in approvals:
        if a.task:
            studies.setdefault((a.task, a.model, json.dumps(a.categories, sort_keys=True)), a.study)
    if not studies:
        load_site_data(site, None)
        return
    for (task, model, categories), name in studies.items():
        try:
            check_format(site, model)
            load_site_data(site, task, json.loads(categories))
        except FedhelixError as err:
            raise type(err)(f"the site's data does not fit approved study '{name}' ({task}, model {model}): {err.line}") from None


@dataclass(frozen=True)
class NodePlan:
    kit: NodeKit
    site: SiteConfig
    approvals: Path
    ledger: Path | None  # the site's privacy ledger (None: the site allows no DP studies)
    command: list[str]
    launcher: list[str] | None = None  # fast mode: the warm ClientApp launcher beside the SuperNode
    rejoin_wait_s: float = REJOIN_WAIT_S  # how long a refused activation is retried (a restart after a crash)
    route: Route = DIRECT  # how the node reaches the server (an outbound HTTP proxy, or directly)
    flwr_home: Path | None = None  # this node's own FLWR_HOME (the apps it installed), not shared with another node


def prepare_node(
    kit_path: Path,
    site_path: Path,
    *,
    port: int = 9094,
    probe: bool = True,
    fast: bool = True,
    rejoin_wait_s: float = REJOIN_WAIT_S,
    proxy: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodePlan:
    """Every local check, then the SuperNode command line (nothing started yet).

    ``fast`` (default): short polls and a warm, forking ClientApp launcher (about a second of
    fixed cost per round); ``fast=False`` runs Flower's stock SuperNode (a fresh ClientApp
    process per message, 3 s polls). ``proxy`` (``--proxy``) wins over ``HTTPS_PROXY`` in
    ``environ`` (default: this process's); see :mod:`client.proxy`.
    """
    kit = load_node_kit(kit_path)
    site = load_site(site_path)
    if site.name != kit.site:
        raise ConfigError(f"site file {site.path} describes site '{site.name}' but the kit {kit.path} belongs to '{kit.site}'")
    check_kit(kit)
    approvals = approvals_path(site)
    check_site_data(site, read_approvals(approvals))  # the contract, before anything leaves (an unreadable approvals file fails here too)
    # The SuperNode's Runtime API listens on this loopback port: taken, Flower would end in a traceback.
    require_free_port("127.0.0.1", port, "another node?", "give this node its own --port")
    route = choose_route(proxy, *split_address(kit.server_address, f"{kit.path}/node.toml server_address"), environ)
    if probe:
        probe_server(kit, proxy=route.proxy)
    # The site file's [privacy] ledger is the one ledger of this dataset (also what `fedhelix ledger show` reads).
    ledger = site.privacy.ledger if site.privacy is not None else None
    # The node key also signs this site's SecAgg+ public keys (checked by the other sites against the signed roster).
    node_config = f'site-config="{site.path}" {AUTH_KEY}="{kit.key}"'
    command = [
        sys.executable, "-m", "client.supernode_entry",
        "--site", kit.site, "--consortium", kit.consortium, "--approvals", str(approvals), "--admin-cert", str(kit.admin_cert),
        *(["--fast"] if fast else []),
        "--",
        "--superlink", kit.server_address,
        "--root-certificates", str(kit.ca),
        "--auth-supernode-private-key", str(kit.key),
        "--node-config", node_config,
        "--port", str(port),
    ]  # fmt: skip
    launcher = None
    if fast:
        from client.launcher import write_secret_file
        from client.task_wakeup import new_wake_name

        # The node's Runtime API hands out tasks; only holders of this secret may ask (loopback, 0600).
        secret = write_secret_file(approvals.parent / f".{kit.site}.runtime-secret")
        wake = new_wake_name()  # the SuperNode wakes the launcher when a message arrives (a hint; tasks still need the secret)
        command[command.index("--fast") + 1 : command.index("--fast") + 1] = ["--wake-name", wake]
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        launcher = [sys.executable, "-m", "client.launcher", "--runtime-api-address", f"127.0.0.1:{port}", "--secret-file", str(secret), "--wake-name", wake]
    # Flower installs each run's app under FLWR_HOME/apps; two nodes sharing one (the default ~/.flwr)
    # would unpack into the same directory at once, and one could plant code the other runs.
    flwr_home = approvals.parent / f".{kit.site}.flwr"
    flwr_home.mkdir(mode=0o700, exist_ok=True)
    return NodePlan(kit, site, approvals, ledger, command, launcher, max(0.0, rejoin_wait_s), route, flwr_home)


def run_node(plan: NodePlan) -> int:
    """Run the SuperNode in the foreground; translate Flower's exit codes into one line.

    A refused activation is retried for ``plan.rejoin_wait_s``: a node restarted right
    after a crash is refused until the SuperLink lets its previous session expire.
    """
    env = plan.route.child_env(flower_process_env(plan.flwr_home))  # flower-superexec, flwr-clientapp on PATH; the probe's proxy, loopback direct
    # Own process groups: stopping the node stops Flower's SuperExec / the launcher and every ClientApp.
    # The launcher outlives SuperNode retries (it only polls the node's local Runtime API).
    helpers = [subprocess.Popen(plan.launcher, env=env, start_new_session=True)] if plan.launcher else []
    running: list[subprocess.Popen] = []
    stopping = threading.Event()

    def stop_all() -> None:
        for p in (*running, *helpers):
            _stop_group(p)

    def on_sigterm(*_: object) -> None:
        stopping.set()
        stop_all()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    deadline = time.monotonic() + plan.rejoin_wait_s
    refused, code = False, 0
    try:
        while True:
            proc = subprocess.Popen(plan.command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            running[:] = [proc]
            code, refused = _pass_through(proc)
            remaining = deadline - time.monotonic()
            if not refused or stopping.is_set() or remaining <= 0:
                break
            print(
                f"the server did not activate this node (not on the allow-list, or its previous session still counts as "
                f"online for up to a minute after a crash); retrying for another {remaining:.0f} s",
                flush=True,
            )
            if stopping.wait(min(REJOIN_RETRY_S, remaining)):
                break
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)
    if refused and not stopping.is_set():
        raise FedhelixError(
            f"the server refused this node's key: site '{plan.kit.site}' is not on the consortium's allow-list; "
            f"ask the consortium admin to register {plan.kit.path / 'node.pub'}"
        )
    return code


def _pass_through(proc: subprocess.Popen) -> tuple[int, bool]:
    """Copy the SuperNode's log to ours until it exits: (exit status, whether activation was refused)."""
    refused = False
    assert proc.stdout is not None
    for raw in proc.stdout:  # Flower prints its exit code; the process status itself is 1
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        refused = refused or FLOWER_NOT_ACTIVATED in raw
    code = proc.wait()
    return (0 if code < 0 else code), refused  # stopped by a signal (SIGTERM from systemd, Ctrl-C): a clean stop


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the node's process group, then SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
