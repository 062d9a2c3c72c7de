"""Protobuf conversions: what crosses the wire comes back as it was sent."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.errors import InvalidArgument
from orchestrator.model import (
    ConnectionRef,
    ConnectionState,
    EmitRequest,
    EmitResult,
    FunctionStatus,
    Job,
    JobStatus,
    LifecycleEvent,
    Outcome,
)
from orchestrator.records import Record
from orchestrator.rpc import wire


def test_struct_round_trip_keeps_integers() -> None:
    """Integral numbers come back as ints, fractions as floats, nesting intact."""
    data = {"port": 443, "ratio": 0.5, "nested": {"list": [1, "a", None, True]}, "big": 2**60}
    back = wire.struct_to_dict(wire.dict_to_struct(data))
    assert back["port"] == 443 and isinstance(back["port"], int)
    assert back["ratio"] == 0.5
    assert back["nested"] == {"list": [1, "a", None, True]}
    assert isinstance(back["big"], float)  # beyond 2**53 a double cannot promise an exact int


def test_non_finite_numbers_are_refused() -> None:
    """NaN cannot be stored as JSON: the field is named in the error."""
    struct = wire.dict_to_struct({"x": 1})
    struct.fields["x"].number_value = math.nan
    with pytest.raises(InvalidArgument, match=r"payload\.x"):
        wire.struct_to_dict(struct, "payload")


def test_emit_request_round_trip() -> None:
    """The CLI's encoding of an emit decodes to the same request on the server."""
    request = EmitRequest(
        ref=ConnectionRef("dev", "salesforce", "acme/1"),
        event=LifecycleEvent.POST_CONNECTION_CREATION,
        config={"instance_url": "acme.my.salesforce.com"},
        credentials={"access_token": "t"},
        payload={"n": 1},
        idempotency_key="k",
        expected_version=0,
        wait=True,
    )
    assert wire.emit_request_from_proto(wire.emit_request_to_proto(request)) == request


def test_unspecified_event_is_refused() -> None:
    """The enum's zero value is not an event."""
    message = pb.EmitLifecycleEventRequest(
        connection=pb.ConnectionRef(environment="dev", integration="x", connection_id="c")
    )
    with pytest.raises(InvalidArgument, match="event must be one of"):
        wire.emit_request_from_proto(message)


@pytest.mark.parametrize(
    ("ref", "field"),
    [
        (pb.ConnectionRef(environment="Dev", integration="x", connection_id="c"), "connection.environment"),
        (pb.ConnectionRef(environment="dev", integration="-x", connection_id="c"), "connection.integration"),
        (pb.ConnectionRef(environment="dev", integration="x", connection_id=""), "connection.connection_id"),
        (pb.ConnectionRef(environment="dev", integration="x", connection_id="a\tb"), "connection.connection_id"),
    ],
)
def test_bad_refs_name_the_field(ref: pb.ConnectionRef, field: str) -> None:
    """Each malformed ref field is refused with its name in the message."""
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        wire.ref_from_proto(ref)


def test_emit_result_round_trip() -> None:
    """The server's encoding of an emit's result decodes to the same result in the client."""
    result = EmitResult(
        event_id="01a2",
        position=7,
        version=3,
        state=ConnectionState.REJECTED,
        outcomes=(Outcome("check-token-scopes", FunctionStatus.FAILED, 1, "lacks read:org", 12),),
        rejection_reason="check-token-scopes: lacks read:org",
        deduplicated=True,
    )
    assert wire.emit_response_from_proto(wire.emit_response_to_proto(result)) == result


NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def log_record(position: int, data: dict[str, object] | None = None) -> Record:
    """A record of the log at ``position``."""
    return Record(
        position, "dev/salesforce/acme", position, f"e{position}", "post-connection-creation", data or {}, NOW
    )


def test_a_record_is_encoded_once_and_the_bytes_shared() -> None:
    """EncodedRecords gives the EventRecord's bytes, the same object to every caller while it is kept."""
    encoded = wire.EncodedRecords()
    record = log_record(7, {"config": {"instance_url": "acme"}, "payload": {"n": 1}})
    first = encoded(record)
    assert pb.EventRecord.FromString(first) == wire.record_to_proto(record)
    assert encoded(log_record(7, {"config": {"instance_url": "acme"}, "payload": {"n": 1}})) is first
    assert len(encoded) == 1


def test_encoded_records_are_bounded_by_count_and_bytes() -> None:
    """Beyond either bound the least recently used go: a record sent again is encoded again."""
    by_count = wire.EncodedRecords(records=2)
    kept = by_count(log_record(1))
    by_count(log_record(2))
    assert by_count(log_record(1)) is kept  # used again: now the most recent
    by_count(log_record(3))
    assert len(by_count) == 2
    assert by_count(log_record(1)) is kept  # 2 went, not 1
    size = len(kept)
    by_bytes = wire.EncodedRecords(max_bytes=2 * size)
    for position in range(1, 10):
        by_bytes(log_record(position))
    assert len(by_bytes) == 2


def job(status: JobStatus) -> Job:
    """A job of dev/acme/c-1 in ``status``, as the service returns it."""
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    return Job(
        "01900000-0000-7000-8000-000000000001",
        "dev/acme/c-1",
        "register",
        LifecycleEvent.POST_CONNECTION_CREATION,
        "01900000-0000-7000-8000-000000000002",
        {"kept": "in the store only"},
        at,
        2,
        7,
        status is JobStatus.RUNNING,
        status=status,
        last_error="HTTP 503",
        created_at=at,
        updated_at=at,
        max_attempts=5,
    )


@pytest.mark.parametrize("status", list(JobStatus), ids=str)
def test_a_job_crosses_the_wire_with_its_next_attempt_only_while_queued(status: JobStatus) -> None:
    """Every field the proto has comes back; next_attempt_at is set for a queued job only."""
    message = wire.job_to_proto(job(status))
    assert message.HasField("next_attempt_at") is (status is JobStatus.QUEUED)
    assert (message.id, message.event_id, message.attempts, message.max_attempts) == (
        "01900000-0000-7000-8000-000000000001",
        "01900000-0000-7000-8000-000000000002",
        2,
        5,
    )
    back = wire.job_from_proto(message)
    sent = job(status)
    assert (back.job_id, back.stream, back.function, back.event, back.causation_id) == (
        sent.job_id,
        sent.stream,
        sent.function,
        sent.event,
        sent.causation_id,
    )
    assert (back.status, back.attempt, back.max_attempts, back.last_error) == (status, 2, 5, "HTTP 503")
    assert (back.run_at, back.created_at, back.updated_at) == (sent.run_at, sent.created_at, sent.updated_at)


def test_a_status_filter_refuses_unspecified_and_unknown_values() -> None:
    """Empty means any; the zero value and numbers the enum lacks are named."""
    assert wire.job_statuses_from_proto([]) == frozenset()
    assert wire.job_statuses_from_proto([pb.JOB_STATUS_GAVE_UP, pb.JOB_STATUS_GAVE_UP]) == {JobStatus.GAVE_UP}
    with pytest.raises(InvalidArgument, match=r"statuses\[1\] must be one of JOB_STATUS_QUEUED, .* not 0"):
        wire.job_statuses_from_proto([pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_UNSPECIFIED])
    with pytest.raises(InvalidArgument, match=r"statuses\[0\] .* not 42"):
        wire.job_statuses_from_proto([42])
