"""The daemon's gRPC API as the tests call it: refs, emits, reads and follows of the log.

Each async helper takes a *target*: a stub on an open channel (an in-process
daemon's ``daemon.stub``) or the address of a daemon (``127.0.0.1:<port>`` of
a subprocess), to which a channel is opened for the call and closed after.
:class:`Api` is the same API for sync tests (the end-to-end suite arranges
state with it, as a platform service would).

Nothing here sleeps to wait: :func:`follow_until` follows the log
(``ReadEvents(follow=true)``) until a record matches, and every call is
bounded by :data:`WAIT` seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import grpc
from google.protobuf import json_format, struct_pb2

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

WAIT = 20.0
"""Seconds a test waits for something the daemon does promptly."""
RPC_EMIT = "orchestrator.v1.Orchestrator/EmitLifecycleEvent"
"""The emit's RPC, as its server span is named."""

# The lifecycle events, connection states and function statuses of the proto, by their short names.
VALIDATE, CREATE, DELETE = (
    pb.LIFECYCLE_EVENT_VALIDATE_CONNECTION,
    pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION,
    pb.LIFECYCLE_EVENT_PRE_CONNECTION_DELETION,
)
PENDING, ACTIVE, REJECTED, DELETING, DELETED = (
    pb.CONNECTION_STATE_PENDING,
    pb.CONNECTION_STATE_ACTIVE,
    pb.CONNECTION_STATE_REJECTED,
    pb.CONNECTION_STATE_DELETING,
    pb.CONNECTION_STATE_DELETED,
)
SCHEDULED, SUCCEEDED, FAILED, GAVE_UP = (
    pb.FUNCTION_STATUS_SCHEDULED,
    pb.FUNCTION_STATUS_SUCCEEDED,
    pb.FUNCTION_STATUS_FAILED,
    pb.FUNCTION_STATUS_GAVE_UP,
)

Stub = pb_grpc.OrchestratorStub
Target = Stub | str
"""A stub, or the address of a daemon."""
Connection = str | pb.ConnectionRef
"""A connection ref, or a connection id (of the helper's ``integration``, in environment dev)."""


@asynccontextmanager
async def connected(target: Target) -> AsyncIterator[Stub]:
    """``target`` itself when it is a stub, else a stub on a fresh channel to that address (closed at the end)."""
    if not isinstance(target, str):
        yield target
        return
    async with grpc.aio.insecure_channel(target) as channel:
        yield pb_grpc.OrchestratorStub(channel)


def ref(connection_id: str, integration: str = "acme", environment: str = "dev") -> pb.ConnectionRef:
    """A connection ref (in environment dev unless told otherwise)."""
    return pb.ConnectionRef(environment=environment, integration=integration, connection_id=connection_id)


def _ref(connection: Connection, integration: str) -> pb.ConnectionRef:
    """``connection`` as a ref."""
    return ref(connection, integration) if isinstance(connection, str) else connection


def emit_request(
    event: int, connection: Connection, integration: str = "acme", **fields: Any
) -> pb.EmitLifecycleEventRequest:
    """An EmitLifecycleEventRequest of ``event`` for ``connection``; ``fields`` are the request's other fields."""
    return pb.EmitLifecycleEventRequest(connection=_ref(connection, integration), event=event, **fields)


async def emit(
    target: Target,
    event: int,
    connection: Connection,
    integration: str = "acme",
    *,
    traceparent: str = "",
    **fields: Any,
) -> pb.EmitLifecycleEventResponse:
    """EmitLifecycleEvent, with the caller's ``traceparent`` in the call's metadata when given."""
    metadata = (("traceparent", traceparent),) if traceparent else None
    async with connected(target) as stub:
        request = emit_request(event, connection, integration, **fields)
        return await stub.EmitLifecycleEvent(request, metadata=metadata, timeout=WAIT)


async def get(target: Target, connection: Connection, integration: str = "acme") -> pb.Connection:
    """The connection as GetConnection returns it."""
    async with connected(target) as stub:
        request = pb.GetConnectionRequest(connection=_ref(connection, integration))
        return (await stub.GetConnection(request, timeout=WAIT)).connection


def read_request(
    connection: Connection | None = None, integration: str = "acme", **fields: Any
) -> pb.ReadEventsRequest:
    """A ReadEventsRequest; no ``connection`` means every connection."""
    message = pb.ReadEventsRequest(**fields)
    if connection is not None:
        message.connection.CopyFrom(_ref(connection, integration))
    return message


async def records(
    target: Target,
    connection: Connection | None = None,
    integration: str = "acme",
    *,
    from_position: int = 0,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> list[pb.EventRecord]:
    """Every record of the log (of one connection when given) from ``from_position``, not following."""
    async with connected(target) as stub:
        request = read_request(connection, integration, from_position=from_position)
        return [record async for record in stub.ReadEvents(request, metadata=metadata, timeout=WAIT)]


async def follow_until(
    target: Target, predicate: Callable[[pb.EventRecord], bool], *, from_position: int = 0
) -> list[pb.EventRecord]:
    """Follow the whole log until a record matches ``predicate``; the records read, the match last."""
    seen: list[pb.EventRecord] = []
    async with connected(target) as stub:
        call = stub.ReadEvents(pb.ReadEventsRequest(from_position=from_position, follow=True))
        try:
            with anyio.fail_after(WAIT):
                async for record in call:
                    seen.append(record)
                    if predicate(record):
                        return seen
        finally:
            call.cancel()
    raise AssertionError(f"the follow stream ended after {[r.type for r in seen]}")


def as_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict (numbers as floats, which compare equal to ints)."""
    return json_format.MessageToDict(message)


class Api:
    """The daemon's gRPC API over one blocking channel, for sync tests; it answers like ``emit --json``."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.OrchestratorStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def emit(
        self,
        event: str,
        connection: str,
        integration: str,
        *,
        environment: str = "dev",
        config: Mapping[str, Any] | None = None,
        idempotency_key: str = "",
    ) -> dict[str, Any]:
        """Emit one lifecycle event (by name); the response's event_id, position, version, state and deduplicated."""
        request = emit_request(
            pb.LifecycleEvent.Value("LIFECYCLE_EVENT_" + event.upper().replace("-", "_")),
            ref(connection, integration, environment),
            idempotency_key=idempotency_key,
        )
        if config:
            request.connection_config.update(config)
        response = self.stub.EmitLifecycleEvent(request, timeout=WAIT)
        return {
            "event_id": response.event_id,
            "position": response.position,
            "version": response.version,
            "state": pb.ConnectionState.Name(response.state).removeprefix("CONNECTION_STATE_").lower(),
            "deduplicated": response.deduplicated,
        }

    def lifecycle(self, connection: str, integration: str) -> list[dict[str, Any]]:
        """Validate, create and delete one connection; the three responses."""
        return [
            self.emit(event, connection, integration)
            for event in ("validate-connection", "post-connection-creation", "pre-connection-deletion")
        ]
