"""Several daemons on one PostgreSQL log: each daemon is a store of its own (its own pool), on one schema.

What one store alone cannot show, and the contract suites therefore do not:
positions given in commit order across daemons (a follower never skips one),
appends to one connection from several daemons serialised, jobs claimed once
and rescued when a lease runs out (the late outcome refused), other daemons'
commits and jobs waking a daemon by notification, a lost listening
connection made again without a record missed, and the schema migrated once
by daemons starting together.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import httpx
import pytest

from orchestrator.config import DispatchConfig
from orchestrator.errors import LeaseLost, ResourceExhausted, StoreError, VersionConflict
from orchestrator.model import ConnectionRef, EmitRequest, Job, JobQuery, JobStatus, LifecycleEvent
from orchestrator.plugins import Registry
from orchestrator.records import Fact, NewEvent, Record
from orchestrator.service import Engine, assemble
from orchestrator.store import Appended, EventStore, open_store
from orchestrator.store import postgres as postgres_store
from orchestrator.store._postgres_write import Write
from orchestrator.store.postgres import PostgresEventStore
from tests.contract.test_store_contract import (
    ACME,
    GLOBEX,
    INITECH,
    LIMIT_ALL,
    T0,
    activity,
    assert_gap_free,
    created,
    everything,
    job,
    lifecycle,
    outcome,
)
from tests.support.clock import FakeClock
from tests.support.engine import ACME as ENGINE_ACME
from tests.support.engine import CREATE, DELETE, Gate, function, no_provider
from tests.support.postgres import Schemas, terminate

pytestmark = pytest.mark.anyio

WAIT = 20.0
"""Seconds for what takes milliseconds (a notification, a reconnection) before a test fails."""


@pytest.fixture
async def url(postgres_schemas: Schemas) -> str:
    """A log in a new schema of the session's database."""
    return await postgres_schemas.new()


async def daemons(stack: AsyncExitStack, url: str, count: int, **options: Any) -> list[PostgresEventStore]:
    """``count`` stores on the log at ``url``, each with its own pool and listener, closed with ``stack``."""
    stores = []
    for _ in range(count):
        store = await stack.enter_async_context(PostgresEventStore.open(url, **{"clock": FakeClock(T0)} | options))
        stores.append(store)
    return stores


async def sql(url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    """Run ``statement`` on the log's schema, as an operator with psql would."""
    con = await asyncpg.connect(url, timeout=5)
    try:
        rows: list[asyncpg.Record] = await con.fetch(statement, *args)
    finally:
        await con.close()
    return rows


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds: for states of the database that nothing notifies (a lock wait)."""
    with anyio.move_on_after(WAIT):
        while not await condition():  # noqa: ASYNC110  # a state of the database: nothing to await
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"not within {WAIT} s: {what}")


# -- positions -----------------------------------------------------------------------------------


async def test_a_later_position_waits_for_the_earlier_one_to_commit(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While daemon A holds position 1 uncommitted, daemon B's append waits to take position 2, and a reader sees
    neither; once A commits, B takes 2: no reader can ever see 2 before 1."""
    paused, release = anyio.Event(), anyio.Event()
    commit = Write.commit
    held: list[Write] = []

    async def pausing_commit(write: Write) -> None:
        if not held:  # the first write to commit holds its positions until released
            held.append(write)
            paused.set()
            await release.wait()
        await commit(write)

    monkeypatch.setattr(Write, "commit", pausing_commit)
    appended: dict[str, Sequence[Record]] = {}

    async def append(store: EventStore, ref: ConnectionRef) -> None:
        appended[ref.stream] = (await store.append(ref, 0, created())).records

    async with AsyncExitStack() as stack:
        a, b, reader = await daemons(stack, url, 3)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(append, a, ACME)
                await paused.wait()

                async def b_waits_for_the_head() -> bool:
                    rows = await sql(
                        url,
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query LIKE 'UPDATE log_head%'",
                    )
                    return bool(rows[0][0])

                tg.start_soon(append, b, GLOBEX)
                await until(b_waits_for_the_head, "B waits for the head's lock")
                assert await reader.read() == []
                assert await reader.head() == 0
                assert appended == {}
                release.set()
        assert [r.position for r in appended[ACME.stream]] == [1]
        assert [r.position for r in appended[GLOBEX.stream]] == [2]
        assert [r.stream for r in await everything(reader)] == [ACME.stream, GLOBEX.stream]


async def test_a_follower_never_skips_a_position_while_three_daemons_append(url: str) -> None:
    """Three daemons append concurrently to their own and to shared connections while a reader pages through the
    log: every page it reads continues the last without a gap, and it reads every record once, in order."""
    per_daemon, shared = 40, (ACME, GLOBEX)
    total = 3 * per_daemon
    seen: list[Record] = []

    async with AsyncExitStack() as stack:
        stores = await daemons(stack, url, 3, pool_size=4)
        reader = await stack.enter_async_context(open_store(url, readonly=True))

        async def write(index: int, store: EventStore) -> None:
            own = ConnectionRef("dev", "hubspot", f"daemon-{index}")
            async with anyio.create_task_group() as tg:
                for i in range(per_daemon):
                    ref = shared[i % 2] if i % 3 else own
                    tg.start_soon(store.append, ref, None, activity(0))

        async def follow() -> None:
            while len(seen) < total:
                page = await reader.read(from_position=len(seen) + 1, limit=7)
                positions = [r.position for r in page]
                assert positions == list(range(len(seen) + 1, len(seen) + 1 + len(page))), positions
                seen.extend(page)
                await anyio.lowlevel.checkpoint()  # let the writers on

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                for index, store in enumerate(stores):
                    tg.start_soon(write, index, store)
        logged = await everything(reader)
        assert seen == logged
        assert len(logged) == total
        assert_gap_free(logged)  # and each stream's versions 1..n, the shared ones written by every daemon


async def test_concurrent_creations_of_one_connection_on_two_daemons_admit_one(url: str) -> None:
    """Appends at expected version 0 of one connection, half through each daemon: one commits, the rest conflict."""
    won: list[Record] = []
    conflicts: list[int] = []

    async with AsyncExitStack() as stack:
        a, b = await daemons(stack, url, 2)

        async def create(store: EventStore) -> None:
            try:
                won.extend((await store.append(ACME, 0, created())).records)
            except VersionConflict as exc:
                conflicts.append(exc.current)

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(create, (a, b)[i % 2])
        assert len(won) == 1 and conflicts == [1] * 9
        assert await everything(a) == won


# -- jobs ----------------------------------------------------------------------------------------


async def schedule(store: EventStore, ref: ConnectionRef, count: int) -> list[str]:
    """Create ``ref`` with ``count`` creation jobs due at once; their ids."""
    cause = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION)
    jobs = [job(cause, f"f{i}") for i in range(count)]
    await store.append(ref, None, [cause], jobs=jobs)
    return [j.job_id for j in jobs]


async def test_daemons_claiming_together_claim_each_job_once(url: str) -> None:
    """Two daemons claiming the same due jobs at once, a few at a time: every job is claimed by exactly one."""
    async with AsyncExitStack() as stack:
        a, b = await daemons(stack, url, 2)
        made = await schedule(a, ACME, 12) + await schedule(a, GLOBEX, 12)
        claimed: list[Job] = []

        async def claim(store: EventStore) -> None:
            while batch := await store.claim_jobs(limit=3, lease=60):
                claimed.extend(batch)

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for store in (a, b, a, b):
                    tg.start_soon(claim, store)
        assert sorted(j.job_id for j in claimed) == sorted(made)
        assert {j.attempt for j in claimed} == {1}


async def test_an_expired_claim_is_rescued_by_another_daemon_and_the_late_outcome_refused(url: str) -> None:
    """A claims a job and goes quiet; once its lease has run out, B claims it (the next attempt, the next token);
    A's late outcome is refused (LeaseLost, nothing written); B's is recorded."""
    clock = FakeClock(T0 + timedelta(days=1))
    async with AsyncExitStack() as stack:
        a, b = await daemons(stack, url, 2, clock=clock)
        (job_id,) = await schedule(a, ACME, 1)
        (stale,) = await a.claim_jobs(limit=1, lease=5)  # within a database lease: nothing to renew
        assert await b.claim_jobs(limit=1, lease=5) == []
        clock.advance(6)
        (rescued,) = await b.claim_jobs(limit=1, lease=5)
        assert (rescued.job_id, rescued.attempt, rescued.lease_token) == (job_id, 2, stale.lease_token + 1)
        head = await a.head()
        with pytest.raises(LeaseLost):
            await a.finish_job(stale, [outcome(Fact.FUNCTION_SUCCEEDED, stale)])
        assert await a.head() == head
        assert await b.finish_job(rescued, [outcome(Fact.FUNCTION_SUCCEEDED, rescued)]) is not None
        done = await a.get_job(job_id)
        assert done is not None and (done.status, done.attempt) == (JobStatus.SUCCEEDED, 2)


async def test_a_claim_held_is_renewed_and_rescued_once_its_daemon_stops_renewing(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A claims for 60 s under 3 s database leases: renewed, B cannot take it past the first lease. When A stops
    renewing (partitioned: its renewals come too late) B rescues it, and A's next renewal finds it taken over
    (a WARNING) and drops it; A's outcome is refused."""
    clock = FakeClock(T0 + timedelta(days=1))
    async with AsyncExitStack() as stack:
        a, b = await daemons(stack, url, 2, clock=clock, lease=3.0)  # renewed every second
        await schedule(a, ACME, 1)
        (claimed,) = await a.claim_jobs(limit=1, lease=60)
        with anyio.fail_after(WAIT):
            # Each step right after a round of renewals: the next comes a second later.
            await a.leases.next_round()
            clock.advance(2)
            await a.leases.next_round()  # renewed until 5 s
            clock.advance(2)
            assert await b.claim_jobs(limit=1, lease=60) == [], "renewed: still A's"
            await a.leases.next_round()  # renewed until 7 s
            clock.advance(10)  # A's next renewals come too late: the lease ran out
            (rescued,) = await b.claim_jobs(limit=1, lease=60)
            assert rescued.lease_token == claimed.lease_token + 1
            with caplog.at_level(logging.WARNING, logger="orchestrator.store._postgres_jobs"):
                await a.leases.next_round()
        assert a.leases.lost == 1 and len(a.leases) == 0
        assert "its lease was taken over" in caplog.text
        with pytest.raises(LeaseLost):
            await a.finish_job(claimed, [outcome(Fact.FUNCTION_SUCCEEDED, claimed)])


# -- notifications -------------------------------------------------------------------------------


async def test_a_follower_on_one_daemon_is_woken_by_another_daemons_append(url: str) -> None:
    """A waiter on A for the next position returns once B appends (A is notified: no poll), and A's tail then
    holds B's records, read once from the log."""
    async with AsyncExitStack() as stack:
        a, b = await daemons(stack, url, 2)
        await a.append(ACME, 0, created())
        reads = a.feed.reads
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                woken = anyio.Event()

                async def follower() -> None:
                    await a.wait_for(2)
                    woken.set()

                tg.start_soon(follower)
                await anyio.wait_all_tasks_blocked()
                assert not woken.is_set()
                appended = await b.append(GLOBEX, 0, activity(2))
        page = a.read_tail(from_position=2)
        assert page is not None and page.records == list(appended.records)
        assert a.feed.reads == reads + 1


async def test_jobs_another_daemon_schedules_wake_this_ones_worker(url: str) -> None:
    """A's jobs_changed() is set by B's append that schedules jobs, and by B's outcome that ends one."""
    async with AsyncExitStack() as stack:
        a, b = await daemons(stack, url, 2)
        with anyio.fail_after(WAIT):
            changed = a.jobs_changed()
            await schedule(b, ACME, 1)
            await changed.wait()
            changed = a.jobs_changed()
            (claimed,) = await b.claim_jobs(limit=1, lease=60)
            await b.finish_job(claimed, [outcome(Fact.FUNCTION_SUCCEEDED, claimed)])
            await changed.wait()


async def test_a_lost_listening_connection_is_made_again_and_nothing_is_missed(url: str) -> None:
    """A's listening connection is ended by the server (pg_terminate_backend, as a restart or failover does) and
    B appends meanwhile: A listens again and its follower receives every record, in order, once."""
    async with AsyncExitStack() as stack:
        a, b = await daemons(stack, url, 2)
        listener = a.listener
        assert listener is not None and listener.connections == 1
        received: list[Record] = []

        async def follow() -> None:
            position = 1
            while len(received) < 8:  # 3 + 3 + 2 records
                await a.wait_for(position)
                page = a.read_tail(from_position=position)
                assert page is not None
                received.extend(page.records)
                position = page.next_position

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await b.append(ACME, None, activity(2))
                assert await terminate(url, listener.pid)
                await b.append(GLOBEX, None, activity(2))
                await b.append(INITECH, None, activity(1))
        assert listener.connections == 2
        assert received == await everything(b)


async def test_writes_go_on_once_the_pools_connections_are_ended(url: str) -> None:
    """Every connection of A's pool ended by the server (a restart): A's next appends are made on new ones."""
    async with AsyncExitStack() as stack:
        (a,) = await daemons(stack, url, 1)
        await a.append(ACME, 0, created())
        ended = await sql(
            url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'orchestrator'",
        )
        assert ended and all(row[0] for row in ended)
        with anyio.fail_after(WAIT):
            await a.append(GLOBEX, 0, created())
            await a.append(ACME, 1, activity(1))
        assert [r.stream for r in await everything(a)] == [ACME.stream, GLOBEX.stream, ACME.stream, ACME.stream]


# -- schema, bounds ------------------------------------------------------------------------------


async def test_daemons_starting_together_migrate_once(url: str) -> None:
    """Four daemons opening a new log at once: each migration is applied and recorded once, and all of them work."""

    async def daemon(index: int) -> None:
        async with open_store(url) as store:
            await store.append(ConnectionRef("dev", "hubspot", f"c{index}"), 0, created())

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for index in range(4):
                tg.start_soon(daemon, index)
    rows = await sql(url, "SELECT version, count(*) FROM schema_migrations GROUP BY version")
    assert [tuple(row) for row in rows] == [(1, 1)]
    async with open_store(url, readonly=True) as reader:
        assert len(await everything(reader)) == 4


async def test_a_log_of_a_later_release_or_another_applications_schema_is_refused(url: str) -> None:
    """A schema with a migration this release does not know, or with other tables and no log, is refused."""
    await sql(url, "CREATE TABLE invoices (id INT)")
    with pytest.raises(StoreError, match=r"holds other tables \(invoices\) and no event log"):
        async with open_store(url):
            pass
    async with open_store(url, init=True) as store:  # --init: the log's tables beside theirs
        await store.append(ACME, 0, created())
    await sql(url, "INSERT INTO schema_migrations VALUES (999, '0999_future.sql', 0)")
    with pytest.raises(StoreError, match="newer than this orchestrator knows"):
        async with open_store(url):
            pass


async def test_the_log_is_append_only_to_someone_with_psql(url: str) -> None:
    """UPDATE, DELETE and TRUNCATE of the records are refused by the database itself."""
    async with open_store(url) as store:
        await store.append(ACME, 0, created())
    for statement, verb in (
        ("UPDATE events SET type = 'x'", "updated"),
        ("DELETE FROM events", "deleted"),
        ("TRUNCATE events", "truncated"),
    ):
        with pytest.raises(asyncpg.RaiseError, match=f"append-only: records are never {verb}"):
            await sql(url, statement)
    async with open_store(url, readonly=True) as reader:
        assert len(await everything(reader)) == 1


async def test_writes_waiting_for_the_database_are_bounded(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every connection busy, writes queue up to the bound and the next is refused at once (RESOURCE_EXHAUSTED);
    those queued commit once the database answers again."""
    monkeypatch.setattr(postgres_store, "WAITING", 3)
    async with AsyncExitStack() as stack:
        (store,) = await daemons(stack, url, 1, pool_size=1)
        blocker = await asyncpg.connect(url)
        stack.push_async_callback(blocker.close)
        await blocker.execute("BEGIN; SELECT * FROM log_head FOR UPDATE")  # an append takes positions here: it waits
        refs = [ConnectionRef("dev", "hubspot", f"c{i}") for i in range(4)]
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for ref in refs:  # one holds the pool's connection, three wait for it
                    tg.start_soon(store.append, ref, 0, created())

                await anyio.wait_all_tasks_blocked()  # one waits for the head, three for the connection
                assert store.waiting == 3
                with pytest.raises(ResourceExhausted):
                    await store.append(ConnectionRef("dev", "hubspot", "one-too-many"), 0, created())
                await blocker.execute("ROLLBACK")
        assert len(await everything(store)) == 4


async def test_data_survives_reopening(url: str) -> None:
    """Records, the read model and the numbering survive closing every store and opening the log again."""
    async with open_store(url) as store:
        await store.append(ACME, 0, activity(2))
        before = await store.read(limit=LIMIT_ALL)
    async with open_store(url) as store:
        assert await store.read(limit=LIMIT_ALL) == before
        appended = await store.append(ACME, 3, created())
        assert [(r.position, r.version) for r in appended.records] == [(4, 4)]


# -- the deletion barrier across daemons -----------------------------------------------------------


@dataclass
class Pair:
    """Daemon A, which takes requests (its worker is not running), and daemon B, whose worker runs the jobs."""

    a: Engine
    b: Engine
    log: EventStore
    """A's store."""
    b_store: PostgresEventStore


@asynccontextmanager
async def two_daemons(url: str, register: Callable[[Any], Awaitable[None]], running_wait: float) -> AsyncIterator[Pair]:
    """A and B on one log, with one function, ``register``, run on creation."""
    clock = FakeClock(T0 + timedelta(days=1))
    registry = Registry.of([function("register", CREATE, register)])
    config = DispatchConfig(running_wait=running_wait)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(transport=httpx.MockTransport(no_provider)))
        a, b = await daemons(stack, url, 2, clock=clock)
        pair = Pair(*(assemble(store, registry, clock, http=http, config=config) for store in (a, b)), a, b)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pair.b.worker.run)
            yield pair
            tg.cancel_scope.cancel()


def held_at(gate: Gate) -> Callable[[Any], Awaitable[None]]:
    """A creation function that waits at ``gate``."""

    async def register(ctx: Any) -> None:
        await gate.enter()

    return register


async def delete_while_running(pair: Pair, gate: Gate) -> None:
    """Create the connection (B runs its function, held at ``gate``), then delete it through A, then open the gate."""
    await pair.a.service.emit(EmitRequest(ENGINE_ACME, CREATE))
    await gate.arrivals(1)
    async with anyio.create_task_group() as tg:
        deleted = anyio.Event()

        async def delete() -> None:
            await pair.a.service.emit(EmitRequest(ENGINE_ACME, DELETE))
            deleted.set()

        tg.start_soon(delete)
        await anyio.wait_all_tasks_blocked()
        assert not deleted.is_set(), "A's deletion waits for B's attempt"
        if pair.a.dispatcher.config.running_wait < WAIT:
            await deleted.wait()  # the wait ran out first
        gate.open()


async def test_a_deletion_on_one_daemon_waits_for_the_creation_running_on_another(url: str) -> None:
    """B runs the creation's function when the deletion arrives at A: A's hold waits for it (woken by the
    notification of B's outcome), so the outcome is recorded before the deletion."""
    gate = Gate()
    async with two_daemons(url, held_at(gate), running_wait=WAIT) as pair:
        with anyio.fail_after(WAIT):
            await delete_while_running(pair, gate)
        logged = [r.type for r in await everything(pair.log)]
    assert logged == [CREATE.value, Fact.FUNCTION_SUCCEEDED, DELETE.value, Fact.CONNECTION_DELETED]


async def test_a_creation_still_running_on_another_daemon_is_cancelled_and_its_outcome_refused(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """B's attempt outlasts A's wait: A's deletion cancels the job (fenced by its token), and B's outcome, when it
    comes, is refused (LeaseLost, logged by B's worker): nothing of it follows the deletion."""
    gate, refused = Gate(), anyio.Event()
    async with two_daemons(url, held_at(gate), running_wait=0.2) as pair:
        finish = pair.b_store.finish_job

        async def finish_job(job: Job, events: Sequence[NewEvent], **options: Any) -> Appended | None:
            try:
                return await finish(job, events, **options)
            except LeaseLost:
                refused.set()
                raise

        pair.b_store.finish_job = finish_job  # type: ignore[method-assign]  # watched: B's worker calls it
        with anyio.fail_after(WAIT), caplog.at_level(logging.WARNING, logger="orchestrator.worker"):
            await delete_while_running(pair, gate)
            await refused.wait()
            await anyio.wait_all_tasks_blocked()  # B's worker logs the refusal
        logged = [r.type for r in await everything(pair.log)]
        (job,) = await pair.log.list_jobs(JobQuery())
    assert logged == [CREATE.value, DELETE.value, Fact.FUNCTION_CANCELLED, Fact.CONNECTION_DELETED]
    assert job.status is JobStatus.CANCELLED
    assert "was claimed again; outcome dropped" in caplog.text
