"""A throwaway TLS deployment on 127.0.0.1: one SuperLink, N SuperNodes, `flwr run` of a study.

Used by ``bench/round_overhead.py`` and the fast-round e2e test. Two node
flavours: ``fast=False`` is stock Flower (``flower-supernode``, which spawns a
fresh ``flwr-clientapp`` per message, and the ServerApp's stock 3 s loop);
``fast=True`` is fedhelix's fast path (``client.fast_supernode`` in
``--isolation process`` with a per-node secret, ``client.launcher`` forking
warm ClientApp processes, and ``poll-interval`` on the ServerApp). Node
authentication is on: each node gets an ECDSA P-384 key registered with
``flwr supernode register``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.launcher import write_secret_file  # noqa: E402
from shared.flower_env import apply_flower_env  # noqa: E402
from shared.flower_polling import FAST, TASK_POLL_ENV  # noqa: E402

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
CONNECTION = "loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1: (ca.crt, server.crt, server.key)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("fedhelix loopback CA")).issuer_name(_name("fedhelix loopback CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    paths = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH ECDSA P-384 key pair, the format ``flwr supernode register`` takes: (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.key.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


@dataclass
class Loopback:
    """One deployment; use as a context manager (stops every process it started)."""

    workdir: Path
    site_files: list[Path]
    study: Path  # the study every node agreed to (node config approved-study: these nodes run without the gate)
    fast: bool = True
    auth: bool = True
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = apply_flower_env(dict(os.environ))
        self.env["FLWR_HOME"] = str(self.workdir / "flwr_home")
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env['PATH']}"
        self.env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{self.env.get('PYTHONPATH', '')}"
        if self.fast:
            self.env[TASK_POLL_ENV] = str(FAST.run_start_s)  # the SuperLink's SuperExec starting the ServerApp
        self.port = free_port()

    # -- processes -------------------------------------------------------------
    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("w")
        proc = subprocess.Popen(command, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> Loopback:
        ca, cert, key = make_tls(self.workdir / "tls")
        self.ca = ca
        link = [str(BIN / "flower-superlink"), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(ca), "--host", HOST, "--port", str(self.port)]
        if self.auth:
            link.append("--enable-supernode-auth")
        self._spawn("superlink", link)
        self._wait_healthy()
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{HOST}:{self.port}"\nroot-certificates = "{ca}"\n')
        for index, site in enumerate(self.site_files):
            self._start_node(index, site)
        return self

    def _wait_healthy(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {(self.workdir / 'superlink.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"https://{HOST}:{self.port}/health", verify=ssl.create_default_context(cafile=str(self.ca)), timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("flower-superlink did not become healthy")

    def _start_node(self, index: int, site: Path) -> None:
        name = f"node{index}"
        runtime_port = free_port()
        node = ["--superlink", f"{HOST}:{self.port}", "--root-certificates", str(self.ca), "--port", str(runtime_port), "--node-config", f"site-config='{site}' approved-study='{self.study}'"]
        if self.auth:
            (self.workdir / "keys").mkdir(exist_ok=True)
            private, public = make_node_key(self.workdir / "keys", name)
            done = self._flwr("supernode", "register", str(public), CONNECTION, "--name", name)
            if done.returncode != 0:
                raise RuntimeError(f"flwr supernode register failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
            node += ["--auth-supernode-private-key", str(private)]
        if not self.fast:
            self._spawn(name, [str(BIN / "flower-supernode"), *node])
            return
        secret = write_secret_file(self.workdir / "secrets" / f"{name}.secret")
        self._spawn(name, [sys.executable, "-m", "client.fast_supernode", *node, "--isolation", "process", "--superexec-auth-secret-file", str(secret)])
        self._spawn(f"{name}-launcher", [sys.executable, "-m", "client.launcher", "--runtime-api-address", f"{HOST}:{runtime_port}", "--secret-file", str(secret)])

    def run(self, study: Path, out: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run . loopback --stream`` of ``study``; the fast path's ServerApp polls every 0.1 s, stock 3 s."""
        poll = FAST.grid_s if self.fast else 0
        config = f"study='{study}' out='{out}' poll-interval={poll}"
        return self._flwr("run", str(ROOT), CONNECTION, "--stream", "--run-config", config, timeout=timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        self.procs.clear()

    def __enter__(self) -> Loopback:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-tail:]}" for p in sorted(self.workdir.glob("*.log")))


def write_tiny_study(folder: Path, rounds: int, name: str = "tiny", secure: bool = False) -> tuple[Path, list[Path]]:
    """A logistic model over WDBC's three hospitals, one local step: compute is milliseconds, so a round is overhead.

    Without secure aggregation a round is two exchanges (train, evaluate); with SecAgg+ five.
    """
    sites = [(ROOT / "studies" / "wdbc" / "sites" / f"hospital_{s}.toml").resolve() for s in "abc"]
    folder.mkdir(parents=True, exist_ok=True)
    blocks = "".join(f'\n[[sites]]\nname = "hospital_{s}"\nconfig = "{path}"\n' for s, path in zip("abc", sites))
    study = folder / f"{name}.toml"
    study.write_text(
        f'[study]\nname = "{name}"\ntask = "binary"\nmodel = "logistic"\nrounds = {rounds}\nstrategy = "fedavg"\n'
        f"local_steps = 1\nbatch_size = 32\nlearning_rate = 0.1\nseed = 1\nsecure_aggregation = {str(secure).lower()}\n{blocks}"
    )
    return study, sites


def round_times(metrics: Path) -> list[float]:
    """Seconds each round took after the first (round 1 also carries the handshake)."""
    elapsed = [json.loads(line)["elapsed_s"] for line in metrics.read_text().splitlines() if line.strip()]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]
