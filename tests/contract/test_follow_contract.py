"""Following the log (``Service.read_events``) over every backend: served from the tail, falling back to the log.

A follower that is caught up is served from the store's in-memory tail and
reads nothing from the log; one behind the tail pages through the log, then
rejoins the tail. Whatever the path, it receives every record once, in order,
including those committed while it was reading the log. Reads of the log are
counted through :class:`Watched`, and on SQLite every query of the reader's
connection as well.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiosqlite
import anyio
import httpx
import pytest

from orchestrator.clock import SystemClock
from orchestrator.errors import Unavailable
from orchestrator.model import ConnectionRef
from orchestrator.plugins import Registry
from orchestrator.records import Record
from orchestrator.service import Service, assemble
from orchestrator.store import EventStore, TailBounds, TailPage, open_store
from tests.contract.test_store_contract import (
    ACME,
    GLOBEX,
    INITECH,
    LIMIT_ALL,
    SMALL_TAIL,
    activity,
    created,
    everything,
    interleave,
)

pytestmark = pytest.mark.anyio

WAIT = 20.0
"""Seconds a follower may take to receive records already committed (it takes milliseconds)."""


class Watched:
    """A store whose reads of the log are counted; ``during_read`` runs inside the next read, after the log was read."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.reads = 0
        self.tail_reads = 0
        self.during_read: Callable[[], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def read(self, **query: Any) -> list[Record]:
        """The log's records, as the store reads them; then whatever ``during_read`` commits."""
        self.reads += 1
        records = await self.store.read(**query)
        hook, self.during_read = self.during_read, None
        if hook is not None:
            await hook()
        return records

    def read_tail(self, **query: Any) -> TailPage | None:
        """The tail's records, as the store reads them (counted: each is a follower awake)."""
        self.tail_reads += 1
        return self.store.read_tail(**query)


class Queries:
    """How many statements the store's SQLite reader ran (none on the memory backend, which has no database)."""

    def __init__(self) -> None:
        self.count = 0


async def follow(service: Service, received: list[Record], count: int, ref: ConnectionRef | None = None) -> None:
    """Follow the log (of ``ref``'s connection, when given) into ``received`` until it holds ``count`` records."""
    async for record in service.read_events(ref=ref, follow=True):
        received.append(record)
        if len(received) == count:
            return


async def take(follower: AsyncGenerator[Record, None], count: int) -> list[Record]:
    """The follower's next ``count`` records (already committed, so they come at once)."""
    with anyio.fail_after(WAIT):
        return [await anext(follower) for _ in range(count)]


class FollowContract:
    """What a follower of the log gets, whatever the backend; subclasses supply ``url``."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        """The URL of the backend under test (each subclass names one)."""
        raise NotImplementedError

    @pytest.fixture
    def queries(self, monkeypatch: pytest.MonkeyPatch) -> Queries:
        """The count of the database's reader queries (the SQLite subclass counts them)."""
        return Queries()

    @pytest.fixture
    async def store(self, url: str) -> AsyncIterator[EventStore]:
        """An open store whose tail holds :data:`SMALL_TAIL` records at most."""
        async with open_store(url, tail=TailBounds(records=SMALL_TAIL)) as store:
            yield store

    @pytest.fixture
    def watched(self, store: EventStore) -> Watched:
        """The store, its reads of the log counted."""
        return Watched(store)

    @pytest.fixture
    async def service(self, watched: Watched) -> AsyncIterator[Service]:
        """The service over the watched store (no event functions: only reading matters here)."""
        async with httpx.AsyncClient() as http:
            yield assemble(cast(EventStore, watched), Registry(), SystemClock(), http=http).service

    async def test_caught_up_followers_read_nothing_from_the_log(
        self, store: EventStore, watched: Watched, service: Service, queries: Queries
    ) -> None:
        """Twenty caught-up followers each receive all fifty records, in order, without one read of the log."""
        emits = 50
        received: list[list[Record]] = [[] for _ in range(20)]
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for records in received:
                    tg.start_soon(follow, service, records, emits)
                await anyio.wait_all_tasks_blocked()
                before = (watched.reads, queries.count)
                for i in range(emits):
                    await store.append([ACME, GLOBEX][i % 2], None, created())
        assert (watched.reads, queries.count) == before == (0, 0)
        logged = await everything(store)
        assert len(logged) == emits
        assert all(records == logged for records in received)

    async def test_followers_of_one_connection_are_woken_by_its_commits_only(
        self, store: EventStore, watched: Watched, service: Service
    ) -> None:
        """Twenty followers of one connection sleep through fifty commits of others, and wake once for theirs."""
        received: list[list[Record]] = [[] for _ in range(20)]
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for records in received:
                    tg.start_soon(follow, service, records, 1, ACME)
                await anyio.wait_all_tasks_blocked()
                before = watched.tail_reads
                for i in range(50):
                    await store.append([GLOBEX, INITECH][i % 2], None, created())
                await anyio.wait_all_tasks_blocked()
                assert watched.tail_reads == before
                appended = await store.append(ACME, None, created())
        assert watched.tail_reads == before + len(received)
        assert received == [list(appended.records)] * len(received)

    @pytest.mark.parametrize("one", [False, True], ids=["every-connection", "one-connection"])
    @pytest.mark.parametrize("committed", [1, 3 * SMALL_TAIL], ids=["within-the-tail", "beyond-the-tail"])
    async def test_a_record_committed_during_the_catch_up_read_is_not_missed(
        self, store: EventStore, watched: Watched, service: Service, one: bool, committed: int
    ) -> None:
        """Records committed after the log's page was read, before the follower joins the tail, all come, once.

        The follower starts behind the tail, so it reads the log; while that read is
        returning, appends commit records of the followed connection and of others:
        a few (then they are in the tail), or more than the tail holds (then the
        follower must read the log again).
        """
        await interleave(store, 12)
        assert store.read_tail(from_position=1) is None  # the follower starts behind the tail

        async def commit() -> None:
            for i in range(committed):
                await store.append([ACME, INITECH][i % 2], None, activity(i))

        watched.during_read = commit
        ref = ACME if one else None
        follower = service.read_events(from_position=1, ref=ref, follow=True)
        try:
            first = await take(follower, 1)
            assert watched.during_read is None  # the commits ran during the first read
            expected = await watched.store.read(ref=ref, limit=LIMIT_ALL)
            received = first + await take(follower, len(expected) - 1)
            assert received == expected
            assert sum(r.stream == ACME.stream for r in received) > 1
            # Nothing left over (no duplicate): the next record is the next one committed.
            appended = await store.append(ACME, None, created())
            assert await take(follower, 1) == list(appended.records)
        finally:
            await follower.aclose()

    async def test_a_follower_behind_the_tail_reads_the_log_then_rejoins_the_tail(
        self, store: EventStore, watched: Watched, service: Service
    ) -> None:
        """A follower that stops pulling falls behind the tail, catches up from the log, then reads no more of it."""
        await interleave(store, 2)
        follower = service.read_events(follow=True)
        try:
            received = await take(follower, 2)
            await interleave(store, 20)  # far more than the tail holds, while the follower does not pull
            received += await take(follower, await store.head() - len(received))
            assert watched.reads > 0
            reads = watched.reads
            for i in range(10):  # caught up again: served from the tail
                await store.append(GLOBEX, None, activity(i))
                received += await take(follower, await store.head() - len(received))
            assert watched.reads == reads
            assert received == await everything(store)
        finally:
            await follower.aclose()

    async def test_followers_end_unavailable_naming_where_to_resume_when_draining(
        self, store: EventStore, service: Service
    ) -> None:
        """Every waiting follower (of the whole log or of one connection) ends with UNAVAILABLE and the position."""
        await store.append(ACME, None, created())
        await store.append(GLOBEX, None, created())
        ended: list[str] = []

        async def until_drained(ref: ConnectionRef | None) -> None:
            try:
                async for _ in service.read_events(ref=ref, follow=True):
                    pass
            except Unavailable as exc:
                ended.append(str(exc))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for ref in (None, ACME, GLOBEX, INITECH) * 5:
                    tg.start_soon(until_drained, ref)
                await anyio.wait_all_tasks_blocked()
                service.drain()
        assert ended == ["the daemon is shutting down; resume reading from position 3"] * 20


class TestMemoryFollow(FollowContract):
    """Following the in-process backend."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        """An in-process store."""
        return "memory:"


class TestSQLiteFollow(FollowContract):
    """Following the SQLite backend, whose reader's queries are counted as well."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        """A log in the test's directory."""
        return f"sqlite://{tmp_path / 'events.db'}"

    @pytest.fixture
    def queries(self, monkeypatch: pytest.MonkeyPatch) -> Queries:
        """Counts every round trip to the reader's connection (each runs one statement)."""
        counted = Queries()
        round_trip = aiosqlite.Connection._execute

        async def execute(connection: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
            counted.count += 1
            return await round_trip(connection, fn, *args, **kwargs)

        monkeypatch.setattr(aiosqlite.Connection, "_execute", execute)
        return counted
