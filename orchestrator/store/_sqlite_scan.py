"""Replay's reads of an SQLite log: one streaming cursor over the columns the fold reads, no async hops.

``orchestrator replay`` folds a whole log, often a large one, once: paging it
through the store's reader (an async generator per page, a thread hop per
query, every column made into a :class:`~orchestrator.records.Record`) costs
several times the fold itself. This module reads the file directly instead,
on a plain read-only :mod:`sqlite3` connection in the caller's thread:

- :func:`open_log` opens the file read-only and checks it is a log this release
  reads (the same refusals as the store's reader);
- :func:`rows` is one cursor over ``events`` in log order, fetched in pages,
  each row the tuple :func:`orchestrator.state.fold_rows` takes. The columns the
  fold does not read are not sent: ``data`` only for the types of
  :data:`~orchestrator.state.READS_DATA` (NULL for the others), ``event_id`` or
  ``causation_id`` (in one column) only where the fold reads them (``''``
  elsewhere); times stay integer microseconds;
- :func:`bounds` splits the streams into ranges of about the shares asked (by a
  sample of the records) for folding in several processes: each range scans the
  same table but only its streams' rows reach Python;
- :func:`last_position` turns ``--until`` into one position, and
  :func:`read_model` reads the rows ``--verify`` compares the fold with.

Every read of one call runs in one read transaction (one snapshot) so that a
daemon appending meanwhile changes nothing of what is read.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from orchestrator import state
from orchestrator.errors import StoreError
from orchestrator.store._migrations import check_known, migrations

PAGE = 4096
"""Rows fetched at a time: large enough that the per-page cost vanishes, small enough to stay a few MB."""

Bounds = tuple[str | None, str | None]
"""A range of streams: from the first (inclusive) to the second (exclusive); None is open-ended."""


def _listed(types: frozenset[str]) -> str:
    # Record types are fixed names of [a-z-], never user input: safe to inline as SQL literals.
    assert all(t.replace("-", "").isalpha() for t in types)
    return ", ".join(f"'{t}'" for t in sorted(types))


_COLUMNS = (
    "stream, type, position, version,"
    f" CASE WHEN type IN ({_listed(state.READS_EVENT_ID)}) THEN event_id"
    f" WHEN type IN ({_listed(state.READS_CAUSATION)}) THEN causation_id ELSE '' END,"
    " recorded_at,"
    f" CASE WHEN type IN ({_listed(state.READS_DATA)}) THEN data END"
)
"""What :func:`orchestrator.state.fold_rows` takes of each record, and nothing it does not read (every column
costs about as much to read as the fold of a record costs to run)."""


def open_log(path: Path) -> sqlite3.Connection:
    """A read-only connection to the log at ``path``; :class:`StoreError` when there is none or it is not one.

    Refuses what the store's reader refuses, with the same messages: a missing file, a file that is
    not a log or is damaged, a log of a newer schema.
    """
    if not path.exists():
        raise StoreError(f"no event log at {path}")
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the event log at {path}: {exc}") from exc
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
    except sqlite3.DatabaseError as exc:  # no such table, not a database, a damaged file
        db.close()
        raise StoreError(f"{path} is not an orchestrator event log, or it is damaged ({exc})") from exc
    migrations("sqlite")
    try:
        check_known("sqlite", applied, path)
    except StoreError:
        db.close()
        raise
    return db


def snapshot(db: sqlite3.Connection) -> None:
    """Start the read transaction every later read of ``db`` shares (ended by ``db.close()`` or ``COMMIT``)."""
    db.execute("BEGIN")
    db.execute("SELECT 1 FROM events LIMIT 1").fetchall()  # a read takes the snapshot; BEGIN alone does not


def head(db: sqlite3.Connection) -> int:
    """The position of the last record (0 for an empty log)."""
    return int(db.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0])


def last_position(db: sqlite3.Connection, *, position: int | None = None, micros: int | None = None) -> int:
    """The last position folded when stopping after ``position`` and before the first record recorded after
    ``micros`` (either may be None); 0 when no record is inside."""
    stop = head(db)
    if position is not None:
        stop = min(stop, position)
    if micros is not None:
        # Replay stops at the first record recorded after the time (the index on recorded_at finds it).
        later = db.execute("SELECT MIN(position) FROM events WHERE recorded_at > ?", (micros,)).fetchone()[0]
        if later is not None:
            stop = min(stop, later - 1)
    if stop <= 0:
        return 0
    found = db.execute("SELECT MAX(position) FROM events WHERE position <= ?", (stop,)).fetchone()[0]
    return int(found or 0)


SAMPLE = 4096
"""Records :func:`bounds` looks at to split the streams (by position: a lookup each, not a scan)."""


def bounds(db: sqlite3.Connection, shares: Sequence[float], stop: int) -> list[Bounds]:
    """Ranges of streams covering every stream, one per share, each holding about that share of the records up to
    ``stop`` (``shares`` add up to 1; fewer ranges when there are fewer streams than ranges).

    The streams of :data:`SAMPLE` records spread evenly over the log stand for all of them: the
    fold's work is per record, and this reads a few pages rather than the read model or an index.
    """
    if stop < 1:
        return [(None, None)]
    step = max(1, stop // SAMPLE)
    sampled = db.execute(
        "WITH RECURSIVE at(p) AS (VALUES(1) UNION ALL SELECT p + ? FROM at WHERE p + ? <= ?)"
        " SELECT stream FROM events JOIN at ON position = at.p",
        (step, step, stop),
    )
    streams = sorted(row[0] for row in sampled)
    cuts: list[str] = []
    total = 0.0
    for share in shares[:-1]:
        total += share
        if not streams:
            break
        # A range starts above the first stream and above the last cut: at the next stream sampled, if need be.
        index = max(round(len(streams) * total), bisect.bisect_right(streams, cuts[-1] if cuts else streams[0]))
        if index < len(streams):
            cuts.append(streams[index])
    edges: list[str | None] = [None, *cuts, None]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def connections(db: sqlite3.Connection) -> int:
    """How many rows the read model has."""
    return int(db.execute("SELECT COUNT(*) FROM connections").fetchone()[0])


def _where(stop: int, part: Bounds) -> tuple[str, list[Any]]:
    where, params = ["position <= ?"], list[Any]([stop])
    low, high = part
    if low is not None:
        where.append("stream >= ?")
        params.append(low)
    if high is not None:
        where.append("stream < ?")
        params.append(high)
    return " AND ".join(where), params


def rows(db: sqlite3.Connection, stop: int, part: Bounds = (None, None)) -> Iterator[list[Any]]:
    """Pages of the rows :func:`orchestrator.state.fold_rows` takes, of the streams in ``part``, up to ``stop``,
    in log order."""
    where, params = _where(stop, part)
    # NOT INDEXED: a scan of the table in rowid (= position) order, never a walk of the (stream, version)
    # index that a stream range would otherwise pick (a random read per row).
    cursor = db.execute(f"SELECT {_COLUMNS} FROM events NOT INDEXED WHERE {where} ORDER BY position", params)
    try:
        while page := cursor.fetchmany(PAGE):
            yield page
    finally:
        cursor.close()


def read_model(db: sqlite3.Connection, part: Bounds = (None, None)) -> Iterator[tuple[str, str]]:
    """(stream, body) of each read-model row of ``part``, by stream."""
    low, high = part
    where, params = ["1"], list[Any]()
    if low is not None:
        where.append("stream >= ?")
        params.append(low)
    if high is not None:
        where.append("stream < ?")
        params.append(high)
    yield from db.execute(f"SELECT stream, body FROM connections WHERE {' AND '.join(where)} ORDER BY stream", params)


def read_model_position(db: sqlite3.Connection) -> int:
    """The newest position the read model reflects (the largest ``last_position``; 0 when it is empty)."""
    return int(db.execute("SELECT COALESCE(MAX(last_position), 0) FROM connections").fetchone()[0])
