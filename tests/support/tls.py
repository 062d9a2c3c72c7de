"""TLS material made by the test, with ``cryptography``: a CA, certificates it signs, and files holding them.

Nothing here is committed or downloaded: each test makes a fresh CA (ECDSA
P-256, quick) and the certificates it needs, valid for loopback
(``127.0.0.1``, ``localhost``) unless told otherwise.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, PEM, and where they were written (once :meth:`write` ran)."""

    cert: bytes
    key: bytes
    cert_path: Path | None = None
    key_path: Path | None = None

    def write(self, folder: Path, name: str) -> Pair:
        """Write ``name.crt`` and ``name.key`` (0600) in ``folder``; the same pair, with its paths."""
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(self.cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.key)
        return Pair(self.cert, self.key, cert_path, key_path)

    @property
    def paths(self) -> tuple[Path, Path]:
        """(certificate, key) paths; the pair must have been written."""
        assert self.cert_path is not None and self.key_path is not None, "write() the pair first"
        return self.cert_path, self.key_path


class Authority:
    """A certificate authority that signs server and client certificates."""

    def __init__(self, name: str = "orchestrator test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        self._name = _name(name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        """The CA's certificate, PEM: what clients trust (``--tls-ca``), what the daemon asks of clients (mTLS)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        """Write the CA's certificate to ``path``; the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def server(self, *names: str, days: float = 30) -> Pair:
        """A server certificate for ``names`` (IP addresses or DNS names; loopback by default), valid for ``days``
        from now (a negative number: one that expired that many days ago, valid for a month before)."""
        return self._issue(names or LOOPBACK_NAMES, ExtendedKeyUsageOID.SERVER_AUTH, days)

    def client(self, common_name: str = "test client") -> Pair:
        """A client certificate (for mutual TLS)."""
        return self._issue((common_name,), ExtendedKeyUsageOID.CLIENT_AUTH, 30)

    def _issue(self, names: tuple[str, ...], usage: x509.ObjectIdentifier, days: float) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5) + min(timedelta(days=days - 30), timedelta()))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return Pair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
