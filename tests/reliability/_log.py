"""The event log as the reliability checks read it: its records, its numbering, and what each function run became.

:func:`read` takes the records straight from the SQLite file (read-only, the
daemon stopped or running); :func:`from_pb` takes one from ``ReadEvents``.
:func:`numbering` lists what is wrong with positions, versions, event ids and
idempotency keys. A :class:`Ledger` folds records one at a time into
incarnations, lifecycle records and function runs: which runs are still open
(a creation's job with no terminal outcome, the cleanup a rejection of an
active incarnation scheduled, a cleanup scheduled to retry), which ended
twice, and which creation succeeded after its incarnation's ending (the
rejection of the active incarnation, or its deletion, whichever came first).
Bodies are read with :func:`orchestrator.records.parse` only.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from orchestrator import records
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

VALIDATE, CREATE, DELETE = "validate-connection", "post-connection-creation", "pre-connection-deletion"
LIFECYCLE = frozenset({VALIDATE, CREATE, DELETE})
ENDINGS = frozenset({"connection-deleted", "connection-rejected"})
"""Verdicts that end an incarnation: the next validation or creation starts a new one."""
TERMINAL = frozenset({"function-succeeded", "function-gave-up", "function-cancelled"})
"""Outcomes after which a function run is over."""


@dataclass(frozen=True)
class Entry:
    """One committed record."""

    position: int
    stream: str
    version: int
    event_id: str
    type: str
    data: dict[str, Any]
    causation_id: str
    idempotency_key: str


def read(database: Path) -> list[Entry]:
    """Every record of the log at ``database``, by position (through a read-only connection)."""
    sql = (
        "SELECT position, stream, version, event_id, type, data, causation_id, idempotency_key"
        " FROM events ORDER BY position"
    )
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return [Entry(*row[:5], json.loads(row[5]), *row[6:]) for row in db.execute(sql)]


def read_jobs(database: Path) -> list[dict[str, Any]]:
    """The outbox at ``database``: every job still to run (queued or running; ended jobs are kept beside them)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        sql = "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY job_id"
        return [dict(row) for row in db.execute(sql)]


def from_pb(record: pb.EventRecord) -> Entry:
    """A record as ``ReadEvents`` returns it."""
    return Entry(
        record.position,
        record.stream,
        record.version,
        record.event_id,
        record.type,
        json_format.MessageToDict(record.data),
        record.causation_id,
        record.idempotency_key,
    )


def numbering(entries: list[Entry]) -> list[str]:
    """What is wrong with the log's numbering: positions 1..n, versions 1..n per stream, unique ids and keys."""
    problems = []
    positions = [e.position for e in entries]
    if positions != list(range(1, len(entries) + 1)):
        problems.append(f"positions are not 1..{len(entries)} in order")
    versions: dict[str, list[int]] = {}
    for entry in entries:
        versions.setdefault(entry.stream, []).append(entry.version)
    problems += [f"{s}: versions {v[:20]}..." for s, v in versions.items() if v != list(range(1, len(v) + 1))]
    ids = Counter(e.event_id for e in entries)
    problems += [f"event_id {i} appears {n} times" for i, n in ids.items() if n > 1]
    keys = Counter((e.stream, e.idempotency_key) for e in entries if e.idempotency_key)
    problems += [f"idempotency key {k} appears {n} times" for k, n in keys.items() if n > 1]
    return problems


@dataclass(frozen=True)
class Lifecycle:
    """A lifecycle record and the incarnation of its connection it belongs to (1, 2, ... per stream)."""

    entry: Entry
    incarnation: int


@dataclass
class Run:
    """One function's run for one lifecycle record: every outcome recorded for it, in log order."""

    cause: str
    function: str
    outcomes: list[Entry] = field(default_factory=list)

    @property
    def ended(self) -> list[Entry]:
        """Its terminal outcomes (one at most, in a sound log)."""
        return [e for e in self.outcomes if e.type in TERMINAL]

    @property
    def retrying(self) -> bool:
        """Its latest outcome is a failure with another attempt scheduled."""
        if not self.outcomes or self.outcomes[-1].type != "function-failed":
            return False
        body = records.parse("function-failed", self.outcomes[-1].data)
        return isinstance(body, records.FunctionFailed) and body.retry_in_ms is not None


class Ledger:
    """Records folded one at a time (in position order) into incarnations, lifecycle records and function runs."""

    def __init__(self, creation_functions: Iterable[str], cleanup_functions: Iterable[str] = ()) -> None:
        self.creation_functions = frozenset(creation_functions)
        """The post-connection-creation functions installed: each creation owes one run of each."""
        self.cleanup_functions = frozenset(cleanup_functions)
        """The pre-connection-deletion functions installed: rejecting an active incarnation owes one run of each."""
        self.lifecycle: dict[str, Lifecycle] = {}
        """Lifecycle records by event id."""
        self.deletions: dict[tuple[str, int], Entry] = {}
        """The deletion of each (stream, incarnation) that has one."""
        self.rejections: dict[tuple[str, int], Entry] = {}
        """The rejecting validation of each (stream, incarnation) rejected once active (its cleanup's cause)."""
        self.endings: dict[tuple[str, int], Entry] = {}
        """The first of the two (rejection once active, or deletion) of each (stream, incarnation) that has one: the
        lifecycle record after which no creation may succeed, and whose cleanup deletes what creation made."""
        self.runs: dict[tuple[str, str], Run] = {}
        """Function runs by (lifecycle event id, function)."""
        self.owed: set[tuple[str, str]] = set()
        """Runs a rejection scheduled (the cleanup of an active incarnation): open until they end."""
        self.metadata_before: dict[str, dict[str, Any]] = {}
        """The connection's metadata as the log held it just before each deletion or validation record, by its
        event id."""
        self.head = 0
        self._metadata: dict[str, dict[str, Any]] = {}
        self._incarnation: dict[str, int] = {}
        self._ended: dict[str, bool] = {}
        self._active: dict[str, bool] = {}
        self._latest: dict[str, Entry] = {}

    def add(self, entry: Entry) -> list[tuple[str, str]]:
        """Fold the next record; the runs it opens (those it owes)."""
        assert entry.position > self.head, f"record {entry.position} after {self.head}"
        self.head = entry.position
        stream = entry.stream
        opened: list[tuple[str, str]] = []
        if entry.type in LIFECYCLE:
            if self._ended.get(stream, True) and entry.type != DELETE:
                self._incarnation[stream] = self._incarnation.get(stream, 0) + 1
                self._ended[stream] = False
                self._active[stream] = False
                self._metadata[stream] = {}
            incarnation = self._incarnation.get(stream, 0)
            self.lifecycle[entry.event_id] = Lifecycle(entry, incarnation)
            self._latest[stream] = entry
            if entry.type in (DELETE, VALIDATE):
                self.metadata_before[entry.event_id] = dict(self._metadata.get(stream, {}))
            if entry.type == CREATE:
                self._active[stream] = True
                for function in self.creation_functions:
                    self.runs[(entry.event_id, function)] = Run(entry.event_id, function)
                    opened.append((entry.event_id, function))
            elif entry.type == DELETE:
                self.deletions.setdefault((stream, incarnation), entry)
                self.endings.setdefault((stream, incarnation), entry)
        elif entry.type in ENDINGS:
            self._ended[stream] = True
            if entry.type == "connection-rejected" and self._active.get(stream):
                validation = self._latest[stream]
                incarnation = self._incarnation[stream]
                self.rejections.setdefault((stream, incarnation), validation)
                self.endings.setdefault((stream, incarnation), validation)
                for function in self.cleanup_functions:
                    key = (validation.event_id, function)
                    self.runs.setdefault(key, Run(validation.event_id, function))
                    self.owed.add(key)
                    opened.append(key)
        elif entry.type == "metadata-updated":
            update = records.parse(entry.type, entry.data)
            assert isinstance(update, records.MetadataUpdated)
            merged = {**self._metadata.get(stream, {}), **update.metadata} if update.merge else dict(update.metadata)
            self._metadata[stream] = merged
        elif entry.type.startswith("function-"):
            body = records.parse(entry.type, entry.data)
            function = str(getattr(body, "function", ""))
            run = self.runs.setdefault((entry.causation_id, function), Run(entry.causation_id, function))
            run.outcomes.append(entry)
        return opened

    def extend(self, entries: Iterable[Entry]) -> Ledger:
        """Fold every record of ``entries``; this ledger."""
        for entry in entries:
            self.add(entry)
        return self

    def kind(self, run: Run) -> str:
        """The lifecycle event the run is for."""
        cause = self.lifecycle.get(run.cause)
        return cause.entry.type if cause is not None else ""

    def is_open(self, key: tuple[str, str]) -> bool:
        """Whether the run ``key`` still owes an outcome: a creation's or a rejection's cleanup with no terminal
        one, or one set to retry."""
        run = self.runs.get(key)
        return run is not None and not run.ended and (self.kind(run) == CREATE or key in self.owed or run.retrying)

    def open(self) -> set[tuple[str, str]]:
        """The runs that still owe an outcome (see :meth:`is_open`)."""
        return {key for key in self.runs if self.is_open(key)}

    def ended_twice(self) -> list[Run]:
        """Runs with an outcome after their terminal one."""
        return [run for run in self.runs.values() if run.ended and run.outcomes[-1] is not run.ended[0]]

    def deletion_of(self, event_id: str) -> Entry | None:
        """The deletion of the incarnation the lifecycle record ``event_id`` belongs to, if it has one."""
        cause = self.lifecycle[event_id]
        return self.deletions.get((cause.entry.stream, cause.incarnation))

    def ending_of(self, event_id: str) -> Entry | None:
        """The ending (see :attr:`endings`) of the incarnation the lifecycle record ``event_id`` belongs to."""
        cause = self.lifecycle[event_id]
        return self.endings.get((cause.entry.stream, cause.incarnation))

    def late_successes(self) -> list[tuple[Entry, Entry]]:
        """(success, ending) of each creation function that succeeded after its incarnation's ending."""
        late = []
        for run in self.runs.values():
            if self.kind(run) != CREATE:
                continue
            ending = self.ending_of(run.cause)
            if ending is None:
                continue
            late += [
                (outcome, ending)
                for outcome in run.outcomes
                if outcome.type == "function-succeeded" and outcome.position > ending.position
            ]
        return late
