"""Offline replay: rebuild every connection from the log alone with the daemon's own fold.

Used by ``orchestrator replay``; it only reads, so it works while the daemon
runs. An SQLite log is read from its file directly (:func:`replay_file`,
:func:`verify_file`: one cursor over the columns the fold reads, the
connections split over processes, see :mod:`orchestrator._replay_jobs`); any
other backend through the store interface, opened read-only. Both fold with
:mod:`orchestrator.state`'s rules, into one mutable draft per connection,
each frozen once at the end.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio
import anyio.to_thread

from orchestrator import _replay_jobs, codec, state
from orchestrator.errors import InvalidArgument
from orchestrator.model import Connection, ConnectionQuery, ConnectionRef
from orchestrator.records import Record
from orchestrator.store import EventStore
from orchestrator.store import _sqlite_scan as scan
from orchestrator.store import scan as scan_store
from orchestrator.store._sqlite_rows import connection_from_body

PAGE = 5000
_VERIFY_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Until:
    """Where to stop: after a position, or after the last record recorded at or before a time."""

    position: int | None = None
    time: datetime | None = None

    def admits(self, record: Record) -> bool:
        """Whether ``record`` is inside the window."""
        if self.position is not None and record.position > self.position:
            return False
        return self.time is None or record.recorded_at <= self.time


@dataclass(slots=True)
class Replayed:
    """The world as the log says it was at the end of the window.

    Its connections are read-only, like every :class:`Connection`: those with equal configs may
    share one dict.
    """

    connections: dict[str, Connection] = field(default_factory=dict)
    position: int = 0
    records: int = 0

    def named(self, connection_id: str, *, integration: str = "", environment: str = "") -> list[ConnectionRef]:
        """The connections called ``connection_id`` (of ``integration``, in ``environment``, when given), sorted."""
        return sorted(
            c.ref
            for c in self.connections.values()
            if c.ref.connection_id == connection_id
            and (not integration or c.ref.integration == integration)
            and (not environment or c.ref.environment == environment)
        )


async def records(
    store: EventStore, *, ref: ConnectionRef | None = None, until: Until | None = None
) -> AsyncIterator[Record]:
    """Every record (of one stream, or all) inside ``until``, in log order, page by page."""
    until = until or Until()
    async for record in scan_store(store, ref=ref, page=PAGE):
        if not until.admits(record):
            return
        yield record


async def timeline(
    store: EventStore, ref: ConnectionRef, *, until: Until | None = None
) -> AsyncIterator[tuple[Record, Connection]]:
    """One connection's records inside ``until``, each with the connection as the fold leaves it after the record."""
    connection: Connection | None = None
    async for record in records(store, ref=ref, until=until):
        connection = state.apply(connection, record)
        yield record, connection


async def replay(
    store: EventStore,
    *,
    until: Until | None = None,
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
) -> Replayed:
    """Fold the whole log (up to ``until``); ``progress`` is told each record's position now and then.

    An SQLite log is read from its file (:func:`replay_file`, in a worker thread, its streams split over
    ``jobs`` processes); any other store through its :meth:`~orchestrator.store.EventStore.read`.
    """
    _check_jobs(jobs)
    path = _sqlite_file(store)
    if path is not None:
        return await anyio.to_thread.run_sync(
            functools.partial(replay_file, path, until=until, progress=progress, jobs=jobs)
        )
    out = Replayed()
    drafts: dict[str, state.Draft[datetime]] = {}
    async for record in records(store, until=until):
        stream = record.stream
        draft = drafts.get(stream)
        after = state.step(
            draft,
            stream,
            record.type,
            record.position,
            record.version,
            record.event_id,
            record.causation_id,
            record.recorded_at,
            record.data,
        )
        if after is not draft:
            drafts[stream] = after
        out.position = record.position
        out.records += 1
        if progress is not None and out.records % 1000 == 0:
            progress(record.position)
    out.connections = {stream: draft.freeze(_as_is) for stream, draft in drafts.items()}
    return out


def _as_is(moment: datetime) -> datetime:
    return moment


def _check_jobs(jobs: int) -> None:
    if not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgument(f"jobs must be a whole number of processes, at least 1 (not {jobs!r})")


def _sqlite_file(store: EventStore) -> Path | None:
    """The file of an SQLite store (read directly by the fast path); None for any other backend."""
    if "orchestrator.store.sqlite" not in sys.modules:
        return None  # no SQLite store was ever opened here
    from orchestrator.store.sqlite import SQLiteEventStore

    return store.file if isinstance(store, SQLiteEventStore) else None


PARALLEL_FROM = 50_000
"""The records from which ``orchestrator replay`` folds in several processes by default: below, starting them
costs more than they save."""


def default_jobs(records: int) -> int:
    """The processes ``orchestrator replay`` folds ``records`` records in when ``--jobs`` is not given: one per
    core this process may run on, for a log of :data:`PARALLEL_FROM` records or more; else 1."""
    if records < PARALLEL_FROM:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def log_head(path: Path) -> int:
    """The last position of the SQLite log at ``path`` (0 when empty); :class:`StoreError` when there is no log."""
    db = scan.open_log(path)
    try:
        return scan.head(db)
    finally:
        db.close()


def replay_file(
    path: Path, *, until: Until | None = None, progress: Callable[[int], None] | None = None, jobs: int = 1
) -> Replayed:
    """:func:`replay` of the SQLite log at ``path``, read directly (no store opened): its streams folded in
    ``jobs`` processes (1: this one). Blocks; works while a daemon appends to the log."""
    _check_jobs(jobs)
    until = until or Until()
    result = _replay_jobs.replay_file(
        path,
        until_position=until.position,
        until_micros=codec.to_micros(until.time) if until.time is not None else None,
        jobs=jobs,
        progress=progress or _ignore,
    )
    return Replayed(result.connections, result.position, result.records)


def _ignore(position: int) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the read model disagrees with the fold of the log."""

    stream: str
    field: str
    read_model: object
    replayed: object

    def __str__(self) -> str:
        return f"{self.stream}: {self.field}: read model has {self.read_model!r}, the log says {self.replayed!r}"


async def _read_model(store: EventStore) -> dict[str, Connection]:
    rows: dict[str, Connection] = {}
    after = ""
    while True:
        page = await store.list_connections(ConnectionQuery(after_stream=after, limit=1000))
        rows.update((c.ref.stream, c) for c in page)
        if len(page) < 1000:
            return rows
        after = page[-1].ref.stream


def diff(read_model: dict[str, Connection], replayed: dict[str, Connection]) -> list[Difference]:
    """Every field on which the two disagree, stream by stream."""
    out: list[Difference] = []
    for stream in sorted(read_model.keys() | replayed.keys()):
        have, want = read_model.get(stream), replayed.get(stream)
        if have is None or want is None:
            out.append(Difference(stream, "row", "present" if have else "missing", "present" if want else "missing"))
            continue
        a, b = codec.connection_to_json(have), codec.connection_to_json(want)
        out.extend(Difference(stream, key, a[key], b.get(key)) for key in sorted(a) if a[key] != b.get(key))
    return out


async def verify(
    store: EventStore, progress: Callable[[int], None] | None = None, *, jobs: int = 1
) -> list[Difference]:
    """Compare the read model with the fold of the log; empty when they agree.

    An SQLite log is checked by :func:`verify_file` (in a worker thread). For any other store: the
    daemon may append while this runs, so the read model is read first and the log folded up to the
    newest position it reflects; if the log moved underneath, the check is repeated before a
    difference is reported.
    """
    _check_jobs(jobs)
    path = _sqlite_file(store)
    if path is not None:
        return await anyio.to_thread.run_sync(functools.partial(verify_file, path, progress=progress, jobs=jobs))
    differences: list[Difference] = []
    for _ in range(_VERIFY_ATTEMPTS):
        head = await store.head()
        rows = await _read_model(store)
        seen = max((c.last_position for c in rows.values()), default=0)
        replayed = await replay(store, until=Until(position=seen), progress=progress)
        differences = diff(rows, replayed.connections)
        if not differences or await store.head() == head:
            return differences
    return differences


def verify_file(path: Path, *, progress: Callable[[int], None] | None = None, jobs: int = 1) -> list[Difference]:
    """:func:`verify` of the SQLite log at ``path``, read directly; blocks.

    Each process reads its streams' read-model rows and folds their records in one snapshot (up to
    the newest position the read model reflects, found in SQL), so a daemon appending meanwhile
    cannot make them disagree; the rows whose JSON equals the fold's are not looked at again.
    """
    _check_jobs(jobs)
    mismatches, _ = _replay_jobs.verify_file(path, jobs=jobs, progress=progress or _ignore)
    read_model = {m.stream: connection_from_body(m.body) for m in mismatches if m.body is not None}
    replayed = {m.stream: m.replayed for m in mismatches if m.replayed is not None}
    return diff(read_model, replayed)
