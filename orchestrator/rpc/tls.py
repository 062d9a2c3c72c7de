"""The daemon's TLS: its certificate and key, and for mutual TLS the CA its clients' certificates must chain to.

:func:`load` reads the files and checks them before anything is served: each
is readable PEM, the key is not passphrase-protected and belongs to the
certificate, the certificate has not expired. Any failure is one
:class:`~orchestrator.errors.InvalidArgument` naming the file, so ``serve``
refuses to start with one line instead of failing every handshake later.

:class:`ServerTls` hands grpc *dynamic* credentials: grpc asks its fetcher for
a new configuration before each new connection's handshake, and
:meth:`ServerTls.reload` (on SIGHUP) reads and checks the files again and, if
they pass, has the next handshakes use them. Connections already open keep
the certificate they started with; a reload that fails keeps the old material
and says why. Whether client certificates are required is fixed at start.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from orchestrator.errors import InvalidArgument

log = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS = 21
"""A certificate that expires sooner than this is logged as a WARNING at start and on each reload."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the daemon's TLS material is: its certificate (chain), its key, and the client CA (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class Material:
    """TLS material read and checked: the PEM bytes, and what to say about it."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    subject: str
    not_after: datetime

    def summary(self) -> str:
        """One line for the log: the certificate's subject and expiry, and whether clients need a certificate."""
        mutual = ", client certificates required" if self.client_ca is not None else ""
        return f"certificate {self.subject}, valid until {self.not_after:%Y-%m-%d %H:%M}Z{mutual}"

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """As grpc takes it."""
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.client_ca)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None


def load(files: TlsFiles, *, now: datetime | None = None) -> Material:
    """Read and check the files; :class:`InvalidArgument` naming the file and the problem otherwise."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read(files.cert, "certificate")
    key_pem = _read(files.key, "key")
    ca_pem = _read(files.client_ca, "client CA") if files.client_ca is not None else None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise InvalidArgument(f"the TLS certificate {files.cert} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise InvalidArgument(
            f"the TLS key {files.key} is protected by a passphrase, which the daemon cannot be given: "
            "store it unencrypted, readable by the daemon's user only"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument(f"the TLS key {files.key} is not a PEM private key") from None
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise InvalidArgument(f"the TLS key {files.key} does not belong to the certificate {files.cert}")
    moment = now or datetime.now(UTC)
    if leaf.not_valid_after_utc <= moment:
        raise InvalidArgument(f"the TLS certificate {files.cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise InvalidArgument(f"the TLS client CA {files.client_ca} is not a PEM certificate") from None
    return Material(
        cert_pem, key_pem, ca_pem, leaf.subject.rfc4514_string() or "(no subject)", leaf.not_valid_after_utc
    )


def warn_if_expiring(material: Material, *, now: datetime | None = None) -> None:
    """A WARNING when the certificate expires within :data:`EXPIRY_WARNING_DAYS` days."""
    left = material.not_after - (now or datetime.now(UTC))
    if left.days < EXPIRY_WARNING_DAYS:
        log.warning(
            "the TLS certificate %s expires in %d day(s), on %s: renew it and send SIGHUP",
            material.subject,
            left.days,
            f"{material.not_after:%Y-%m-%d %H:%M}Z",
        )


class ServerTls:
    """The server's credentials, whose certificate, key and client CA SIGHUP reloads (:meth:`reload`)."""

    def __init__(self, files: TlsFiles, material: Material) -> None:
        self.files = files
        self.material = material
        self._pending: deque[grpc.ServerCertificateConfiguration] = deque(maxlen=1)
        """The configuration the next handshake takes up (a deque: appending and popping are atomic, lock-free)."""

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; mutual TLS when the files name a client CA."""
        return grpc.dynamic_ssl_server_credentials(
            self.material.configuration(),
            self._fetch,  # type: ignore[arg-type]  # grpc-stubs forgets that None means "no change"
            require_client_authentication=self.files.client_ca is not None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc before every new connection's handshake, on one of its threads: cheap and never blocking.
        try:
            return self._pending.pop()
        except IndexError:
            return None

    def reload(self) -> Material:
        """Read and check the files again; new connections use them. Raises (keeping the old) when they fail."""
        material = load(self.files)
        self._pending.append(material.configuration())
        self.material = material
        return material
