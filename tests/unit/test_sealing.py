"""Sealing credentials: what opens, what does not, the key ring, rotation and the key file."""

from __future__ import annotations

import base64
import dataclasses
import os
import sqlite3
from pathlib import Path

import pytest

from orchestrator import sealing
from orchestrator.clock import SystemClock
from orchestrator.errors import InvalidArgument, KeyMissing, SealError
from orchestrator.model import ConnectionRef, SealedCredentials
from orchestrator.store.sqlite import reseal_sqlite

ACME = ConnectionRef("dev", "salesforce", "acme")
GLOBEX = ConnectionRef("dev", "salesforce", "globex")
CREDENTIALS = {"access_token": "t0k3n-value", "refresh_token": "r3fresh"}
OLD = sealing.Keyring.ephemeral()
NEW = sealing.Keyring.ephemeral()


def ring(*rings: sealing.Keyring) -> sealing.Keyring:
    """One key ring of the sealing keys of ``rings``, in order (the first seals)."""
    return sealing.Keyring([r.sealing.secret for r in rings])


def test_sealed_credentials_open_for_their_connection_and_incarnation() -> None:
    """A seal opens back to the credentials; the ciphertext holds none of them in the clear."""
    sealed = sealing.seal(OLD, ACME, 2, CREDENTIALS)
    assert sealing.open_sealed(OLD, sealed, ACME, 2) == CREDENTIALS
    assert (sealed.stream, sealed.incarnation, sealed.key_id) == (ACME.stream, 2, OLD.sealing.id)
    assert len(sealed.nonce) == 12
    assert b"t0k3n-value" not in sealed.ciphertext
    assert "t0k3n" not in repr(sealed)
    again = sealing.seal(OLD, ACME, 2, CREDENTIALS)
    assert again.nonce != sealed.nonce and again.ciphertext != sealed.ciphertext, "a fresh nonce each time"


def test_tampered_ciphertext_does_not_open() -> None:
    """One flipped bit of the ciphertext (or of the nonce) fails authentication."""
    sealed = sealing.seal(OLD, ACME, 1, CREDENTIALS)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(SealError, match="do not open"):
        sealing.open_sealed(OLD, dataclasses.replace(sealed, ciphertext=flipped), ACME, 1)
    nonce = bytes([sealed.nonce[0] ^ 1]) + sealed.nonce[1:]
    with pytest.raises(SealError, match="do not open"):
        sealing.open_sealed(OLD, dataclasses.replace(sealed, nonce=nonce), ACME, 1)


def test_a_row_moved_to_another_connection_or_incarnation_does_not_open() -> None:
    """The associated data binds the ciphertext to its connection and incarnation."""
    sealed = sealing.seal(OLD, ACME, 1, CREDENTIALS)
    moved = dataclasses.replace(sealed, stream=GLOBEX.stream)
    with pytest.raises(SealError, match="another connection or incarnation"):
        sealing.open_sealed(OLD, moved, GLOBEX, 1)
    with pytest.raises(SealError, match="incarnation 2"):
        sealing.open_sealed(OLD, dataclasses.replace(sealed, incarnation=2), ACME, 2)


def test_the_wrong_key_does_not_open_and_a_missing_key_is_named() -> None:
    """Under another key of the same id (a forged row) it fails; a key id not configured is named."""
    sealed = sealing.seal(OLD, ACME, 1, CREDENTIALS)
    with pytest.raises(KeyMissing) as missing:
        sealing.open_sealed(NEW, sealed, ACME, 1)
    assert missing.value.key_id == OLD.sealing.id
    assert f"key id {OLD.sealing.id}, which is not configured" in str(missing.value)
    forged = dataclasses.replace(sealed, key_id=NEW.sealing.id)
    with pytest.raises(SealError, match="do not open"):
        sealing.open_sealed(NEW, forged, ACME, 1)


def test_rotation_old_rows_open_and_reseal_moves_them_to_the_first_key() -> None:
    """With new,old every row opens; reseal puts old rows under the new key and leaves new ones alone."""
    rotated = ring(NEW, OLD)
    old_row = sealing.seal(OLD, ACME, 1, CREDENTIALS)
    assert sealing.open_sealed(rotated, old_row, ACME, 1) == CREDENTIALS
    resealed = sealing.reseal(rotated, old_row)
    assert resealed is not None
    assert resealed.key_id == NEW.sealing.id
    assert resealed.fingerprint == sealing.fingerprint(NEW.sealing, CREDENTIALS)
    assert sealing.open_sealed(NEW, resealed, ACME, 1) == CREDENTIALS
    assert sealing.reseal(rotated, resealed) is None


def test_fingerprints_are_keyed_short_and_tell_equal_credentials() -> None:
    """16 hex digits; equal for equal credentials under one key, different under another key or other values."""
    one = sealing.fingerprint(OLD.sealing, CREDENTIALS)
    assert len(one) == 16 and int(one, 16) >= 0
    assert sealing.fingerprint(OLD.sealing, dict(reversed(CREDENTIALS.items()))) == one
    assert sealing.fingerprint(OLD.sealing, {**CREDENTIALS, "access_token": "other"}) != one
    assert sealing.fingerprint(NEW.sealing, CREDENTIALS) != one


def test_the_key_ring_takes_a_comma_separated_list_and_refuses_bad_keys() -> None:
    """Base64 of 32 bytes each; the first seals; a bad one is named by its place, never echoed."""
    text = f"{sealing.generate()}, {sealing.generate()}"
    keyring = sealing.Keyring.parse(text, "ORCHESTRATOR_SECRET_KEY")
    assert len(keyring.ids) == 2 and keyring.sealing.id == keyring.ids[0]
    assert len(keyring.sealing.id) == 8
    short = base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(InvalidArgument, match="key 2 is 16 bytes") as bad:
        sealing.Keyring.parse(f"{sealing.generate()},{short}", "ORCHESTRATOR_SECRET_KEY")
    assert short not in str(bad.value)
    with pytest.raises(InvalidArgument, match="key 1 is not base64"):
        sealing.Keyring.parse("not base64!", "ORCHESTRATOR_SECRET_KEY")
    with pytest.raises(InvalidArgument, match="holds no key"):
        sealing.Keyring.parse(" , ", "ORCHESTRATOR_SECRET_KEY")
    shown = repr(keyring) + repr(keyring.sealing)
    assert keyring.sealing.id in shown and text.split(",")[0] not in shown


def test_a_missing_key_file_is_created_private_and_read_back(tmp_path: Path) -> None:
    """First start: a new key in a 0600 file (its folder made 0700); the next start reads the same key."""
    path = tmp_path / "state" / "secret.key"
    created = sealing.load_key_file(path, create=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert sealing.load_key_file(path, create=False).ids == created.ids
    with pytest.raises(InvalidArgument, match="does not exist"):
        sealing.load_key_file(tmp_path / "absent.key", create=False)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_file_readable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    """Whoever reads the key file opens every credential: such a file is refused, saying how to fix it."""
    path = tmp_path / "secret.key"
    path.write_text(sealing.generate() + "\n")
    path.chmod(mode)
    with pytest.raises(InvalidArgument, match=f"readable by group or others \\(mode {mode:04o}\\).*chmod 600"):
        sealing.load_key_file(path, create=False)
    path.chmod(0o600)
    assert len(sealing.load_key_file(path, create=False).ids) == 1


def test_reseal_sqlite_rotates_every_row_and_skips_rows_changed_meanwhile(tmp_path: Path) -> None:
    """rotate-key's loop: old rows resealed in place; a row whose nonce changed under it is left; no key: named."""
    path = tmp_path / "events.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE credentials (stream TEXT PRIMARY KEY, incarnation INTEGER, key_id TEXT, nonce BLOB,"
        " ciphertext BLOB, fingerprint TEXT, version INTEGER, updated_at INTEGER)"
    )
    lost = sealing.Keyring.ephemeral()
    rows = [
        sealing.seal(OLD, ACME, 1, CREDENTIALS),
        sealing.seal(NEW, GLOBEX, 1, CREDENTIALS),
        sealing.seal(lost, ConnectionRef("dev", "salesforce", "initech"), 1, CREDENTIALS),
    ]
    for row in rows:
        db.execute(
            "INSERT INTO credentials VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            (row.stream, row.incarnation, row.key_id, row.nonce, row.ciphertext, row.fingerprint, 3),
        )
    db.commit()
    db.close()
    rotated = ring(NEW, OLD)

    def reseal_then_race(sealed: SealedCredentials) -> SealedCredentials | None:
        return sealing.reseal(rotated, sealed)

    resealed, skipped, problems = reseal_sqlite(path, reseal_then_race, clock=SystemClock(), batch=2)
    assert (resealed, skipped) == (1, 0)
    assert len(problems) == 1 and problems[0].startswith("dev/salesforce/initech:")
    assert f"key id {lost.sealing.id}" in problems[0]
    db = sqlite3.connect(path)
    stored = {row[0]: row for row in db.execute("SELECT stream, key_id, version FROM credentials")}
    assert stored[ACME.stream][1:] == (NEW.sealing.id, 3)
    assert stored[GLOBEX.stream][1] == NEW.sealing.id

    def changed_meanwhile(sealed: SealedCredentials) -> SealedCredentials | None:
        fresh = sealing.reseal(ring(OLD, NEW), sealed)
        # The daemon seals new credentials for this connection between the read and the write.
        db.execute("UPDATE credentials SET nonce = ? WHERE stream = ?", (os.urandom(12), sealed.stream))
        db.commit()
        return fresh

    assert reseal_sqlite(path, changed_meanwhile, clock=SystemClock())[:2] == (0, 2)
    db.close()
