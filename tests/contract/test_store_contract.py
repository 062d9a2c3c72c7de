"""The EventStore contract, written once and run against every backend (PostgreSQL: test_postgres_contract.py)."""

from __future__ import annotations

import gc
import sqlite3
import sys
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import codec, records, sealing, state
from orchestrator.errors import (
    IdempotencyConflict,
    InvalidArgument,
    LeaseLost,
    NotFound,
    StoreError,
    Unavailable,
    VersionConflict,
)
from orchestrator.ids import uuid7
from orchestrator.model import (
    ConnectionQuery,
    ConnectionRef,
    ConnectionState,
    Job,
    JobQuery,
    JobStatus,
    LifecycleEvent,
    NewJob,
    SealedCredentials,
)
from orchestrator.records import Fact, NewEvent, Record
from orchestrator.replay import verify as replay_verify
from orchestrator.store import Appended, EventStore, TailBounds, open_store
from orchestrator.store._append import plan_append
from orchestrator.store._base import Counts
from orchestrator.store._migrations import CREATE_TABLE, migrations
from orchestrator.store._sqlite_rows import RECORD_COLUMNS, connection_to_row, record_to_row
from tests.support.clock import FakeClock

pytestmark = pytest.mark.anyio

ACME = ConnectionRef("dev", "salesforce", "acme")
GLOBEX = ConnectionRef("dev", "salesforce", "globex")
INITECH = ConnectionRef("dev", "hubspot", "initech")
UMBRELLA = ConnectionRef("prod", "salesforce", "umbrella")
LIMIT_ALL = 100_000
SMALL_TAIL = 8
"""Records the tail of the ``small`` store holds, so that a few appends evict from it."""
T0 = datetime(2000, 1, 1, tzinfo=UTC)
"""A due time long past: jobs due at it are claimable at once."""


def lifecycle(event: LifecycleEvent, *, key: str = "", config: dict[str, Any] | None = None) -> NewEvent:
    """A lifecycle record as the service writes it."""
    return NewEvent(
        event_id=str(uuid7()),
        type=event.value,
        data={"config": config or {}, "payload": {}},
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        idempotency_key=key,
    )


def fact(kind: Fact, cause: NewEvent, data: dict[str, Any] | None = None) -> NewEvent:
    """A fact caused by the lifecycle record ``cause``."""
    return NewEvent(event_id=str(uuid7()), type=kind.value, data=data or {}, causation_id=cause.event_id)


def job(cause: NewEvent, function: str = "register") -> NewJob:
    """A creation job for ``cause``, due at once."""
    return NewJob(str(uuid7()), function, LifecycleEvent.POST_CONNECTION_CREATION, cause.event_id, {}, T0)


def validated() -> list[NewEvent]:
    """A validation and its accepting verdict."""
    request = lifecycle(LifecycleEvent.VALIDATE_CONNECTION)
    return [request, fact(Fact.CONNECTION_VALIDATED, request)]


def created(key: str = "") -> list[NewEvent]:
    """A post-connection-creation record."""
    return [lifecycle(LifecycleEvent.POST_CONNECTION_CREATION, key=key)]


def deleted() -> list[NewEvent]:
    """A deletion request and its completion."""
    request = lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION)
    return [request, fact(Fact.CONNECTION_DELETED, request)]


def rejected() -> list[NewEvent]:
    """A validation and its rejecting verdict."""
    request = lifecycle(LifecycleEvent.VALIDATE_CONNECTION)
    return [request, fact(Fact.CONNECTION_REJECTED, request, {"reason": "invalid API key"})]


KEYS = sealing.Keyring.ephemeral()


def sealed_for(ref: ConnectionRef, incarnation: int, credentials: dict[str, str]) -> tuple[NewEvent, SealedCredentials]:
    """The credentials-updated record and the sealed row of ``credentials``, as the daemon makes them."""
    sealed = sealing.seal(KEYS, ref, incarnation, credentials)
    body = records.CredentialsUpdated(sealed.fingerprint, sealed.key_id, tuple(sorted(credentials)), "emit")
    return records.new(body), sealed


async def append_next(store: EventStore, ref: ConnectionRef, events: Sequence[NewEvent]) -> Appended:
    """Append at the stream's current version."""
    current = await store.get_connection(ref)
    return await store.append(ref, current.version if current else 0, events)


async def everything(store: EventStore) -> list[Record]:
    """The whole log."""
    return await store.read(from_position=1, limit=LIMIT_ALL)


def activity(index: int, config: dict[str, Any] | None = None) -> list[NewEvent]:
    """One to three records, by ``index``: a (re)creation, then its metadata update and its function's success."""
    creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION, config=config)
    events = [
        creation,
        fact(Fact.METADATA_UPDATED, creation, {"metadata": {"n": index}}),
        fact(Fact.FUNCTION_SUCCEEDED, creation, {"function": "register", "attempt": 1}),
    ]
    return events[: 1 + index % 3]


def cleanup(cause: NewEvent, function: str = "cleanup") -> NewJob:
    """A cleanup job of the deletion ``cause``, due at once."""
    return NewJob(str(uuid7()), function, LifecycleEvent.PRE_CONNECTION_DELETION, cause.event_id, {}, T0)


def outcome(kind: Fact, job: Job, error: str = "") -> NewEvent:
    """A ``function-*`` record of ``job``'s attempt, caused by its lifecycle record, as the worker writes it."""
    data: dict[str, Any] = {"function": job.function, "attempt": job.attempt}
    if error:
        data["error"] = error
    return NewEvent(event_id=str(uuid7()), type=kind.value, data=data, causation_id=job.causation_id)


def retried(job: Job) -> NewEvent:
    """The ``function-retried`` record of ``job``, as the service writes it."""
    body = records.FunctionRetried(job.function, job.job_id, job.attempt, job.status.value, "token:0123abcd")
    return records.new(body, causation_id=job.causation_id)


async def give_up(store: EventStore, error: str = "503 from the provider") -> Job:
    """Claim the one due job and record that it gave up (a failed attempt, then function-gave-up); the job after."""
    (claimed,) = await store.claim_jobs(limit=1, lease=60)
    await store.finish_job(
        claimed, [outcome(Fact.FUNCTION_FAILED, claimed, error), outcome(Fact.FUNCTION_GAVE_UP, claimed, error)]
    )
    job = await store.get_job(claimed.job_id)
    assert job is not None and job.status is JobStatus.GAVE_UP
    return job


async def all_jobs(store: EventStore, query: JobQuery | None = None) -> list[Job]:
    """Every job ``query`` lists (every job of the store without one)."""
    return await store.list_jobs(query or JobQuery(limit=LIMIT_ALL))


async def interleave(store: EventStore, appends: int, refs: Sequence[ConnectionRef] = (ACME, GLOBEX, INITECH)) -> None:
    """``appends`` appends of one to three records, round-robin over ``refs``."""
    for i in range(appends):
        await store.append(refs[i % len(refs)], None, activity(i))


async def assert_tail_reads_as_the_log(store: EventStore, first: int) -> None:
    """From every position, of every stream and of all, at every limit: the tail answers as the log, from ``first``."""
    head = await store.head()
    for position in range(1, head + 2):
        for ref in (None, ACME, GLOBEX, UMBRELLA):
            for limit in (1, 2, 1000):
                page = store.read_tail(from_position=position, ref=ref, limit=limit)
                if position < first:
                    assert page is None, (position, ref, limit)
                    continue
                assert page is not None, (position, ref, limit)
                logged = await store.read(from_position=position, ref=ref, limit=LIMIT_ALL)
                if page.more:
                    assert page.records == logged[:limit]
                    assert len(page.records) == limit
                    assert page.next_position == page.records[-1].position + 1
                else:
                    assert page.records == logged, (position, ref, limit)
                    assert page.next_position == max(position, head + 1)


def assert_gap_free(records: Sequence[Record]) -> None:
    """Positions are 1..n in order and every stream's versions are 1..k in order."""
    assert [r.position for r in records] == list(range(1, len(records) + 1))
    versions: dict[str, list[int]] = {}
    for record in records:
        versions.setdefault(record.stream, []).append(record.version)
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), stream


def tamper(path: Path) -> int:
    """Try to UPDATE and DELETE records behind the store's back; return the number of records left."""
    db = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE events SET type = 'tampered' WHERE position = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM events WHERE position = 2")
        db.rollback()
        (count,) = db.execute("SELECT COUNT(*) FROM events WHERE type <> 'tampered'").fetchone()
        return int(count)
    finally:
        db.close()


class StoreContract:
    """What every EventStore backend promises; subclasses supply ``url``."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        """The URL of the backend under test (each subclass names one)."""
        raise NotImplementedError

    @pytest.fixture
    async def store(self, url: str) -> AsyncIterator[EventStore]:
        """An open store, closed after the test."""
        async with open_store(url) as store:
            yield store

    async def test_new_store_is_empty(self, store: EventStore) -> None:
        """A new log has head 0, no records, no connections and no idempotency keys."""
        assert await store.head() == 0
        assert await everything(store) == []
        assert await store.get_connection(ACME) is None
        assert await store.list_connections(ConnectionQuery()) == []
        assert await store.find_idempotent(ACME, "k") is None

    async def test_append_numbers_positions_globally_and_versions_per_stream(self, store: EventStore) -> None:
        """Positions run 1, 2, 3... across streams; versions run 1, 2, 3... within each stream."""
        first = await store.append(ACME, 0, validated())
        second = await store.append(GLOBEX, 0, created())
        third = await store.append(ACME, 2, created())
        assert [(r.position, r.version) for r in first.records] == [(1, 1), (2, 2)]
        assert [(r.position, r.version) for r in second.records] == [(3, 1)]
        assert [(r.position, r.version) for r in third.records] == [(4, 3)]
        assert [r.stream for r in (*first.records, *second.records, *third.records)] == [
            ACME.stream,
            ACME.stream,
            GLOBEX.stream,
            ACME.stream,
        ]
        assert await store.head() == 4
        assert_gap_free(await everything(store))

    async def test_append_keeps_every_field_of_the_new_events(self, store: EventStore) -> None:
        """A record carries the event's id, type, data, causation, traceparent and key as given."""
        events = [lifecycle(LifecycleEvent.VALIDATE_CONNECTION, key="req-1", config={"instance_url": "acme.my"})]
        events.append(fact(Fact.CONNECTION_VALIDATED, events[0]))
        appended = await store.append(ACME, 0, events)
        for event, record in zip(events, appended.records, strict=True):
            assert (record.event_id, record.type, record.data) == (event.event_id, event.type, event.data)
            assert (record.causation_id, record.traceparent) == (event.causation_id, event.traceparent)
            assert record.idempotency_key == event.idempotency_key
            assert record.recorded_at.tzinfo is not None
        assert await everything(store) == list(appended.records)

    async def test_append_returns_the_connection_as_folded(self, store: EventStore) -> None:
        """Appended.connection is the fold of the stream, and get_connection returns the same row."""
        await store.append(ACME, 0, validated())
        appended = await store.append(ACME, 2, created())
        assert appended.connection.state is ConnectionState.ACTIVE
        assert appended.connection.version == 3
        folded = state.fold(await store.read(ref=ACME))
        assert folded is not None
        assert codec.connection_to_json(appended.connection) == codec.connection_to_json(folded)
        stored = await store.get_connection(ACME)
        assert stored is not None
        assert codec.connection_to_json(stored) == codec.connection_to_json(folded)

    async def test_version_conflict_carries_the_current_version_and_writes_nothing(self, store: EventStore) -> None:
        """An append at a stale expected_version raises VersionConflict(current=...) and writes nothing."""
        await store.append(ACME, 0, validated())
        with pytest.raises(VersionConflict) as conflict:
            await store.append(ACME, 0, created())
        assert (conflict.value.stream, conflict.value.expected, conflict.value.current) == (ACME.stream, 0, 2)
        with pytest.raises(VersionConflict) as ahead:
            await store.append(GLOBEX, 3, created())
        assert ahead.value.current == 0
        assert await store.head() == 2
        assert len(await everything(store)) == 2
        assert await store.get_connection(GLOBEX) is None

    async def test_append_refused_by_the_fold_writes_nothing(self, store: EventStore) -> None:
        """connection-deleted on an active connection raises InvalidTransition and changes nothing."""
        creation = await store.append(ACME, 0, created())
        before = await store.get_connection(ACME)
        assert before is not None
        with pytest.raises(state.InvalidTransition):
            await store.append(ACME, 1, [fact(Fact.CONNECTION_DELETED, created()[0])])
        assert await store.head() == 1
        assert await everything(store) == list(creation.records)
        after = await store.get_connection(ACME)
        assert after is not None
        assert codec.connection_to_json(after) == codec.connection_to_json(before)

    async def test_append_is_all_or_nothing(self, store: EventStore) -> None:
        """A valid record followed by a refused one in one append writes neither."""
        creation = created()
        with pytest.raises(state.InvalidTransition):
            await store.append(ACME, 0, [*creation, fact(Fact.CONNECTION_DELETED, creation[0])])
        assert await store.head() == 0
        assert await store.get_connection(ACME) is None
        assert await store.read(ref=ACME) == []

    async def test_empty_append_is_refused(self, store: EventStore) -> None:
        """An append of no records raises InvalidArgument."""
        with pytest.raises(InvalidArgument):
            await store.append(ACME, 0, [])
        assert await store.head() == 0

    async def test_idempotency_key_is_unique_per_stream(self, store: EventStore) -> None:
        """A key may be used once per stream: again on another stream is fine, on the same one a conflict."""
        await store.append(ACME, 0, created(key="req-1"))
        await store.append(GLOBEX, 0, created(key="req-1"))
        with pytest.raises(IdempotencyConflict):
            await store.append(ACME, 1, created(key="req-1"))
        assert await store.head() == 2
        acme = await store.get_connection(ACME)
        assert acme is not None and acme.version == 1

    async def test_same_key_twice_in_one_append_is_refused(self, store: EventStore) -> None:
        """Two records of one append carrying the same key raise IdempotencyConflict and write nothing."""
        events = [*created(key="req-1"), *created(key="req-1")]
        with pytest.raises(IdempotencyConflict):
            await store.append(ACME, 0, events)
        assert await store.head() == 0

    async def test_find_idempotent_returns_the_lifecycle_record(self, store: EventStore) -> None:
        """find_idempotent returns the keyed lifecycle record of that stream, and None elsewhere."""
        await store.append(ACME, 0, created())
        request = lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION, key="del-1")
        appended = await store.append(ACME, 1, [request, fact(Fact.CONNECTION_DELETED, request)])
        found = await store.find_idempotent(ACME, "del-1")
        assert found == appended.records[0]
        assert found is not None and found.type == LifecycleEvent.PRE_CONNECTION_DELETION.value
        assert await store.find_idempotent(GLOBEX, "del-1") is None
        assert await store.find_idempotent(ACME, "del-2") is None

    async def test_read_from_position_is_inclusive_and_limited(self, store: EventStore) -> None:
        """read(from_position=p) starts at p, honours limit, and is empty past the head."""
        await store.append(ACME, 0, validated())
        await store.append(GLOBEX, 0, created())
        await store.append(ACME, 2, created())
        await store.append(INITECH, 0, validated())
        assert [r.position for r in await store.read(from_position=3)] == [3, 4, 5, 6]
        assert [r.position for r in await store.read(from_position=3, limit=2)] == [3, 4]
        assert [r.position for r in await store.read(from_position=6)] == [6]
        assert await store.read(from_position=7) == []

    async def test_read_one_stream(self, store: EventStore) -> None:
        """read(ref=...) returns only that stream's records in order, from a position, up to a limit."""
        await store.append(ACME, 0, validated())
        await store.append(GLOBEX, 0, created())
        await store.append(ACME, 2, created())
        await store.append(ACME, 3, deleted())
        acme = await store.read(ref=ACME)
        assert [(r.position, r.version) for r in acme] == [(1, 1), (2, 2), (4, 3), (5, 4), (6, 5)]
        assert {r.stream for r in acme} == {ACME.stream}
        assert [r.position for r in await store.read(ref=ACME, from_position=3)] == [4, 5, 6]
        assert [r.position for r in await store.read(ref=ACME, from_position=2, limit=2)] == [2, 4]
        assert [r.position for r in await store.read(ref=GLOBEX)] == [3]
        assert await store.read(ref=UMBRELLA) == []

    async def test_list_connections_filters(self, store: EventStore) -> None:
        """list_connections filters by environment, integration and state, ordered by stream."""
        await store.append(ACME, 0, created())
        await store.append(GLOBEX, 0, validated())
        await store.append(INITECH, 0, created())
        await store.append(UMBRELLA, 0, created())
        await store.append(UMBRELLA, 1, deleted())
        rejected_ref = ConnectionRef("dev", "salesforce", "hooli")
        await store.append(rejected_ref, 0, rejected())

        async def streams(**query: Any) -> list[str]:
            return [c.ref.stream for c in await store.list_connections(ConnectionQuery(**query))]

        assert await streams() == sorted(
            [ACME.stream, GLOBEX.stream, INITECH.stream, UMBRELLA.stream, rejected_ref.stream]
        )
        assert await streams(environment="dev") == sorted(
            [ACME.stream, GLOBEX.stream, INITECH.stream, rejected_ref.stream]
        )
        assert await streams(integration="salesforce") == sorted(
            [ACME.stream, GLOBEX.stream, UMBRELLA.stream, rejected_ref.stream]
        )
        assert await streams(state=ConnectionState.ACTIVE) == [INITECH.stream, ACME.stream]
        assert await streams(state=ConnectionState.DELETED) == [UMBRELLA.stream]
        assert await streams(state=ConnectionState.REJECTED) == [rejected_ref.stream]
        assert await streams(environment="dev", integration="salesforce", state=ConnectionState.PENDING) == [
            GLOBEX.stream
        ]
        assert await streams(environment="staging") == []

    async def test_list_connections_pages_by_stream(self, store: EventStore) -> None:
        """Keyset paging with after_stream and limit visits every connection once, in stream order."""
        refs = [ConnectionRef("dev", "salesforce", f"c{i:02d}") for i in range(7)]
        refs.append(ConnectionRef("dev", "salesforce", "c03/sub"))  # a '/' inside the id sorts by stream text
        for ref in reversed(refs):
            await store.append(ref, 0, created())
        pages: list[list[str]] = []
        after = ""
        while True:
            page = await store.list_connections(ConnectionQuery(after_stream=after, limit=3))
            if not page:
                break
            pages.append([c.ref.stream for c in page])
            after = page[-1].ref.stream
        assert [len(p) for p in pages] == [3, 3, 2]
        assert [s for p in pages for s in p] == sorted(r.stream for r in refs)
        filtered = await store.list_connections(
            ConnectionQuery(integration="salesforce", after_stream=refs[5].stream, limit=10)
        )
        assert [c.ref.stream for c in filtered] == [refs[6].stream]

    async def test_get_connection_reflects_each_append(self, store: EventStore) -> None:
        """The read model changes with every append: state, version, metadata, config, outcomes."""
        creation = created()
        await store.append(ACME, 0, creation)
        row = await store.get_connection(ACME)
        assert row is not None and (row.state, row.version) == (ConnectionState.ACTIVE, 1)
        await store.append(
            ACME,
            1,
            [
                fact(Fact.METADATA_UPDATED, creation[0], {"metadata": {"webhook_id": "w1"}}),
                fact(Fact.FUNCTION_SUCCEEDED, creation[0], {"function": "register-webhook", "attempt": 1}),
            ],
        )
        row = await store.get_connection(ACME)
        assert row is not None
        assert row.metadata == {"webhook_id": "w1"}
        assert [(o.name, o.status.value, o.attempts) for o in row.outcomes] == [("register-webhook", "succeeded", 1)]
        assert (row.version, row.last_position, row.lifecycle.event_id) == (3, 3, creation[0].event_id)
        await store.append(ACME, 3, deleted())
        row = await store.get_connection(ACME)
        assert row is not None and (row.state, row.version) == (ConnectionState.DELETED, 5)

    @pytest.fixture
    async def small(self, url: str) -> AsyncIterator[EventStore]:
        """An open store whose in-memory tail holds :data:`SMALL_TAIL` records at most."""
        async with open_store(url, tail=TailBounds(records=SMALL_TAIL)) as store:
            yield store

    async def test_the_tail_reads_as_the_log_across_its_eviction(self, small: EventStore) -> None:
        """read_tail returns what read returns (order, positions, streams, limits) from the tail's first record on.

        Before it, None: those records are in the log only. Appends of one to three records, streams
        interleaved, so that evictions cut through appends and a stream's records are spread out.
        """
        assert small.read_tail(from_position=1) is not None  # an empty log: every position is ahead
        for appends in (1, 4, 9, 17):
            await interleave(small, appends)
            head = await small.head()
            await assert_tail_reads_as_the_log(small, first=max(1, head - SMALL_TAIL + 1))

    async def test_the_tail_is_bounded_by_bytes_too(self, url: str) -> None:
        """With a byte bound only a few large records fit: the oldest go first, and what is kept reads as the log."""
        big = {"blob": "x" * 3000}
        async with open_store(url, tail=TailBounds(records=1000, bytes=10_000)) as store:
            for i in range(12):
                await store.append([ACME, GLOBEX][i % 2], None, activity(0, config=big))
            head = await store.head()
            first = next(p for p in range(1, head + 2) if store.read_tail(from_position=p) is not None)
            assert head - 3 < first <= head  # one to three records of over 3,000 bytes each in 10,000
            await assert_tail_reads_as_the_log(store, first)

    async def test_one_commit_wakes_every_waiter_once(self, store: EventStore) -> None:
        """Twenty waiters for the next position all return after one append; one waiting further stays."""
        await store.append(ACME, 0, created())
        woken: list[int] = []

        async def waiter(position: int) -> None:
            await store.wait_for(position)
            woken.append(position)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(waiter, 2)
                tg.start_soon(waiter, 3)
                await anyio.wait_all_tasks_blocked()
                assert woken == []
                await store.append(GLOBEX, 0, created())
                await anyio.wait_all_tasks_blocked()
                assert woken == [2] * 20
                await store.append(INITECH, 0, created())
        assert woken == [2] * 20 + [3]

    async def test_a_waiter_cancelled_does_not_stop_the_others_being_woken(self, store: EventStore) -> None:
        """Waiters are woken in turn; one cancelled meanwhile (first, middle or last) is skipped, not waited for."""
        woken: list[int] = []
        scopes = [anyio.CancelScope() for _ in range(5)]

        async def waiter(index: int) -> None:
            with scopes[index]:
                await store.wait_for(1)
                woken.append(index)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index in range(5):
                    tg.start_soon(waiter, index)
                await anyio.wait_all_tasks_blocked()
                for index in (0, 2, 4):
                    scopes[index].cancel()
                await anyio.wait_all_tasks_blocked()
                await store.append(ACME, 0, created())
        assert sorted(woken) == [1, 3]

    async def test_head_follows_appends(self, store: EventStore) -> None:
        """head() is the position of the last committed record."""
        assert await store.head() == 0
        await store.append(ACME, 0, validated())
        assert await store.head() == 2
        await store.append(GLOBEX, 0, created())
        assert await store.head() == 3

    async def test_wait_for_a_committed_position_returns_at_once(self, store: EventStore) -> None:
        """wait_for(p) with p at or below the head returns without an append."""
        await store.append(ACME, 0, validated())
        with anyio.fail_after(5):
            await store.wait_for(0)
            await store.wait_for(2)

    async def test_wait_for_returns_once_a_later_append_commits(self, store: EventStore) -> None:
        """A waiter for the next position stays blocked until an append commits it, then sees the record."""
        await store.append(ACME, 0, created())
        seen: list[Record] = []

        async def follower() -> None:
            await store.wait_for(2)
            seen.extend(await store.read(from_position=2))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower)
                await anyio.wait_all_tasks_blocked()
                assert seen == []
                appended = await store.append(GLOBEX, 0, created())
        assert seen == list(appended.records)

    async def test_wait_for_raises_unavailable_once_closed(self, url: str) -> None:
        """A waiter blocked when the store closes, and any later waiter, get Unavailable."""
        outcome: list[BaseException] = []

        async def follower(store: EventStore) -> None:
            try:
                await store.wait_for(1)
            except Unavailable as exc:
                outcome.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                async with open_store(url) as store:
                    tg.start_soon(follower, store)
                    await anyio.wait_all_tasks_blocked()
                    assert outcome == []
        assert len(outcome) == 1
        with anyio.fail_after(5), pytest.raises(Unavailable):
            await store.wait_for(1)

    async def test_errors_from_the_block_pass_through(self, url: str) -> None:
        """An exception raised inside ``async with open_store(...)`` comes out as itself, not wrapped in a group."""
        with pytest.raises(NotFound):
            async with open_store(url):
                raise NotFound("connection dev/salesforce/acme not found")

    async def test_append_after_close_is_unavailable(self, url: str) -> None:
        """A closed store refuses appends with Unavailable."""
        async with open_store(url) as store:
            pass
        with pytest.raises(Unavailable):
            await store.append(ACME, 0, created())

    async def test_concurrent_appends_to_different_streams_all_commit(self, store: EventStore) -> None:
        """Many tasks appending to their own streams all commit, with unique gap-free positions."""
        refs = [ConnectionRef("dev", "salesforce", f"c{i}") for i in range(50)]
        results: dict[str, Appended] = {}

        async def create_and_validate(ref: ConnectionRef) -> None:
            await store.append(ref, 0, created())
            results[ref.stream] = await store.append(ref, 1, validated())

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for ref in refs:
                    tg.start_soon(create_and_validate, ref)
        records = await everything(store)
        assert len(records) == 3 * len(refs)
        assert_gap_free(records)
        assert await store.head() == len(records)
        returned = sorted(r.position for a in results.values() for r in a.records)
        assert len(set(returned)) == 2 * len(refs)
        rows = [await store.get_connection(ref) for ref in refs]
        assert all(row is not None and row.state is ConnectionState.ACTIVE for row in rows)

    async def test_concurrent_creations_of_one_stream_admit_one(self, store: EventStore) -> None:
        """Of many appends at expected_version 0 to one stream, exactly one commits; the rest conflict."""
        won: list[Appended] = []
        conflicts: list[VersionConflict] = []

        async def create() -> None:
            try:
                won.append(await store.append(ACME, 0, created()))
            except VersionConflict as exc:
                conflicts.append(exc)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(create)
        assert len(won) == 1
        assert len(conflicts) == 19
        assert {c.current for c in conflicts} == {1}
        assert await everything(store) == list(won[0].records)

    async def test_a_refused_append_does_not_fail_concurrent_ones(self, store: EventStore) -> None:
        """Appends committed alongside a conflicting or invalid one still commit."""
        await store.append(ACME, 0, created(key="req-1"))
        refs = [ConnectionRef("dev", "hubspot", f"c{i}") for i in range(20)]
        errors: list[Exception] = []

        async def attempt(ref: ConnectionRef, expected: int, events: list[NewEvent]) -> None:
            try:
                await store.append(ref, expected, events)
            except (IdempotencyConflict, state.InvalidTransition) as exc:
                errors.append(exc)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i, ref in enumerate(refs):
                    tg.start_soon(attempt, ref, 0, created())
                    if i == 5:
                        tg.start_soon(attempt, ACME, 1, created(key="req-1"))
                    if i == 10:
                        tg.start_soon(attempt, GLOBEX, 0, [fact(Fact.CONNECTION_DELETED, created()[0])])
        assert sorted(type(e).__name__ for e in errors) == ["IdempotencyConflict", "InvalidTransition"]
        records = await everything(store)
        assert len(records) == 1 + len(refs)
        assert_gap_free(records)
        assert {r.stream for r in records} == {ACME.stream, *(ref.stream for ref in refs)}

    async def test_recorded_at_never_goes_back(self, url: str) -> None:
        """recorded_at is non-decreasing in position order even when the clock steps back."""
        t = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
        clock = FakeClock(t)
        steps = (t, t + timedelta(seconds=10), t + timedelta(seconds=5), t + timedelta(seconds=20))
        async with open_store(url, clock=clock) as store:
            for ref, when in zip((ACME, GLOBEX, INITECH, UMBRELLA), steps, strict=True):
                clock.set(when)  # the third append's clock is behind the second's
                await store.append(ref, 0, created())
            records = await everything(store)
        times = [r.recorded_at for r in records]
        assert times == sorted(times)
        assert times[-1] == t + timedelta(seconds=20)

    # Run in a child process: if the writer task dies, the caller's shielded wait can never be cancelled.

    async def test_counts_are_per_environment_state_and_status(self, store: EventStore) -> None:
        """counts() (the console's overview): connections by (environment, state), jobs by (environment, status)."""
        assert await store.counts() == Counts({}, {})
        await store.append(ACME, 0, validated())
        await store.append(GLOBEX, 0, rejected())
        created = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(UMBRELLA, 0, [created], jobs=[job(created), job(created, "notify")])
        (claimed, _) = await store.claim_jobs(limit=2, lease=60)
        await store.finish_job(claimed, [fact(Fact.FUNCTION_SUCCEEDED, created, {"function": claimed.function})])
        counts = await store.counts()
        assert counts.connections == {("dev", "pending"): 1, ("dev", "rejected"): 1, ("prod", "active"): 1}
        assert counts.jobs == {("prod", "succeeded"): 1, ("prod", "running"): 1}

    async def test_cancelling_a_job_as_listed_ends_it_with_the_append(self, store: EventStore) -> None:
        """A job cancelled with the token it was listed with ends (cancelled) in the same transaction as the records."""
        created = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, None, [created], jobs=[job(created)])
        (listed,) = await store.jobs(ACME)
        deletion = lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION)
        await store.append(ACME, None, [deletion], cancel_jobs=[listed])
        assert await store.jobs(ACME) == []
        assert [r.type for r in await everything(store)] == [created.type, deletion.type]

    async def test_a_job_claimed_since_it_was_listed_refuses_the_cancelling_append(self, store: EventStore) -> None:
        """Fencing: a job whose token moved on since it was listed refuses the whole append (LeaseLost)."""
        created = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, None, [created], jobs=[job(created)])
        (listed,) = await store.jobs(ACME)
        (claimed,) = await store.claim_jobs(limit=1, lease=60)
        head = await store.head()
        with pytest.raises(LeaseLost):
            await store.append(ACME, None, [lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION)], cancel_jobs=[listed])
        assert await store.head() == head
        assert [j.job_id for j in await store.jobs(ACME)] == [claimed.job_id]

    async def test_a_claimed_job_cancelled_with_its_claim_ends_and_is_fenced(self, store: EventStore) -> None:
        """A claim's holder may cancel its job; the claim's outcome is then refused (LeaseLost)."""
        created = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, None, [created], jobs=[job(created)])
        (claimed,) = await store.claim_jobs(limit=1, lease=60)
        await store.append(ACME, None, [lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION)], cancel_jobs=[claimed])
        assert await store.jobs(ACME) == []
        with pytest.raises(LeaseLost):
            await store.finish_job(claimed, [fact(Fact.FUNCTION_SUCCEEDED, created, {"function": "f"})])

    # -- sealed credentials (the sealing itself: tests/unit/test_sealing.py) --------------------

    async def test_a_seal_is_stored_with_its_record_and_opens(self, store: EventStore) -> None:
        """Sealed credentials are written with their credentials-updated record, carry its version and open."""
        creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        appended = await store.append(ACME, 0, [creation, update], seal=sealed)
        stored = await store.sealed_credentials(ACME)
        assert stored is not None
        assert (stored.version, stored.key_id, stored.fingerprint) == (2, sealed.key_id, sealed.fingerprint)
        assert sealing.open_sealed(KEYS, stored, ACME, 1) == {"access_token": "t0k3n-one"}
        assert [r.type for r in appended.records] == [creation.type, Fact.CREDENTIALS_UPDATED]
        assert appended.connection.state is ConnectionState.ACTIVE
        assert await store.sealed_credentials(GLOBEX) is None
        assert await store.sealed_keys() == {KEYS.sealing.id: 1}

    async def test_a_later_seal_replaces_the_earlier(self, store: EventStore) -> None:
        """One row per connection: the latest credentials win."""
        update, first = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [*created(), update], seal=first)
        update, second = sealed_for(ACME, 1, {"access_token": "t0k3n-two"})
        await store.append(ACME, None, [update], seal=second)
        stored = await store.sealed_credentials(ACME)
        assert stored is not None and stored.version == 3
        assert sealing.open_sealed(KEYS, stored, ACME, 1) == {"access_token": "t0k3n-two"}

    async def test_a_seal_without_its_record_or_for_another_connection_is_refused(self, store: EventStore) -> None:
        """A seal must come with its credentials-updated record, for its own stream; nothing is written otherwise."""
        _, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        with pytest.raises(InvalidArgument, match="credentials-updated"):
            await store.append(ACME, 0, created(), seal=sealed)
        update, other = sealed_for(GLOBEX, 1, {"access_token": "t0k3n-one"})
        with pytest.raises(InvalidArgument, match="globex"):
            await store.append(ACME, 0, [*created(), update], seal=other)
        assert await store.head() == 0
        assert await store.sealed_credentials(ACME) is None

    async def test_a_deletion_with_no_job_left_shreds_in_its_own_append(self, store: EventStore) -> None:
        """deleted + no job + a sealed row: the row goes and credentials-destroyed follows, in the same append."""
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [*created(), update], seal=sealed)
        deletion = deleted()
        appended = await store.append(ACME, 2, deletion)
        assert [r.type for r in appended.records] == [
            deletion[0].type,
            Fact.CONNECTION_DELETED,
            Fact.CREDENTIALS_DESTROYED,
        ]
        destroyed = appended.records[-1]
        assert destroyed.data["fingerprint"] == sealed.fingerprint
        assert destroyed.data["key_id"] == sealed.key_id
        assert destroyed.causation_id == deletion[0].event_id, "caused by the request that ended the connection"
        assert appended.connection.state is ConnectionState.DELETED and appended.connection.version == 5
        assert await store.sealed_credentials(ACME) is None
        assert await everything(store) == [*(await store.read(ref=ACME))]
        assert await store.sealed_keys() == {}

    async def test_a_rejection_shreds(self, store: EventStore) -> None:
        """A connection rejected with nothing of it left to run loses its sealed credentials at once."""
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [*validated(), update], seal=sealed)
        appended = await store.append(ACME, None, rejected())
        assert appended.records[-1].type == Fact.CREDENTIALS_DESTROYED
        assert await store.sealed_credentials(ACME) is None

    async def test_the_last_job_of_a_deleted_connection_shreds_as_it_finishes(self, store: EventStore) -> None:
        """A cleanup job keeps the row; rescheduling it keeps it still; its removal shreds in the same write."""
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [*created(), update], seal=sealed)
        deletion = deleted()
        cleanup = NewJob(str(uuid7()), "cleanup", LifecycleEvent.PRE_CONNECTION_DELETION, deletion[0].event_id, {}, T0)
        other = NewJob(str(uuid7()), "tidy", LifecycleEvent.PRE_CONNECTION_DELETION, deletion[0].event_id, {}, T0)
        appended = await store.append(ACME, 2, deletion, jobs=[cleanup, other])
        assert appended.records[-1].type == Fact.CONNECTION_DELETED
        assert await store.sealed_credentials(ACME) is not None
        first, second = await store.claim_jobs(limit=2, lease=60)
        failed = fact(Fact.FUNCTION_FAILED, deletion[0], {"function": first.function})
        assert await store.finish_job(first, [failed], retry_at=T0) is not None
        assert await store.sealed_credentials(ACME) is not None
        done = await store.finish_job(second, [fact(Fact.FUNCTION_SUCCEEDED, deletion[0], {"function": "x"})])
        assert done is not None and done.records[-1].type == Fact.FUNCTION_SUCCEEDED
        assert await store.sealed_credentials(ACME) is not None, "a job is still queued"
        (again,) = await store.claim_jobs(limit=1, lease=60)
        last = await store.finish_job(again, [fact(Fact.FUNCTION_SUCCEEDED, deletion[0], {"function": "y"})])
        assert last is not None
        assert [r.type for r in last.records] == [Fact.FUNCTION_SUCCEEDED, Fact.CREDENTIALS_DESTROYED]
        assert await store.sealed_credentials(ACME) is None
        assert await store.jobs(ACME) == []

    async def test_a_cancelling_append_that_leaves_no_job_shreds(self, store: EventStore) -> None:
        """Cancelling the last job in a deletion's own append shreds in that append."""
        creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [creation, update], jobs=[job(creation)], seal=sealed)
        (listed,) = await store.jobs(ACME)
        appended = await store.append(ACME, 2, deleted(), cancel_jobs=[listed])
        assert appended.records[-1].type == Fact.CREDENTIALS_DESTROYED
        assert await store.sealed_credentials(ACME) is None

    async def test_an_active_connection_keeps_its_row_and_sweeping_changes_nothing(self, store: EventStore) -> None:
        """Only ended connections are shredded; a sweep of a consistent store deletes nothing."""
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [*created(), update], seal=sealed)
        head = await store.head()
        assert await store.sweep_credentials() == 0
        assert await store.head() == head
        assert await store.sealed_credentials(ACME) is not None

    # -- jobs you can see and steer: finished jobs are kept, listed, retried ----------------------

    async def test_finished_jobs_are_kept_with_their_status_and_last_error(self, store: EventStore) -> None:
        """Succeeded, given-up and cancelled jobs stay listed; only queued and running ones are claimed or counted."""
        creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, 0, [creation], jobs=[job(creation, name) for name in ("a", "b", "c", "d")])
        ok, flaky, down = await store.claim_jobs(limit=3, lease=60)
        (left,) = [j for j in await store.jobs(ACME) if not j.leased]
        listed = {j.job_id: j for j in await all_jobs(store)}
        assert {j.job_id for j in listed.values() if j.status is JobStatus.RUNNING} == {
            ok.job_id,
            flaky.job_id,
            down.job_id,
        }
        await store.finish_job(ok, [outcome(Fact.FUNCTION_SUCCEEDED, ok)])
        await store.finish_job(flaky, [outcome(Fact.FUNCTION_FAILED, flaky, "timeout")], retry_at=T0)
        await store.finish_job(
            down, [outcome(Fact.FUNCTION_FAILED, down, "HTTP 503"), outcome(Fact.FUNCTION_GAVE_UP, down, "HTTP 503")]
        )
        await store.append(ACME, None, [lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION)], cancel_jobs=[left])

        kept = {j.job_id: j for j in await all_jobs(store)}
        assert {job_id: (j.status, j.last_error) for job_id, j in kept.items()} == {
            ok.job_id: (JobStatus.SUCCEEDED, ""),
            flaky.job_id: (JobStatus.QUEUED, "timeout"),
            down.job_id: (JobStatus.GAVE_UP, "HTTP 503"),
            left.job_id: (JobStatus.CANCELLED, ""),
        }
        for kept_job in kept.values():
            assert kept_job.incarnation == 1
            assert kept_job.created_at is not None and kept_job.updated_at is not None
            assert kept_job.updated_at >= kept_job.created_at
        assert [j.job_id for j in await store.jobs()] == [flaky.job_id]
        assert (await store.stats()).jobs == 1
        again = await store.claim_jobs(limit=10, lease=60)
        assert [j.job_id for j in again] == [flaky.job_id], "only a queued job is claimed again"
        assert await store.get_job(str(uuid7())) is None

    async def test_a_finished_job_takes_no_second_outcome(self, store: EventStore) -> None:
        """Fencing holds once a job ended: its claim's outcome, recorded twice, is refused the second time."""
        creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, 0, [creation], jobs=[job(creation)])
        (claimed,) = await store.claim_jobs(limit=1, lease=60)
        await store.finish_job(claimed, [outcome(Fact.FUNCTION_SUCCEEDED, claimed)])
        head = await store.head()
        with pytest.raises(LeaseLost):
            await store.finish_job(claimed, [outcome(Fact.FUNCTION_SUCCEEDED, claimed)])
        assert await store.head() == head

    async def test_list_jobs_pages_in_stream_and_job_order_with_filters(self, store: EventStore) -> None:
        """Keyset pages over (stream, job id); one connection, one environment, and statuses filter them."""
        made: list[tuple[str, str]] = []
        for ref in (UMBRELLA, GLOBEX, ACME, INITECH):
            creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
            jobs = [job(creation, f"f{n}") for n in range(3)]
            await store.append(ref, 0, [creation], jobs=jobs)
            made += [(ref.stream, j.job_id) for j in jobs]
        await give_up(store)  # the first due job
        everything_listed = await all_jobs(store)
        assert [(j.stream, j.job_id) for j in everything_listed] == sorted(made)

        pages: list[list[Job]] = []
        after = ("", "")
        while True:
            page = await store.list_jobs(JobQuery(after=after, limit=5))
            if not page:
                break
            pages.append(page)
            after = (page[-1].stream, page[-1].job_id)
        assert [len(p) for p in pages] == [5, 5, 2]
        assert [j.job_id for p in pages for j in p] == [j.job_id for j in everything_listed]

        one = await all_jobs(store, JobQuery(stream=GLOBEX.stream, limit=LIMIT_ALL))
        assert [(j.stream, j.job_id) for j in one] == sorted(m for m in made if m[0] == GLOBEX.stream)
        prod = await all_jobs(store, JobQuery(environment="prod", limit=LIMIT_ALL))
        assert {j.stream for j in prod} == {UMBRELLA.stream} and len(prod) == 3
        dev = await all_jobs(store, JobQuery(environment="dev", limit=2))
        assert [(j.stream, j.job_id) for j in dev] == sorted(m for m in made if m[0].startswith("dev/"))[:2]
        assert await all_jobs(store, JobQuery(environment="de", limit=LIMIT_ALL)) == []

        gave_up = await all_jobs(store, JobQuery(statuses=frozenset({JobStatus.GAVE_UP}), limit=LIMIT_ALL))
        assert len(gave_up) == 1
        queued = await all_jobs(store, JobQuery(statuses=frozenset({JobStatus.QUEUED}), limit=LIMIT_ALL))
        assert len(queued) == 11
        both = frozenset({JobStatus.GAVE_UP, JobStatus.QUEUED})
        merged = await all_jobs(store, JobQuery(statuses=both, limit=LIMIT_ALL))
        assert [j.job_id for j in merged] == [j.job_id for j in everything_listed]
        first, second = gave_up[0], queued[0]
        paged = await store.list_jobs(JobQuery(statuses=both, after=(first.stream, first.job_id), limit=3))
        assert [j.job_id for j in paged] == [
            j.job_id for j in merged if (j.stream, j.job_id) > (first.stream, first.job_id)
        ][:3]
        assert await all_jobs(store, JobQuery(stream=second.stream, statuses=frozenset({JobStatus.SUCCEEDED}))) == []

    async def test_retry_queues_a_given_up_job_with_a_fresh_budget_in_the_same_write(self, store: EventStore) -> None:
        """function-retried is appended with the job's reset: queued, no attempt made, due at run_at, claimable."""
        creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, 0, [creation], jobs=[job(creation)])
        gone = await give_up(store)
        changed = store.jobs_changed()
        record = retried(gone)
        appended = await store.retry_job(gone, [record], run_at=T0 + timedelta(seconds=1))
        assert [r.type for r in appended.records] == [Fact.FUNCTION_RETRIED]
        assert appended.records[0].causation_id == creation.event_id
        assert changed.is_set(), "the worker is told"
        again = await store.get_job(gone.job_id)
        assert again is not None
        assert (again.status, again.attempt, again.run_at, again.leased) == (
            JobStatus.QUEUED,
            0,
            T0 + timedelta(seconds=1),
            False,
        )
        assert again.last_error == "503 from the provider", "kept until an attempt succeeds"
        row = appended.connection
        assert [(o.name, o.status.value, o.attempts) for o in row.outcomes] == [("register", "scheduled", 0)]
        (claimed,) = await store.claim_jobs(limit=1, lease=60)
        assert (claimed.job_id, claimed.attempt) == (gone.job_id, 1)
        await store.finish_job(claimed, [outcome(Fact.FUNCTION_SUCCEEDED, claimed)])
        done = await store.get_job(gone.job_id)
        assert done is not None and (done.status, done.last_error) == (JobStatus.SUCCEEDED, "")
        cancelled = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(GLOBEX, 0, [cancelled], jobs=[job(cancelled)])
        (listed,) = await store.jobs(GLOBEX)
        await store.append(
            GLOBEX, None, [fact(Fact.FUNCTION_CANCELLED, cancelled, {"function": "register"})], cancel_jobs=[listed]
        )
        (was,) = await all_jobs(store, JobQuery(stream=GLOBEX.stream))
        assert was.status is JobStatus.CANCELLED
        await store.retry_job(was, [retried(was)], run_at=T0)
        assert [j.job_id for j in await store.jobs(GLOBEX)] == [was.job_id]

    async def test_retry_is_refused_and_writes_nothing_unless_the_job_is_as_read_and_ended(
        self, store: EventStore
    ) -> None:
        """A queued or running job, a job changed since it was read, or an unknown one: LeaseLost, nothing written."""
        creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, 0, [creation], jobs=[job(creation), job(creation, "other")])
        queued = (await store.jobs(ACME))[0]
        head = await store.head()
        with pytest.raises(LeaseLost):
            await store.retry_job(queued, [retried(queued)], run_at=T0)
        gone = await give_up(store)
        (running,) = await store.claim_jobs(limit=1, lease=60)
        with pytest.raises(LeaseLost):
            await store.retry_job(running, [retried(running)], run_at=T0)
        await store.retry_job(gone, [retried(gone)], run_at=T0)
        head = await store.head()
        stale = gone  # read as gave-up; queued again since
        with pytest.raises(LeaseLost):
            await store.retry_job(stale, [retried(stale)], run_at=T0)
        ghost = Job(
            str(uuid7()),
            ACME.stream,
            "x",
            LifecycleEvent.POST_CONNECTION_CREATION,
            creation.event_id,
            {},
            T0,
            1,
            1,
            False,
            status=JobStatus.GAVE_UP,
        )
        with pytest.raises(LeaseLost):
            await store.retry_job(ghost, [retried(ghost)], run_at=T0)
        assert await store.head() == head
        current = await store.get_job(gone.job_id)
        assert current is not None and current.status is JobStatus.QUEUED

    async def test_cancelling_a_job_twice_is_refused_the_second_time(self, store: EventStore) -> None:
        """A cancelled job is kept as cancelled; cancelling it again as it was read is LeaseLost, nothing written."""
        creation = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
        await store.append(ACME, 0, [creation], jobs=[job(creation)])
        (listed,) = await store.jobs(ACME)
        cancel = fact(Fact.FUNCTION_CANCELLED, creation, {"function": "register", "reason": "not needed"})
        appended = await store.append(ACME, None, [cancel], cancel_jobs=[listed])
        assert [o.status.value for o in appended.connection.outcomes] == ["cancelled"]
        head = await store.head()
        with pytest.raises(LeaseLost):
            await store.append(ACME, None, [cancel], cancel_jobs=[listed])
        assert await store.head() == head
        (kept,) = await all_jobs(store)
        assert kept.status is JobStatus.CANCELLED
        assert await store.claim_jobs(limit=1, lease=60) == []

    async def test_only_queued_or_running_jobs_keep_the_credentials(self, store: EventStore) -> None:
        """Shredding: an ended job is not "left"; a retried one is, until it ends."""
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [*created(), update], seal=sealed)
        deletion = deleted()
        await store.append(ACME, 2, deletion, jobs=[cleanup(deletion[0], "a"), cleanup(deletion[0], "b")])
        first, second = await store.claim_jobs(limit=2, lease=60)
        gave_up = await store.finish_job(
            first, [outcome(Fact.FUNCTION_FAILED, first, "x"), outcome(Fact.FUNCTION_GAVE_UP, first, "x")]
        )
        assert gave_up is not None and gave_up.records[-1].type == Fact.FUNCTION_GAVE_UP
        assert await store.sealed_credentials(ACME) is not None, "the other cleanup is still running"
        ended = await store.get_job(first.job_id)
        assert ended is not None
        await store.retry_job(ended, [retried(ended)], run_at=T0)
        last = await store.finish_job(second, [outcome(Fact.FUNCTION_SUCCEEDED, second)])
        assert last is not None and last.records[-1].type == Fact.FUNCTION_SUCCEEDED
        assert await store.sealed_credentials(ACME) is not None, "the retried cleanup is queued"
        assert await store.sweep_credentials() == 0
        (again,) = await store.claim_jobs(limit=1, lease=60)
        shred = await store.finish_job(again, [outcome(Fact.FUNCTION_SUCCEEDED, again)])
        assert shred is not None
        assert [r.type for r in shred.records] == [Fact.FUNCTION_SUCCEEDED, Fact.CREDENTIALS_DESTROYED]
        assert await store.sealed_credentials(ACME) is None
        assert len(await all_jobs(store, JobQuery(stream=ACME.stream))) == 2, "both kept, ended"

    async def test_a_retried_cleanup_of_a_shredded_connection_shreds_nothing_more(self, store: EventStore) -> None:
        """Retrying a cleanup once the credentials are gone appends function-retried alone."""
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        await store.append(ACME, 0, [*created(), update], seal=sealed)
        deletion = deleted()
        await store.append(ACME, 2, deletion, jobs=[cleanup(deletion[0])])
        gone = await give_up(store)
        assert (await store.read(ref=ACME))[-1].type == Fact.CREDENTIALS_DESTROYED
        appended = await store.retry_job(gone, [retried(gone)], run_at=T0)
        assert [r.type for r in appended.records] == [Fact.FUNCTION_RETRIED]
        assert appended.connection.state is ConnectionState.DELETED
        assert await store.sealed_credentials(ACME) is None
        assert await replay_verify(store) == []


UNENCODABLE_APPEND = """
import sys, anyio
from orchestrator.errors import OrchestratorError
from orchestrator.model import ConnectionRef
from orchestrator.records import NewEvent
from orchestrator.store import open_store

async def main(url):
    ref = ConnectionRef("dev", "salesforce", "acme")
    async with open_store(url) as store:
        try:
            await store.append(ref, 0, [NewEvent("e1", "post-connection-creation", {"payload": {"at": {1, 2}}})])
        except OrchestratorError as exc:
            print("refused:", type(exc).__name__)
        appended = await store.append(ref, 0, [NewEvent("e2", "post-connection-creation", {"payload": {}})])
        print("then:", appended.records[0].position)

anyio.run(main, sys.argv[1])
"""


def log_of_schema_3(path: Path, leased_until: int) -> tuple[str, str]:
    """A log as a release before job history wrote it (migrations 0001-0003): ACME created, with two jobs in the
    outbox, the second leased by a daemon that died; their ids."""
    creation = created()
    records, connection = plan_append(None, ACME, 0, creation, first_position=1, recorded_at=T0)
    ids = (str(uuid7()), str(uuid7()))
    with closing(sqlite3.connect(path)) as db:
        db.execute(CREATE_TABLE)
        for migration in migrations("sqlite")[:3]:
            db.executescript(
                f"BEGIN;\n{migration.sql}\nINSERT INTO schema_migrations VALUES"
                f" ({migration.number}, '{migration.name}', 0);\nCOMMIT;"
            )
        with db:
            db.executemany(
                f"INSERT INTO events ({RECORD_COLUMNS}) VALUES ({','.join('?' * 11)})",
                [record_to_row(r) for r in records],
            )
            db.execute("INSERT INTO connections VALUES (?, ?, ?, ?, ?, ?, ?, ?)", connection_to_row(connection))
            db.executemany(
                "INSERT INTO jobs (job_id, stream, function, event, causation_id, payload, traceparent, run_at,"
                " attempt, lease_until, lease_token, created_at) VALUES (?, ?, ?, ?, ?, '{}', '', 0, ?, ?, ?, 7)",
                [
                    (ids[0], ACME.stream, "one", creation[0].type, creation[0].event_id, 0, None, 0),
                    (ids[1], ACME.stream, "two", creation[0].type, creation[0].event_id, 1, leased_until, 1),
                ],
            )
    return ids


class TestMemoryStore(StoreContract):
    """The contract on the in-process backend."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        """An in-process store."""
        return "memory:"


class TestSQLiteStore(StoreContract):
    """The contract on the embedded SQLite backend, plus what only a file can promise."""

    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        """The log's file."""
        return tmp_path / "events.db"

    @pytest.fixture
    def url(self, path: Path) -> str:
        """The log's URL."""
        # ``path`` is absolute, so this is the documented sqlite:///abs/path.db form.
        return f"sqlite://{path}"

    async def test_data_survives_reopening(self, url: str) -> None:
        """Records, read model, idempotency keys and numbering survive closing and reopening the file."""
        async with open_store(url) as store:
            await store.append(ACME, 0, created(key="req-1"))
            await store.append(GLOBEX, 0, validated())
            before = await everything(store)
            row = await store.get_connection(GLOBEX)
        async with open_store(url) as store:
            assert await everything(store) == before
            assert await store.head() == 3
            reopened = await store.get_connection(GLOBEX)
            assert reopened is not None and row is not None
            assert codec.connection_to_json(reopened) == codec.connection_to_json(row)
            assert await store.find_idempotent(ACME, "req-1") == before[0]
            with pytest.raises(IdempotencyConflict):
                await store.append(ACME, 1, created(key="req-1"))
            appended = await store.append(GLOBEX, 2, created())
            assert [(r.position, r.version) for r in appended.records] == [(4, 3)]

    async def test_the_sweep_at_start_shreds_a_row_an_ended_connection_kept(self, url: str, path: Path) -> None:
        """A row of a deleted connection with no job (an old or hand-edited log) is shredded by the sweep."""
        update, sealed = sealed_for(ACME, 1, {"access_token": "t0k3n-one"})
        async with open_store(url) as store:
            await store.append(ACME, 0, [*created(), update], seal=sealed)
            await store.append(GLOBEX, 0, [*created(), *deleted()])

        def move() -> None:  # what no daemon of this release leaves: an ended connection's row
            with closing(sqlite3.connect(path)) as db, db:
                db.execute("UPDATE credentials SET stream = ? WHERE stream = ?", (GLOBEX.stream, ACME.stream))

        await anyio.to_thread.run_sync(move)
        async with open_store(url) as store:
            assert await store.sweep_credentials() == 1
            assert await store.sealed_credentials(GLOBEX) is None
            (last,) = (await store.read(ref=GLOBEX))[-1:]
            assert last.type == Fact.CREDENTIALS_DESTROYED and last.data["fingerprint"] == sealed.fingerprint
            assert await store.sweep_credentials() == 0
            assert await replay_verify(store) == []

    async def test_jobs_of_a_log_before_job_history_are_queued_after_the_migration(self, url: str, path: Path) -> None:
        """Migration 0004: jobs in the outbox become queued jobs of the connection's incarnation (a lease left by a
        dead daemon released), listed and claimed as any other."""
        first, second = await anyio.to_thread.run_sync(log_of_schema_3, path, 2**62)
        async with open_store(url) as store:
            listed = await store.list_jobs(JobQuery(stream=ACME.stream))
            assert sorted(j.job_id for j in listed) == sorted([first, second])
            for kept in listed:
                assert (kept.status, kept.incarnation, kept.last_error, kept.leased) == (JobStatus.QUEUED, 1, "", False)
                assert kept.updated_at == kept.created_at
            claimed = await store.claim_jobs(limit=5, lease=60)
            assert sorted(j.job_id for j in claimed) == sorted([first, second])
            assert {j.job_id: j.attempt for j in claimed} == {first: 1, second: 2}
            assert await replay_verify(store) == []

    async def test_second_writer_is_refused(self, store: EventStore, url: str) -> None:
        """Opening the same file for writing while it is open raises StoreError; the first writer goes on."""
        with pytest.raises(StoreError, match="in use"):
            async with open_store(url):
                pass
        appended = await store.append(ACME, 0, created())
        assert appended.records[0].position == 1

    async def test_readonly_reader_alongside_the_writer(self, store: EventStore, url: str) -> None:
        """A read-only open reads what the writer commits, even later, and refuses appends with Unavailable."""
        await store.append(ACME, 0, validated())
        async with open_store(url, readonly=True) as reader:
            assert await reader.head() == 2
            assert await everything(reader) == await everything(store)
            await store.append(GLOBEX, 0, created())
            assert await reader.head() == 3
            row = await reader.get_connection(GLOBEX)
            assert row is not None and row.state is ConnectionState.ACTIVE
            with pytest.raises(Unavailable):
                await reader.append(INITECH, 0, created())
        assert await store.head() == 3

    async def test_readonly_open_of_a_missing_file_fails(self, path: Path) -> None:
        """A read-only open does not create a log: a missing file raises StoreError."""
        with pytest.raises(StoreError):
            async with open_store(f"sqlite://{path}", readonly=True):
                pass
        assert not await anyio.Path(path).exists()

    async def test_triggers_refuse_update_and_delete(self, url: str, path: Path) -> None:
        """UPDATE and DELETE on the events table are aborted by the append-only triggers."""
        async with open_store(url) as store:
            await store.append(ACME, 0, validated())
            before = await everything(store)
        # A plain sqlite3 connection, as someone bypassing the orchestrator would use; off the event loop.
        assert await anyio.to_thread.run_sync(tamper, path) == 2
        async with open_store(url) as store:
            assert await everything(store) == before

    async def test_recorded_at_never_goes_back_across_restarts(self, url: str) -> None:
        """After a reopen with a clock behind the last record, new records are not stamped earlier."""
        t = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
        async with open_store(url, clock=FakeClock(t)) as store:
            await store.append(ACME, 0, created())
        async with open_store(url, clock=FakeClock(t - timedelta(hours=1))) as store:
            await store.append(GLOBEX, 0, created())
            times = [r.recorded_at for r in await everything(store)]
        assert times == [t, t]

    async def test_group_commit_of_many_concurrent_appends(self, store: EventStore) -> None:
        """200 concurrent appends to 200 streams all commit with unique gap-free positions."""
        refs = [ConnectionRef("prod", "salesforce", f"tenant-{i:03d}") for i in range(200)]
        results: list[Appended] = []

        async def create(ref: ConnectionRef) -> None:
            results.append(await store.append(ref, 0, validated()))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for ref in refs:
                    tg.start_soon(create, ref)
        assert len(results) == 200
        records = await everything(store)
        assert len(records) == 400
        assert_gap_free(records)
        assert sorted(r.position for a in results for r in a.records) == list(range(1, 401))
        pending = await store.list_connections(ConnectionQuery(state=ConnectionState.PENDING, limit=1000))
        assert [c.ref.stream for c in pending] == sorted(r.stream for r in refs)

    async def test_four_slash_url_names_an_absolute_path(self, path: Path) -> None:
        """sqlite:////abs/path.db (the SQLAlchemy spelling of an absolute path) opens /abs/path.db."""
        async with open_store(f"sqlite:///{path}") as store:
            await store.append(ACME, 0, created())
        async with open_store(f"sqlite://{path}") as store:
            assert await store.head() == 1

    async def test_every_open_closes_its_write_queue(self, store: EventStore, url: str) -> None:
        """Read-only opens and refused opens leave no unclosed resources behind once collected."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with open_store(url, readonly=True) as reader:
                await reader.head()
            with pytest.raises(StoreError):
                async with open_store(url):
                    pass
            del reader
            gc.collect()
        assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []

    async def test_unencodable_append_fails_alone(self, url: str) -> None:
        """An append whose data is not JSON fails with an OrchestratorError and the store keeps writing."""
        with anyio.fail_after(8):
            done = await anyio.run_process([sys.executable, "-c", UNENCODABLE_APPEND, url], check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().splitlines()[-1] == "then: 1"
        assert done.stdout.decode().startswith("refused:")
