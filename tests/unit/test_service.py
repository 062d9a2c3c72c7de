"""Service.emit over the memory store on a fake clock: the state table, checks, idempotency, ordering, draining."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest

from orchestrator import records
from orchestrator.context import Context
from orchestrator.errors import (
    IdempotencyConflict,
    InvalidArgument,
    NotFound,
    Unavailable,
    VersionConflict,
)
from orchestrator.functions import Rejected
from orchestrator.model import ConnectionState, FunctionStatus, LifecycleEvent, Outcome
from orchestrator.plugins import Installed
from tests.support.engine import ACME, CREATE, DELETE, GLOBEX, VALIDATE, Call, Gate, Harness, function, running, settle

pytestmark = pytest.mark.anyio

S = ConnectionState
REJECT = {"reject": "invalid API key"}
"""The payload that makes :func:`checker`'s function reject."""


class Calls:
    """What the test functions were asked to do, by function name."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[dict[str, Any]]] = {}

    def note(self, ctx: Context, name: str) -> None:
        self.by_name.setdefault(name, []).append(dict(ctx.event.payload))

    def count(self, name: str | None = None) -> int:
        return sum(len(v) for k, v in self.by_name.items() if name is None or k == name)


def checker(calls: Calls, gate: Gate | None = None) -> Installed:
    """A validate function that rejects a payload with ``reject`` and waits at ``gate`` for one with ``hold``."""

    async def check(ctx: Context) -> None:
        calls.note(ctx, "check")
        if gate is not None and ctx.event.payload.get("hold"):
            await gate.enter()
        if "reject" in ctx.event.payload:
            raise Rejected(str(ctx.event.payload["reject"]))

    return function("check", VALIDATE, check)


def simple(calls: Calls, name: str, event: LifecycleEvent) -> Installed:
    """A function that succeeds and notes its call."""

    async def run(ctx: Context) -> None:
        calls.note(ctx, name)

    return function(name, event, run)


def standard(calls: Calls, gate: Gate | None = None) -> list[Installed]:
    """A validate, a creation and a cleanup function."""
    return [checker(calls, gate), simple(calls, "register", CREATE), simple(calls, "cleanup", DELETE)]


async def emit_steps(h: Harness, steps: list[tuple[LifecycleEvent, dict[str, Any]]]) -> None:
    for event, payload in steps:
        await h.emit(event, payload=payload)


# -- the state table through emits -----------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "state", "incarnation"),
    [
        ([(VALIDATE, {})], S.PENDING, 1),
        ([(VALIDATE, REJECT)], S.REJECTED, 1),
        ([(VALIDATE, {}), (CREATE, {})], S.ACTIVE, 1),
        ([(CREATE, {})], S.ACTIVE, 1),
        ([(CREATE, {}), (VALIDATE, {})], S.ACTIVE, 1),
        ([(CREATE, {}), (VALIDATE, REJECT)], S.REJECTED, 1),
        ([(CREATE, {}), (CREATE, {})], S.ACTIVE, 1),
        ([(VALIDATE, {}), (DELETE, {})], S.DELETED, 1),
        ([(CREATE, {}), (DELETE, {})], S.DELETED, 1),
        ([(VALIDATE, REJECT), (VALIDATE, {})], S.PENDING, 2),
        ([(VALIDATE, REJECT), (CREATE, {})], S.ACTIVE, 2),
        ([(CREATE, {}), (DELETE, {}), (VALIDATE, {})], S.PENDING, 2),
        ([(CREATE, {}), (DELETE, {}), (CREATE, {})], S.ACTIVE, 2),
        ([(VALIDATE, REJECT), (DELETE, {})], S.DELETED, 1),
        ([(CREATE, {}), (VALIDATE, REJECT), (DELETE, {})], S.DELETED, 1),
        ([(CREATE, {}), (VALIDATE, REJECT), (DELETE, {}), (VALIDATE, {})], S.PENDING, 2),
    ],
)
async def test_accepted_emits_move_the_connection_through_the_state_table(
    steps: list[tuple[LifecycleEvent, dict[str, Any]]], state: ConnectionState, incarnation: int
) -> None:
    """Each accepted sequence of emits leaves the state and incarnation the state table gives."""
    async with running(*standard(Calls())) as h:
        await emit_steps(h, steps)
        connection = await h.service.get_connection(ACME)
        assert (connection.state, connection.incarnation) == (state, incarnation)
        assert connection.version == len(await h.log(ACME))


async def test_deleting_an_unknown_connection_is_not_found_and_writes_nothing() -> None:
    """pre-connection-deletion of a connection without events raises NotFound naming it; the log stays empty."""
    calls = Calls()
    async with running(*standard(calls)) as h:
        with pytest.raises(NotFound, match=r"connection dev/acme/acme-1 not found: pre-connection-deletion needs"):
            await h.emit(DELETE)
        assert await h.head() == 0
        assert calls.count() == 0


async def test_deleting_a_connection_rejected_while_pending_runs_no_cleanup_and_ends_deleted() -> None:
    """A connection rejected before it was ever active set nothing up: its deletion runs no cleanup."""
    calls = Calls()
    async with running(*standard(calls)) as h:
        await h.emit(VALIDATE, payload=REJECT)
        assert await h.store.jobs() == []
        deleted = await h.emit(DELETE)
        assert (deleted.state, deleted.outcomes, deleted.rejection_reason) == (S.DELETED, (), "")
        assert (await h.types())[-2:] == ["pre-connection-deletion", "connection-deleted"]
        assert calls.count("cleanup") == 0


# -- expected_version --------------------------------------------------------------------


async def test_a_stale_expected_version_is_a_conflict_naming_the_current_version() -> None:
    """expected_version other than the stream's version raises VersionConflict(current=...) and runs nothing."""
    calls = Calls()
    async with running(*standard(calls)) as h:
        first = await h.emit(VALIDATE, expected_version=0)
        assert first.version == 3  # after the verdict: the version to pass back
        before, appends = await h.log(), len(h.store.appends)
        with pytest.raises(VersionConflict, match=r"expected version 1, but the current version is 3") as conflict:
            await h.emit(VALIDATE, expected_version=1)
        assert (conflict.value.stream, conflict.value.expected, conflict.value.current) == (ACME.stream, 1, 3)
        assert (await h.log(), len(h.store.appends), calls.count("check")) == (before, appends, 1)
        accepted = await h.emit(CREATE, expected_version=3)
        assert (accepted.version, accepted.state) == (4, S.ACTIVE)


async def test_expected_version_zero_means_no_events_yet() -> None:
    """expected_version=0 is accepted for a new connection and refused (current 1) once it has an event."""
    async with running(*standard(Calls())) as h:
        await h.emit(CREATE, expected_version=0)
        with pytest.raises(VersionConflict) as conflict:
            await h.emit(CREATE, expected_version=0)
        assert conflict.value.current == 1
        assert await h.head() == 1


# -- idempotency -------------------------------------------------------------------------


async def test_a_repeated_request_answers_the_original_response_and_writes_nothing() -> None:
    """The same request with the same key answers the original ids and state with deduplicated=true."""
    calls = Calls()
    async with running(*standard(calls)) as h:
        original = await h.emit(VALIDATE, config={"instance": "acme"}, payload={"n": 1}, idempotency_key="validate-1")
        await h.emit(CREATE)  # the connection moves on; the repeat still answers as the original left it
        before = await h.log()
        repeat = await h.emit(
            VALIDATE,
            config={"instance": "acme"},
            payload={"n": 1},
            idempotency_key="validate-1",
            expected_version=0,  # stale, and credentials differ: neither takes part in "the same request"
            credentials={"access_token": "other"},
        )
        assert not original.deduplicated
        assert repeat.deduplicated
        assert (repeat.event_id, repeat.position, repeat.version) == (
            original.event_id,
            original.position,
            original.version,
        )
        assert (repeat.state, repeat.outcomes) == (S.PENDING, original.outcomes)
        assert await h.log() == before
        assert calls.count("check") == 1


@pytest.mark.parametrize(
    "different",
    [
        {"event": VALIDATE, "config": {"instance": "acme"}, "payload": {"n": 2}},
        {"event": VALIDATE, "config": {"instance": "globex"}, "payload": {"n": 1}},
        {"event": CREATE, "config": {"instance": "acme"}, "payload": {"n": 1}},
    ],
    ids=["payload", "config", "event"],
)
async def test_a_key_reused_for_a_different_request_is_a_conflict(different: dict[str, Any]) -> None:
    """A key already used on the connection for another event, config or payload raises IdempotencyConflict."""
    calls = Calls()
    async with running(*standard(calls)) as h:
        await h.emit(VALIDATE, config={"instance": "acme"}, payload={"n": 1}, idempotency_key="k-1")
        before = await h.log()
        with pytest.raises(IdempotencyConflict, match=r"idempotency key 'k-1' was already used on dev/acme/acme-1"):
            await h.emit(different.pop("event"), idempotency_key="k-1", **different)
        assert await h.log() == before
        assert calls.count() == 1


async def test_a_key_is_scoped_to_its_connection() -> None:
    """The same key on another connection is a new request, not a repeat."""
    async with running(*standard(Calls())) as h:
        first = await h.emit(CREATE, idempotency_key="k")
        other = await h.emit(CREATE, ref=GLOBEX, idempotency_key="k")
        assert not other.deduplicated
        assert (first.position, other.position) == (1, 2)


# -- deletion repeats ---------------------------------------------------------------------


async def test_a_repeated_deletion_answers_with_the_earlier_deletion() -> None:
    """A second deletion writes nothing, runs no cleanup and answers the first deletion's ids."""
    calls = Calls()
    async with running(*standard(calls)) as h:
        await h.emit(CREATE)
        first = await h.emit(DELETE)
        before = await h.log()
        again = await h.emit(DELETE, payload={"reason": "retry"})
        assert (again.event_id, again.position, again.version, again.state) == (
            first.event_id,
            first.position,
            first.version,
            S.DELETED,
        )
        assert await h.log() == before
        assert calls.count("cleanup") == 1


# -- refusals write nothing --------------------------------------------------------------


async def test_every_refused_request_writes_nothing_and_runs_nothing() -> None:
    """Requests refused for any reason (NotFound, FailedPrecondition, conflicts, bad fields) leave the log as it was."""
    calls = Calls()
    async with running(*standard(calls)) as h:
        await h.emit(VALIDATE, payload=REJECT, idempotency_key="k-1")
        before, appends, ran = await h.log(), list(h.store.appends), calls.count()
        refusals: list[tuple[type[Exception], LifecycleEvent, dict[str, Any]]] = [
            (NotFound, DELETE, {"ref": GLOBEX}),
            (VersionConflict, VALIDATE, {"expected_version": 1}),
            (IdempotencyConflict, CREATE, {"idempotency_key": "k-1"}),
            (InvalidArgument, VALIDATE, {"expected_version": -1}),
            (InvalidArgument, VALIDATE, {"idempotency_key": "bad\nkey"}),
        ]
        for error, event, fields in refusals:
            with pytest.raises(error):
                await h.emit(event, **fields)
        assert await h.log() == before
        assert h.store.appends == appends
        assert calls.count() == ran
        assert await h.store.jobs() == []


# -- ordering ---------------------------------------------------------------------------


async def test_concurrent_emits_to_one_connection_are_applied_one_at_a_time_in_arrival_order() -> None:
    """Emits racing on one connection run their functions one at a time and get versions in arrival order."""
    calls, gate = Calls(), Gate()
    n = 5
    async with running(checker(calls, gate)) as h, anyio.create_task_group() as tg:
        emits = [Call(tg, functools.partial(h.emit, VALIDATE, payload={"n": i, "hold": True})) for i in range(n)]
        await gate.arrivals(1)
        await settle()  # every other emit is queued on the connection's lock
        assert (gate.entered, await h.head()) == (1, 0)
        gate.open()
        results = [await e.result() for e in emits]
    log = await h.log(ACME)
    assert [r.version for r in log] == list(range(1, 3 * n + 1))
    assert [r.version for r in results] == [3 * (i + 1) for i in range(n)]
    lifecycle = [records.parse(r.type, r.data) for r in log if r.type == VALIDATE]
    assert [body.payload["n"] for body in lifecycle if isinstance(body, records.Lifecycle)] == list(range(n))
    assert [c["n"] for c in calls.by_name["check"]] == list(range(n))


async def test_emits_to_different_connections_do_not_wait_for_each_other() -> None:
    """An emit held in a function on one connection does not hold up an emit on another."""
    calls, gate = Calls(), Gate()
    async with running(checker(calls, gate)) as h, anyio.create_task_group() as tg:
        held = Call(tg, lambda: h.emit(VALIDATE, payload={"hold": True}))
        await gate.arrivals(1)
        other = await h.emit(VALIDATE, ref=GLOBEX)
        assert (other.position, other.state, held.done.is_set()) == (1, S.PENDING, False)
        gate.open()
        assert (await held.result()).position == 4  # after the other's three records


# -- draining ---------------------------------------------------------------------------


async def test_drain_refuses_new_emits_while_the_one_in_flight_finishes() -> None:
    """After drain() new emits and reads raise Unavailable; idle() returns once the in-flight emit has finished."""
    calls, gate = Calls(), Gate()
    async with running(checker(calls, gate)) as h, anyio.create_task_group() as tg:
        inflight = Call(tg, lambda: h.emit(VALIDATE, payload={"hold": True}))
        await gate.arrivals(1)
        h.service.drain()
        with pytest.raises(Unavailable, match="shutting down"):
            await h.emit(VALIDATE, ref=GLOBEX)
        with pytest.raises(Unavailable):
            await h.service.get_connection(ACME)
        idle = Call(tg, h.service.idle)
        await settle()
        assert not idle.done.is_set()
        gate.open()
        await idle.result()
        result = await inflight.result()
        assert (result.state, result.version) == (S.PENDING, 3)
        assert await h.types() == ["validate-connection", "function-succeeded", "connection-validated"]
        assert calls.count() == 1


async def test_idle_returns_at_once_when_nothing_is_in_flight() -> None:
    """idle() does not wait when no emit is running."""
    async with running() as h:
        await h.emit(CREATE)
        h.service.drain()
        await h.service.idle()


# -- wait and the response --------------------------------------------------------------


async def test_without_wait_a_creation_answers_its_functions_as_scheduled() -> None:
    """A creation returns at once with each creation function scheduled, before any has run."""
    calls = Calls()
    async with running(simple(calls, "register", CREATE), simple(calls, "sync", CREATE)) as h:
        result = await h.emit(CREATE)
        assert set(result.outcomes) == {
            Outcome("register", FunctionStatus.SCHEDULED),
            Outcome("sync", FunctionStatus.SCHEDULED),
        }
        assert calls.count() == 0


async def test_wait_returns_once_every_job_finished_with_their_outcomes() -> None:
    """With wait=true a creation returns only after its jobs ended (a retry included), with their final outcomes."""
    calls = Calls()
    failures = [RuntimeError("provider hiccup")]

    async def flaky(ctx: Context) -> None:
        calls.note(ctx, "sync")
        if failures:
            raise failures.pop()

    functions = [simple(calls, "register", CREATE), function("sync", CREATE, flaky)]
    async with running(*functions, worker=True) as h, anyio.create_task_group() as tg:
        emit = Call(tg, lambda: h.emit(CREATE, wait=True))
        await h.records_up_to(3)  # the creation, one success and one failure
        (job,) = await h.store.jobs(ACME)
        assert not emit.done.is_set()
        await h.until_due(job.run_at)
        result = await emit.result()
    assert result.state is S.ACTIVE
    assert {(o.name, o.status, o.attempts) for o in result.outcomes} == {
        ("register", FunctionStatus.SUCCEEDED, 1),
        ("sync", FunctionStatus.SUCCEEDED, 2),
    }
    assert calls.count("sync") == 2


async def test_the_response_names_the_lifecycle_record_and_the_version_after_the_call() -> None:
    """event_id and position of a response are those of the appended lifecycle record; its version is the
    stream's after every record the call appended, so it can be passed straight back as expected_version."""
    async with running(*standard(Calls())) as h:
        await h.emit(CREATE, ref=GLOBEX)  # positions and versions differ from here on
        version = 0
        for event in (VALIDATE, CREATE, DELETE):
            result = await h.emit(event, expected_version=version)
            log = await h.log(ACME)
            (lifecycle,) = [r for r in log if r.event_id == result.event_id]
            assert lifecycle.type == event.value
            assert (result.position, result.version) == (lifecycle.position, log[-1].version)
            version = result.version
        assert [r.version for r in await h.log(ACME) if r.type in {e.value for e in LifecycleEvent}] == [1, 4, 5]
