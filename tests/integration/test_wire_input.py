"""Bad wire input to a real daemon: bodies that do not decode, callers that go away.

A body that is not the method's message is INVALID_ARGUMENT naming the
message, with one WARNING line in the daemon's log and no traceback; a
follower that cancels or drops its connection is a DEBUG line. Either way the
daemon keeps serving. (tests/reliability/test_fuzz_grpc.py throws random
input of every kind at every method.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.limits import MAX_JSON_DEPTH
from orchestrator.plugins import Registry
from tests.support.daemon import Daemon, run_daemon
from tests.support.grpc import CREATE, VALIDATE, as_dict, emit, emit_request, read_request, ref

pytestmark = pytest.mark.anyio

SERVICE = "/orchestrator.v1.Orchestrator"
UNARY = {
    f"{SERVICE}/EmitLifecycleEvent": "orchestrator.v1.EmitLifecycleEventRequest",
    f"{SERVICE}/GetConnection": "orchestrator.v1.GetConnectionRequest",
    f"{SERVICE}/ListConnections": "orchestrator.v1.ListConnectionsRequest",
    "/grpc.health.v1.Health/Check": "grpc.health.v1.HealthCheckRequest",
}
READ = f"{SERVICE}/ReadEvents"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
UNDECODABLE = {
    "truncated": b"\x0a\x05ab",  # field 1, 5 bytes long, only 2 there
    "bad-wire-type": b"\x0f\x00",  # wire type 7 does not exist
    "bad-varint": b"\x10" + b"\xff" * 11,  # a varint longer than 10 bytes
}
WAIT = 20


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of the daemon's own loggers during the test, DEBUG and up.

    Only the orchestrator's loggers: at DEBUG, aiosqlite logs every statement from its thread, and a
    collection of the garbage there (grpc.aio's finalizers join its poller thread) once deadlocked
    against pytest's capture handler's lock.
    """
    with caplog.at_level(logging.DEBUG, logger="orchestrator"):
        yield caplog


def errors(log: pytest.LogCaptureFixture) -> list[str]:
    """The ERROR lines (or worse) logged, and every line that carries a traceback."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in log.records
        if r.levelno >= logging.ERROR or r.exc_info is not None
    ]


async def still_serving(daemon: Daemon) -> None:
    """Health says SERVING and an ordinary emit goes through."""
    health = health_pb2_grpc.HealthStub(daemon.channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
    ).status == health_pb2.HealthCheckResponse.SERVING
    response = await emit(daemon.stub, VALIDATE, "after")
    assert response.position > 0


@pytest.mark.parametrize("body", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_a_body_that_does_not_decode_is_invalid_argument(
    tmp_path: Path, log: pytest.LogCaptureFixture, body: bytes
) -> None:
    """Every method (ours, health, reflection) answers an undecodable body INVALID_ARGUMENT naming the message."""
    async with run_daemon(f"sqlite:///{tmp_path}/events.db", registry=Registry()) as daemon:
        answers: dict[str, tuple[grpc.StatusCode, str]] = {}
        for path in UNARY:
            call = daemon.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(body, timeout=WAIT)
            answers[path] = (info.value.code(), info.value.details() or "")
        read = daemon.channel.unary_stream(READ, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [record async for record in read(body, timeout=WAIT)]
        answers[READ] = (info.value.code(), info.value.details() or "")
        reflect = daemon.channel.stream_stream(REFLECTION, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [response async for response in reflect(iter([body]), timeout=WAIT)]
        answers[REFLECTION] = (info.value.code(), info.value.details() or "")
        await still_serving(daemon)

    expected = {
        **{path: f"the request is not a valid {message}" for path, message in UNARY.items()},
        READ: "the request is not a valid orchestrator.v1.ReadEventsRequest",
        REFLECTION: "the request is not a valid grpc.reflection.v1alpha.ServerReflectionRequest",
    }
    assert answers == {path: (grpc.StatusCode.INVALID_ARGUMENT, details) for path, details in expected.items()}
    assert errors(log) == []
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "six bad requests within the throttle's interval: one line"
    assert "is not a valid" in warnings[0]


async def test_followers_that_go_away_are_not_errors(tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    """Followers cancelled, or whose connection drops, mid-stream and while waiting, log no error and no traceback."""
    async with run_daemon(f"sqlite:///{tmp_path}/events.db", registry=Registry()) as daemon:
        for i in range(20):
            await emit(daemon.stub, CREATE, f"c{i}")
        for i in range(10):
            # Cancelled with records still to send (grpc waits in a write)...
            call = daemon.stub.ReadEvents(read_request(follow=True))
            with anyio.fail_after(WAIT):
                for _ in range(1 + i):
                    assert await call.read() is not grpc.aio.EOF
            call.cancel()
            # ... and once every record is sent (the follower waits for the next commit).
            position = (await emit(daemon.stub, CREATE, f"c{i}")).position
            waiting = daemon.stub.ReadEvents(read_request(follow=True, from_position=position))
            with anyio.fail_after(WAIT):
                assert (await waiting.read()).position == position
            waiting.cancel()
            # The connection itself dropped.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
                dropped = pb_grpc.OrchestratorStub(channel).ReadEvents(pb.ReadEventsRequest(follow=True))
                with anyio.fail_after(WAIT):
                    assert await dropped.read() is not grpc.aio.EOF
        await still_serving(daemon)

    assert errors(log) == []
    gone = [r for r in log.records if r.name == "orchestrator.rpc.server" and "went away" in r.getMessage()]
    assert gone and all(r.levelno == logging.DEBUG for r in gone)


JUNK_TRACEPARENTS = {
    "junk-7023": "x" * 7023,
    "valid-then-junk": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "-junk" * 1000,
    "zero-trace-id": "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "zero-parent-id": "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "version-ff": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "uppercase": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
    "short": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902-01",
}


@pytest.mark.parametrize("traceparent", JUNK_TRACEPARENTS.values(), ids=JUNK_TRACEPARENTS.keys())
async def test_an_invalid_traceparent_is_dropped(
    tmp_path: Path, log: pytest.LogCaptureFixture, traceparent: str
) -> None:
    """An invalid traceparent is treated as absent: no record stores it, no span continues it, one WARNING says so."""
    async with run_daemon(f"sqlite:///{tmp_path}/events.db", registry=Registry()) as daemon:
        await emit(daemon.stub, VALIDATE, "conn-1", traceparent=traceparent)
        stored = {record.traceparent async for record in daemon.stub.ReadEvents(read_request(), timeout=WAIT)}

    # Tracing off: nothing stored. Tracing on (another module installed the SDK): the RPC's own span, a new trace.
    (value,) = stored
    assert value == "" or (len(value) == 55 and value[3:35] not in traceparent), value
    assert errors(log) == []
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not a W3C traceparent" in warnings[0], warnings
    assert traceparent not in warnings[0]


def nested(levels: int) -> dict[str, Any]:
    """A JSON object ``levels`` objects deep."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"n": value}
    return value


async def test_a_config_nested_too_deep_is_refused_and_the_log_stays_readable(tmp_path: Path) -> None:
    """Config and payload nest at most 20 levels: deeper was stored, then no read of the log could serve it."""
    async with run_daemon(f"sqlite:///{tmp_path}/events.db", registry=Registry()) as daemon:
        deepest = emit_request(VALIDATE, "deepest")
        deepest.connection_config.update(nested(MAX_JSON_DEPTH))
        deepest.payload.update({"list": [nested(MAX_JSON_DEPTH - 2)]})  # arrays count as levels too
        accepted = await daemon.stub.EmitLifecycleEvent(deepest, timeout=WAIT)
        refusals = []
        for field, levels in [("connection_config", MAX_JSON_DEPTH + 1), ("payload", 31), ("connection_config", 32)]:
            message = emit_request(VALIDATE, f"deep-{levels}")
            getattr(message, field).update(nested(levels))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await daemon.stub.EmitLifecycleEvent(message, timeout=WAIT)
            refusals.append((info.value.code(), info.value.details()))
        records = [r async for r in daemon.stub.ReadEvents(read_request(), timeout=WAIT)]
        shown = await daemon.stub.GetConnection(pb.GetConnectionRequest(connection=ref("deepest")), timeout=WAIT)

    assert refusals == [
        (grpc.StatusCode.INVALID_ARGUMENT, f"{field} nests objects and arrays {levels} levels deep; the limit is 20")
        for field, levels in [("connection_config", 21), ("payload", 31), ("connection_config", 32)]
    ]
    assert [r.event_id for r in records[:1]] == [accepted.event_id]
    assert len(records) == 2, "the refused emits wrote nothing"
    assert as_dict(shown.connection.config) == nested(MAX_JSON_DEPTH)


async def test_a_page_token_that_is_not_ascii_is_invalid_argument(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    """A page token with characters base64 cannot hold is refused like any other bad token, not an internal error."""
    async with run_daemon(f"sqlite:///{tmp_path}/events.db", registry=Registry()) as daemon:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await daemon.stub.ListConnections(pb.ListConnectionsRequest(page_token="\x80é"), timeout=WAIT)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "page_token is not a token this server returned"
    assert errors(log) == []
