"""``fedhelix server``: the SuperLink on loopback, the gateway (site and admin listeners), the allow-list.

Three things a consortium server must do that stock Flower OSS leaves open:
TLS everywhere (the server certificate from the consortium CA), SuperNode
authentication always on (only provisioned site keys may join), and the Control API
kept off the site-facing address and open only to the admin's certificate (see
:mod:`server.gateway`, :mod:`server.admin_listener`). Telemetry and update checks are
off in every process (:mod:`shared.flower_env`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from server.run_store import RUNS_ENV
from shared.errors import ConfigError, FedhelixError
from shared.flower_env import flower_process_env
from shared.flower_polling import FAST, TASK_POLL_ENV
from shared.kits import read_kit
from shared.pki import check_issued_by, check_owner_only, check_validity, load_certificate, split_address
from shared.ports import require_free_port

CONNECTION = "fedhelix"  # the flwr CLI's name for this server's Control API


@dataclass(frozen=True)
class ServerKit:
    """A server kit as written by ``fedhelix provision``."""

    path: Path
    consortium: str
    listen: str
    link_port: int
    database: Path
    admin_listen: str | None = None  # the admin listener's bind address; None: a kit from before it (Control on loopback only)
    runs: Path | None = None  # where deployed runs write (server.run_store); None: PATH/runs

    @property
    def runs_dir(self) -> Path:
        return self.runs or self.path / "runs"

    @property
    def ca(self) -> Path:
        return self.path / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.path / "server.crt"

    @property
    def key(self) -> Path:
        return self.path / "server.key"

    @property
    def admin_cert(self) -> Path:
        return self.path / "admin.crt"

    @property
    def link_address(self) -> str:
        return f"127.0.0.1:{self.link_port}"

    def node_keys(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted((self.path / "nodes").glob("*.pub"))}


def load_server_kit(path: Path) -> ServerKit:
    path, s = read_kit(path, "server.toml", "server", ("consortium", "listen", "link_port", "database"))
    database = Path(str(s["database"]))
    admin_listen = str(s["admin_listen"]) if "admin_listen" in s else None
    if admin_listen is not None:
        split_address(admin_listen, f"{path}/server.toml admin_listen")
    runs = Path(str(s.get("runs", "runs")))
    return ServerKit(
        path, str(s["consortium"]), str(s["listen"]), int(s["link_port"]), database if database.is_absolute() else path / database, admin_listen,
        runs if runs.is_absolute() else path / runs,
    )  # fmt: skip


def check_server_kit(kit: ServerKit) -> None:
    for what, file in (("consortium CA", kit.ca), ("server certificate", kit.cert)):
        check_validity(load_certificate(file), f"{what} {file}")
    check_owner_only(kit.key, "server key")
    if kit.admin_listen is not None:  # the one certificate the admin listener lets in: the consortium's, and valid
        if not kit.admin_cert.is_file():
            raise ConfigError(f"{kit.path}/server.toml sets admin_listen but {kit.admin_cert} is missing; copy kits/admin/admin.crt there (never admin.key)")
        admin = load_certificate(kit.admin_cert)
        check_issued_by(admin, load_certificate(kit.ca), f"admin certificate {kit.admin_cert}")
        check_validity(admin, f"admin certificate {kit.admin_cert}")
    if not kit.node_keys():
        raise ConfigError(f"{kit.path}/nodes holds no site keys; provision sites first")


def flwr_home_for(kit_ca: Path, control_address: str, home: Path) -> Path:
    """A private FLWR_HOME whose one connection is this consortium's Control API (TLS, CA-verified)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{control_address}"\nroot-certificates = "{kit_ca}"\n'
    )
    return home


def flower_env(flwr_home: Path) -> dict[str, str]:
    return flower_process_env(flwr_home)


def superlink_command(kit: ServerKit) -> list[str]:
    return [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--ssl-certfile", str(kit.cert), "--ssl-keyfile", str(kit.key), "--ssl-ca-certfile", str(kit.ca),
        "--enable-supernode-auth",
        "--database", str(kit.database),
        "--host", "127.0.0.1", "--port", str(kit.link_port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def gateway_command(kit: ServerKit) -> list[str]:
    host, port = split_address(kit.listen, f"{kit.path}/server.toml listen")
    command = [sys.executable, "-m", "server.gateway", host, str(port), f"https://{kit.link_address}", str(kit.ca), str(kit.cert), str(kit.key)]
    if kit.admin_listen is not None:
        admin_host, admin_port = split_address(kit.admin_listen)
        command += [admin_host, str(admin_port), str(kit.admin_cert), str(kit.runs_dir)]
    return command


def wait_listening(host: str, port: int, timeout_s: float, proc: subprocess.Popen) -> None:
    """The admin listener accepts TCP (no TLS probe: only the admin's key could finish that handshake)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedhelixError(f"the gateway exited with code {proc.returncode} while starting; see gateway.log")
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise FedhelixError(f"the admin listener {host}:{port} did not open within {timeout_s:.0f} s; see gateway.log")


def probe_host(host: str) -> str:
    """Where this host reaches a listener bound to ``host`` (a wildcard bind: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def wait_healthy(url: str, ca: Path, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FedhelixError(f"{proc.args[0] if isinstance(proc.args, list) else proc.args} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise FedhelixError(f"{url} did not answer within {timeout_s:.0f} s")


def register_sites(kit: ServerKit, env: dict[str, str]) -> list[str]:
    """Put every provisioned site key on the SuperLink's allow-list (idempotent across restarts)."""
    flwr = str(Path(sys.executable).parent / "flwr")
    registered = []
    for site, key in kit.node_keys().items():  # `flwr supernode ls` does not list names: register, tolerate "already"
        done = subprocess.run([flwr, "supernode", "register", str(key), CONNECTION, "--name", site, "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 and "already" not in (done.stdout + done.stderr).lower():
            raise FedhelixError(f"registering site '{site}' ({key}) failed: {(done.stdout + done.stderr).strip().splitlines()[-1:]}")
        registered.append(site)
    return registered


@dataclass
class RunningServer:
    kit: ServerKit
    superlink: subprocess.Popen
    gateway: subprocess.Popen
    flwr_home: Path

    def stop(self) -> None:
        """Stop the gateway, the SuperLink and every process they started.

        Flower's SuperExec and the ServerApp it runs leave the SuperLink's process group,
        so they are found through their parent links first and stopped after it.
        """
        started = _descendants(self.gateway, self.superlink)
        for proc in (self.gateway, self.superlink):
            _signal_group(proc, signal.SIGTERM)
        for proc in (self.gateway, self.superlink):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
        for child in started:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(started, timeout=10)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def _descendants(*procs: subprocess.Popen) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    for proc in procs:
        try:
            found += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def check_ports_free(kit: ServerKit) -> None:
    """The SuperLink's, the gateway's and the admin listener's ports are free (taken, the health checks could even reach another server)."""
    toml = kit.path / "server.toml"
    require_free_port("127.0.0.1", kit.link_port, "another fedhelix server?", f"stop it, or set another link_port in {toml}")
    host, port = split_address(kit.listen, f"{toml} listen")
    require_free_port(host, port, "another server?", f"stop it, or set another port in listen of {toml}")
    if kit.admin_listen is not None:
        admin_host, admin_port = split_address(kit.admin_listen, f"{toml} admin_listen")
        require_free_port(admin_host, admin_port, "another server?", f"stop it, or set another port in admin_listen of {toml}")


def start_server(kit_path: Path, log_dir: Path | None = None) -> RunningServer:
    """Start SuperLink and gateway, register the sites; returns once both answer /health."""
    kit = load_server_kit(kit_path)
    check_server_kit(kit)
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        raise FedhelixError("flower-superlink not found beside this Python; install fedhelix into this environment")
    check_ports_free(kit)
    kit.database.parent.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or kit.database.parent
    home = flwr_home_for(kit.ca, kit.link_address, kit.database.parent / "flwr-home")
    env = flower_env(home)
    env.setdefault(TASK_POLL_ENV, str(FAST.run_start_s))  # SuperExec starts a study's ServerApp within 0.5 s
    kit.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    env[RUNS_ENV] = str(kit.runs_dir.resolve())  # inherited by SuperExec and the ServerApp: where every run writes
    link_log = open(log_dir / "superlink.log", "ab")  # noqa: SIM115 - owned by the process
    superlink = subprocess.Popen(superlink_command(kit), env=env, stdout=link_log, stderr=subprocess.STDOUT, start_new_session=True)
    gateway = None
    try:
        wait_healthy(f"https://{kit.link_address}/health", kit.ca, 60, superlink)
        register_sites(kit, env)
        gate_log = open(log_dir / "gateway.log", "ab")  # noqa: SIM115
        gateway = subprocess.Popen(gateway_command(kit), env=env, stdout=gate_log, stderr=subprocess.STDOUT, start_new_session=True)
        host, port = split_address(kit.listen)
        wait_healthy(f"https://{probe_host(host)}:{port}/health", kit.ca, 30, gateway)
        if kit.admin_listen is not None:
            admin_host, admin_port = split_address(kit.admin_listen)
            wait_listening(probe_host(admin_host), admin_port, 30, gateway)
    except BaseException:
        for proc in (gateway, superlink):
            if proc is not None:
                _signal_group(proc, signal.SIGKILL)
        raise
    return RunningServer(kit, superlink, gateway, home)


def sites_status(server: RunningServer) -> list[dict]:
    """The SuperLink's view of the registered nodes (flwr supernode ls)."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
        env=flower_env(server.flwr_home), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        return list(json.loads(out.stdout).get("nodes", []))
    except (ValueError, AttributeError):
        return []
