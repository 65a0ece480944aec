"""Certificates made at test time with `cryptography`: a CA, server certificates, client certificates.

    ca = CertificateAuthority("test CA")
    ca.issue("server", dns=["localhost"], ips=["127.0.0.1"]).write(tmp_path, "server")  # server.pem, server.key
    ca.issue("alice", dns=["alice.clients.test"], client=True)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # fast to make, unlike RSA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmrec tests")])


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes
    certificate: x509.Certificate

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write <stem>.pem and <stem>.key; returns their paths."""
        cert, key = Path(directory) / f"{stem}.pem", Path(directory) / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates valid for a day."""

    def __init__(self, common_name: str = "llmrec test CA") -> None:
        self.key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, stem: str = "ca") -> Path:
        path = Path(directory) / f"{stem}.pem"
        path.write_bytes(self.cert_pem)
        return path

    def issue(self, common_name: str, dns: Sequence[str] = (), ips: Sequence[str] = (),
              client: bool = False) -> Issued:
        """A leaf certificate for a server (client=False) or a client, with these subject alternative names."""
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return Issued(certificate.public_bytes(serialization.Encoding.PEM), key_pem, certificate)


@dataclasses.dataclass
class TestPki:
    """Files for a TLS test server and its clients, all under one directory."""

    __test__ = False  # not a test class, whatever its name

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (cert, key)
    authority: CertificateAuthority


def make_pki(directory: Path, clients: dict[str, Sequence[str]] | None = None) -> TestPki:
    """A CA, a server certificate for localhost and 127.0.0.1, and client certificates {CN: [SAN DNS names]}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority()
    server_cert, server_key = authority.issue("llmrec test server", dns=["localhost"], ips=["127.0.0.1"]).write(
        directory, "server")
    issued = {name: authority.issue(name, dns=list(sans), client=True).write(directory, f"client-{name}")
              for name, sans in (clients or {}).items()}
    return TestPki(directory, authority.write(directory), server_cert, server_key, issued, authority)
