"""Replay of an SQLite log on the fast path: its streams folded in ``jobs`` processes, then merged.

:mod:`orchestrator.replay` comes here for an SQLite log. Each process opens the
file itself, read-only, and folds one range of streams
(:func:`~orchestrator.store._sqlite_scan.bounds`) with
:func:`orchestrator.state.fold_rows`: the same rules as the daemon's
:func:`~orchestrator.state.apply`, on one mutable draft per stream, with
integer times. This process folds the first range itself while the others
fold theirs. For a replay, each other process then packs its drafts
(:meth:`~orchestrator.state.Draft.pack`) and pickles them in chunks at once,
and this one unpacks them and freezes every draft once into a
:class:`~orchestrator.model.Connection`; since that last part is this
process's alone, its range is the smaller (:func:`_shares`). For a verify,
each process compares its own range with the read model and sends only the
streams that differ.

Processes are forked when this process runs no other thread (the CLI), and
spawned otherwise (a fork with threads running is not safe). A process that
fails sends its error, which is raised here; one that dies is reported as a
:class:`~orchestrator.errors.StoreError`; either way the others are stopped.

The JSON decoder is orjson, chosen by measurement on the benchmark's log
(1,000,000 records, 800,000 ``data`` of the types the fold reads), in CPU seconds
on the 2-core machine: decoding those 800,000 texts alone takes 1.9 s with
:mod:`json`, 0.33-0.44 s with orjson and 0.24-0.36 s with msgspec; a whole replay
of the log (one job) takes 4.8-5.8 s with either of the two, within the noise,
since the fold decodes only about 500,000 of them (the outcomes a later
lifecycle record drops are never decoded). orjson also writes the CLI's
``--json`` as :mod:`json` does (two-space indent, sorted keys), ten times
faster, so it is the one dependency. What orjson refuses (integers beyond 64
bits, NaN) is read with :mod:`json`, so that any log :mod:`json` wrote still replays.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import orjson

from orchestrator import codec, state
from orchestrator.errors import OrchestratorError, StoreError
from orchestrator.model import Connection, ConnectionRef, JSONObject
from orchestrator.store import _sqlite_scan as scan

CHUNK = 2000
"""Drafts per message from a process to this one (each is unpacked and frozen before the next is read)."""
PROGRESS_EVERY = 16
"""Pages between two progress messages of a process."""


def load(text: str) -> Any:
    """A record's ``data``: orjson, or :mod:`json` for what orjson refuses (see the module's docstring)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


@dataclass(slots=True)
class Folded:
    """What one range of streams folded to."""

    records: int = 0
    position: int = 0
    """The last position folded (0: none)."""
    drafts: dict[str, state.Draft[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A stream on which the read model and the fold disagree: its row's body, and the fold's connection."""

    stream: str
    body: str | None
    """None: no row."""
    replayed: Connection | None
    """None: no stream in the log."""


Progress = Callable[[int], None]


def _nothing(position: int) -> None:
    pass


@contextmanager
def _no_gc() -> Iterator[None]:
    # A replay makes millions of small objects and no cycle: the collector would walk every
    # draft again and again (a third of the time on 1M records) for nothing. One span for the
    # whole replay: each time it is enabled again, it walks everything made meanwhile once.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def fold_part(db: Any, stop: int, part: scan.Bounds, progress: Progress = _nothing) -> Folded:
    """Fold the streams of ``part`` up to ``stop`` on ``db`` (a connection of :func:`scan.open_log`); every draft
    settled (its data read)."""
    try:
        # orjson itself, not load(): a call less per record. On a log orjson refuses (rare), folded again.
        return _fold_part(db, stop, part, progress, orjson.loads)
    except orjson.JSONDecodeError:
        return _fold_part(db, stop, part, progress, load)


def _fold_part(db: Any, stop: int, part: scan.Bounds, progress: Progress, decode: Callable[[str], Any]) -> Folded:
    out = Folded()
    pages = 0
    for page in scan.rows(db, stop, part):
        state.fold_rows(out.drafts, page, decode)
        out.records += len(page)
        pages += 1
        if pages % PROGRESS_EVERY == 0:
            progress(page[-1][2])
        out.position = page[-1][2]
    for draft in out.drafts.values():
        draft.settle()  # what is left to decode, decoded here: with the same decoder, under the same guard
    return out


class _Shared:
    """What the connections of one replay share: the names in their refs, and equal configs.

    Refs are made from streams the log holds (checked when they were appended). Many connections
    have the same settings: one dict serves all of those (a connection's values are read-only), so
    that a replay of 100,000 connections holds one config rather than 100,000 copies of it.
    """

    def __init__(self) -> None:
        self._names: dict[str, str] = {}
        self._configs: dict[bytes, JSONObject] = {}

    def ref(self, stream: str) -> ConnectionRef:
        """The ref of ``stream``."""
        environment, integration, connection_id = stream.split("/", 2)
        names = self._names
        return ConnectionRef(
            names.setdefault(environment, environment), names.setdefault(integration, integration), connection_id
        )

    def config(self, config: JSONObject) -> JSONObject:
        """The one dict of configs equal to ``config`` (``config`` itself the first time)."""
        try:
            key = orjson.dumps(config)
        except TypeError:  # what orjson cannot write (an integer beyond 64 bits) is kept as it is
            return config
        return self._configs.setdefault(key, config)

    def freeze(self, draft: state.Draft[int]) -> Connection:
        """``draft`` frozen, with its config shared."""
        draft.config = self.config(draft.config)
        return draft.freeze(codec.from_micros, self.ref)

    def unpack(self, chunk: list[tuple[Any, ...]], into: dict[str, Connection]) -> None:
        """Freeze the drafts another process packed (:meth:`~orchestrator.state.Draft.pack`) into ``into``."""
        # Equal configs arrive as one object per chunk (they were shared before pickling): compare each once.
        seen: dict[int, JSONObject] = {}
        for values in chunk:
            draft = state.Draft.unpack(values)
            config = draft.config
            shared = seen.get(id(config))
            if shared is None:
                shared = seen[id(config)] = self.config(config)
            draft.config = shared
            into[draft.stream] = draft.freeze(codec.from_micros, self.ref)


def _freeze_all(drafts: dict[str, state.Draft[int]], into: dict[str, Connection], shared: _Shared) -> None:
    # Drafts are dropped as they are frozen: the two never all live at once.
    while drafts:
        stream, draft = drafts.popitem()
        into[stream] = shared.freeze(draft)


# -- the other processes ---------------------------------------------------------------------


def _child(pipe: Pipe, path: str, stop: int, part: scan.Bounds, verify: bool) -> None:
    """A process's whole life: fold ``part``, send the result (or the error), end."""
    with _no_gc():
        _child_life(pipe, path, stop, part, verify)


def _child_life(pipe: Pipe, path: str, stop: int, part: scan.Bounds, verify: bool) -> None:
    try:
        db = scan.open_log(Path(path))
        try:
            scan.snapshot(db)
            if verify:
                stop = scan.read_model_position(db)
            folded = fold_part(db, stop, part, lambda position: pipe.send(("progress", position)))
            if verify:
                pipe.send(("done", folded.records, folded.position, _compare(db, folded, part)))
                return
            # Packed and pickled at once, while this process still has the core: this one only waits on its
            # reader from here on, rather than taking turns with it through the pipe's 64 KiB.
            chunks, drafts, shared = [], folded.drafts, _Shared()
            while drafts:
                chunk = []
                for _ in range(min(CHUNK, len(drafts))):
                    draft = drafts.popitem()[1]
                    draft.config = shared.config(draft.config)  # pickled once per chunk
                    chunk.append(draft.pack())
                chunks.append(pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
            pipe.send(("done", folded.records, folded.position, len(chunks)))
            for data in chunks:
                pipe.send_bytes(data)
        finally:
            db.close()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent says it, once
        return
    except Exception as exc:  # every failure goes to the parent, which raises it
        try:
            pipe.send(("error", exc if isinstance(exc, OrchestratorError) else StoreError(f"replay failed: {exc!r}")))
        except Exception:  # an error that does not pickle: its text still does
            pipe.send(("error", StoreError(f"replay failed: {exc}")))
    finally:
        pipe.close()


@dataclass(slots=True)
class _Job:
    process: BaseProcess
    pipe: Pipe
    position: int = 0
    """The last position it said it had folded."""
    pending: tuple[Any, ...] | None = None
    """A message other than progress, read while polling, for :func:`_until_done`."""


def _context() -> Any:
    # fork is cheap, and safe only while no other thread runs (one might hold a lock the child needs).
    return multiprocessing.get_context("fork" if threading.active_count() == 1 else "spawn")


def _start(path: Path, stop: int, parts: list[scan.Bounds], verify: bool) -> list[_Job]:
    context = _context()
    jobs: list[_Job] = []
    for part in parts:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_child, args=(send, str(path), stop, part, verify), name="orchestrator-replay", daemon=True
        )
        process.start()
        send.close()
        jobs.append(_Job(process, receive))
    return jobs


def _stop(jobs: list[_Job]) -> None:
    for job in jobs:
        job.pipe.close()
        if job.process.is_alive():
            job.process.kill()
        job.process.join()


def _message(job: _Job) -> tuple[Any, ...]:
    try:
        message: tuple[Any, ...] = job.pipe.recv()
    except EOFError:
        job.process.join(5)
        raise StoreError(
            f"a replay process ended without its result (exit code {job.process.exitcode}): replay with --jobs 1"
        ) from None
    if message[0] == "error":
        raise message[1]
    return message


def _chunk(job: _Job) -> list[tuple[Any, ...]]:
    try:
        data = job.pipe.recv_bytes()
    except EOFError:
        job.process.join(5)
        raise StoreError(
            f"a replay process ended before sending its result (exit code {job.process.exitcode})"
        ) from None
    chunk: list[tuple[Any, ...]] = pickle.loads(data)
    return chunk


def _poll(jobs: list[_Job]) -> None:
    """Take the progress messages waiting (without blocking)."""
    for job in jobs:
        while job.pending is None and job.pipe.poll():
            message = _message(job)
            if message[0] == "progress":
                job.position = message[1]
            else:
                job.pending = message


def _until_done(job: _Job) -> tuple[Any, ...]:
    """The first message of ``job`` that is not progress."""
    if job.pending is not None:
        message, job.pending = job.pending, None
        return message
    while (message := _message(job))[0] == "progress":
        job.position = message[1]
    return message


def _shares(jobs: int, records_per_connection: float) -> list[float]:
    """How much of the connections this process folds, and each of the others, so that all end together.

    This process also freezes every connection and unpacks the others' drafts; they pack theirs.
    Measured per connection, in units of about a microsecond on the 2-core machine: folding costs
    about 2 per record, packing 3, freezing 4, unpacking and freezing 6. So this one takes ``f`` where
    ``f (2r + 4) + (1 - f) 6 = (1 - f) (2r + 3) / (jobs - 1)``, ``r`` records per connection: about
    0.41 of the connections of two jobs at ten records each, and nearly half at hundreds.
    """
    r, others = records_per_connection, jobs - 1
    c = (2 * r + 3) / others
    own = min(max((c - 6) / (2 * r - 2 + c), 0.05), 1 / jobs)
    return [own, *[(1 - own) / others] * others]


# -- what replay.py calls -----------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    """A whole replay: every connection, how many records were folded, the last position."""

    connections: dict[str, Connection]
    records: int
    position: int


def replay_file(
    path: Path,
    *,
    until_position: int | None = None,
    until_micros: int | None = None,
    jobs: int = 1,
    progress: Progress = _nothing,
) -> Result:
    """Fold the log at ``path`` up to ``until_position`` and before the first record recorded after
    ``until_micros`` (microseconds), in ``jobs`` processes; blocks."""
    with _no_gc():
        return _replay_file(path, until_position, until_micros, jobs, progress)


def _replay_file(
    path: Path, until_position: int | None, until_micros: int | None, jobs: int, progress: Progress
) -> Result:
    db = scan.open_log(path)
    try:
        scan.snapshot(db)
        stop = scan.last_position(db, position=until_position, micros=until_micros)
        parts = scan.bounds(db, _shares(jobs, stop / max(1, scan.connections(db))) if jobs > 1 else [1.0], stop)
        others = _start(path, stop, parts[1:], verify=False)
        try:

            def report(position: int) -> None:
                _poll(others)
                progress(min([position, *(j.position for j in others)]))

            own = fold_part(db, stop, parts[0], report)
            connections: dict[str, Connection] = {}
            shared = _Shared()
            _freeze_all(own.drafts, connections, shared)
            records, position = own.records, own.position
            for job in others:
                _, count, last, chunks = _until_done(job)
                records, position = records + count, max(position, last)
                for _ in range(chunks):
                    shared.unpack(_chunk(job), connections)
        finally:
            _stop(others)
    finally:
        db.close()
    progress(position)
    return Result(connections, records, position)


def _compare(db: Any, folded: Folded, part: scan.Bounds) -> list[Mismatch]:
    """The streams of ``part`` whose read-model row is not what ``folded`` says (a row's body is compared as JSON:
    equal documents mean no difference; the others go to :func:`orchestrator.replay.diff`)."""
    drafts, shared = folded.drafts, _Shared()
    out: list[Mismatch] = []
    for stream, body in scan.read_model(db, part):
        draft = drafts.pop(stream, None)
        if draft is None:
            out.append(Mismatch(stream, body, None))
            continue
        replayed = shared.freeze(draft)
        if load(body) != codec.connection_to_json(replayed):
            out.append(Mismatch(stream, body, replayed))
    out.extend(Mismatch(stream, None, shared.freeze(draft)) for stream, draft in drafts.items())
    return sorted(out, key=lambda m: m.stream)


def verify_file(path: Path, *, jobs: int = 1, progress: Progress = _nothing) -> tuple[list[Mismatch], int]:
    """The streams on which the read model of the log at ``path`` and the fold of the log disagree, and the
    position it was folded to; blocks.

    Each process reads its range's rows and folds its streams in one snapshot, up to the newest position the
    read model reflects (aggregated in SQL), so a daemon appending meanwhile cannot make them disagree.
    """
    with _no_gc():
        return _verify_file(path, jobs, progress)


def _verify_file(path: Path, jobs: int, progress: Progress) -> tuple[list[Mismatch], int]:
    db = scan.open_log(path)
    try:
        scan.snapshot(db)
        stop = scan.read_model_position(db)
        parts = scan.bounds(db, [1 / jobs] * jobs, stop)
        others = _start(path, stop, parts[1:], verify=True)
        try:

            def report(position: int) -> None:
                _poll(others)
                progress(min([position, *(j.position for j in others)]))

            own = fold_part(db, stop, parts[0], report)
            mismatches = _compare(db, own, parts[0])
            for job in others:
                mismatches.extend(_until_done(job)[3])
            progress(stop)
        finally:
            _stop(others)
    finally:
        db.close()
    return mismatches, stop
