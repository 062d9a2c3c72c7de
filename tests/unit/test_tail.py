"""The tail of recent commits on its own: eviction by count and bytes, the relay of wake-ups, closing.

What every backend does with it (reads through the tail are the log's reads) is
in tests/contract/test_store_contract.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import anyio
import pytest

from orchestrator.errors import Unavailable
from orchestrator.model import ConnectionRef
from orchestrator.records import Record
from orchestrator.store._tail import RECORD_OVERHEAD, Tail, TailBounds, weight

pytestmark = pytest.mark.anyio

ACME = ConnectionRef("dev", "salesforce", "acme")
T0 = datetime(2025, 6, 1, tzinfo=UTC)


GLOBEX = ConnectionRef("dev", "salesforce", "globex")


def record(position: int, stream: str = ACME.stream) -> Record:
    """A record at ``position`` (its content does not matter here)."""
    return Record(position, stream, position, f"e{position}", "post-connection-creation", {}, T0)


def commit(tail: Tail, *positions: int, weight_each: int = 1, stream: str = ACME.stream) -> None:
    """Add records of ``stream`` at ``positions`` as one commit, and wake the waiters."""
    tail.add([record(p, stream) for p in positions], [weight_each] * len(positions))
    tail.wake()


def test_the_oldest_records_go_first_beyond_the_count() -> None:
    """With room for three, a fourth record evicts the first; head and first follow."""
    tail = Tail(10, TailBounds(records=3))
    assert (tail.head, tail.first, len(tail)) == (10, 11, 0)
    commit(tail, 11, 12)
    commit(tail, 13, 14)
    assert (tail.head, tail.first, len(tail)) == (14, 12, 3)
    assert tail.read(from_position=11, limit=10) is None
    page = tail.read(from_position=12, limit=10)
    assert page is not None and [r.position for r in page.records] == [12, 13, 14]


def test_the_oldest_records_go_first_beyond_the_bytes() -> None:
    """The byte bound evicts as many of the oldest as it takes, possibly all but none of a commit's head."""
    tail = Tail(0, TailBounds(records=100, bytes=250))
    commit(tail, 1, 2, weight_each=100)
    assert (tail.first, tail.bytes) == (1, 200)
    commit(tail, 3, weight_each=100)
    assert (tail.first, tail.bytes) == (2, 200)
    commit(tail, 4, weight_each=300)  # heavier than the bound: nothing is kept, every reader reads the log
    assert (tail.head, tail.first, len(tail), tail.bytes) == (4, 5, 0, 0)
    assert tail.read(from_position=4, limit=10) is None
    page = tail.read(from_position=5, limit=10)
    assert page is not None and (page.records, page.next_position, page.more) == ([], 5, False)


def test_a_page_stops_at_its_byte_budget_with_at_least_one_record() -> None:
    """A page ends before the record that would take it past max_bytes; a single heavy record still comes."""
    tail = Tail()
    commit(tail, 1, 2, 3, weight_each=40)
    page = tail.read(from_position=1, limit=10, max_bytes=100)
    assert page is not None and ([r.position for r in page.records], page.next_position, page.more) == ([1, 2], 3, True)
    page = tail.read(from_position=3, limit=10, max_bytes=10)
    assert page is not None and ([r.position for r in page.records], page.next_position, page.more) == ([3], 4, False)


def test_a_commit_must_follow_the_head() -> None:
    """Records that do not start right after the head are a bug, refused loudly rather than leaving a gap."""
    tail = Tail(5)
    with pytest.raises(AssertionError):
        tail.add([record(7)], [1])
    assert (tail.head, len(tail)) == (5, 0)


def test_bounds_hold_at_least_one_record() -> None:
    """A tail that could hold nothing is refused."""
    with pytest.raises(ValueError, match="at least one record"):
        Tail(0, TailBounds(records=0))


def test_weight_counts_the_text_and_an_overhead() -> None:
    """A record weighs its data's JSON and its other text, plus a fixed overhead."""
    plain = record(1)
    assert weight(plain, "{}") == 2 + len(plain.stream) + len(plain.event_id) + len(plain.type) + RECORD_OVERHEAD


async def test_waiters_are_woken_in_turn_each_by_the_one_before() -> None:
    """After a commit only the first waiter is runnable; each wakes the next as it runs."""
    tail = Tail()
    order: list[int] = []

    async def waiter(index: int) -> None:
        await tail.wait_for(1)
        order.append(index)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for index in range(4):
                tg.start_soon(waiter, index)
            await anyio.wait_all_tasks_blocked()
            assert tail.waiters == 4
            commit(tail, 1)
            assert tail.waiters == 3  # the first is woken; the others wait for their turn
    assert order == [0, 1, 2, 3]
    assert tail.waiters == 0


async def test_a_waiter_cancelled_once_woken_passes_the_turn_on() -> None:
    """The first waiter is woken, then its task cancelled before it runs (as grpc cancels a call's task).

    The cancellation is raised where it waits, and the next waiters are woken all the same.
    """
    tail = Tail()
    woken: list[int] = []
    cancelled: list[int] = []
    tasks: list[asyncio.Task[object]] = []

    async def waiter(index: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        try:
            await tail.wait_for(1)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise
        woken.append(index)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for index in range(3):
                tg.start_soon(waiter, index)
            await anyio.wait_all_tasks_blocked()
            commit(tail, 1)
            tasks[0].cancel()  # woken, not yet run
    assert (cancelled, woken) == ([0], [1, 2])
    assert tasks[0].cancelled()
    assert tail.waiters == 0


async def test_a_waiter_for_one_stream_is_woken_by_a_commit_of_it_only() -> None:
    """Commits of other streams leave it waiting; one with a record of its stream wakes it."""
    tail = Tail(0, TailBounds(records=2))
    woken: list[str] = []

    async def waiter(ref: ConnectionRef) -> None:
        await tail.wait_for(1, ref)
        woken.append(ref.connection_id)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, ACME)
            tg.start_soon(waiter, GLOBEX)
            await anyio.wait_all_tasks_blocked()
            commit(tail, 1, 2, 3, stream=GLOBEX.stream)  # evicts position 1 too
            await anyio.wait_all_tasks_blocked()
            assert woken == ["globex"]
            assert tail.waiters == 1
            commit(tail, 4)
    assert woken == ["globex", "acme"]


async def test_a_stream_waiter_returns_at_once_when_the_tail_cannot_tell() -> None:
    """Its position is committed but evicted: whether its stream has a record there, the log will say."""
    tail = Tail(0, TailBounds(records=1))
    commit(tail, 1, 2, stream=GLOBEX.stream)
    with anyio.fail_after(5):
        await tail.wait_for(1, ACME)  # position 1 is evicted: the caller reads the log
    with anyio.fail_after(5), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(tail.wait_for, 2, ACME)  # position 2 is held and is not ACME's: it waits
            await anyio.wait_all_tasks_blocked()
            assert tail.waiters == 1
            scope.cancel()
    assert tail.waiters == 0


async def test_closing_wakes_every_waiter_with_unavailable() -> None:
    """Once closed, waiters (and later ones) get Unavailable; a position already committed still returns."""
    tail = Tail()
    commit(tail, 1)
    refused: list[str] = []

    async def waiter(ref: ConnectionRef | None = None) -> None:
        try:
            await tail.wait_for(2, ref)
        except Unavailable as exc:
            refused.append(str(exc))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            tg.start_soon(waiter, ACME)
            await anyio.wait_all_tasks_blocked()
            tail.close()
    assert refused == ["the event store is closed"] * 4
    assert tail.waiters == 0
    await tail.wait_for(1)
    with pytest.raises(Unavailable):
        await tail.wait_for(2)
