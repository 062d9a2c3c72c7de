"""The gRPC API of a real daemon (127.0.0.1:0, SQLite in tmp_path) through grpc.aio clients.

The daemon runs no event functions (an empty registry, whatever plugins are
installed), so validation accepts and deletion completes at once; functions
over gRPC are pinned in test_functions_grpc.py. Every cell of the state table
reachable that way is driven through EmitLifecycleEvent. The cells from
``rejected`` and ``deleting`` are reached by seeding the SQLite log with the
store before the daemon starts, with the records the daemon writes when
functions reject or a cleanup is still running. The unit fold tests
(tests/unit/test_state.py) cover every cell without a server.
"""

from __future__ import annotations

import asyncio
import base64
import math
import uuid
from collections.abc import Awaitable
from typing import Any

import aiosqlite
import anyio
import grpc
import pytest
from google.protobuf import descriptor_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.ids import uuid7
from orchestrator.limits import MAX_CONFIG_BYTES, MAX_CREDENTIAL_VALUE, MAX_CREDENTIALS, MAX_PAYLOAD_BYTES
from orchestrator.model import ConnectionRef
from orchestrator.plugins import Registry
from orchestrator.records import NewEvent, Record
from orchestrator.rpc import wire
from tests.support import grpc as rpc
from tests.support.daemon import Daemon, run_daemon, seed
from tests.support.grpc import (
    ACTIVE,
    CREATE,
    DELETE,
    DELETED,
    DELETING,
    PENDING,
    REJECTED,
    VALIDATE,
    Stub,
    as_dict,
    read_request,
)
from tests.support.grpc import records as read_events

pytestmark = pytest.mark.anyio

SERVICE = "orchestrator.v1.Orchestrator"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STREAM = "dev/salesforce/acme"
REF = ConnectionRef("dev", "salesforce", "acme")
"""The model's ref of :func:`conn`'s default, for seeding the log."""
READ_TIMEOUT = 10
"""Seconds a follower may wait for a record that is already committed."""


# -- helpers -------------------------------------------------------------------


def conn(connection_id: str = "acme", environment: str = "dev", integration: str = "salesforce") -> pb.ConnectionRef:
    """A connection ref (``dev/salesforce/acme`` by default)."""
    return rpc.ref(connection_id, integration, environment)


def struct(**fields: Any) -> struct_pb2.Struct:
    """A Struct holding ``fields``."""
    message = struct_pb2.Struct()
    message.update(fields)
    return message


def request(event: int, connection: pb.ConnectionRef | None = None, **fields: Any) -> pb.EmitLifecycleEventRequest:
    """An EmitLifecycleEventRequest for ``connection`` (``dev/salesforce/acme`` by default)."""
    return rpc.emit_request(event, connection or conn(), **fields)


async def emit(
    stub: Stub, event: int, connection: pb.ConnectionRef | None = None, **fields: Any
) -> pb.EmitLifecycleEventResponse:
    """Emit one lifecycle event for ``connection`` (``dev/salesforce/acme`` by default) and return the response."""
    return await rpc.emit(stub, event, connection or conn(), **fields)


async def refused(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    """Await ``call``, check it fails with ``code``, and return the status message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    assert details
    assert "Traceback" not in details
    return details


async def get(stub: Stub, connection: pb.ConnectionRef | None = None) -> pb.Connection:
    """The connection as GetConnection returns it (``dev/salesforce/acme`` by default)."""
    return await rpc.get(stub, connection or conn())


def lifecycle(event: str, config: dict[str, Any] | None = None) -> NewEvent:
    """A lifecycle record as the daemon writes it, for seeding."""
    return NewEvent(event_id=str(uuid7()), type=event, data={"config": config or {}, "payload": {}})


def fact(type_: str, cause: NewEvent, **data: Any) -> NewEvent:
    """A fact caused by ``cause``, as the daemon writes it, for seeding."""
    return NewEvent(event_id=str(uuid7()), type=type_, data=data, causation_id=cause.event_id)


class HeldRead:
    """Holds the read of one stream on the daemon's SQLite reader after its first round trip to the reader's thread.

    :meth:`install` replaces ``aiosqlite.Connection._execute`` (each call is one round trip): once a task
    has run a statement with ``stream`` as a parameter, its next round trip waits for :attr:`release`.
    """

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.started = anyio.Event()
        """Set once the held read's first round trip has run."""
        self.release = anyio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Hold the read from now on (until the test ends)."""
        round_trip = aiosqlite.Connection._execute

        async def execute(connection: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
            """One round trip to ``connection``'s thread, held if it continues the held read."""
            task = asyncio.current_task()
            assert task is not None
            if task in self._tasks:
                await self.release.wait()
            result = await round_trip(connection, fn, *args, **kwargs)
            if len(args) >= 2 and isinstance(args[1], tuple | list) and self.stream in args[1]:
                self._tasks.add(task)
                self.started.set()
            return result

        monkeypatch.setattr(aiosqlite.Connection, "_execute", execute)


async def next_record(call: Any) -> pb.EventRecord:
    """The next record of a following ReadEvents call (already committed, so it must come promptly)."""
    with anyio.fail_after(READ_TIMEOUT):
        record = await call.read()
    assert record is not grpc.aio.EOF, "the follow stream ended"
    return record


# -- the state table over the wire -------------------------------------------


async def test_validate_creates_a_pending_connection(stub: Stub) -> None:
    """validate-connection on a new connection answers PENDING with the lifecycle record's position 1, and version 2:
    the stream's after the verdict."""
    response = await emit(stub, VALIDATE)

    assert response.state == PENDING
    assert (response.position, response.version) == (1, 2)
    assert uuid.UUID(response.event_id).version == 7
    assert not response.deduplicated
    assert response.rejection_reason == ""
    records = await read_events(stub)
    assert [(r.position, r.version, r.type) for r in records] == [
        (1, 1, "validate-connection"),
        (2, 2, "connection-validated"),
    ]
    assert records[0].event_id == response.event_id
    assert records[1].causation_id == response.event_id
    assert {r.stream for r in records} == {STREAM}
    assert (await get(stub)).state == PENDING


async def test_post_creation_activates_the_connection(stub: Stub) -> None:
    """post-connection-creation after validation answers ACTIVE with its own record's position and version."""
    await emit(stub, VALIDATE)

    response = await emit(stub, CREATE)

    assert response.state == ACTIVE
    assert (response.position, response.version) == (3, 3)
    records = await read_events(stub)
    assert [r.type for r in records] == ["validate-connection", "connection-validated", "post-connection-creation"]
    assert records[2].event_id == response.event_id
    assert (await get(stub)).state == ACTIVE


async def test_pre_deletion_deletes_the_connection(stub: Stub) -> None:
    """pre-connection-deletion answers DELETED with the lifecycle record, followed by connection-deleted."""
    await emit(stub, VALIDATE)
    await emit(stub, CREATE)

    response = await emit(stub, DELETE)

    assert response.state == DELETED
    assert (response.position, response.version) == (4, 5)
    records = await read_events(stub)
    assert [(r.position, r.type) for r in records[3:]] == [(4, "pre-connection-deletion"), (5, "connection-deleted")]
    assert records[3].event_id == response.event_id
    assert records[4].causation_id == response.event_id
    assert (await get(stub)).state == DELETED


async def test_post_creation_without_validation_creates_an_active_connection(stub: Stub) -> None:
    """post-connection-creation may create a connection directly (version 1, ACTIVE)."""
    response = await emit(stub, CREATE)

    assert (response.state, response.position, response.version) == (ACTIVE, 1, 1)
    assert [r.type for r in await read_events(stub)] == ["post-connection-creation"]


async def test_versions_are_per_connection_and_positions_global(stub: Stub) -> None:
    """Each connection's versions count from 1 while positions count across the whole log."""
    first = await emit(stub, VALIDATE, conn("a"))
    second = await emit(stub, VALIDATE, conn("b"))
    third = await emit(stub, CREATE, conn("a"))

    assert [(r.position, r.version) for r in (first, second, third)] == [(1, 2), (3, 2), (5, 3)]


async def test_deleting_a_deleted_connection_repeats_the_deletion(stub: Stub) -> None:
    """Deleting a deleted connection answers with the original deletion's record and writes nothing."""
    await emit(stub, CREATE)
    deletion = await emit(stub, DELETE)
    before = await read_events(stub)

    for _ in range(2):
        again = await emit(stub, DELETE)
        assert (again.event_id, again.position, again.version, again.state) == (
            deletion.event_id,
            deletion.position,
            deletion.version,
            DELETED,
        )
    assert await read_events(stub) == before


async def test_reconnect_keeps_metadata_and_config(database: str) -> None:
    """A post-creation on an active connection is a reconnect: same incarnation, metadata and config kept."""
    created = lifecycle("post-connection-creation", {"instance_url": "acme.my.salesforce.com"})
    seeded = await seed(database, REF, [created, fact("metadata-updated", created, metadata={"webhook_id": "w1"})])

    async with run_daemon(database, registry=Registry()) as daemon:
        response = await emit(daemon.stub, CREATE)
        connection = await get(daemon.stub)

    assert (response.state, response.version) == (ACTIVE, 3)
    assert as_dict(connection.metadata) == {"webhook_id": "w1"}
    assert as_dict(connection.config) == {"instance_url": "acme.my.salesforce.com"}
    assert connection.created_at.ToDatetime() == seeded[0].recorded_at.replace(tzinfo=None)


@pytest.mark.parametrize(("event", "state"), [(VALIDATE, PENDING), (CREATE, ACTIVE)], ids=["validate", "create"])
async def test_event_after_deletion_starts_a_new_incarnation(database: str, event: int, state: int) -> None:
    """validate/post-creation after deletion start a new incarnation: fresh metadata and config, new created_at."""
    created = lifecycle("post-connection-creation", {"instance_url": "acme.my.salesforce.com"})
    await seed(database, REF, [created, fact("metadata-updated", created, metadata={"webhook_id": "w1"})])

    async with run_daemon(database, registry=Registry()) as daemon:
        assert as_dict((await get(daemon.stub)).metadata) == {"webhook_id": "w1"}
        await emit(daemon.stub, DELETE)
        response = await emit(daemon.stub, event)
        connection = await get(daemon.stub)
        records = await read_events(daemon.stub)

    assert response.state == state
    assert response.version == (6 if event == VALIDATE else 5), "the stream's versions continue across incarnations"
    assert connection.state == state
    assert as_dict(connection.metadata) == {}
    assert as_dict(connection.config) == {}
    new_record = next(r for r in records if r.event_id == response.event_id)
    assert connection.created_at == new_record.recorded_at


async def test_pre_deletion_of_a_rejected_connection_ends_it_deleted(database: str) -> None:
    """pre-connection-deletion of a rejected connection is accepted: with nothing of its cleanup left (it was
    rejected while pending), the deletion runs nothing and the connection ends DELETED, reason cleared."""
    validation = lifecycle("validate-connection")
    await seed(database, REF, [validation, fact("connection-rejected", validation, reason="check: token revoked")])

    async with run_daemon(database, registry=Registry()) as daemon:
        rejected = await get(daemon.stub)
        deleted = await emit(daemon.stub, DELETE)
        connection = await get(daemon.stub)
        after = await read_events(daemon.stub)

    assert (rejected.state, rejected.rejection_reason) == (REJECTED, "check: token revoked")
    assert (deleted.state, connection.state, connection.rejection_reason) == (DELETED, DELETED, "")
    assert [r.type for r in after[2:]] == ["pre-connection-deletion", "connection-deleted"]


@pytest.mark.parametrize(("event", "state"), [(VALIDATE, PENDING), (CREATE, ACTIVE)], ids=["validate", "create"])
async def test_event_after_rejection_starts_a_new_incarnation(database: str, event: int, state: int) -> None:
    """validate/post-creation of a rejected connection start afresh, clearing the rejection reason."""
    validation = lifecycle("validate-connection")
    await seed(database, REF, [validation, fact("connection-rejected", validation, reason="check: token revoked")])

    async with run_daemon(database, registry=Registry()) as daemon:
        response = await emit(daemon.stub, event)
        connection = await get(daemon.stub)

    assert (response.state, response.version) == (state, 4 if event == VALIDATE else 3)
    assert response.rejection_reason == ""
    assert (connection.state, connection.rejection_reason) == (state, "")


@pytest.mark.parametrize(
    ("event", "name"),
    [(VALIDATE, "validate-connection"), (CREATE, "post-connection-creation")],
    ids=["validate", "create"],
)
async def test_event_while_deleting_fails_precondition(database: str, event: int, name: str) -> None:
    """validate/post-creation while a deletion is unfinished are FAILED_PRECONDITION naming event and state."""
    await seed(database, REF, [lifecycle("post-connection-creation")], [lifecycle("pre-connection-deletion")])

    async with run_daemon(database, registry=Registry()) as daemon:
        assert (await get(daemon.stub)).state == DELETING
        before = await read_events(daemon.stub)
        details = await refused(emit(daemon.stub, event), grpc.StatusCode.FAILED_PRECONDITION)
        after = await read_events(daemon.stub)

    assert name in details
    assert "deleting" in details
    assert "wait for the deletion to finish" in details
    assert after == before


async def test_pre_deletion_while_deleting_repeats_the_deletion(database: str) -> None:
    """A second pre-connection-deletion while deleting answers with the unfinished deletion and writes nothing."""
    seeded = await seed(database, REF, [lifecycle("post-connection-creation")], [lifecycle("pre-connection-deletion")])

    async with run_daemon(database, registry=Registry()) as daemon:
        before = await read_events(daemon.stub)
        response = await emit(daemon.stub, DELETE)
        after = await read_events(daemon.stub)

    deletion = seeded[1]
    assert (response.event_id, response.position, response.version, response.state) == (
        deletion.event_id,
        deletion.position,
        deletion.version,
        DELETING,
    )
    assert after == before


# -- refusals ------------------------------------------------------------------

NAN = float("nan")
INVALID_EMITS = [
    pytest.param(pb.EmitLifecycleEventRequest(event=VALIDATE), "connection is required", id="missing-connection"),
    pytest.param(request(VALIDATE, conn(environment="Prod!")), "connection.environment 'Prod!'", id="environment"),
    pytest.param(request(VALIDATE, conn(environment="")), "connection.environment ''", id="empty-environment"),
    pytest.param(request(VALIDATE, conn(integration="Sales force")), "connection.integration", id="integration"),
    pytest.param(request(VALIDATE, conn("")), "connection.connection_id is required", id="empty-connection-id"),
    pytest.param(
        request(VALIDATE, conn("acme\n")), "connection.connection_id contains a control", id="newline-in-connection-id"
    ),
    pytest.param(
        request(VALIDATE, conn("x" * 256)),
        "connection.connection_id is 256 characters long; the maximum is 255",
        id="long-connection-id",
    ),
    pytest.param(request(pb.LIFECYCLE_EVENT_UNSPECIFIED), "event must be one of", id="unspecified-event"),
    pytest.param(request(7), "event must be one of", id="unknown-event"),
    pytest.param(request(VALIDATE, expected_version=-1), "expected_version must be 0 or more", id="expected-version"),
    pytest.param(request(VALIDATE, payload=struct(ratio=NAN)), "payload.ratio", id="nan-in-payload"),
    pytest.param(
        request(VALIDATE, connection_config=struct(port=math.inf)), "connection_config.port", id="inf-in-config"
    ),
    pytest.param(request(VALIDATE, idempotency_key="k" * 256), "idempotency_key is 256 characters", id="long-key"),
    pytest.param(request(VALIDATE, idempotency_key="a\tb"), "idempotency_key contains a control", id="control-key"),
    pytest.param(request(VALIDATE, credentials={"": "s3cret"}), "credentials", id="empty-credential-name"),
]


@pytest.mark.parametrize(("message", "expected"), INVALID_EMITS)
async def test_invalid_emit_is_refused_naming_the_field(
    stub: Stub, message: pb.EmitLifecycleEventRequest, expected: str
) -> None:
    """A malformed emit is INVALID_ARGUMENT with a message naming the field, and nothing is written."""
    await emit(stub, VALIDATE)
    before = await read_events(stub)

    details = await refused(stub.EmitLifecycleEvent(message), grpc.StatusCode.INVALID_ARGUMENT)

    assert expected in details
    assert "s3cret" not in details
    assert await read_events(stub) == before


async def test_longest_connection_id_is_accepted(stub: Stub) -> None:
    """A 255-character connection_id (the maximum) is accepted and round-trips."""
    response = await emit(stub, VALIDATE, conn("x" * 255))

    assert response.state == PENDING
    assert (await get(stub, conn("x" * 255))).ref.connection_id == "x" * 255


TOO_LARGE = [
    pytest.param(
        request(VALIDATE, payload=struct(blob="x" * MAX_PAYLOAD_BYTES)),
        f"payload is {MAX_PAYLOAD_BYTES + 11} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES}",
        id="payload",
    ),
    pytest.param(
        request(VALIDATE, connection_config=struct(blob="x" * MAX_CONFIG_BYTES)),
        f"the limit is {MAX_CONFIG_BYTES}",
        id="connection-config",
    ),
    pytest.param(
        request(VALIDATE, credentials={f"k{i}": "v" for i in range(MAX_CREDENTIALS + 1)}),
        f"credentials has {MAX_CREDENTIALS + 1} entries",
        id="credential-count",
    ),
    pytest.param(
        request(VALIDATE, credentials={"access_token": "s3cret" * MAX_CREDENTIAL_VALUE}),
        "credentials['access_token']",
        id="credential-value",
    ),
]


@pytest.mark.parametrize(("message", "expected"), TOO_LARGE)
async def test_oversized_emit_is_resource_exhausted(
    stub: Stub, message: pb.EmitLifecycleEventRequest, expected: str
) -> None:
    """A field over its size limit is RESOURCE_EXHAUSTED naming field and limit (never a secret); nothing written."""
    await emit(stub, VALIDATE)
    before = await read_events(stub)

    details = await refused(stub.EmitLifecycleEvent(message), grpc.StatusCode.RESOURCE_EXHAUSTED)

    assert expected in details
    assert "s3cret" not in details
    assert await read_events(stub) == before


async def test_payload_at_the_limit_is_accepted(stub: Stub) -> None:
    """A payload of exactly 256 KiB as JSON is accepted and stored whole."""
    blob = "x" * (MAX_PAYLOAD_BYTES - len('{"blob":""}'))

    response = await emit(stub, VALIDATE, payload=struct(blob=blob))

    records = await read_events(stub)
    assert records[0].event_id == response.event_id
    assert as_dict(records[0].data)["payload"] == {"blob": blob}


async def test_get_unknown_connection_is_not_found(stub: Stub) -> None:
    """GetConnection of a connection without events is NOT_FOUND naming it."""
    await emit(stub, VALIDATE)

    details = await refused(get(stub, conn("ghost")), grpc.StatusCode.NOT_FOUND)

    assert "dev/salesforce/ghost" in details
    assert "not found" in details


async def test_pre_deletion_of_unknown_connection_is_not_found(stub: Stub) -> None:
    """pre-connection-deletion of an unknown connection is NOT_FOUND naming it, and nothing is written."""
    await emit(stub, VALIDATE)
    before = await read_events(stub)

    details = await refused(emit(stub, DELETE, conn("ghost")), grpc.StatusCode.NOT_FOUND)

    assert "dev/salesforce/ghost" in details
    assert "pre-connection-deletion" in details
    assert await read_events(stub) == before


@pytest.mark.parametrize(
    ("connection", "expected"),
    [(None, "connection is required"), (conn(environment="Prod!"), "connection.environment")],
    ids=["missing", "bad-environment"],
)
async def test_get_connection_with_bad_ref_is_invalid(
    stub: Stub, connection: pb.ConnectionRef | None, expected: str
) -> None:
    """GetConnection without a valid ref is INVALID_ARGUMENT naming the field."""
    message = pb.GetConnectionRequest(connection=connection)

    details = await refused(stub.GetConnection(message), grpc.StatusCode.INVALID_ARGUMENT)

    assert expected in details


async def test_expected_version_mismatch_is_aborted_with_current_version(stub: Stub) -> None:
    """A wrong expected_version is ABORTED saying the current version, and nothing is written."""
    await emit(stub, VALIDATE)
    before = await read_events(stub)

    stale = await refused(emit(stub, CREATE, expected_version=1), grpc.StatusCode.ABORTED)
    ahead = await refused(emit(stub, CREATE, expected_version=3), grpc.StatusCode.ABORTED)
    new = await refused(emit(stub, VALIDATE, conn("new"), expected_version=1), grpc.StatusCode.ABORTED)

    assert "expected version 1" in stale
    assert "current version is 2" in stale
    assert "current version is 2" in ahead
    assert "current version is 0" in new
    assert STREAM in stale
    assert await read_events(stub) == before


async def test_expected_version_that_matches_is_accepted(stub: Stub) -> None:
    """expected_version 0 creates a connection; each response's version, passed straight back, appends to it."""
    validated = await emit(stub, VALIDATE, expected_version=0)
    created = await emit(stub, CREATE, expected_version=validated.version)
    deleted = await emit(stub, DELETE, expected_version=created.version)

    assert [(r.state, r.version) for r in (validated, created, deleted)] == [(PENDING, 2), (ACTIVE, 3), (DELETED, 5)]


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"payload": struct(attempt=2)}, id="payload"),
        pytest.param({"connection_config": struct(instance_url="other")}, id="config"),
        pytest.param({"event": CREATE}, id="event"),
    ],
)
async def test_idempotency_key_reused_for_another_request_already_exists(stub: Stub, changed: dict[str, Any]) -> None:
    """The same key with a different request on a connection is ALREADY_EXISTS naming the key; nothing written."""
    original = {"event": VALIDATE, "payload": struct(attempt=1), "connection_config": struct(instance_url="acme")}
    await stub.EmitLifecycleEvent(pb.EmitLifecycleEventRequest(connection=conn(), idempotency_key="k-1", **original))
    before = await read_events(stub)
    different = pb.EmitLifecycleEventRequest(connection=conn(), idempotency_key="k-1", **(original | changed))

    details = await refused(stub.EmitLifecycleEvent(different), grpc.StatusCode.ALREADY_EXISTS)

    assert "'k-1'" in details
    assert STREAM in details
    assert await read_events(stub) == before


# -- idempotent repeats --------------------------------------------------------


async def test_repeat_with_same_key_returns_the_original_response(stub: Stub) -> None:
    """A repeat with the same key answers the original response, deduplicated, even after the state moved on."""
    config = struct(instance_url="acme")
    first = await emit(stub, VALIDATE, idempotency_key="v-1", payload=struct(attempt=1), connection_config=config)
    created = await emit(stub, CREATE, idempotency_key="c-1")
    await emit(stub, DELETE)
    before = await read_events(stub)

    again = await emit(stub, VALIDATE, idempotency_key="v-1", payload=struct(attempt=1), connection_config=config)
    created_again = await emit(stub, CREATE, idempotency_key="c-1")

    assert not first.deduplicated
    assert again.deduplicated
    assert (again.event_id, again.position, again.version, again.state) == (
        first.event_id,
        first.position,
        first.version,
        PENDING,
    )
    assert created_again.deduplicated
    assert (created_again.event_id, created_again.position, created_again.version, created_again.state) == (
        created.event_id,
        created.position,
        created.version,
        ACTIVE,
    )
    assert await read_events(stub) == before
    assert (await get(stub)).state == DELETED


async def test_concurrent_repeats_with_one_key_append_once(stub: Stub) -> None:
    """Ten concurrent identical requests with one key append once; the other nine are deduplicated repeats of it."""
    responses: list[pb.EmitLifecycleEventResponse] = []

    async def validate() -> None:
        responses.append(await emit(stub, VALIDATE, idempotency_key="v-1", payload=struct(attempt=1)))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(validate)

    assert sorted(r.deduplicated for r in responses) == [False] + [True] * 9
    assert {(r.event_id, r.position, r.version, r.state) for r in responses} == {(responses[0].event_id, 1, 2, PENDING)}
    assert [r.type for r in await read_events(stub)] == ["validate-connection", "connection-validated"]


async def test_same_key_on_another_connection_is_independent(stub: Stub) -> None:
    """Idempotency keys are scoped to one connection: the same key elsewhere is a new request."""
    first = await emit(stub, VALIDATE, conn("a"), idempotency_key="k-1")
    second = await emit(stub, CREATE, conn("b"), idempotency_key="k-1")

    assert not second.deduplicated
    assert second.event_id != first.event_id
    assert (second.state, second.version) == (ACTIVE, 1)
    assert [r.stream for r in await read_events(stub, conn("b"))] == ["dev/salesforce/b"]


async def test_idempotency_key_is_on_the_lifecycle_record_only(stub: Stub) -> None:
    """The key is stored on the lifecycle record, not on the facts the orchestrator adds after it."""
    await emit(stub, VALIDATE, idempotency_key="v-1")

    records = await read_events(stub)

    assert [(r.type, r.idempotency_key) for r in records] == [
        ("validate-connection", "v-1"),
        ("connection-validated", ""),
    ]


# -- queries -------------------------------------------------------------------


async def test_get_connection_returns_the_read_model(stub: Stub) -> None:
    """GetConnection returns ref, state, version, config, created_at, updated_at and the last event."""
    await emit(stub, VALIDATE, connection_config=struct(instance_url="acme.my.salesforce.com", port=443))
    await emit(stub, CREATE)

    connection = await get(stub)

    records = await read_events(stub)
    assert connection.ref == conn()
    assert connection.state == ACTIVE
    assert connection.version == 3
    assert as_dict(connection.config) == {"instance_url": "acme.my.salesforce.com", "port": 443}
    assert as_dict(connection.metadata) == {}
    assert connection.created_at == records[0].recorded_at
    assert connection.updated_at == records[-1].recorded_at
    assert connection.created_at.ToDatetime() <= connection.updated_at.ToDatetime()
    assert (connection.last_event, connection.last_position) == ("post-connection-creation", 3)
    assert list(connection.outcomes) == []


async def make_connections(stub: Stub) -> None:
    """Five connections in different environments, integrations and states."""
    await emit(stub, CREATE, conn("a"))
    await emit(stub, VALIDATE, conn("b"))
    await emit(stub, CREATE, conn("c", integration="hubspot"))
    await emit(stub, CREATE, conn("d", environment="prod"))
    await emit(stub, DELETE, conn("d", environment="prod"))
    await emit(stub, VALIDATE, conn("e", environment="prod", integration="hubspot"))


async def list_streams(stub: Stub, **filters: Any) -> list[str]:
    """The streams ListConnections returns for ``filters`` (one page)."""
    response = await stub.ListConnections(pb.ListConnectionsRequest(**filters))
    assert response.next_page_token == ""
    return [
        f"{c.ref.environment}/{c.ref.integration}/{c.ref.connection_id}:{pb.ConnectionState.Name(c.state)}"
        for c in response.connections
    ]


async def test_list_connections_filters(stub: Stub) -> None:
    """ListConnections filters by environment, integration and state, in stream order."""
    await make_connections(stub)

    assert await list_streams(stub) == [
        "dev/hubspot/c:CONNECTION_STATE_ACTIVE",
        "dev/salesforce/a:CONNECTION_STATE_ACTIVE",
        "dev/salesforce/b:CONNECTION_STATE_PENDING",
        "prod/hubspot/e:CONNECTION_STATE_PENDING",
        "prod/salesforce/d:CONNECTION_STATE_DELETED",
    ]
    assert await list_streams(stub, environment="dev") == [
        "dev/hubspot/c:CONNECTION_STATE_ACTIVE",
        "dev/salesforce/a:CONNECTION_STATE_ACTIVE",
        "dev/salesforce/b:CONNECTION_STATE_PENDING",
    ]
    assert await list_streams(stub, integration="salesforce") == [
        "dev/salesforce/a:CONNECTION_STATE_ACTIVE",
        "dev/salesforce/b:CONNECTION_STATE_PENDING",
        "prod/salesforce/d:CONNECTION_STATE_DELETED",
    ]
    assert await list_streams(stub, state=ACTIVE) == [
        "dev/hubspot/c:CONNECTION_STATE_ACTIVE",
        "dev/salesforce/a:CONNECTION_STATE_ACTIVE",
    ]
    assert await list_streams(stub, environment="prod", integration="hubspot", state=PENDING) == [
        "prod/hubspot/e:CONNECTION_STATE_PENDING",
    ]
    assert await list_streams(stub, environment="staging") == []


async def test_list_connections_pages_visit_each_once_in_order(stub: Stub) -> None:
    """page_size=2 over five connections gives pages of 2, 2 and 1 with every connection once, in order."""
    for i in range(5):
        await emit(stub, VALIDATE, conn(f"c{i}"))
    sizes: list[int] = []
    seen: list[str] = []
    token = ""

    while True:
        page = await stub.ListConnections(pb.ListConnectionsRequest(page_size=2, page_token=token))
        sizes.append(len(page.connections))
        seen.extend(c.ref.connection_id for c in page.connections)
        token = page.next_page_token
        if not token:
            break

    assert sizes == [2, 2, 1]
    assert seen == [f"c{i}" for i in range(5)]


async def test_list_connections_clamps_a_large_page_size(stub: Stub) -> None:
    """page_size above the maximum (1000) is clamped, not refused."""
    await make_connections(stub)

    response = await stub.ListConnections(pb.ListConnectionsRequest(page_size=5000))

    assert len(response.connections) == 5
    assert response.next_page_token == ""


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(pb.ListConnectionsRequest(page_token="not a token!"), "page_token", id="garbage-token"),
        pytest.param(
            pb.ListConnectionsRequest(page_token=base64.urlsafe_b64encode(b"no-slashes").decode()),
            "page_token",
            id="token-of-no-stream",
        ),
        pytest.param(pb.ListConnectionsRequest(page_size=-1), "page_size must be 0 or more", id="negative-page-size"),
        pytest.param(pb.ListConnectionsRequest(environment="Prod!"), "environment 'Prod!'", id="environment"),
        pytest.param(pb.ListConnectionsRequest(integration="-x"), "integration '-x'", id="integration"),
        pytest.param(pb.ListConnectionsRequest(state=99), "state 99", id="state"),
    ],
)
async def test_list_connections_with_bad_field_is_invalid(
    stub: Stub, message: pb.ListConnectionsRequest, expected: str
) -> None:
    """A bad ListConnections field is INVALID_ARGUMENT naming it."""
    details = await refused(stub.ListConnections(message), grpc.StatusCode.INVALID_ARGUMENT)

    assert expected in details


# -- concurrency ---------------------------------------------------------------


async def test_concurrent_emits_to_one_connection_keep_order(stub: Stub) -> None:
    """50 concurrent reconnects of one connection all succeed with versions 1..50 and increasing positions."""
    responses: list[pb.EmitLifecycleEventResponse] = []

    async def reconnect() -> None:
        responses.append(await emit(stub, CREATE))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(reconnect)

    assert all(r.state == ACTIVE for r in responses)
    assert sorted(r.version for r in responses) == list(range(1, 51))
    records = await read_events(stub, conn())
    assert [r.version for r in records] == list(range(1, 51))
    positions = [r.position for r in records]
    assert positions == sorted(set(positions))
    by_event = {r.event_id: (r.position, r.version) for r in records}
    assert {r.event_id: (r.position, r.version) for r in responses} == by_event


async def test_concurrent_emits_to_many_connections_all_succeed(stub: Stub) -> None:
    """Concurrent validations of 20 connections all succeed, each at version 1, with a gapless log."""
    responses: list[pb.EmitLifecycleEventResponse] = []

    async def validate(i: int) -> None:
        responses.append(await emit(stub, VALIDATE, conn(f"c{i:02}")))

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(validate, i)

    assert len(responses) == 20
    assert all((r.state, r.version) == (PENDING, 2) for r in responses)
    records = await read_events(stub)
    assert [r.position for r in records] == list(range(1, 41))
    listed = await stub.ListConnections(pb.ListConnectionsRequest())
    assert [c.ref.connection_id for c in listed.connections] == [f"c{i:02}" for i in range(20)]


async def test_get_connection_after_emit_sees_the_emit(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    """GetConnection right after an emit returns (at least) the emitted version while another client's read is open."""
    stale: list[tuple[str, int, int]] = []
    other = conn("other")
    await emit(stub, CREATE, other)
    # A regression test for stale reads through the SQLite store's shared read connection: a statement
    # left open between execute and fetch (two round trips to the reader's thread) pinned its snapshot
    # for every other read. Rather than hoping reads overlap, the test holds one open: a read of
    # "other" through the reader's thread (ListJobs; GetConnection is answered from the store's row
    # cache or a lookup on the loop) is stopped before any further round trip once its first has run,
    # for as long as the emits and reads below take. Each of them must see its own emit.
    reader = HeldRead("dev/salesforce/other")
    reader.install(monkeypatch)

    async def list_jobs_of(connection: pb.ConnectionRef) -> None:
        await stub.ListJobs(pb.ListJobsRequest(connection=connection))

    async with anyio.create_task_group() as tg:
        tg.start_soon(list_jobs_of, other)
        try:
            with anyio.fail_after(READ_TIMEOUT):
                await reader.started.wait()
            for _ in range(2):  # a first version, then a reconnect's
                for i in range(4):
                    name = f"c{i}"
                    response = await emit(stub, CREATE, conn(name))
                    try:
                        seen = (await get(stub, conn(name))).version
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                        seen = 0  # an older snapshot still: from before the connection existed
                    if seen < response.version:
                        stale.append((name, response.version, seen))
        finally:
            reader.release.set()

    assert stale == [], "GetConnection answered (connection, emitted version, version seen) from an older snapshot"


# -- ReadEvents ----------------------------------------------------------------


async def test_read_events_from_position_is_inclusive(stub: Stub) -> None:
    """from_position is inclusive, 0 and 1 both mean the start, past the head gives nothing."""
    for name in ("a", "b", "c"):
        await emit(stub, VALIDATE, conn(name))

    everything = await read_events(stub)

    assert [r.position for r in everything] == [1, 2, 3, 4, 5, 6]
    assert await read_events(stub, from_position=1) == everything
    assert [r.position for r in await read_events(stub, from_position=3)] == [3, 4, 5, 6]
    assert await read_events(stub, from_position=7) == []


async def test_read_events_of_one_connection(stub: Stub) -> None:
    """ReadEvents with a connection returns only its records, from the position given."""
    for name in ("a", "b", "c"):
        await emit(stub, VALIDATE, conn(name))

    records = await read_events(stub, conn("b"))

    assert [(r.position, r.version, r.stream) for r in records] == [
        (3, 1, "dev/salesforce/b"),
        (4, 2, "dev/salesforce/b"),
    ]
    assert records[0].connection == conn("b")
    assert [r.position for r in await read_events(stub, conn("b"), from_position=4)] == [4]
    assert await read_events(stub, conn("ghost")) == []


async def test_read_events_record_fields(stub: Stub) -> None:
    """A lifecycle record carries its request's config and payload, a time and the current schema version."""
    response = await emit(
        stub, VALIDATE, connection_config=struct(instance_url="acme"), payload=struct(source="ui", attempt=1)
    )

    record = (await read_events(stub))[0]

    assert record.event_id == response.event_id
    assert as_dict(record.data) == {"config": {"instance_url": "acme"}, "payload": {"source": "ui", "attempt": 1}}
    assert record.recorded_at.seconds > 0
    assert record.schema_version == 1
    assert record.causation_id == ""


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(read_request(from_position=-1), "from_position must be 0 or more", id="negative-position"),
        pytest.param(read_request(conn(environment="Prod!")), "connection.environment", id="bad-connection"),
    ],
)
async def test_read_events_with_bad_field_is_invalid(stub: Stub, message: pb.ReadEventsRequest, expected: str) -> None:
    """A bad ReadEvents field is INVALID_ARGUMENT naming it."""

    async def read_all() -> list[pb.EventRecord]:
        return [record async for record in stub.ReadEvents(message)]

    details = await refused(read_all(), grpc.StatusCode.INVALID_ARGUMENT)

    assert expected in details


async def test_follow_receives_events_emitted_after_it_started(stub: Stub) -> None:
    """ReadEvents(follow) returns the existing records, then records committed while it is open."""
    await emit(stub, VALIDATE)
    call = stub.ReadEvents(read_request(follow=True))
    try:
        assert [(await next_record(call)).position for _ in range(2)] == [1, 2]

        created = await emit(stub, CREATE)
        record = await next_record(call)
        assert (record.position, record.type, record.event_id) == (3, "post-connection-creation", created.event_id)

        other = await emit(stub, VALIDATE, conn("other"))
        record = await next_record(call)
        assert (record.position, record.stream, record.event_id) == (4, "dev/salesforce/other", other.event_id)
        assert (await next_record(call)).type == "connection-validated"
    finally:
        call.cancel()


async def test_follow_of_one_connection_skips_other_connections(stub: Stub) -> None:
    """ReadEvents(follow) of one connection delivers only that connection's new records."""
    await emit(stub, CREATE)
    call = stub.ReadEvents(read_request(conn(), follow=True))
    try:
        assert (await next_record(call)).position == 1

        await emit(stub, CREATE, conn("other"))
        deleted = await emit(stub, DELETE)

        record = await next_record(call)
        assert (record.position, record.stream, record.event_id) == (3, STREAM, deleted.event_id)
        assert (await next_record(call)).type == "connection-deleted"
    finally:
        call.cancel()


async def test_follow_sees_every_record_once_in_order_under_concurrent_emits(stub: Stub) -> None:
    """A follower receives every record exactly once, in position order, while ten clients emit concurrently."""
    call = stub.ReadEvents(read_request(follow=True))
    try:

        async def reconnect_often(i: int) -> None:
            for _ in range(10):
                await emit(stub, CREATE, conn(f"c{i}"))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(reconnect_often, i)
        committed = await read_events(stub)

        followed = [await next_record(call) for _ in committed]
    finally:
        call.cancel()

    assert len(committed) == 100
    assert followed == committed


async def test_fifty_followers_each_receive_every_record_once_in_order(daemon: Daemon) -> None:
    """Fifty ReadEvents(follow) streams over five connections each receive every record of 100 emits, once, in order.

    The emits come from ten concurrent clients, so commits carry one record or several; the
    followers are caught up (served from the daemon's tail) and share each record's encoding.
    """
    followers, channels, clients, emits = 50, 5, 10, 100
    first = await emit(daemon.stub, VALIDATE, conn("first"))  # every stream's first record: it is open
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}", options=options) for _ in range(channels)]
    stubs = [pb_grpc.OrchestratorStub(channel) for channel in opened]
    calls = [
        stubs[i % channels].ReadEvents(read_request(follow=True, from_position=first.position))
        for i in range(followers)
    ]
    try:
        for call in calls:
            assert (await next_record(call)).position == first.position

        async def reconnect_often(client: int) -> None:
            for n in range(emits // clients):
                await emit(stubs[client % channels], CREATE, conn(f"c{client}-{n % 3}"))

        async with anyio.create_task_group() as tg:
            for client in range(clients):
                tg.start_soon(reconnect_often, client)
        committed = await read_events(daemon.stub, from_position=first.position + 1)
        received: list[list[pb.EventRecord]] = [[] for _ in calls]

        async def drain(index: int) -> None:
            received[index] = [await next_record(calls[index]) for _ in committed]

        async with anyio.create_task_group() as tg:
            for index in range(followers):
                tg.start_soon(drain, index)
    finally:
        for call in calls:
            call.cancel()
        for channel in opened:
            await channel.close()

    assert len(committed) == emits + 1  # the first validation's verdict, then one record per emit
    assert [r.position for r in committed] == list(range(first.position + 1, first.position + 2 + emits))
    assert all(records == committed for records in received)


async def test_a_follower_whose_client_does_not_read_stops_pulling(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC flow control holds a follower whose client reads nothing: it pulls a few records, not the whole log.

    30 MB are committed while the client reads nothing; the daemon's follower stops at what the
    connection's windows take (it holds no more than that). Once the client reads, it gets every
    record, in order (from the log: the tail has long moved on).
    """
    pulled: list[int] = []
    encode = wire.EncodedRecords.__call__

    def encoded(self: wire.EncodedRecords, record: Record) -> bytes:
        pulled.append(record.position)
        return encode(self, record)

    monkeypatch.setattr(wire.EncodedRecords, "__call__", encoded)
    emits = 300
    call = daemon.stub.ReadEvents(read_request(follow=True))
    try:
        payload = struct(blob="x" * 100_000)
        for n in range(emits):
            await emit(daemon.stub, CREATE, conn(f"c{n}"), payload=payload)
        assert len(pulled) < emits // 2
        assert [(await next_record(call)).position for _ in range(emits)] == list(range(1, emits + 1))
    finally:
        call.cancel()


async def test_follow_ends_unavailable_when_the_daemon_stops(daemon: Daemon) -> None:
    """A follower is ended with UNAVAILABLE (saying where to resume) when the daemon drains."""
    await emit(daemon.stub, VALIDATE)
    call = daemon.stub.ReadEvents(read_request(follow=True))
    assert [(await next_record(call)).position for _ in range(2)] == [1, 2]

    daemon.stop.set()

    with anyio.fail_after(READ_TIMEOUT):
        details = await refused(call.read(), grpc.StatusCode.UNAVAILABLE)
    assert "shutting down" in details
    assert "position 3" in details


# -- health, reflection, tracing, secrets ----------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_is_serving(daemon: Daemon, service: str) -> None:
    """grpc.health.v1 Check answers SERVING for the server and for orchestrator.v1.Orchestrator."""
    health = health_pb2_grpc.HealthStub(daemon.channel)

    response = await health.Check(health_pb2.HealthCheckRequest(service=service))

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_of_unknown_service_is_not_found(daemon: Daemon) -> None:
    """grpc.health.v1 Check of a service the daemon does not serve is NOT_FOUND."""
    health = health_pb2_grpc.HealthStub(daemon.channel)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))

    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(daemon: Daemon) -> None:
    """Server reflection lists orchestrator.v1.Orchestrator and serves its descriptor with its eight RPCs."""
    reflection = reflection_pb2_grpc.ServerReflectionStub(daemon.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]

    responses = [response async for response in reflection.ServerReflectionInfo(iter(requests))]

    services = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in responses[1].file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        method.name
        for file in files
        if file.package == "orchestrator.v1"
        for service in file.service
        if service.name == "Orchestrator"
        for method in service.method
    }
    assert methods == {
        "EmitLifecycleEvent",
        "GetConnection",
        "ListConnections",
        "ReadEvents",
        "UpdateCredentials",
        "ListJobs",
        "RetryJob",
        "CancelJob",
    }


async def test_traceparent_is_stored_on_the_records(stub: Stub) -> None:
    """The caller's traceparent metadata is stored on the lifecycle record and the facts it causes."""
    response = await emit(stub, VALIDATE, traceparent=TRACEPARENT)
    await emit(stub, CREATE)

    records = await read_events(stub)

    assert records[0].event_id == response.event_id
    assert [r.type for r in records] == ["validate-connection", "connection-validated", "post-connection-creation"]
    # With tracing on, the records carry the RPC's own span (a child of the caller's, in its
    # trace); with tracing off, the caller's traceparent as sent. Either way: the caller's trace.
    stored = records[0].traceparent
    assert records[1].traceparent == stored
    assert stored == TRACEPARENT or stored.split("-")[1] == TRACEPARENT.split("-")[1]
    assert records[2].traceparent == "" or records[2].traceparent.split("-")[1] != TRACEPARENT.split("-")[1]


async def test_credentials_never_reach_the_log_or_the_read_model(stub: Stub) -> None:
    """Credentials sent with an emit appear in no record and not in GetConnection."""
    await emit(stub, CREATE, credentials={"access_token": "s3cret-token"}, connection_config=struct(region="eu"))

    records = await read_events(stub)
    connection = await get(stub)

    assert records
    assert all("s3cret-token" not in str(record) for record in records)
    assert "s3cret-token" not in str(connection)
    assert as_dict(connection.config) == {"region": "eu"}
