"""How a PostgreSQL store's tail learns of every commit: its own as they are made, other daemons' by notification.

Several daemons append to one log, so the positions one daemon commits are
interleaved with the others'. The tail (:mod:`orchestrator.store._tail`) must
hold a contiguous run of positions, so :class:`Feed` puts records into it in
position order only:

- a commit of this store gives its records at once (:meth:`Feed.committed`);
  they go into the tail if they are next, else they wait in a small buffer for
  the positions before them;
- positions before them that another daemon committed are read from the log.
  They are committed: positions are given in commit order (an append holds the
  head's row lock from taking its positions until it commits), so once position
  N is committed every position before N is too, and a read finds them all;
- positions that a transaction of this store took and has not reported yet are
  not read: its report comes (its commit, or its failure, :meth:`Feed.released`);
- a notification from another daemon (:class:`Listener`) says up to where the
  log is committed (:meth:`Feed.seen`); the missing records are read by
  :meth:`Feed.run`, page by page, in order.

:class:`Listener` keeps one connection of its own LISTENing on the log's
channels. When that connection drops (a restart, a failover,
``pg_terminate_backend``), it connects again with a growing delay and, once
listening again, reads the head of the log, so that whatever was committed
meanwhile is read as well (:meth:`Feed.seen`): a follower resumes where it
was and misses nothing. The connection is also checked every
:data:`PING_INTERVAL` seconds, so a silent network loss is found too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from orchestrator.errors import OrchestratorError
from orchestrator.records import Record
from orchestrator.store._tail import Tail

log = logging.getLogger(__name__)

PAGE = 500
"""Records read from the log per query when catching up."""
RETRY = 1.0
"""Seconds before a failed catch-up read is tried again."""
PING_INTERVAL = 10.0
"""Seconds between two checks of the listening connection."""
PING_TIMEOUT = 5.0
"""Seconds a check may take before the connection is taken for lost."""
RECONNECT_FIRST = 0.2
RECONNECT_MAX = 10.0
"""The delays between attempts to listen again: doubling from the first to the max."""

Reader = Callable[[int, int], Awaitable[list[tuple[Record, int]]]]
"""Reads up to ``limit`` committed records from ``position`` on, with their weights in the tail."""


class Feed:
    """Fills one store's :class:`~orchestrator.store._tail.Tail` in position order (see the module)."""

    def __init__(self, tail: Tail, read: Reader) -> None:
        self.tail = tail
        self._read = read
        self._pending: list[tuple[Sequence[Record], Sequence[int]]] = []
        """Commits of this store waiting for the positions before them, each with its weights."""
        self._reserved: dict[object, tuple[int, int]] = {}
        """The positions each transaction of this store took and has not reported yet."""
        self._known = tail.head
        """The highest position known to be committed."""
        self._wanted = anyio.Event()
        self.reads = 0
        """Catch-up reads made (tests count them)."""

    @property
    def known(self) -> int:
        """The highest position known to be committed."""
        return self._known

    def reserved(self, token: object, first: int, last: int) -> None:
        """A transaction of this store took the positions ``first`` to ``last``; it reports them under ``token``."""
        self._reserved[token] = (first, last)

    def released(self, token: object) -> None:
        """The transaction of ``token`` ended without committing (or without knowing): read what it left."""
        if self._reserved.pop(token, None) is not None:
            self._drain()

    def committed(self, token: object, records: Sequence[Record], weights: Sequence[int]) -> None:
        """A transaction of this store committed ``records`` (positions in order, weights alike)."""
        self._reserved.pop(token, None)
        if records and records[-1].position > self.tail.head:
            self._pending.append((records, weights))
            self._known = max(self._known, records[-1].position)
        self._drain()

    def seen(self, position: int) -> None:
        """The log is committed up to ``position`` (another daemon said so, or it was read)."""
        if position > self._known:
            self._known = position
            self._drain()

    def _drain(self) -> None:
        """Add what is next from the buffer; ask for a read when a gap remains that no local report will fill."""
        tail, added = self.tail, False
        while self._pending:
            following = tail.head + 1
            index = next(
                (i for i, (r, _) in enumerate(self._pending) if r[0].position <= following <= r[-1].position), None
            )
            if index is None:
                break
            records, weights = self._pending.pop(index)
            skip = following - records[0].position
            tail.add(records[skip:], weights[skip:])
            added = True
        self._pending = [entry for entry in self._pending if entry[0][-1].position > tail.head]
        if added:
            tail.wake()
        if self._known > tail.head and not self._covered():
            self._wanted.set()

    def _covered(self) -> bool:
        """Whether every position after the tail's head up to the known one will be reported by this store."""
        position = self.tail.head + 1
        spans = sorted([(r[0].position, r[-1].position) for r, _ in self._pending] + list(self._reserved.values()))
        for first, last in spans:
            if first > position:
                return False
            position = max(position, last + 1)
        return position > self._known

    async def run(self) -> None:
        """Read what the tail lacks from the log whenever asked, until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted = anyio.Event()
            while self._known > self.tail.head and not self._covered():
                self.reads += 1
                try:
                    rows = await self._read(self.tail.head + 1, PAGE)
                except OrchestratorError as exc:
                    log.warning("could not read the log's new records (%s); trying again in %.0f s", exc, RETRY)
                    await anyio.sleep(RETRY)
                    continue
                fresh = [(record, size) for record, size in rows if record.position > self.tail.head]
                if not fresh or fresh[0][0].position != self.tail.head + 1:
                    break  # nothing more is visible: wait for the next report
                self.tail.add([record for record, _ in fresh], [size for _, size in fresh])
                self.tail.wake()
                self._known = max(self._known, fresh[-1][0].position)
                self._drain()


Connect = Callable[[], Awaitable[asyncpg.Connection]]


class Listener:
    """One connection LISTENing on the log's channels, connected again whenever it is lost (see the module)."""

    def __init__(
        self,
        connect: Connect,
        channels: dict[str, Callable[[str], None]],
        caught_up: Callable[[], Awaitable[None]],
    ) -> None:
        self._connect = connect
        self._channels = channels
        self._caught_up = caught_up
        self.connections = 0
        """Connections made so far (tests count them)."""
        self.pid = 0
        """The server process of the current connection (tests end it with pg_terminate_backend)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status`` is told once the first connection listens.

        The first connection's failure is raised (the store does not start without it); later ones are retried.
        """
        delay = RECONNECT_FIRST
        started = False
        while True:
            try:
                con = await self._connect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if not started:
                    raise
                log.warning("cannot listen for the log's new records and jobs (%s); again in %.1f s", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            try:
                lost = anyio.Event()
                con.add_termination_listener(_setter(lost))
                for name, handler in self._channels.items():
                    await con.add_listener(name, _handler(handler))
                self.connections += 1
                self.pid = con.get_server_pid()
                if started:
                    log.warning("listening again for the log's new records and jobs; reading what was missed")
                # Listening first, then the head: a commit is either notified or at most the head read here.
                await self._caught_up()
                if not started:
                    started = True
                    task_status.started()
                delay = RECONNECT_FIRST
                await _until_lost(con, lost)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, OrchestratorError) as exc:
                if not started:
                    raise
                log.warning("lost the connection listening for new records and jobs (%s)", exc)
            else:
                log.warning("lost the connection listening for new records and jobs; connecting again")
            finally:
                con.terminate()


def _setter(event: anyio.Event) -> Callable[[Any], None]:
    def on_termination(_con: Any) -> None:
        event.set()

    return on_termination


def _handler(handle: Callable[[str], None]) -> Callable[[Any, int, str, object], None]:
    def on_notification(_con: Any, _pid: int, _channel: str, payload: object) -> None:
        handle(str(payload))

    return on_notification


async def _until_lost(con: asyncpg.Connection, lost: anyio.Event) -> None:
    """Return once ``con`` is closed, or does not answer a check within :data:`PING_TIMEOUT`."""
    while True:
        with anyio.move_on_after(PING_INTERVAL):
            await lost.wait()
            return
        with anyio.move_on_after(PING_TIMEOUT) as check:
            await con.execute("SELECT 1")
        if check.cancelled_caught:
            return
