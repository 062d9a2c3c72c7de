"""A gRPC fuzzer against an in-process daemon: whatever a caller sends, it is refused or served, never failed.

Hypothesis draws batches of requests, sent concurrently to a daemon on a
fresh SQLite log (its functions: a validation that rejects on demand and a
trivial deletion cleanup, so nothing runs in the background):

- every field of every request of ``orchestrator.v1.Orchestrator``: names at and
  over their limits, empty, with control characters or any Unicode; every enum
  value and unknown numbers; huge and deeply nested Struct payloads, NaN and
  infinities; credentials over the limits; ``expected_version``, ``page_size``
  and ``from_position`` extremes; page tokens of every kind;
- random bytes as the body of every method (health's and reflection's too);
- ``ReadEvents(follow)`` calls cancelled at random points, and connections dropped
  under them.

Every answer must be OK or a deliberate refusal, never UNKNOWN or INTERNAL;
a refused request writes nothing (every record appended is a successful emit's
own, or caused by it); the daemon's log gets no ERROR line and no traceback;
at the end health is SERVING, an ordinary emit works and ``replay.verify``
finds the read model equal to the fold of the log.

The default run sends over 5,000 requests in well under a minute. For more,
``pytest --long`` (when tests/reliability/conftest.py registers it) runs ten
times as many examples, and ``ORCHESTRATOR_FUZZ_EXAMPLES=N`` sets the number of
examples (batches) of each test. The figures (requests, seconds) are printed
with ``-s`` and handed to the reliability report where there is one.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import Context, Rejected, replay
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.limits import MAX_CONFIG_BYTES, MAX_CREDENTIAL_VALUE, MAX_CREDENTIALS, MAX_MESSAGE_BYTES
from orchestrator.model import MAX_IDEMPOTENCY_KEY
from orchestrator.plugins import Registry
from orchestrator.store import EventStore, open_store
from tests.support.daemon import Daemon, function, run_daemon

pytestmark = pytest.mark.anyio

WAIT = 30.0
"""Seconds any one call may take (an emit with a huge payload takes a few hundred milliseconds)."""
SERVICE = "/orchestrator.v1.Orchestrator"
PATHS = [
    f"{SERVICE}/EmitLifecycleEvent",
    f"{SERVICE}/GetConnection",
    f"{SERVICE}/ListConnections",
    f"{SERVICE}/ReadEvents",
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
]
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""What a bad or untimely request may be answered: anything else (UNKNOWN, INTERNAL, UNAVAILABLE...) fails."""
BATCH = (8, 24)
"""The fewest and most requests sent at once (220 batches by default: at least 1,760 requests)."""
RAW_BATCH = (12, 32)
"""The same for random bodies, quicker to draw and to answer (250 batches: at least 3,000)."""
READ_AT_MOST = 50
"""Records a non-following ReadEvents reads before it cancels (the log grows to thousands)."""


def examples(default: int, config: pytest.Config) -> int:
    """Examples (batches) for a test: ``$ORCHESTRATOR_FUZZ_EXAMPLES``, else ten times ``default`` with --long."""
    if os.environ.get("ORCHESTRATOR_FUZZ_EXAMPLES"):
        return int(os.environ["ORCHESTRATOR_FUZZ_EXAMPLES"])
    return default * 10 if config.getoption("--long", default=False) else default


# -- what is sent ----------------------------------------------------------------


WILD_NAMES = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True),
    st.sampled_from(["a" * 63, "a" * 64, "", "Dev", "dev!", "-dev", "dev\n", "dév", "a\x00b", " dev", "dev/x"]),
    st.text(max_size=70),
)
NAMES = st.sampled_from(["dev", "acme", "prod"])
WILD_CONNECTION_IDS = st.one_of(
    st.sampled_from(["c" * 255, "c" * 256, "", " ", "\t", "c\x00", "c\n", "c\u200b", "c\x7f", "é" * 255]),
    st.text(max_size=300),
)
CONNECTION_IDS = st.sampled_from(["c1", "c2", "c3", "conn/with/slashes"])
ENUMS = st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1))
INT64 = st.one_of(
    st.integers(0, 3), st.sampled_from([-1, 2**63 - 1, -(2**63), 2**53, 2**31]), st.integers(-(2**63), 2**63 - 1)
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),  # NaN and the infinities included: JSON cannot hold them
    st.integers(-(2**64), 2**64),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def nested(depth: int) -> dict[str, Any]:
    """A Struct ``depth`` objects deep (protobuf refuses to decode past 100 nested messages)."""
    value: dict[str, Any] = {"leaf": True}
    for _ in range(depth):
        value = {"n": value}
    return value


def huge(size: int) -> dict[str, Any]:
    """A Struct holding a string of ``size`` characters."""
    return {"blob": "x" * size}


STRUCTS = st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=20), st.integers(-1000, 1000)), max_size=3)
WILD_STRUCTS = st.one_of(
    st.dictionaries(st.text(max_size=20), JSON_VALUES, max_size=6),
    st.builds(nested, st.sampled_from([1, 20, 32, 40, 60, 120])),
    st.builds(huge, st.sampled_from([MAX_CONFIG_BYTES - 20, MAX_CONFIG_BYTES + 1, MAX_MESSAGE_BYTES + 1])),
)
CREDENTIALS = st.sampled_from([{}, {"access_token": "t0k3n-value"}])
WILD_CREDENTIALS = st.one_of(
    st.dictionaries(st.text(max_size=130), st.text(max_size=50), max_size=4),
    st.just({f"k{i}": "v" for i in range(MAX_CREDENTIALS + 1)}),
    st.just({"access_token": "v" * (MAX_CREDENTIAL_VALUE + 1)}),
    st.just({"": "v", "bad\nname": "v"}),
)
KEYS = st.sampled_from(["", "k1", "k2"])
WILD_KEYS = st.one_of(
    st.sampled_from(["k" * MAX_IDEMPOTENCY_KEY, "k" * (MAX_IDEMPOTENCY_KEY + 1), "k\x00", "k\n"]),
    st.text(max_size=MAX_IDEMPOTENCY_KEY + 10),
)
PAGE_TOKENS = st.one_of(
    st.just(""),
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")),
    st.sampled_from(["dev/acme/c1", "ZGV2L2FjbWUvYzE", "ZGV2L2FjbWUvYzE=", "===", "ZGV2"]),
)
FIELDS = (
    "connection",
    "environment",
    "integration",
    "connection_id",
    "event",
    "connection_config",
    "payload",
    "credentials",
    "idempotency_key",
    "expected_version",
)


class Fields:
    """Draws each field of one request: a value that passes, or, for the fields chosen to be wild, anything."""

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw
        # No field wild, one, a few or all of them: about a quarter of the requests have every field valid.
        mode = draw(st.sampled_from(["none", "one", "some", "all"]))
        if mode == "all":
            self.wild = frozenset(FIELDS)
        else:
            size = {"none": 0, "one": 1, "some": 4}[mode]
            self.wild = frozenset(draw(st.sets(st.sampled_from(FIELDS), min_size=min(size, 1), max_size=size)))

    def __call__(self, name: str, valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> Any:
        """Field ``name``: from ``wild`` if it was chosen to be, else from ``valid``."""
        return self._draw(wild if name in self.wild else valid)

    def ref(self) -> pb.ConnectionRef | None:
        """A connection ref (None, left unset, when ``connection`` is wild and so chooses)."""
        if "connection" in self.wild and self._draw(st.booleans()):
            return None
        return pb.ConnectionRef(
            environment=self("environment", NAMES, WILD_NAMES),
            integration=self("integration", NAMES, WILD_NAMES),
            connection_id=self("connection_id", CONNECTION_IDS, WILD_CONNECTION_IDS),
        )


@st.composite
def emits(draw: st.DrawFn) -> pb.EmitLifecycleEventRequest:
    """An EmitLifecycleEventRequest with each field drawn, valid or wild."""
    field = Fields(draw)
    message = pb.EmitLifecycleEventRequest(
        event=field("event", st.integers(1, 3), ENUMS),
        idempotency_key=field("idempotency_key", KEYS, WILD_KEYS),
        wait=draw(st.booleans()),
        credentials=field("credentials", CREDENTIALS, WILD_CREDENTIALS),
    )
    # Filled in place: copying a Struct nested past protobuf's depth limit would parse it, and fail here.
    message.connection_config.update(field("connection_config", STRUCTS, WILD_STRUCTS))
    message.payload.update(field("payload", STRUCTS | st.just({"reject": True}), WILD_STRUCTS))
    ref = field.ref()
    if ref is not None:
        message.connection.CopyFrom(ref)
    if "expected_version" in field.wild:
        message.expected_version = draw(INT64)
    return message


@st.composite
def gets(draw: st.DrawFn) -> pb.GetConnectionRequest:
    """A GetConnectionRequest, with or without a ref."""
    ref = Fields(draw).ref()
    return pb.GetConnectionRequest(connection=ref) if ref is not None else pb.GetConnectionRequest()


@st.composite
def lists(draw: st.DrawFn) -> pb.ListConnectionsRequest:
    """A ListConnectionsRequest with every filter, page size and token drawn."""
    field = Fields(draw)
    return pb.ListConnectionsRequest(
        environment=field("environment", st.just("") | NAMES, WILD_NAMES),
        integration=field("integration", st.just("") | NAMES, WILD_NAMES),
        state=draw(ENUMS),
        page_size=draw(st.one_of(st.sampled_from([0, 1, 1000, 1001, -1]), st.integers(-(2**31), 2**31 - 1))),
        page_token=draw(PAGE_TOKENS),
    )


@st.composite
def reads(draw: st.DrawFn) -> pb.ReadEventsRequest:
    """A ReadEventsRequest (not following), of every connection or one."""
    message = pb.ReadEventsRequest(from_position=draw(INT64))
    ref = Fields(draw).ref() if draw(st.booleans()) else None
    if ref is not None:
        message.connection.CopyFrom(ref)
    return message


REQUESTS = st.one_of(
    st.tuples(st.just("EmitLifecycleEvent"), emits()),
    st.tuples(st.just("EmitLifecycleEvent"), emits()),
    st.tuples(st.just("GetConnection"), gets()),
    st.tuples(st.just("ListConnections"), lists()),
    st.tuples(st.just("ReadEvents"), reads()),
)


@dataclass
class Run:
    """One fuzzed daemon: its channel, a read-only view of its log, and what was sent and written."""

    daemon: Daemon
    log: EventStore
    sent: int = 0
    head: int = 0
    """The log's head after the last batch."""
    emitted: set[str] = field(default_factory=set)
    """The event ids successful emits answered with: every record must be one of these or caused by one."""
    codes: dict[str, int] = field(default_factory=dict)

    def answered(self, code: grpc.StatusCode, details: str = "") -> None:
        """Count an answer; fail on one that is not OK or a deliberate refusal."""
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        assert code is grpc.StatusCode.OK or code in REFUSALS, f"{code.name}: {details}"
        assert "Traceback" not in details, details

    async def call(self, send: Callable[[], Awaitable[Any]]) -> Any:
        """Send one request and check its answer; the response, or None when it was refused."""
        self.sent += 1
        try:
            with anyio.fail_after(WAIT):
                response = await send()
        except grpc.aio.AioRpcError as exc:
            self.answered(exc.code(), exc.details() or "")
            return None
        self.answered(grpc.StatusCode.OK)
        return response

    async def written_by_refused_requests(self) -> list[str]:
        """The records appended since the last batch that no successful emit accounts for (there must be none)."""
        head = await self.log.head()
        new = await self.log.read(from_position=self.head + 1, limit=max(head - self.head, 1)) if head else []
        self.head = head
        return [
            f"{r.position} {r.type} of {r.stream}"
            for r in new
            if r.event_id not in self.emitted and r.causation_id not in self.emitted
        ]


async def reject_on_request(ctx: Context) -> None:
    """Validation that rejects when the payload asks it to, and accepts otherwise."""
    if ctx.event.payload.get("reject") is True:
        raise Rejected("asked to reject")


async def clean_up(ctx: Context) -> None:
    """A deletion cleanup that has nothing to do."""


REGISTRY = Registry.of(
    [
        function("reject-on-request", "validate-connection", reject_on_request),
        function("clean-up", "pre-connection-deletion", clean_up),
    ]
)


@pytest.fixture
async def run(tmp_path: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> AsyncIterator[Run]:
    """A daemon on a fresh log, a read-only view of the log; at the end, the daemon healthy and its log consistent."""
    database = f"sqlite:///{tmp_path}/events.db"
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        async with run_daemon(database, registry=REGISTRY) as daemon, open_store(database, readonly=True) as log:
            fuzzed = Run(daemon, log)
            yield fuzzed
            health = health_pb2_grpc.HealthStub(daemon.channel)
            serving = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert serving.status == health_pb2.HealthCheckResponse.SERVING
            after = await daemon.stub.EmitLifecycleEvent(
                pb.EmitLifecycleEventRequest(
                    connection=pb.ConnectionRef(environment="dev", integration="after", connection_id="fuzz"),
                    event=pb.LIFECYCLE_EVENT_VALIDATE_CONNECTION,
                ),
                timeout=WAIT,
            )
            fuzzed.emitted.add(after.event_id)
            assert after.state == pb.CONNECTION_STATE_PENDING
            assert await fuzzed.written_by_refused_requests() == []
        async with open_store(database, readonly=True) as log:
            assert await replay.verify(log) == []
    seconds = time.perf_counter() - started
    logged = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]  # this teardown's last
    failures = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in logged if r.levelno >= logging.ERROR or r.exc_info]
    assert failures == []
    figures = {"requests": fuzzed.sent, "seconds": round(seconds, 1), "answers": dict(sorted(fuzzed.codes.items()))}
    print(f"\n{request.node.name}: {figures}")
    report(request, figures)


def report(request: pytest.FixtureRequest, figures: dict[str, Any]) -> None:
    """Hand the figures to the reliability report, when tests/reliability has one."""
    try:
        from tests.reliability._report import report as keep  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return
    keep(request.config, f"fuzz_grpc::{request.node.name}", figures)


async def fuzz(
    run: Run,
    request: pytest.FixtureRequest,
    default: int,
    strategy: st.SearchStrategy[Any],
    batch: Callable[[Any], Awaitable[None]],
) -> int:
    """Run ``batch`` on each example of ``strategy``, on this event loop, while the daemon serves; how many examples.

    Hypothesis runs on a worker thread (its engine is synchronous) and hands each
    example back to the loop: the daemon keeps serving between examples.
    """

    async def checked(example: Any) -> None:
        try:
            await batch(example)
        except BaseException:
            # The failure cut the batch's other requests short, and the emits among them may have
            # written without an answer: the examples Hypothesis runs next must not be blamed.
            run.head = await run.log.head()
            raise

    count = examples(default, request.config)
    config = settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )

    @config
    @given(strategy)
    def each(example: Any) -> None:
        anyio.from_thread.run(checked, example)

    await anyio.to_thread.run_sync(each)
    return count


# -- the tests -----------------------------------------------------------------


async def send(run: Run, method: str, message: Any) -> Any:
    """One fuzzed request to the orchestrator; the response (None when refused)."""
    stub = run.daemon.stub
    if method == "ReadEvents":

        async def read() -> list[pb.EventRecord]:
            call = stub.ReadEvents(message)
            records = []
            try:
                async for record in call:
                    records.append(record)
                    if len(records) == READ_AT_MOST:
                        break
            finally:
                call.cancel()
            return records

        return await run.call(read)
    response = await run.call(lambda: getattr(stub, method)(message, timeout=WAIT))
    if method == "EmitLifecycleEvent" and response is not None:
        run.emitted.add(response.event_id)
    return response


@pytest.mark.timeout(300)
async def test_fuzzed_requests_are_served_or_refused(run: Run, request: pytest.FixtureRequest) -> None:
    """Random and boundary values in every field of each request: never UNKNOWN or INTERNAL; refusals write nothing."""

    async def batch(requests: list[tuple[str, Any]]) -> None:
        async with anyio.create_task_group() as tg:
            for method, message in requests:
                tg.start_soon(send, run, method, message)
        assert await run.written_by_refused_requests() == []

    batches = await fuzz(run, request, 220, st.lists(REQUESTS, min_size=BATCH[0], max_size=BATCH[1]), batch)
    assert run.sent >= batches * BATCH[0], run.sent
    assert run.codes.get("OK", 0) > 100, run.codes  # some requests got through: the fuzzer is not all refusals


@pytest.mark.timeout(300)
async def test_random_bytes_as_a_body_are_invalid_argument(run: Run, request: pytest.FixtureRequest) -> None:
    """Random bytes as the body of every method, ours, health's and reflection's: refused, never failed."""

    async def raw(path: str, body: bytes) -> None:
        channel = run.daemon.channel
        if path.endswith("ServerReflectionInfo"):
            call: Any = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            await run.call(lambda: drain(call(iter([body]), timeout=WAIT)))
        elif path.endswith("ReadEvents"):
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            if following(body):  # the bytes happen to ask to follow: nothing says when to stop but a cancellation
                run.sent += 1
                stream(body).cancel()
                return
            await run.call(lambda: drain(stream(body, timeout=WAIT)))
        else:
            unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            answer = await run.call(lambda: unary(body, timeout=WAIT))
            if answer is not None and path.endswith("EmitLifecycleEvent"):  # the bytes happened to be an emit
                run.emitted.add(pb.EmitLifecycleEventResponse.FromString(answer).event_id)

    async def drain(call: Any) -> None:
        try:
            count = 0
            async for _ in call:
                count += 1
                if count == READ_AT_MOST:
                    break
        finally:
            call.cancel()

    async def batch(bodies: list[tuple[str, bytes]]) -> None:
        async with anyio.create_task_group() as tg:
            for path, body in bodies:
                tg.start_soon(raw, path, body)
        assert await run.written_by_refused_requests() == []

    bodies = st.tuples(st.sampled_from(PATHS), st.binary(max_size=200))
    batches = await fuzz(run, request, 250, st.lists(bodies, min_size=RAW_BATCH[0], max_size=RAW_BATCH[1]), batch)
    assert run.sent >= batches * RAW_BATCH[0], run.sent
    assert run.codes.get("INVALID_ARGUMENT", 0) > 100, run.codes


@pytest.mark.timeout(300)
async def test_followers_cancelled_at_random_points_leave_the_daemon_well(
    run: Run, request: pytest.FixtureRequest
) -> None:
    """ReadEvents(follow) cancelled, or its connection dropped, at random points while emits go on: no error logged."""

    async def follow(from_position: int, records: int, drop_connection: bool) -> None:
        run.sent += 1
        if drop_connection:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{run.daemon.port}") as channel:
                call = pb_grpc.OrchestratorStub(channel).ReadEvents(follow_request(from_position))
                await read(call, records)
            return  # the channel closed under the call
        call = run.daemon.stub.ReadEvents(follow_request(from_position))
        await read(call, records)
        call.cancel()

    async def read(call: Any, records: int) -> None:
        with anyio.fail_after(WAIT):
            for _ in range(records):
                record = await call.read()
                assert record is not grpc.aio.EOF

    async def emit(connection_id: str) -> None:
        response = await run.call(lambda: run.daemon.stub.EmitLifecycleEvent(create(connection_id), timeout=WAIT))
        if response is not None:
            run.emitted.add(response.event_id)

    for i in range(20):  # something to follow
        await emit(f"seed-{i}")

    async def batch(example: tuple[list[tuple[int, int, bool]], int]) -> None:
        followers, emits = example
        head = await run.log.head()
        async with anyio.create_task_group() as tg:
            for back, records, drop in followers:
                # From a little before the head: ``records`` of them are there already.
                start = max(1, head - back)
                tg.start_soon(follow, start, min(records, head - start + 1), drop)
            for i in range(emits):
                tg.start_soon(emit, f"c{i}")
        assert await run.written_by_refused_requests() == []

    followers = st.lists(st.tuples(st.integers(0, 10), st.integers(0, 5), st.booleans()), min_size=5, max_size=10)
    batches = await fuzz(run, request, 150, st.tuples(followers, st.integers(0, 3)), batch)
    assert run.sent >= batches * 5, run.sent


def following(body: bytes) -> bool:
    """Whether ``body`` is a ReadEventsRequest that follows the log."""
    try:
        return pb.ReadEventsRequest.FromString(body).follow
    except DecodeError:
        return False


def create(connection_id: str) -> pb.EmitLifecycleEventRequest:
    """A post-connection-creation emit (a reconnect when the connection exists)."""
    return pb.EmitLifecycleEventRequest(
        connection=pb.ConnectionRef(environment="dev", integration="follow", connection_id=connection_id),
        event=pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION,
    )


def follow_request(from_position: int) -> pb.ReadEventsRequest:
    """ReadEvents following the whole log from ``from_position``."""
    return pb.ReadEventsRequest(from_position=from_position, follow=True)
