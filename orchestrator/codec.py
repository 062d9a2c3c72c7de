"""JSON forms of connections and records: the read model's row body and ``--json`` output.

The read model stores a connection as one JSON document so that a new field
in :class:`~orchestrator.model.Connection` needs no schema migration.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.model import Connection, ConnectionRef, ConnectionState, FunctionStatus, JSONObject, Mark, Outcome
from orchestrator.records import Record


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON: equal values give equal text."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch (how the stores keep time)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_micros(micros: int) -> datetime:
    """The inverse of :func:`to_micros`, always timezone-aware UTC."""
    # Twice as fast as fromtimestamp().replace(): replay makes two per connection, the daemon one per record read.
    return _EPOCH + timedelta(0, 0, micros)


def _mark(mark: Mark) -> JSONObject:
    return {"event_id": mark.event_id, "type": mark.type, "position": mark.position, "version": mark.version}


def _unmark(data: JSONObject) -> Mark:
    return Mark(data["event_id"], data["type"], int(data["position"]), int(data["version"]))


def outcome_to_json(outcome: Outcome) -> JSONObject:
    """A JSON document of one function outcome."""
    return {
        "name": outcome.name,
        "status": outcome.status.value,
        "attempts": outcome.attempts,
        "error": outcome.error,
        "duration_ms": outcome.duration_ms,
    }


def connection_to_json(connection: Connection) -> JSONObject:
    """A JSON document holding every field of ``connection``."""
    return {
        "ref": {
            "environment": connection.ref.environment,
            "integration": connection.ref.integration,
            "connection_id": connection.ref.connection_id,
        },
        "stream": connection.ref.stream,
        "state": connection.state.value,
        "version": connection.version,
        "created_at": connection.created_at.isoformat(),
        "updated_at": connection.updated_at.isoformat(),
        "last_event": connection.last_event,
        "last_position": connection.last_position,
        "lifecycle": _mark(connection.lifecycle),
        "incarnation": connection.incarnation,
        "metadata": connection.metadata,
        "config": connection.config,
        "rejection_reason": connection.rejection_reason,
        "deletion": _mark(connection.deletion) if connection.deletion else None,
        "outcomes": [outcome_to_json(o) for o in connection.outcomes],
    }


def connection_from_json(data: JSONObject) -> Connection:
    """The inverse of :func:`connection_to_json`."""
    ref = data["ref"]
    return Connection(
        ref=ConnectionRef(ref["environment"], ref["integration"], ref["connection_id"]),
        state=ConnectionState(data["state"]),
        version=int(data["version"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        updated_at=datetime.fromisoformat(data["updated_at"]),
        last_event=data["last_event"],
        last_position=int(data["last_position"]),
        lifecycle=_unmark(data["lifecycle"]),
        incarnation=int(data["incarnation"]),
        metadata=data["metadata"],
        config=data["config"],
        rejection_reason=data["rejection_reason"],
        deletion=_unmark(data["deletion"]) if data["deletion"] else None,
        outcomes=tuple(
            Outcome(o["name"], FunctionStatus(o["status"]), o["attempts"], o["error"], o["duration_ms"])
            for o in data["outcomes"]
        ),
    )


def record_to_json(record: Record) -> JSONObject:
    """A JSON document of one log record (the ``--json`` output of ``events`` and ``replay``)."""
    return {
        "position": record.position,
        "stream": record.stream,
        "version": record.version,
        "event_id": record.event_id,
        "type": record.type,
        "data": record.data,
        "recorded_at": record.recorded_at.isoformat(),
        "causation_id": record.causation_id,
        "traceparent": record.traceparent,
        "idempotency_key": record.idempotency_key,
        "schema_version": record.schema_version,
    }
