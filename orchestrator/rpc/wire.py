"""Conversions between protobuf messages and the model: the only users of ``_proto`` are
this module, the gRPC server and the gRPC client.

Struct numbers are doubles on the wire; integral values are turned back into
ints so that ``{"port": 443}`` round-trips as written.
"""

from __future__ import annotations

import math
import shlex
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from orchestrator import limits
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.errors import InvalidArgument
from orchestrator.model import (
    Connection,
    ConnectionRef,
    ConnectionState,
    EmitRequest,
    EmitResult,
    FunctionStatus,
    Job,
    JobStatus,
    JSONObject,
    LifecycleEvent,
    Mark,
    Outcome,
)
from orchestrator.records import Record

_MAX_SAFE_INT = 2**53
ENCODED_RECORDS = 4096
"""Records :class:`EncodedRecords` keeps encoded at most (as many as the store's tail holds)."""
ENCODED_BYTES = 8 * 1024 * 1024
"""Bytes of encoded records :class:`EncodedRecords` keeps at most."""

EVENTS: dict[LifecycleEvent, pb.LifecycleEvent.ValueType] = {
    LifecycleEvent.VALIDATE_CONNECTION: pb.LIFECYCLE_EVENT_VALIDATE_CONNECTION,
    LifecycleEvent.POST_CONNECTION_CREATION: pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION,
    LifecycleEvent.PRE_CONNECTION_DELETION: pb.LIFECYCLE_EVENT_PRE_CONNECTION_DELETION,
}
_EVENTS_BACK = {v: k for k, v in EVENTS.items()}

STATES: dict[ConnectionState, pb.ConnectionState.ValueType] = {
    ConnectionState.PENDING: pb.CONNECTION_STATE_PENDING,
    ConnectionState.ACTIVE: pb.CONNECTION_STATE_ACTIVE,
    ConnectionState.REJECTED: pb.CONNECTION_STATE_REJECTED,
    ConnectionState.DELETING: pb.CONNECTION_STATE_DELETING,
    ConnectionState.DELETED: pb.CONNECTION_STATE_DELETED,
}
_STATES_BACK = {v: k for k, v in STATES.items()}

_STATUSES: dict[FunctionStatus, pb.FunctionStatus.ValueType] = {
    FunctionStatus.SCHEDULED: pb.FUNCTION_STATUS_SCHEDULED,
    FunctionStatus.RUNNING: pb.FUNCTION_STATUS_RUNNING,
    FunctionStatus.SUCCEEDED: pb.FUNCTION_STATUS_SUCCEEDED,
    FunctionStatus.FAILED: pb.FUNCTION_STATUS_FAILED,
    FunctionStatus.GAVE_UP: pb.FUNCTION_STATUS_GAVE_UP,
    FunctionStatus.CANCELLED: pb.FUNCTION_STATUS_CANCELLED,
}
_STATUSES_BACK = {v: k for k, v in _STATUSES.items()}

JOB_STATUSES: dict[JobStatus, pb.JobStatus.ValueType] = {
    JobStatus.QUEUED: pb.JOB_STATUS_QUEUED,
    JobStatus.RUNNING: pb.JOB_STATUS_RUNNING,
    JobStatus.SUCCEEDED: pb.JOB_STATUS_SUCCEEDED,
    JobStatus.GAVE_UP: pb.JOB_STATUS_GAVE_UP,
    JobStatus.CANCELLED: pb.JOB_STATUS_CANCELLED,
}
_JOB_STATUSES_BACK = {v: k for k, v in JOB_STATUSES.items()}


# -- values ------------------------------------------------------------------


def _from_value(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value, path)
    if kind == "list_value":
        return [_from_value(v, f"{path}[{i}]") for i, v in enumerate(value.list_value.values)]
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidArgument(f"{path} is {number}, which JSON cannot hold")
        if number.is_integer() and abs(number) < _MAX_SAFE_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_dict(struct: struct_pb2.Struct, path: str = "struct") -> JSONObject:
    """A Struct as a plain JSON object (integral numbers as ints)."""
    return {key: _from_value(value, f"{path}.{key}") for key, value in struct.fields.items()}


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a Struct."""
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


OMITTED = "_omitted"
"""The one key of the object that stands in a reply for a value too big or too deep to carry."""


def reply_struct(value: JSONObject, what: str, elsewhere: str) -> struct_pb2.Struct:
    """``value`` as a Struct for a reply, or, past :data:`limits.MAX_REPLY_VALUE_BYTES` or
    :data:`limits.MAX_REPLY_DEPTH`, an object ``{"_omitted": {"reason": ..., "read_with": elsewhere}}``.

    Only values written before today's limits existed can be that big or deep; without this, one
    of them would fail every reply that carries it (a client refuses a message over 4 MiB, or
    nested past 100 levels) and the records after it could not be read past.
    """
    levels = limits.depth(value)
    if levels > limits.MAX_REPLY_DEPTH:
        reason = f"{what} nests {levels} levels deep; a reply carries at most {limits.MAX_REPLY_DEPTH}"
    else:
        struct = dict_to_struct(value)
        size = struct.ByteSize()
        if size <= limits.MAX_REPLY_VALUE_BYTES:
            return struct
        reason = f"{what} is {size} bytes; a reply carries at most {limits.MAX_REPLY_VALUE_BYTES}"
    return dict_to_struct({OMITTED: {"reason": reason, "read_with": elsewhere}})


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A timezone-aware datetime as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def ref_from_proto(ref: pb.ConnectionRef, field: str = "connection") -> ConnectionRef:
    """A validated ref; :class:`InvalidArgument` names the bad field."""
    try:
        return ConnectionRef.parse(ref.environment, ref.integration, ref.connection_id)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc).replace("connection.", f"{field}.", 1)) from None


def ref_to_proto(ref: ConnectionRef) -> pb.ConnectionRef:
    """The wire form of a ref."""
    return pb.ConnectionRef(environment=ref.environment, integration=ref.integration, connection_id=ref.connection_id)


def event_from_proto(value: int) -> LifecycleEvent:
    """The lifecycle event of an enum value; UNSPECIFIED and unknown values are refused."""
    try:
        return _EVENTS_BACK[value]  # type: ignore[index]  # an int off the wire, checked here
    except KeyError:
        names = ", ".join(pb.LifecycleEvent.Name(v) for v in EVENTS.values())
        raise InvalidArgument(f"event must be one of {names}, not {value}") from None


def state_from_proto(value: int) -> ConnectionState | None:
    """A state filter: UNSPECIFIED means any."""
    if value == pb.CONNECTION_STATE_UNSPECIFIED:
        return None
    try:
        return _STATES_BACK[value]  # type: ignore[index]  # an int off the wire, checked here
    except KeyError:
        raise InvalidArgument(f"state {value} is not a ConnectionState") from None


def job_statuses_from_proto(values: Sequence[int]) -> frozenset[JobStatus]:
    """A ListJobs status filter (empty: any); UNSPECIFIED and unknown values are refused, naming the entry."""
    statuses = set()
    for i, value in enumerate(values):
        status = _JOB_STATUSES_BACK.get(value)  # type: ignore[call-overload]  # an int off the wire, checked here
        if status is None:
            names = ", ".join(pb.JobStatus.Name(v) for v in JOB_STATUSES.values())
            raise InvalidArgument(f"statuses[{i}] must be one of {names}, not {value} (send none for every status)")
        statuses.add(status)
    return frozenset(statuses)


# -- messages ----------------------------------------------------------------


def emit_request_from_proto(message: pb.EmitLifecycleEventRequest, *, traceparent: str = "") -> EmitRequest:
    """A checked :class:`EmitRequest` (fields validated; limits are checked by the service)."""
    if not message.HasField("connection"):
        raise InvalidArgument("connection is required")
    return EmitRequest(
        ref=ref_from_proto(message.connection),
        event=event_from_proto(message.event),
        config=struct_to_dict(message.connection_config, "connection_config"),
        credentials=dict(message.credentials),
        payload=struct_to_dict(message.payload, "payload"),
        idempotency_key=message.idempotency_key,
        expected_version=message.expected_version if message.HasField("expected_version") else None,
        wait=message.wait,
        traceparent=traceparent,
    )


def emit_request_to_proto(request: EmitRequest) -> pb.EmitLifecycleEventRequest:
    """The wire form of an emit (what the CLI sends)."""
    message = pb.EmitLifecycleEventRequest(
        connection=ref_to_proto(request.ref),
        event=EVENTS[request.event],
        connection_config=dict_to_struct(request.config),
        credentials=dict(request.credentials),
        payload=dict_to_struct(request.payload),
        idempotency_key=request.idempotency_key,
        wait=request.wait,
    )
    if request.expected_version is not None:
        message.expected_version = request.expected_version
    return message


def update_credentials_from_proto(message: pb.UpdateCredentialsRequest) -> tuple[ConnectionRef, dict[str, str]]:
    """The connection and the credentials of an UpdateCredentials request (fields checked)."""
    if not message.HasField("connection"):
        raise InvalidArgument("connection is required")
    return ref_from_proto(message.connection), dict(message.credentials)


def update_credentials_to_proto(ref: ConnectionRef, credentials: Mapping[str, str]) -> pb.UpdateCredentialsRequest:
    """The wire form of an UpdateCredentials request (what the CLI sends)."""
    return pb.UpdateCredentialsRequest(connection=ref_to_proto(ref), credentials=dict(credentials))


def job_to_proto(job: Job) -> pb.Job:
    """The wire form of a job (``next_attempt_at`` only while it is queued)."""
    message = pb.Job(
        id=job.job_id,
        connection=ref_to_proto(job.ref),
        function=job.function,
        event=EVENTS[job.event],
        event_id=job.causation_id,
        status=JOB_STATUSES[job.status],
        attempts=job.attempt,
        max_attempts=job.max_attempts,
        last_error=job.last_error,
    )
    if job.status is JobStatus.QUEUED:
        message.next_attempt_at.CopyFrom(timestamp(job.run_at))
    if job.created_at is not None:
        message.created_at.CopyFrom(timestamp(job.created_at))
    if job.updated_at is not None:
        message.updated_at.CopyFrom(timestamp(job.updated_at))
    return message


def job_from_proto(message: pb.Job) -> Job:
    """A job off the wire (what ``orchestrator jobs`` prints); ``run_at`` is its next attempt's due time, or its
    last change when it is not queued."""
    updated = message.updated_at.ToDatetime(tzinfo=UTC)
    return Job(
        job_id=message.id,
        stream=f"{message.connection.environment}/{message.connection.integration}/{message.connection.connection_id}",
        function=message.function,
        event=_EVENTS_BACK[message.event],
        causation_id=message.event_id,
        payload={},  # not on the wire
        run_at=message.next_attempt_at.ToDatetime(tzinfo=UTC) if message.HasField("next_attempt_at") else updated,
        attempt=message.attempts,
        lease_token=0,  # not on the wire
        leased=message.status == pb.JOB_STATUS_RUNNING,
        status=_JOB_STATUSES_BACK[message.status],
        last_error=message.last_error,
        created_at=message.created_at.ToDatetime(tzinfo=UTC),
        updated_at=updated,
        max_attempts=message.max_attempts,
    )


def outcome_to_proto(outcome: Outcome) -> pb.FunctionOutcome:
    """The wire form of a function outcome."""
    return pb.FunctionOutcome(
        name=outcome.name,
        status=_STATUSES[outcome.status],
        attempts=outcome.attempts,
        error=outcome.error,
        duration_ms=outcome.duration_ms,
    )


def outcome_from_proto(message: pb.FunctionOutcome) -> Outcome:
    """A function outcome off the wire."""
    return Outcome(
        name=message.name,
        status=_STATUSES_BACK.get(message.status, FunctionStatus.SCHEDULED),
        attempts=message.attempts,
        error=message.error,
        duration_ms=message.duration_ms,
    )


def emit_response_to_proto(result: EmitResult) -> pb.EmitLifecycleEventResponse:
    """The wire form of an emit's result."""
    return pb.EmitLifecycleEventResponse(
        event_id=result.event_id,
        position=result.position,
        version=result.version,
        state=STATES[result.state],
        outcomes=[outcome_to_proto(o) for o in result.outcomes],
        rejection_reason=result.rejection_reason,
        deduplicated=result.deduplicated,
    )


def emit_response_from_proto(message: pb.EmitLifecycleEventResponse) -> EmitResult:
    """An emit's result off the wire (what the CLI prints)."""
    return EmitResult(
        event_id=message.event_id,
        position=message.position,
        version=message.version,
        state=_STATES_BACK[message.state],
        outcomes=tuple(outcome_from_proto(o) for o in message.outcomes),
        rejection_reason=message.rejection_reason,
        deduplicated=message.deduplicated,
    )


def connection_to_proto(connection: Connection) -> pb.Connection:
    """The wire form of a read-model row."""
    return pb.Connection(
        ref=ref_to_proto(connection.ref),
        state=STATES[connection.state],
        version=connection.version,
        metadata=reply_struct(connection.metadata, "the metadata", _offline(connection.ref)),
        config=reply_struct(connection.config, "the config", _offline(connection.ref)),
        created_at=timestamp(connection.created_at),
        updated_at=timestamp(connection.updated_at),
        outcomes=[outcome_to_proto(o) for o in connection.outcomes],
        last_event=connection.last_event,
        last_position=connection.last_position,
        rejection_reason=connection.rejection_reason,
    )


def connection_from_proto(message: pb.Connection) -> Connection:
    """A read-model row off the wire (what ``orchestrator connections`` prints)."""
    return Connection(
        ref=ConnectionRef(message.ref.environment, message.ref.integration, message.ref.connection_id),
        state=_STATES_BACK[message.state],
        version=message.version,
        created_at=message.created_at.ToDatetime(tzinfo=UTC),
        updated_at=message.updated_at.ToDatetime(tzinfo=UTC),
        last_event=message.last_event,
        last_position=message.last_position,
        lifecycle=Mark("", "", 0, 0),  # not on the wire
        metadata=struct_to_dict(message.metadata, "metadata"),
        config=struct_to_dict(message.config, "config"),
        rejection_reason=message.rejection_reason,
        outcomes=tuple(outcome_from_proto(o) for o in message.outcomes),
    )


def record_to_proto(record: Record) -> pb.EventRecord:
    """The wire form of a log record."""
    return pb.EventRecord(
        position=record.position,
        connection=ref_to_proto(record.ref),
        stream=record.stream,
        version=record.version,
        event_id=record.event_id,
        type=record.type,
        data=reply_struct(record.data, f"record {record.position}'s data", _offline(record.ref)),
        recorded_at=timestamp(record.recorded_at),
        causation_id=record.causation_id,
        traceparent=record.traceparent,
        idempotency_key=record.idempotency_key,
        schema_version=record.schema_version,
    )


def _offline(ref: ConnectionRef) -> str:
    """The command that shows a value whole: it reads the log's file directly, past any reply limit."""
    return (
        f"orchestrator replay --connection {shlex.quote(ref.connection_id)} -i {shlex.quote(ref.integration)}"
        f" -e {shlex.quote(ref.environment)} --json"
        " (on the daemon's machine: it reads the database file)"
    )


class EncodedRecords:
    """Records as serialised ``EventRecord`` messages, each encoded once while it is recent.

    Every follower of the log sends the same records: the first to send one
    encodes it, the others send the same bytes. Kept by position (one cache per
    log), the most recently used first out beyond :data:`ENCODED_RECORDS`
    records or :data:`ENCODED_BYTES` bytes.
    """

    def __init__(self, records: int = ENCODED_RECORDS, max_bytes: int = ENCODED_BYTES) -> None:
        self._max_records = records
        self._max_bytes = max_bytes
        self._encoded: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0

    def __call__(self, record: Record) -> bytes:
        """``record`` as the wire bytes of its ``EventRecord``."""
        encoded = self._encoded.get(record.position)
        if encoded is not None:
            self._encoded.move_to_end(record.position)
            return encoded
        encoded = record_to_proto(record).SerializeToString()
        self._encoded[record.position] = encoded
        self._bytes += len(encoded)
        while len(self._encoded) > self._max_records or self._bytes > self._max_bytes:
            _, dropped = self._encoded.popitem(last=False)
            self._bytes -= len(dropped)
        return encoded

    def __len__(self) -> int:
        return len(self._encoded)


def record_from_proto(message: pb.EventRecord) -> Record:
    """A log record off the wire (what ``orchestrator events`` prints)."""
    return Record(
        position=message.position,
        stream=message.stream,
        version=message.version,
        event_id=message.event_id,
        type=message.type,
        data=struct_to_dict(message.data, "data"),
        recorded_at=message.recorded_at.ToDatetime(tzinfo=UTC),
        causation_id=message.causation_id,
        traceparent=message.traceparent,
        idempotency_key=message.idempotency_key,
        schema_version=message.schema_version,
    )
