"""Provision a consortium: CA, server certificate, site node keys, admin identity, kits.

One directory ("kit") per role, each holding only what that role needs:

* ``OUT/ca``     the CA key. Keep it offline; it is needed only to re-issue certificates.
* ``OUT/server`` the server's TLS certificate and key and the allow-list of site node keys.
* ``OUT/admin``  the admin's signing identity (a certificate from the CA), connection settings and
  ``roster.json`` (site name -> node public key), which every signed run carries to the sites.
* ``OUT/<site>`` the site's node key (ECDSA P-384, OpenSSH format), the CA certificate,
  the admin certificate (to check studies were sent by the admin) and connection settings.

Private keys are written 0600. ``add_site`` creates one more site kit and extends the
server's allow-list without touching any existing key.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from shared.config import _read_toml, _Section, _unknown_tables
from shared.errors import ConfigError
from shared.pki import (
    Identity,
    cert_pem,
    create_ca,
    issue_certificate,
    load_identity,
    new_key,
    openssh_private,
    openssh_public,
    save_identity,
    split_address,
    write_private,
    write_public,
)

SITE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
DEFAULT_LINK_PORT = 9093  # the SuperLink itself, on loopback only, behind the gateway
DEFAULT_ADMIN_PORT = 9095  # the admin listener (Control API, mutual TLS with the admin's certificate)
ADMIN_BIND = "0.0.0.0"  # every address of the server host, as the site gateway; narrow admin_listen in server.toml if wanted


@dataclass(frozen=True)
class ConsortiumConfig:
    """The consortium file: who takes part and where the sites dial."""

    name: str
    server_address: str  # host:port the sites dial (the gateway)
    sites: tuple[str, ...]
    link_port: int = DEFAULT_LINK_PORT
    extra_hosts: tuple[str, ...] = ()  # more names for the server certificate
    certificate_days: int = 825
    admin_address: str = ""  # host:port the admin dials (the admin listener); default: server host, port 9095

    @property
    def host(self) -> str:
        return split_address(self.server_address)[0]

    @property
    def port(self) -> int:
        return split_address(self.server_address)[1]

    @property
    def admin_endpoint(self) -> str:
        """Where the admin's machine dials the admin listener."""
        return self.admin_address or f"{self.host}:{DEFAULT_ADMIN_PORT}"


def check_site_name(name: str, source: str) -> str:
    if not name or not set(name) <= SITE_NAME_CHARS:
        raise ConfigError(f"{source}: site name '{name}' must use lowercase letters, digits, '-' or '_'")
    return name


def parse_consortium(doc: dict, source: str = "consortium") -> ConsortiumConfig:
    _unknown_tables(doc, {"consortium"}, source)
    if "consortium" not in doc:
        raise ConfigError(f"{source}: the [consortium] section is missing")
    c = _Section(doc["consortium"], "consortium", source)
    config = ConsortiumConfig(
        name=c.get("name", str),
        server_address=c.get("server_address", str),
        sites=c.strings("sites"),
        link_port=c.positive("link_port", int, DEFAULT_LINK_PORT),
        extra_hosts=c.strings("extra_hosts"),
        certificate_days=c.positive("certificate_days", int, 825),
        admin_address=c.get("admin_address", str, ""),
    )
    c.done()
    split_address(config.server_address, f"{source}: [consortium] server_address")
    admin_port = split_address(config.admin_endpoint, f"{source}: [consortium] admin_address")[1]
    if not config.sites:
        raise ConfigError(f"{source}: [consortium] sites must list at least one site")
    for site in config.sites:
        check_site_name(site, source)
    if len(set(config.sites)) != len(config.sites):
        raise ConfigError(f"{source}: [consortium] sites lists a site twice")
    if config.port == config.link_port:
        raise ConfigError(f"{source}: [consortium] link_port must differ from the server_address port")
    if admin_port in (config.port, config.link_port):
        raise ConfigError(f"{source}: [consortium] the admin_address port ({admin_port}) must differ from the server_address port and link_port")
    if {"ca", "server", "admin"} & set(config.sites):
        raise ConfigError(f"{source}: 'ca', 'server' and 'admin' are kit names, not site names")
    return config


def load_consortium(path: str | Path) -> ConsortiumConfig:
    return parse_consortium(_read_toml(Path(path), "consortium"), source=str(path))


# --------------------------------------------------------------------------- kits


def _toml_value(value: object) -> str:
    return json.dumps(value) if not isinstance(value, list) else "[" + ", ".join(json.dumps(v) for v in value) + "]"


def _write_toml(path: Path, table: str, values: dict[str, object]) -> None:
    lines = [f"[{table}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    write_public(path, ("\n".join(lines) + "\n").encode())


def provision(config: ConsortiumConfig, out: Path, *, now: dt.datetime | None = None) -> list[Path]:
    """Create every kit under ``out``; refuses to overwrite an existing consortium."""
    out = Path(out)
    if (out / "ca" / "ca.key").exists():
        raise ConfigError(f"{out} already holds a consortium (ca/ca.key exists); use --add-site to extend it")
    ca = create_ca(config.name, not_before=now)
    save_identity(ca, out / "ca" / "ca.crt", out / "ca" / "ca.key")
    _write_toml(out / "ca" / "consortium.toml", "consortium", _consortium_values(config))
    hosts = sorted({config.host, split_address(config.admin_endpoint)[0], "127.0.0.1", "localhost", *config.extra_hosts})
    server = issue_certificate(ca, f"{config.name} server", server_hosts=hosts, days=config.certificate_days, not_before=now)
    admin = issue_certificate(ca, f"{config.name} admin", client=True, days=config.certificate_days, not_before=now)
    kits = [_server_kit(config, out / "server", ca, server, admin), _admin_kit(config, out / "admin", ca, admin)]
    for site in config.sites:
        kits.append(_site_kit(config, out, site, ca, admin.cert))
    write_roster(out)
    return kits


def add_site(out: Path, site: str) -> Path:
    """One more site: a new kit and one more key on the server's allow-list; nothing else changes."""
    out = Path(out)
    config = load_consortium(out / "ca" / "consortium.toml")
    check_site_name(site, "--add-site")
    if site in config.sites or (out / site).exists():
        raise ConfigError(f"site '{site}' is already provisioned in {out}")
    ca = load_identity(out / "ca" / "ca.crt", out / "ca" / "ca.key")
    admin_cert = load_identity(out / "admin" / "admin.crt", out / "admin" / "admin.key").cert
    kit = _site_kit(config, out, site, ca, admin_cert)
    if not (out / "server" / "admin.crt").exists():  # a server kit from before the admin listener
        write_public(out / "server" / "admin.crt", cert_pem(admin_cert))
    config = ConsortiumConfig(**{**config.__dict__, "sites": (*config.sites, site)})
    _write_toml(out / "ca" / "consortium.toml", "consortium", _consortium_values(config))
    _write_toml(out / "server" / "server.toml", "server", _server_values(config))
    write_roster(out)
    return kit


def write_roster(out: Path) -> Path:
    """``OUT/admin/roster.json``: the server's allow-list as ``{site: OpenSSH public key}``, signed into every run."""
    roster = {pub.stem: pub.read_text().strip() for pub in sorted((Path(out) / "server" / "nodes").glob("*.pub"))}
    path = Path(out) / "admin" / "roster.json"
    write_public(path, (json.dumps(roster, indent=2, sort_keys=True) + "\n").encode())
    return path


def _consortium_values(config: ConsortiumConfig) -> dict[str, object]:
    return {
        "name": config.name,
        "server_address": config.server_address,
        "sites": list(config.sites),
        "link_port": config.link_port,
        "extra_hosts": list(config.extra_hosts),
        "certificate_days": config.certificate_days,
        "admin_address": config.admin_endpoint,
    }


def _server_values(config: ConsortiumConfig) -> dict[str, object]:
    return {
        "consortium": config.name,
        "listen": f"0.0.0.0:{config.port}",
        "link_port": config.link_port,
        "admin_listen": f"{ADMIN_BIND}:{split_address(config.admin_endpoint)[1]}",
        "database": "state/superlink.db",
        "runs": "runs",
        "sites": list(config.sites),
    }


def _server_kit(config: ConsortiumConfig, kit: Path, ca: Identity, server: Identity, admin: Identity) -> Path:
    write_public(kit / "ca.crt", cert_pem(ca.cert))
    save_identity(server, kit / "server.crt", kit / "server.key")
    write_public(kit / "admin.crt", cert_pem(admin.cert))  # the one certificate the admin listener accepts (never the key)
    _write_toml(kit / "server.toml", "server", _server_values(config))
    _readme(kit, SERVER_README.format(name=config.name, port=config.port, link=config.link_port, admin=config.admin_endpoint))
    return kit


def _admin_kit(config: ConsortiumConfig, kit: Path, ca: Identity, admin: Identity) -> Path:
    write_public(kit / "ca.crt", cert_pem(ca.cert))
    save_identity(admin, kit / "admin.crt", kit / "admin.key")
    _write_toml(kit / "admin.toml", "admin", {"consortium": config.name, "admin_address": config.admin_endpoint})
    _readme(kit, ADMIN_README.format(name=config.name, admin=config.admin_endpoint))
    return kit


def _site_kit(config: ConsortiumConfig, out: Path, site: str, ca: Identity, admin_cert: object) -> Path:
    kit = out / site
    key = new_key()
    write_private(kit / "node.key", openssh_private(key))
    public = openssh_public(key, comment=f"{config.name}/{site}")
    write_public(kit / "node.pub", public)
    write_public(out / "server" / "nodes" / f"{site}.pub", public)  # the server's allow-list
    write_public(kit / "ca.crt", cert_pem(ca.cert))
    write_public(kit / "admin.crt", cert_pem(admin_cert))  # type: ignore[arg-type]
    _write_toml(kit / "node.toml", "node", {"consortium": config.name, "site": site, "server_address": config.server_address})
    _readme(kit, SITE_README.format(name=config.name, site=site, address=config.server_address))
    return kit


def _readme(kit: Path, text: str) -> None:
    write_public(kit / "README.md", text.encode())


SERVER_README = """# {name}: server kit

Holds the server's TLS certificate and key (`server.crt`, `server.key`, 0600), the consortium CA
certificate and `nodes/*.pub`, the public keys of the sites allowed to connect.

Start: `fedhelix server --kit THIS_DIR`. Sites dial port {port} (open it to the sites' addresses
only). Only the Fleet API (`/v1/fleet/`) and `/health` are reachable there; the SuperLink itself
listens on 127.0.0.1:{link}. The admin dials {admin} (`admin_listen` in server.toml): the Control
API, only for a client presenting `admin.crt`, the admin's certificate (open it to the admin's
address only). Every study writes its report, metrics, model and checkpoint to
`runs/<study>/<run nonce>/` here (`runs` in server.toml); `fedhelix run` fetches the results
from the admin listener when the run ends.
"""

ADMIN_README = """# {name}: admin kit

`admin.key` (0600) signs every study you submit; sites refuse runs without a valid signature.
`roster.json` lists each site's node public key; every signed run carries it.
From your own machine: `fedhelix run STUDY.toml --kit THIS_DIR`, `fedhelix status --kit THIS_DIR`.
They reach the server's admin listener ({admin}) with `admin.crt`/`admin.key` (mutual TLS);
keep this directory on your machine only.
"""

SITE_README = """# {name}: kit for site '{site}'

- `node.key` (0600): this site's identity (ECDSA P-384, OpenSSH format). Never copy it elsewhere.
- `node.pub`: its public half; the server's allow-list holds the same key.
- `ca.crt`: the consortium CA; the node refuses a server whose certificate it did not sign.
- `admin.crt`: the consortium admin's certificate; the node refuses studies the admin did not sign.

1. Check the data offline: `fedhelix check-site SITE.toml`
2. Approve a study: `fedhelix approve STUDY.toml --site SITE.toml`
3. Start the node: `fedhelix node --kit THIS_DIR --site SITE.toml` (dials {address}, outbound only)
"""
