"""How the admin's machine reaches the Control API: the admin kit's address, the local tunnel, ``flwr`` calls.

The flwr CLI cannot present a client certificate, so for as long as one ``fedhelix run`` or ``fedhelix status`` lasts, a forwarder listens on
127.0.0.1 (an ephemeral port, TLS with a throwaway self-signed certificate that only this
command's private FLWR_HOME trusts) and forwards the Control API to the admin listener,
presenting the admin's certificate and checking the server's against the consortium CA.
The admin's key is read here, on the admin's machine, and nowhere else. An admin kit from
before the admin listener (``control_address``: the SuperLink's loopback port) is dialled
directly, as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.admin_listener import CONTROL
from server.deployment import CONNECTION, flower_env, flwr_home_for
from server.forwarder import create_forwarder, server_context, serving_in_background
from server.run_store import RESULT_FILES
from shared.errors import ConfigError, FedhelixError
from shared.kits import read_kit
from shared.pki import cert_pem, check_issued_by, check_owner_only, check_validity, load_certificate, key_pem, self_signed_server, split_address, write_private, write_public

TUNNEL_HOST = "127.0.0.1"
# The command's own error line says what failed; the tunnel's lines appear only where logging is set up (--verbose).
logging.getLogger("fedhelix.admin-tunnel").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class AdminKit:
    """An admin kit: where the Control API is (``admin_address``, or ``control_address`` in kits from before it)."""

    path: Path
    consortium: str
    admin_address: str | None = None  # the server's admin listener (mutual TLS)
    control_address: str | None = None  # older kits: the SuperLink's loopback port, on the server host

    @property
    def address(self) -> str:
        return self.admin_address or str(self.control_address)


def load_admin_kit(path: Path) -> AdminKit:
    path, a = read_kit(path, "admin.toml", "admin", ("consortium",))
    if "admin_address" not in a and "control_address" not in a:
        raise ConfigError(f"{path}/admin.toml: [admin] admin_address is missing; use the admin kit written by `fedhelix provision`")
    admin = str(a["admin_address"]) if "admin_address" in a else None
    if admin is not None:
        split_address(admin, f"{path}/admin.toml admin_address")
    control = str(a["control_address"]) if "control_address" in a else None
    return AdminKit(path, str(a["consortium"]), admin, control)


def admin_client_context(kit: AdminKit) -> ssl.SSLContext:
    """TLS to the admin listener: the server checked against the consortium CA, the admin's certificate presented."""
    cert, key, ca = kit.path / "admin.crt", kit.path / "admin.key", kit.path / "ca.crt"
    check_owner_only(key, "admin key")
    admin = load_certificate(cert)
    check_issued_by(admin, load_certificate(ca), f"admin certificate {cert}")
    check_validity(admin, f"admin certificate {cert}")
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


@contextlib.contextmanager
def admin_tunnel(kit: AdminKit, workdir: Path) -> Iterator[tuple[str, Path]]:
    """Serve the local end for the duration of the block; yields its ``127.0.0.1:PORT`` and the certificate to trust."""
    if kit.admin_address is None:
        raise ConfigError(f"{kit.path}/admin.toml has no admin_address")
    identity = self_signed_server(TUNNEL_HOST)
    cert, key = workdir / "tunnel.crt", workdir / "tunnel.key"
    write_public(cert, cert_pem(identity.cert))
    write_private(key, key_pem(identity.key))
    app = create_forwarder(f"https://{kit.admin_address}", CONTROL, admin_client_context(kit), timeout=httpx.Timeout(60.0, read=None), name="admin tunnel")
    with contextlib.ExitStack() as stack:
        try:
            port = stack.enter_context(serving_in_background(app, server_context(str(cert), str(key)), TUNNEL_HOST))
        except OSError as err:
            raise FedhelixError(f"the admin's local tunnel to the server could not start: {err}") from None
        yield f"{TUNNEL_HOST}:{port}", cert


@contextlib.contextmanager
def control_home(kit: AdminKit, workdir: Path | None = None) -> Iterator[Path]:
    """A private FLWR_HOME whose one connection reaches the Control API from this machine, for the block's duration."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedhelix-admin-")))
        if kit.admin_address is None:  # an older kit: the SuperLink's loopback port, on the server host
            yield flwr_home_for(kit.path / "ca.crt", kit.address, workdir / "flwr-home")
            return
        address, trusted = stack.enter_context(admin_tunnel(kit, workdir))
        yield flwr_home_for(trusted, address, workdir / "flwr-home")


def flwr_json(home: Path, args: list[str], what: str, address: str) -> dict:
    """One ``flwr ... --format json`` call through the admin's connection, or one clear line."""
    command = [str(Path(sys.executable).parent / "flwr"), *args, CONNECTION, "--format", "json"]
    done = subprocess.run(command, env=flower_env(home), capture_output=True, text=True, timeout=120)
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        doc = {}
    if done.returncode != 0 or not doc.get("success", False):
        lines = (str(doc.get("error-message", "")) or done.stdout + done.stderr).strip().splitlines()
        detail = lines[-1] if lines else f"flwr exit code {done.returncode}"
        raise FedhelixError(f"{what} from {address} failed: {detail}")
    return doc


def fetch_results(kit: AdminKit, nonce: str, into: Path, names: tuple[str, ...] = RESULT_FILES) -> list[str]:
    """Copy run ``nonce``'s result files from the server's admin listener into ``into``; the names fetched.

    A file the run did not write (e.g. ``model.pt`` of a failed run) is skipped. A kit from
    before the admin listener fetches nothing (its admin works on the server host).
    """
    if kit.admin_address is None:
        return []
    fetched = []
    into.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.Client(base_url=f"https://{kit.admin_address}", verify=admin_client_context(kit), timeout=httpx.Timeout(60.0)) as client:
            for name in names:
                with client.stream("GET", f"/fedhelix/v1/runs/{nonce}/{name}") as reply:
                    if reply.status_code == 404:
                        continue
                    if reply.status_code != 200:
                        raise FedhelixError(f"fetching {name} of run {nonce} from {kit.admin_address} failed: HTTP {reply.status_code}")
                    tmp = into / f".{name}.part"
                    with tmp.open("wb") as fh:
                        for chunk in reply.iter_bytes():
                            fh.write(chunk)
                    tmp.replace(into / name)
                    fetched.append(name)
    except httpx.HTTPError as err:
        raise FedhelixError(f"fetching the results of run {nonce} from {kit.admin_address} failed: {err or type(err).__name__}") from None
    return fetched
