"""Provisioning: certificates chain to the consortium CA, keys are private, adding a site re-keys nothing."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.provision import (
    ConsortiumConfig,
    add_site,
    load_consortium,
    parse_consortium,
    provision,
)
from shared.errors import ConfigError
from shared.pki import (
    CertificateError,
    check_issued_by,
    check_server_chain,
    check_validity,
    create_ca,
    load_certificate,
    load_ssh_private_key,
    san_hosts,
)

CONFIG = ConsortiumConfig(name="demo", server_address="fl.example.org:8000", sites=("northeast", "south"), extra_hosts=("10.0.0.5",))


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    provision(CONFIG, out)
    return out


def test_every_role_gets_its_own_kit(kits: Path) -> None:
    assert sorted(p.name for p in kits.iterdir()) == ["admin", "ca", "northeast", "server", "south"]
    for site in CONFIG.sites:
        assert {p.name for p in (kits / site).iterdir()} >= {"node.key", "node.pub", "ca.crt", "admin.crt", "node.toml", "README.md"}
        assert not (kits / site / "server.key").exists() and not (kits / site / "ca.key").exists()
    assert not (kits / "server" / "ca.key").exists()


def test_private_keys_are_owner_only(kits: Path) -> None:
    keys = [kits / "ca" / "ca.key", kits / "server" / "server.key", kits / "admin" / "admin.key", *(kits / s / "node.key" for s in CONFIG.sites)]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_server_certificate_chains_to_ca_and_names_the_hosts(kits: Path) -> None:
    ca = load_certificate(kits / "ca" / "ca.crt")
    cert = load_certificate(kits / "server" / "server.crt")
    check_issued_by(cert, ca, "server")
    assert set(san_hosts(cert)) >= {"fl.example.org", "10.0.0.5", "127.0.0.1", "localhost"}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    check_server_chain(kits / "south" / "ca.crt", kits / "server" / "server.crt", "fl.example.org")
    with pytest.raises(CertificateError, match="does not name 'other.example.org'"):
        check_server_chain(kits / "south" / "ca.crt", kits / "server" / "server.crt", "other.example.org")


def test_node_keys_are_p384_openssh_and_on_the_allow_list(kits: Path) -> None:
    for site in CONFIG.sites:
        key = load_ssh_private_key(kits / site / "node.key")
        assert isinstance(key.curve, ec.SECP384R1)
        public = serialization.load_ssh_public_key((kits / "server" / "nodes" / f"{site}.pub").read_bytes())
        assert public.public_numbers() == key.public_key().public_numbers()
        assert (kits / site / "node.pub").read_bytes() == (kits / "server" / "nodes" / f"{site}.pub").read_bytes()


def test_site_keys_are_distinct(kits: Path) -> None:
    assert (kits / "northeast" / "node.pub").read_bytes() != (kits / "south" / "node.pub").read_bytes()


def test_provision_refuses_to_overwrite(kits: Path) -> None:
    with pytest.raises(ConfigError, match="already holds a consortium"):
        provision(CONFIG, kits)


def test_add_site_keeps_every_existing_key(tmp_path: Path) -> None:
    provision(CONFIG, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".key", ".crt", ".pub")}
    add_site(tmp_path, "west")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".key", ".crt", ".pub")}
    assert all(after[p] == content for p, content in before.items())
    assert tmp_path / "west" / "node.key" in after and tmp_path / "server" / "nodes" / "west.pub" in after
    assert load_consortium(tmp_path / "ca" / "consortium.toml").sites == ("northeast", "south", "west")
    assert '"west"' in (tmp_path / "server" / "server.toml").read_text()
    with pytest.raises(ConfigError, match="already provisioned"):
        add_site(tmp_path, "west")


def test_admin_kit_roster_lists_every_site_key_and_add_site_extends_it(tmp_path: Path) -> None:
    import json

    provision(CONFIG, tmp_path)
    roster = json.loads((tmp_path / "admin" / "roster.json").read_text())
    assert roster == {site: (tmp_path / site / "node.pub").read_text().strip() for site in CONFIG.sites}
    assert all(key.startswith("ecdsa-sha2-nistp384 ") for key in roster.values())
    add_site(tmp_path, "west")
    extended = json.loads((tmp_path / "admin" / "roster.json").read_text())
    assert extended == {**roster, "west": (tmp_path / "west" / "node.pub").read_text().strip()}


def test_expired_and_foreign_certificates_are_named(tmp_path: Path) -> None:
    old = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    expired = create_ca("old", days=30, not_before=old)
    with pytest.raises(CertificateError, match="expired on 2020-01-31"):
        check_validity(expired.cert, "consortium CA")
    future = create_ca("future", days=30, not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    with pytest.raises(CertificateError, match="not valid before"):
        check_validity(future.cert, "consortium CA")
    other = create_ca("other")
    with pytest.raises(CertificateError, match="not issued by this consortium's CA"):
        check_issued_by(expired.cert, other.cert, "server certificate")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('name = "x"\nsites = ["a"]', "server_address: is required"),
        ('name = "x"\nserver_address = "nohost"\nsites = ["a"]', "is not host:port"),
        ('name = "x"\nserver_address = "h:8000"\nsites = []', "at least one site"),
        ('name = "x"\nserver_address = "h:8000"\nsites = ["Bad Name"]', "lowercase"),
        ('name = "x"\nserver_address = "h:8000"\nsites = ["a", "a"]', "twice"),
        ('name = "x"\nserver_address = "h:8000"\nsites = ["admin"]', "kit names"),
        ('name = "x"\nserver_address = "h:9093"\nsites = ["a"]', "link_port must differ"),
        ('name = "x"\nserver_address = "h:8000"\nsites = ["a"]\nsits = 1', "unknown key"),
    ],
)
def test_consortium_file_errors_are_one_line(body: str, message: str) -> None:
    import tomllib

    with pytest.raises(ConfigError, match=message) as err:
        parse_consortium(tomllib.loads("[consortium]\n" + body), "consortium.toml")
    assert "\n" not in str(err.value)
