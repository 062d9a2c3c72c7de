"""The part of an append every backend shares: checks, numbering and the read-model fold."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from orchestrator import records as bodies
from orchestrator import state
from orchestrator.errors import InvalidArgument, VersionConflict
from orchestrator.model import Connection, ConnectionRef, ConnectionState, SealedCredentials
from orchestrator.records import Fact, NewEvent, Record

ENDED = frozenset({ConnectionState.DELETED, ConnectionState.REJECTED})
"""States in which nothing of the connection runs any more, once its jobs are done."""


def plan_append(
    current: Connection | None,
    ref: ConnectionRef,
    expected_version: int | None,
    events: Sequence[NewEvent],
    *,
    first_position: int,
    recorded_at: datetime,
) -> tuple[list[Record], Connection]:
    """Number ``events`` and fold them onto ``current``; raise if the append must be refused.

    ``expected_version`` None appends whatever the version (the fold still
    checks every record). Pure: the backend writes the records and the returned connection in one
    transaction, or nothing.
    """
    if not events:
        raise InvalidArgument("an append needs at least one record")
    version = current.version if current is not None else 0
    if expected_version is not None and version != expected_version:
        raise VersionConflict(ref.stream, expected_version, version)
    records = [
        Record(
            position=first_position + i,
            stream=ref.stream,
            version=version + 1 + i,
            event_id=event.event_id,
            type=event.type,
            data=event.data,
            recorded_at=recorded_at,
            causation_id=event.causation_id,
            traceparent=event.traceparent,
            idempotency_key=event.idempotency_key,
        )
        for i, event in enumerate(events)
    ]
    connection = state.fold(records, current)
    assert connection is not None
    return records, connection


def check_seal(ref: ConnectionRef, events: Sequence[NewEvent], seal: SealedCredentials | None) -> None:
    """A seal comes with the ``credentials-updated`` record that announces it, for its own connection."""
    if seal is None:
        return
    if seal.stream != ref.stream:
        raise InvalidArgument(f"sealed credentials of {seal.stream} cannot be stored for {ref}")
    if not any(e.type == Fact.CREDENTIALS_UPDATED for e in events):
        raise InvalidArgument("sealed credentials are stored with the credentials-updated record that announces them")


def sealed_version(seal: SealedCredentials, appended: Sequence[Record]) -> SealedCredentials:
    """``seal`` with the version of its ``credentials-updated`` record among ``appended``."""
    version = next(r.version for r in appended if r.type == Fact.CREDENTIALS_UPDATED)
    return SealedCredentials(
        seal.stream, seal.incarnation, seal.key_id, seal.nonce, seal.ciphertext, seal.fingerprint, version
    )


def shredding(
    connection: Connection | None, sealed: SealedCredentials | None, jobs_left: bool, after: Record | None
) -> NewEvent | None:
    """The ``credentials-destroyed`` record to append when the shredding rule applies, else None.

    The rule: the connection is deleted or rejected, no job of it is queued or running, and a
    sealed row is stored. ``after`` is the last record of the write: the shredding's cause is the
    request it answers (its causation, or the record itself when it is a request).
    """
    if connection is None or sealed is None or jobs_left or connection.state not in ENDED:
        return None
    reason = f"the connection is {connection.state.value} and none of its jobs remains"
    body = bodies.CredentialsDestroyed(sealed.fingerprint, sealed.key_id, reason)
    if after is None:
        return bodies.new(body)
    return bodies.new(body, causation_id=after.causation_id or after.event_id, traceparent=after.traceparent)
