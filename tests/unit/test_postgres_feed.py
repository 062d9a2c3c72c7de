"""The PostgreSQL store's feed: the tail filled in position order from this daemon's commits and the others'.

No database: the log is a list, and the feed's reads of it are counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest

from orchestrator.records import Record
from orchestrator.store._postgres_feed import Feed
from orchestrator.store._tail import Tail, TailBounds

pytestmark = pytest.mark.anyio

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def record(position: int) -> Record:
    """A record at ``position``."""
    return Record(position, f"dev/hubspot/c{position}", 1, f"e{position}", "post-connection-creation", {}, T0)


class Log:
    """The committed log (by any daemon), read page by page as the store would read it."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.reads: list[tuple[int, int]] = []

    def commit(self, count: int) -> list[Record]:
        """``count`` records committed after the last (by some daemon)."""
        made = [record(len(self.records) + 1 + i) for i in range(count)]
        self.records += made
        return made

    async def read(self, position: int, limit: int) -> list[tuple[Record, int]]:
        self.reads.append((position, limit))
        return [(r, 100) for r in self.records[position - 1 : position - 1 + limit]]


@pytest.fixture
def log() -> Log:
    """An empty log."""
    return Log()


@pytest.fixture
async def feed(log: Log) -> AsyncIterator[Feed]:
    """A feed over an empty tail, its catch-up task running."""
    feed = Feed(Tail(0, TailBounds(records=100)), log.read)
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed.run)
        yield feed
        tg.cancel_scope.cancel()


def positions(feed: Feed) -> list[int]:
    page = feed.tail.read(from_position=1, limit=1000)
    assert page is not None
    return [r.position for r in page.records]


async def test_own_commits_in_order_go_into_the_tail_without_a_read(feed: Feed, log: Log) -> None:
    """Each commit of this daemon, next after the head, is added as it is reported."""
    for count in (2, 1, 3):
        token = object()
        made = log.commit(count)
        feed.reserved(token, made[0].position, made[-1].position)
        feed.committed(token, made, [100] * count)
    await anyio.wait_all_tasks_blocked()
    assert positions(feed) == [1, 2, 3, 4, 5, 6]
    assert log.reads == []


async def test_own_commits_reported_out_of_order_wait_for_each_other_without_a_read(feed: Feed, log: Log) -> None:
    """Two transactions of this daemon take 1-2 and 3; 3 is reported first: it waits, and no read is made for 1-2."""
    first, second = object(), object()
    one, two = log.commit(2), log.commit(1)
    feed.reserved(first, 1, 2)
    feed.reserved(second, 3, 3)
    feed.committed(second, two, [100])
    await anyio.wait_all_tasks_blocked()
    assert positions(feed) == []
    assert log.reads == []
    feed.committed(first, one, [100, 100])
    assert positions(feed) == [1, 2, 3]


async def test_a_gap_another_daemon_committed_is_read_from_the_log(feed: Feed, log: Log) -> None:
    """Another daemon committed 1-3; this one commits 4: 1-3 are read, then 4 follows, each once."""
    log.commit(3)
    token = object()
    (mine,) = log.commit(1)
    feed.reserved(token, 4, 4)
    feed.committed(token, [mine], [100])
    await anyio.wait_all_tasks_blocked()
    assert positions(feed) == [1, 2, 3, 4]
    assert log.reads == [(1, 500)]


async def test_a_notification_has_the_records_read_in_pages(
    feed: Feed, log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another daemon says it committed up to 7: the records are read from the head on, page by page, in order."""
    monkeypatch.setattr("orchestrator.store._postgres_feed.PAGE", 3)
    log.commit(7)
    feed.seen(7)
    await anyio.wait_all_tasks_blocked()
    assert positions(feed) == list(range(1, 8))
    assert log.reads == [(1, 3), (4, 3), (7, 3)]
    feed.seen(5)  # old news: nothing read
    await anyio.wait_all_tasks_blocked()
    assert len(log.reads) == 3


async def test_a_transaction_that_failed_leaves_its_gap_to_be_read(feed: Feed, log: Log) -> None:
    """A transaction of this daemon took 1 and failed to report (its commit's outcome unknown: it was committed);
    a later commit at 2 waits for it, and once it is released, 1 is read from the log."""
    lost, later = object(), object()
    log.commit(1)
    (two,) = log.commit(1)
    feed.reserved(lost, 1, 1)
    feed.reserved(later, 2, 2)
    feed.committed(later, [two], [100])
    await anyio.wait_all_tasks_blocked()
    assert positions(feed) == [] and log.reads == []
    feed.released(lost)
    await anyio.wait_all_tasks_blocked()
    assert positions(feed) == [1, 2]
    assert log.reads == [(1, 500)]


async def test_a_read_that_ends_inside_a_pending_commit_takes_the_rest_from_it(
    feed: Feed, log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of the log stops within this daemon's pending commit 3-5: the rest of it is added from the commit."""
    monkeypatch.setattr("orchestrator.store._postgres_feed.PAGE", 3)
    log.commit(2)
    token = object()
    mine = log.commit(3)
    feed.reserved(token, 3, 5)
    feed.committed(token, mine, [100] * 3)
    await anyio.wait_all_tasks_blocked()
    assert positions(feed) == [1, 2, 3, 4, 5]
    assert log.reads == [(1, 3)]
