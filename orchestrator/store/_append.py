"""The part of an append every backend shares: checks, numbering and the read-model fold."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from orchestrator import state
from orchestrator.errors import InvalidArgument, VersionConflict
from orchestrator.model import Connection, ConnectionRef
from orchestrator.records import NewEvent, Record


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
