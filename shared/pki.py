"""Keys and X.509 certificates for a consortium, built with ``cryptography``.

One consortium CA signs the server's TLS certificate (so every site can check it
is talking to the consortium's server, not an impostor) and the admin's client
certificate. Site identities are ECDSA P-384 key pairs in OpenSSH format, the
form Flower's SuperNode authentication expects. Nothing here is a new primitive:
this module only chooses parameters and writes files safely.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError, FedhelixError

CURVE = ec.SECP384R1()  # Flower's SuperNode auth requires P-384; used for TLS keys too
SIGNATURE_HASH = hashes.SHA384()


class CertificateError(FedhelixError):
    """A certificate or key is missing, expired, not yet valid or from another CA."""


@dataclass(frozen=True)
class Identity:
    """A private key with its certificate (the CA, the server or the admin)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-384 private key."""
    return ec.generate_private_key(CURVE)


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return start, start + dt.timedelta(days=days)


def _self_signed_builder(key: ec.EllipticCurvePrivateKey, name: x509.Name, start: dt.datetime, end: dt.datetime) -> x509.CertificateBuilder:
    """Subject = issuer = ``name``, ``key``'s public half, a random serial, valid from ``start`` to ``end``."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def create_ca(consortium: str, days: int = 3650, not_before: dt.datetime | None = None) -> Identity:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = new_key()
    cert = (
        _self_signed_builder(key, _name(f"{consortium} consortium CA", consortium), *_validity(days, not_before))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign + cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, SIGNATURE_HASH)
    )
    return Identity(key, cert)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_certificate(
    ca: Identity,
    common_name: str,
    *,
    server_hosts: list[str] | None = None,
    client: bool = False,
    days: int = 825,
    not_before: dt.datetime | None = None,
) -> Identity:
    """An end-entity certificate signed by ``ca``: a TLS server (with SANs) or a TLS client."""
    key = new_key()
    start, end = _validity(days, not_before)
    organisation = ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server_hosts else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, str(organisation)))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server_hosts:
        builder = builder.add_extension(_san(server_hosts), critical=False)
    return Identity(key, builder.sign(ca.key, SIGNATURE_HASH))


def self_signed_server(host: str, hours: float = 24.0) -> Identity:
    """A throwaway self-signed TLS server certificate for ``host`` (the admin's local tunnel: trusted only by its own client)."""
    key = new_key()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        _self_signed_builder(key, _name("fedhelix admin tunnel", "fedhelix"), start, start + dt.timedelta(hours=hours))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san([host]), critical=False)
        .sign(key, SIGNATURE_HASH)
    )
    return Identity(key, cert)


# --------------------------------------------------------------------------- files


def write_private(path: Path, data: bytes) -> None:
    """Write secret material readable by the owner only (0600), never world-readable in between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def openssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def openssh_public(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def save_identity(ident: Identity, cert_path: Path, key_path: Path) -> None:
    write_public(cert_path, cert_pem(ident.cert))
    write_private(key_path, key_pem(ident.key))


def load_identity(cert_path: Path, key_path: Path) -> Identity:
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise CertificateError(f"cannot read private key {key_path}: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an EC private key")
    return Identity(key, cert)


def check_owner_only(path: Path, what: str) -> None:
    """Refuse a private key others can read (or one that is missing), with the fix."""
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"{what} {path} not found; use the kit written by `fedhelix provision`")
    if path.stat().st_mode & 0o077:
        raise CertificateError(f"{what} {path} is readable by other users; run `chmod 600 {path}`")


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError:
        raise CertificateError(f"certificate {path} not found or unreadable") from None
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate") from None


def load_ssh_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's node key, checked to be the P-384 key Flower's node authentication needs."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except OSError:
        raise CertificateError(f"node key {path} not found or unreadable") from None
    except ValueError as err:
        raise CertificateError(f"node key {path} is not an OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise CertificateError(f"node key {path} must be ECDSA P-384 (Flower's SuperNode authentication)")
    return key


# --------------------------------------------------------------------------- checks


def check_validity(cert: x509.Certificate, what: str, now: dt.datetime | None = None) -> None:
    """Refuse a certificate outside its validity window, naming the dates."""
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; ask the consortium admin for a renewed kit"
        )
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock")


def check_issued_by(cert: x509.Certificate, ca: x509.Certificate, what: str) -> None:
    """Check ``cert`` carries a valid signature of ``ca`` (another consortium's CA fails)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"{what} was not issued by this consortium's CA ({ca.subject.rfc4514_string()})") from None


def check_server_chain(ca_path: Path, cert_path: Path, host: str) -> None:
    """What a site checks before dialling: CA valid, server cert from that CA, valid, and naming ``host``."""
    ca = load_certificate(ca_path)
    check_validity(ca, f"consortium CA {ca_path}")
    cert = load_certificate(cert_path)
    check_issued_by(cert, ca, f"server certificate {cert_path}")
    check_validity(cert, f"server certificate {cert_path}")
    if host not in san_hosts(cert):
        raise CertificateError(f"server certificate {cert_path} does not name '{host}' (it names {', '.join(san_hosts(cert))})")


def san_hosts(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def split_address(address: str, source: str = "address") -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) into its parts, with a readable error."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source}: '{address}' is not host:port")
    return host, int(port)
