"""Credentials at rest: sealed with AES-256-GCM under a key ring, told apart by keyed fingerprints.

Every backend stores what this module makes (:class:`~orchestrator.model.SealedCredentials`)
as opaque columns; the crypto lives here and nowhere else, so the SQLite and PostgreSQL
stores share it.

    key ring     ORCHESTRATOR_SECRET_KEY, or the key file: base64 of 32 random bytes each,
                 separated by commas (or lines); the first seals, every one opens
    key id       the first 8 hex digits of SHA-256("orchestrator key id" || key)
    seal         AES-256-GCM(key, a random 96-bit nonce, the credentials as canonical JSON,
                 associated data = ["orchestrator-credentials", 1, stream, incarnation])
    fingerprint  HMAC-SHA256(k_fp, the credentials as canonical JSON), its first 16 hex digits,
                 where k_fp = HMAC-SHA256(key, "orchestrator credentials fingerprint")

The associated data binds a ciphertext to its connection and incarnation: a row copied to
another connection, or kept into the next incarnation, does not open. The fingerprint is keyed
so that the log (which anyone with the database file can read) does not let a guessed password
be checked offline; two fingerprints under the same key id are equal exactly when the
credentials are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import InvalidArgument, KeyMissing, SealError
from orchestrator.model import ConnectionRef, SealedCredentials

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
FINGERPRINT_HEX = 16
KEY_ID_HEX = 8
KEY_FILE_NAME = "secret.key"
"""The key file's name beside the SQLite log, by default."""
_FORMAT = "orchestrator-credentials"
_FORMAT_VERSION = 1


def key_id(secret: bytes) -> str:
    """The short public name of a key: a hash of it, which tells nothing of the key."""
    return hashlib.sha256(b"orchestrator key id\x00" + secret).hexdigest()[:KEY_ID_HEX]


@dataclass(frozen=True, slots=True)
class Key:
    """One 256-bit key."""

    secret: bytes = field(repr=False)

    @property
    def id(self) -> str:
        """See :func:`key_id`."""
        return key_id(self.secret)


class Keyring:
    """The configured keys: the first seals, every one opens (rotation)."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise InvalidArgument("the key ring is empty: give at least one key")
        for secret in secrets:
            if len(secret) != KEY_BYTES:
                raise InvalidArgument(f"a key must be {KEY_BYTES} bytes (base64 of 32 random bytes), not {len(secret)}")
        self._keys = [Key(secret) for secret in secrets]
        self._by_id = {key.id: key for key in reversed(self._keys)}

    def __repr__(self) -> str:
        return f"Keyring({', '.join(self.ids)})"

    @property
    def sealing(self) -> Key:
        """The key new rows are sealed under."""
        return self._keys[0]

    @property
    def ids(self) -> list[str]:
        """Every key id, the sealing key's first."""
        return [key.id for key in self._keys]

    def key(self, wanted: str) -> Key:
        """The key ``wanted`` names; :class:`KeyMissing` when it is not configured."""
        found = self._by_id.get(wanted)
        if found is None:
            raise KeyMissing(
                f"the credentials were sealed under key id {wanted}, which is not configured (configured:"
                f" {', '.join(self.ids)}): add that key to ORCHESTRATOR_SECRET_KEY (or the key file) after the"
                " sealing key, or supply the credentials again",
                key_id=wanted,
            )
        return found

    @classmethod
    def parse(cls, text: str, source: str) -> Keyring:
        """Keys as base64, separated by commas or white space; ``source`` names where they came from in errors."""
        parts = [part for part in text.replace(",", " ").split() if part]
        if not parts:
            raise InvalidArgument(f"{source} holds no key: generate one with `orchestrator keygen`")
        secrets = []
        for number, part in enumerate(parts, 1):
            try:
                secret = base64.b64decode(part, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument(
                    f"{source}: key {number} is not base64 (generate one with `orchestrator keygen`)"
                ) from None
            if len(secret) != KEY_BYTES:
                raise InvalidArgument(
                    f"{source}: key {number} is {len(secret)} bytes; a key is base64 of {KEY_BYTES} random bytes"
                    " (`orchestrator keygen`)"
                )
            secrets.append(secret)
        return cls(secrets)

    @classmethod
    def ephemeral(cls) -> Keyring:
        """A key ring of one random key that lives as long as the process (tests, the memory backend)."""
        return cls([os.urandom(KEY_BYTES)])


def generate() -> str:
    """A new key, as the key ring takes it: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


# -- the key file -----------------------------------------------------------------------


def load_key_file(path: Path, *, create: bool) -> Keyring:
    """The key ring in ``path``; a missing file is created (mode 0600, one new key) when ``create``.

    A file that group or others may read is refused: whoever reads it can open every credential.
    """
    try:
        status = path.stat()
    except FileNotFoundError:
        if not create:
            raise InvalidArgument(f"the key file {path} does not exist") from None
        return _create_key_file(path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        raise InvalidArgument(f"the key file {path} is not a file")
    if status.st_mode & 0o044:
        raise InvalidArgument(
            f"the key file {path} is readable by group or others (mode {stat.S_IMODE(status.st_mode):04o}):"
            f" anyone who reads it can open every sealed credential; `chmod 600 {path}`"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the key file {path}: {exc}") from None
    return Keyring.parse(text, f"the key file {path}")


def _create_key_file(path: Path) -> Keyring:
    key = generate()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:  # another process made it meanwhile: use theirs
        return load_key_file(path, create=False)
    except OSError as exc:
        raise InvalidArgument(f"cannot create the key file {path}: {exc.strerror or exc}") from None
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    keyring = Keyring.parse(key, f"the key file {path}")
    # INFO: a first start does this. A key lost later shows as rows under a missing key id (a WARNING at start).
    log.info(
        "created a new secret key in %s (key id %s): back it up with the database; without it no sealed"
        " credential can be opened",
        path,
        keyring.sealing.id,
    )
    return keyring


# -- sealing --------------------------------------------------------------------------


def _canonical(credentials: Mapping[str, str]) -> bytes:
    return json.dumps(dict(credentials), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def associated_data(ref: ConnectionRef, incarnation: int) -> bytes:
    """What a ciphertext is bound to: its connection and incarnation."""
    return json.dumps([_FORMAT, _FORMAT_VERSION, ref.stream, incarnation], ensure_ascii=True).encode()


def fingerprint(key: Key, credentials: Mapping[str, str]) -> str:
    """The keyed fingerprint of ``credentials`` under ``key`` (16 hex digits)."""
    derived = hmac.new(key.secret, b"orchestrator credentials fingerprint", hashlib.sha256).digest()
    return hmac.new(derived, _canonical(credentials), hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]


def seal(keyring: Keyring, ref: ConnectionRef, incarnation: int, credentials: Mapping[str, str]) -> SealedCredentials:
    """``credentials`` sealed under the key ring's sealing key for ``ref``'s ``incarnation``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = keyring.sealing
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key.secret).encrypt(nonce, _canonical(credentials), associated_data(ref, incarnation))
    return SealedCredentials(ref.stream, incarnation, key.id, nonce, ciphertext, fingerprint(key, credentials))


def open_sealed(keyring: Keyring, sealed: SealedCredentials, ref: ConnectionRef, incarnation: int) -> dict[str, str]:
    """The credentials in ``sealed``, which must belong to ``ref``'s ``incarnation``.

    Raises :class:`KeyMissing` when its key is not configured, and :class:`SealError` when it
    does not open: tampered with, or sealed for another connection or incarnation.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = keyring.key(sealed.key_id)
    try:
        plain = AESGCM(key.secret).decrypt(sealed.nonce, sealed.ciphertext, associated_data(ref, incarnation))
    except (InvalidTag, ValueError):
        raise SealError(
            f"the sealed credentials of {ref} (incarnation {incarnation}) do not open under key id {key.id}:"
            " the row was altered, or belongs to another connection or incarnation; supply them again"
        ) from None
    data = json.loads(plain)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SealError(f"the sealed credentials of {ref} hold no credentials")
    return data


def reseal(keyring: Keyring, sealed: SealedCredentials) -> SealedCredentials | None:
    """``sealed`` sealed again under the sealing key (its fingerprint taken under that key); None when it is already."""
    if sealed.key_id == keyring.sealing.id:
        return None
    ref = sealed.ref
    fresh = seal(keyring, ref, sealed.incarnation, open_sealed(keyring, sealed, ref, sealed.incarnation))
    return SealedCredentials(
        fresh.stream, fresh.incarnation, fresh.key_id, fresh.nonce, fresh.ciphertext, fresh.fingerprint, sealed.version
    )
