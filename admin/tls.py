"""HTTPS for the LAN: the configured certificate, or a self-signed one made on first start.

When the server listens beyond loopback and no `--tls-cert/--tls-key` were given, a private key
(ECDSA P-256, mode 0600) and a self-signed certificate for this host's names are written to
`<state_dir>/tls/` once and reused at every start, so Secure cookies work on the LAN. Its
SHA-256 fingerprint is printed in the log and by `appliance doctor`, so a person can compare
it with what their browser shows before trusting it. Never sends anything anywhere; never
logs the private key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
from pathlib import Path

from appliance.config import Settings

TLS_DIR = "tls"
CERT_FILE = "self-signed.crt"
KEY_FILE = "self-signed.key"
#: Browsers refuse server certificates valid for longer than about 825 days.
CERT_VALID_DAYS = 825


def self_signed_paths(state_dir: Path) -> tuple[Path, Path]:
    folder = state_dir / TLS_DIR
    return folder / CERT_FILE, folder / KEY_FILE


def fingerprint(cert_path: Path) -> str:
    """SHA-256 of the certificate (DER), as browsers show it: AA:BB:..."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _names(host: str) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    dns = sorted({"localhost", socket.gethostname(), socket.getfqdn()} - {""})
    addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        parsed = ipaddress.ip_address(host)
        if not parsed.is_unspecified:
            addresses.add(parsed)
    except ValueError:
        if host:
            dns = sorted(set(dns) | {host})
    return dns, sorted(addresses, key=str)


def make_self_signed(cert_path: Path, key_path: Path, host: str) -> None:
    """Write a new key (0600) and a self-signed certificate for `host` and this box's names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    dns, addresses = _names(host)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else "appliance"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "inference appliance (self-signed)")])
    now = dt.datetime.now(dt.UTC)
    alternative = [x509.DNSName(name) for name in dns] + [x509.IPAddress(address) for address in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_tls(settings: Settings) -> tuple[Settings, str | None]:
    """Settings with a certificate when one is needed, and a sentence about it for the log.

    Given certificates are used as they are; on loopback alone nothing changes; beyond
    loopback without certificates, the self-signed pair is made (once) and used.
    """
    if settings.tls_cert is not None and settings.tls_key is not None:
        return settings, f"TLS with {settings.tls_cert} (SHA-256 fingerprint {fingerprint(settings.tls_cert)})"
    if not settings.listens_beyond_loopback:
        return settings, None
    cert_path, key_path = self_signed_paths(settings.state_dir)
    made = False
    if not (cert_path.is_file() and key_path.is_file()):
        make_self_signed(cert_path, key_path, settings.host)
        made = True
    updated = settings.model_copy(update={"tls_cert": cert_path, "tls_key": key_path})
    what = "generated a self-signed certificate" if made else "using the self-signed certificate"
    return updated, f"TLS: {what} {cert_path} (SHA-256 fingerprint {fingerprint(cert_path)}); compare it with what your browser shows"


def fingerprint_line(settings: Settings) -> str | None:
    """What `appliance doctor` reports: the certificate in use or to be used, with its fingerprint."""
    if settings.tls_cert is not None and settings.tls_cert.is_file():
        return f"{settings.tls_cert}: SHA-256 {fingerprint(settings.tls_cert)}"
    cert_path, _ = self_signed_paths(settings.state_dir)
    if cert_path.is_file():
        return f"self-signed {cert_path}: SHA-256 {fingerprint(cert_path)}"
    return None
