"""A local certificate authority and a server certificate for Mosquitto's TLS listener.

For users who have no certificate of their own: `llm-bridge broker tls` writes,
into `broker/certs/`, `ca.crt` (give it to the bridge as `BRIDGE_MQTT_CA_FILE`
and copy it to each device), `ca.key` (keep it; it signs the next server
certificate), `server.crt` and `server.key` (broker/mosquitto.conf's 8883
listener). Private keys are written owner-only (0600). The CA is kept when it
exists, so renewing the server certificate does not invalidate the devices' CA
file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.ops.passwords import write_private

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "mosquitto")
CA_DAYS = 3650


@dataclass
class Issued:
    ca_cert: Path
    ca_created: bool
    server_cert: Path
    server_key: Path
    hosts: list[str]
    not_after: dt.datetime


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _load_or_make_ca(
    cert_dir: Path, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    cert_path, key_path = cert_dir / "ca.crt", cert_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key made by llm-bridge broker tls")
        return cert, key, False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-bridge local CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    cert_path.write_text(_cert_pem(cert))
    return cert, key, True


def make_certificates(cert_dir: Path, hosts: list[str] | None = None, days: int = 825) -> Issued:
    """Make (or reuse) the CA and issue a new server certificate for `hosts`.

    Args:
        cert_dir: where the files go (`broker/certs`).
        hosts: names and addresses devices and the bridge use to reach the
            broker; `localhost`, `127.0.0.1` and `mosquitto` are always added.
        days: how long the server certificate is valid.
    """
    now = dt.datetime.now(dt.UTC)
    names = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    ca_cert, ca_key, ca_created = _load_or_make_ca(cert_dir, now)
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key, server_cert = cert_dir / "server.key", cert_dir / "server.crt"
    write_private(server_key, _key_pem(key))
    server_cert.write_text(_cert_pem(cert))
    return Issued(cert_dir / "ca.crt", ca_created, server_cert, server_key, names, not_after)
