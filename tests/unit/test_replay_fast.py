"""Replay's fast path (the SQLite file scanned directly, folded into drafts, split over processes) gives what
the plain fold gives: ``state.fold_all`` over the records read through the store, state and metadata alike."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import _replay_jobs, codec, replay, state
from orchestrator.cli import main
from orchestrator.errors import InvalidArgument, InvalidTransition, StoreError
from orchestrator.ids import uuid7
from orchestrator.model import Connection, ConnectionRef, ConnectionState, LifecycleEvent
from orchestrator.records import Fact, NewEvent, Record
from orchestrator.store import EventStore, open_store
from orchestrator.store import _sqlite_scan as scan
from orchestrator.store.memory import MemoryEventStore

GOLDEN = sorted(path.parent for path in (Path(__file__).resolve().parents[1] / "golden").glob("*/events.db"))
JOBS = (1, 2)
ALL = 1_000_000


def read_records(path: Path) -> list[Record]:
    """Every record of the log at ``path``, read through the store (the plain path)."""

    async def main() -> list[Record]:
        async with open_store(f"sqlite://{path}", readonly=True) as store:
            return await store.read(limit=ALL)

    return anyio.run(main)


def as_json(connections: dict[str, Connection]) -> dict[str, Any]:
    """Every connection's whole JSON form, by stream."""
    return {stream: codec.connection_to_json(c) for stream, c in connections.items()}


def assert_same(fast: replay.Replayed, records: list[Record]) -> None:
    """``fast`` is the plain fold of ``records``: same connections (every field), count and last position."""
    plain = state.fold_all(records)
    assert fast.connections == plain
    assert as_json(fast.connections) == as_json(plain)
    assert {s: c.metadata for s, c in fast.connections.items()} == {s: c.metadata for s, c in plain.items()}
    assert (fast.records, fast.position) == (len(records), records[-1].position if records else 0)


@pytest.fixture(params=GOLDEN, ids=[log.name for log in GOLDEN])
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of one golden log's events.db (the checked-in file is never opened)."""
    copy = tmp_path / "events.db"
    shutil.copyfile(request.param / "events.db", copy)
    return copy


@pytest.mark.parametrize("jobs", JOBS)
def test_golden_logs_replay_as_the_plain_fold(golden: Path, jobs: int) -> None:
    """Every golden log, whole and up to each of its positions, folds on the fast path as the plain fold does."""
    records = read_records(golden)
    assert_same(replay.replay_file(golden, jobs=jobs), records)
    for cut in range(len(records) + 1):
        assert_same(replay.replay_file(golden, until=replay.Until(position=cut), jobs=jobs), records[:cut])


@pytest.mark.parametrize("jobs", JOBS)
def test_golden_logs_replay_until_a_time_as_the_plain_fold(golden: Path, jobs: int) -> None:
    """Up to each record's time, and just before it, the fast path stops where the plain fold stops."""
    records = read_records(golden)
    for record in records:
        for moment in (record.recorded_at, codec.from_micros(codec.to_micros(record.recorded_at) - 1)):
            inside = [r for r in records if r.recorded_at <= moment]
            assert inside == records[: len(inside)], "recorded_at goes back in this log: the cut is not a prefix"
            assert_same(replay.replay_file(golden, until=replay.Until(time=moment), jobs=jobs), inside)


@pytest.mark.parametrize("jobs", JOBS)
def test_golden_logs_verify_on_the_fast_path(golden: Path, jobs: int) -> None:
    """The read model stored with each golden log matches the fast fold."""
    assert replay.verify_file(golden, jobs=jobs) == []


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_other_processes_forked_or_spawned_fold_alike(
    golden: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the other processes are forked (no thread running) or spawned (threads running), the result is the
    plain fold's, for a replay and for a verify."""
    monkeypatch.setattr(_replay_jobs, "_context", lambda: multiprocessing.get_context(method))
    assert_same(replay.replay_file(golden, jobs=3), read_records(golden))
    assert replay.verify_file(golden, jobs=3) == []


def test_two_jobs_split_the_connections_in_two(golden: Path) -> None:
    """With two jobs, a log of several connections is folded in two ranges that cover every stream once."""
    streams = sorted({r.stream for r in read_records(golden)})
    with closing(scan.open_log(golden)) as db:
        parts = scan.bounds(db, [0.5, 0.5], scan.head(db))
    assert len(parts) == min(2, len(streams))
    covered = [s for s in streams for low, high in parts if (low is None or s >= low) and (high is None or s < high)]
    assert covered == streams


# -- a hypothesis-generated log ---------------------------------------------------------------

REFS = [
    ConnectionRef("dev", "salesforce", "c1"),
    ConnectionRef("dev", "hubspot", "c2"),
    ConnectionRef("prod", "salesforce", "tenant/42"),
    ConnectionRef("prod", "slack", "ünïcode-✓"),
]
TYPES = sorted({e.value for e in LifecycleEvent} | {f.value for f in Fact} | {"future-fact"})


@st.composite
def candidates(draw: st.DrawFn) -> tuple[int, str, str, dict[str, Any]]:
    """A record someone might append: its connection (an index), type, cause (current, older, none) and data."""
    type_ = draw(st.sampled_from(TYPES))
    data: dict[str, Any] = {}
    if type_ in set(LifecycleEvent):
        config = draw(st.sampled_from([{}, {"region": "eu"}, {"region": "us", "n": 1.5}, {"big": 2**70}]))
        data = {"config": config, "payload": {"k": draw(st.integers(0, 3))}}
    elif type_ == Fact.CONNECTION_REJECTED:
        data = {"reason": draw(st.sampled_from(["bad key", "expired", ""])), "function": "check"}
    elif type_ == Fact.METADATA_UPDATED:
        metadata = draw(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.integers(-9, 9), st.none())))
        data = {"function": "f", "metadata": metadata, "merge": draw(st.booleans())}
    elif type_.startswith("function-"):
        data = {
            "function": draw(st.sampled_from(["f", "g", "h"])),
            "attempt": draw(st.integers(0, 4)),
            "error": draw(st.sampled_from(["", "boom", "ünïcode ✗"])),
            "duration_ms": draw(st.integers(0, 10_000)),
        }
    elif type_.startswith("credentials-"):
        data = {"fingerprint": "abcd", "key_id": "k1"}
    return draw(st.integers(0, len(REFS) - 1)), type_, draw(st.sampled_from(["current", "older", ""])), data


CREATE = {"config": {"region": "eu"}, "payload": {}}


async def write_log(path: Path, plan: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    """Write ``plan`` to a new SQLite log at ``path``."""
    async with open_store(f"sqlite://{path}") as store:
        await append_plan(store, plan)


async def append_plan(store: EventStore, plan: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    """Append each candidate the fold admits to ``store`` (a connection that does not exist yet is created first,
    so that most candidates are admitted)."""
    causes: dict[str, list[str]] = {}
    if True:
        for index, type_, cause, data in plan:
            ref = REFS[index]
            lifecycles = causes.setdefault(ref.stream, [""])
            if await store.get_connection(ref) is None and type_ not in set(LifecycleEvent):
                created = NewEvent(str(uuid7()), LifecycleEvent.POST_CONNECTION_CREATION.value, CREATE)
                await store.append(ref, 0, [created])
                lifecycles.append(created.event_id)
            current = await store.get_connection(ref)
            event = NewEvent(
                str(uuid7()),
                type_,
                data,
                causation_id=lifecycles[-1] if cause == "current" else lifecycles[0] if cause == "older" else "",
            )
            probe = Record(0, ref.stream, 0, event.event_id, type_, data, codec.from_micros(0), event.causation_id)
            try:
                state.apply(current, probe)
            except InvalidTransition:
                continue
            await store.append(ref, current.version if current is not None else 0, [event])
            if type_ in set(LifecycleEvent):
                lifecycles.append(event.event_id)


@contextmanager
def generated(plan: list[tuple[int, str, str, dict[str, Any]]]) -> Iterator[Path]:
    """A new SQLite log holding what ``plan`` appends (a fresh directory per hypothesis example)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "events.db"
        anyio.run(write_log, path, plan)
        yield path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(candidates(), min_size=1, max_size=60), cut=st.integers(0, 80))
def test_a_generated_log_replays_as_the_plain_fold(plan: list[tuple[int, str, str, dict[str, Any]]], cut: int) -> None:
    """Random valid lives of several connections (every record type, big ints and floats in the data): the fast
    path in one process and in two folds them as the plain fold does, whole and up to a position; verify agrees."""
    with generated(plan) as path:
        records = read_records(path)
        for jobs in JOBS:
            assert_same(replay.replay_file(path, jobs=jobs), records)
            assert_same(replay.replay_file(path, until=replay.Until(position=cut), jobs=jobs), records[:cut])
            assert replay.verify_file(path, jobs=jobs) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(candidates(), min_size=1, max_size=60))
def test_a_generated_log_in_memory_replays_as_the_plain_fold(plan: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    """Another backend (the memory store) replays through the store, into the same drafts: as the plain fold."""

    async def main() -> None:
        store = MemoryEventStore()
        try:
            await append_plan(store, plan)
            records = await store.read(limit=ALL)
            assert_same(await replay.replay(store), records)
            assert await replay.verify(store) == []
        finally:
            store.close()

    anyio.run(main)


# -- verify --------------------------------------------------------------------------------------


def tamper(path: Path) -> list[str]:
    """Plant three differences in the read model of the log at ``path``: a changed state, a missing row and a row
    of no stream; returns the streams it changed, sorted."""
    with closing(sqlite3.connect(path)) as db, db:
        first, second = (row[0] for row in db.execute("SELECT stream FROM connections ORDER BY stream LIMIT 2"))
        db.execute(
            "UPDATE connections SET body = json_set(body, '$.state', 'pending', '$.metadata.planted', 1)"
            " WHERE stream = ?",
            (first,),
        )
        db.execute("DELETE FROM connections WHERE stream = ?", (second,))
        db.execute(
            "INSERT INTO connections SELECT 'zz/planted/row', 'zz', 'planted', 'row', state, version, last_position,"
            " body FROM connections WHERE stream = ?",
            (first,),
        )
    return [first, second, "zz/planted/row"]


@pytest.mark.parametrize("jobs", JOBS)
def test_verify_names_each_difference_planted_in_the_read_model(tmp_path: Path, jobs: int) -> None:
    """A changed row, a missing row and an extra row are each reported, as the field-by-field diff says them."""
    log = tmp_path / "events.db"
    shutil.copyfile(GOLDEN[0] / "events.db", log)
    replayed = state.fold_all(read_records(log))
    first, second, extra = tamper(log)
    with closing(sqlite3.connect(log)) as db:
        body = json.loads(db.execute("SELECT body FROM connections WHERE stream = ?", (first,)).fetchone()[0])
    want = replayed[first]
    assert replay.verify_file(log, jobs=jobs) == [
        replay.Difference(first, "metadata", body["metadata"], want.metadata),
        replay.Difference(first, "state", "pending", want.state.value),
        replay.Difference(second, "row", "missing", "present"),
        replay.Difference(extra, "row", "present", "missing"),
    ]


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "65", "two", ""])
def test_a_bad_jobs_value_is_a_usage_error(tmp_path: Path, value: str) -> None:
    """``--jobs`` takes a number of processes from 1 to 64; anything else is refused before the log is read."""
    result = CliRunner().invoke(main, ["replay", "--database", str(tmp_path / "none.db"), "--jobs", value])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--jobs'" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("jobs", [0, -2])
def test_replay_refuses_jobs_below_one(golden: Path, jobs: int) -> None:
    """The library refuses a count of processes below one with a clear error."""
    with pytest.raises(InvalidArgument, match="at least 1"):
        replay.replay_file(golden, jobs=jobs)
    with pytest.raises(InvalidArgument, match="at least 1"):
        replay.verify_file(golden, jobs=jobs)


def test_a_refused_record_in_another_process_fails_the_replay(tmp_path: Path) -> None:
    """A record the rules refuse, in the range another process folds, fails the replay with its position."""
    log = tmp_path / "events.db"
    shutil.copyfile(GOLDEN[0] / "events.db", log)
    with closing(sqlite3.connect(log)) as db, db:
        last = db.execute("SELECT MAX(stream) FROM connections").fetchone()[0]
        position, version = db.execute(
            "SELECT MAX(position) + 1, (SELECT MAX(version) + 1 FROM events WHERE stream = ?) FROM events", (last,)
        ).fetchone()
        db.execute(
            "INSERT INTO events (position, stream, version, event_id, type, data, recorded_at, schema_version)"
            " VALUES (?, ?, ?, 'planted', 'connection-deleted', '{}', 0, 1)",
            (position, last, version),
        )
    with closing(scan.open_log(log)) as db:
        assert last >= scan.bounds(db, [0.5, 0.5], scan.head(db))[1][0], (
            "the planted record is in the range another process folds"
        )
    records = read_records(log)
    assert state.fold_all(records[:-1])[last].state is not ConnectionState.DELETING  # so the planted record is refused
    with pytest.raises(InvalidTransition) as plain:
        state.fold_all(records)
    with pytest.raises(InvalidTransition) as fast:
        replay.replay_file(log, jobs=2)
    assert str(fast.value) == str(plain.value)
    assert f"position {position}" in str(fast.value)


def test_a_missing_log_is_refused_and_not_created(tmp_path: Path) -> None:
    """The fast path refuses a missing file as the store does, and creates nothing."""
    with pytest.raises(StoreError, match="no event log at"):
        replay.replay_file(tmp_path / "absent.db", jobs=2)
    assert list(tmp_path.iterdir()) == []


# -- drafts ------------------------------------------------------------------------------------------


def test_a_packed_draft_unpacks_to_the_same_connection(golden: Path) -> None:
    """What another process sends (Draft.pack) freezes, once unpacked, to the connection the draft freezes to."""
    with closing(scan.open_log(golden)) as db:
        drafts: dict[str, state.Draft[int]] = {}
        for page in scan.rows(db, scan.head(db)):
            state.fold_rows(drafts, page, json.loads)
    assert drafts
    for draft in drafts.values():
        again = state.Draft.unpack(draft.pack())
        assert again.freeze(codec.from_micros) == draft.freeze(codec.from_micros)


# -- output ------------------------------------------------------------------------------------------

ODD_VALUES: list[Any] = [
    1.5,
    1e16,
    2**70,
    -(2**63),
    2**64 - 1,
    float("nan"),
    "é✓😀\u2028\x00\x1f\x7f",
    None,
    True,
    [],
    {},
    {"nested": [1, {"deep": 0.1}]},
]


@pytest.mark.parametrize("value", ODD_VALUES, ids=[repr(v)[:20] for v in ODD_VALUES])
def test_replay_json_is_the_same_text_written_a_part_at_a_time(
    golden: Path, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``replay --json`` writes, a thousand connections at a time, the very text one ``print_json`` of the whole
    document wrote (orjson where it writes alike, json for floats, big integers and lone surrogates)."""
    from orchestrator.cli import _replay as cli_replay
    from orchestrator.cli._common import connection_json, print_json

    replayed = replay.replay_file(golden)
    rows = sorted(replayed.connections.values(), key=lambda c: c.ref)
    odd = dataclasses.replace(rows[0], metadata={"odd": value, "plain": "x"}, config={"k": [value]})
    for connections in ([], rows, [odd, *rows], [*rows] * 700):
        print_json({"position": replayed.position, "connections": [connection_json(c) for c in connections]})
        whole = capsys.readouterr().out
        cli_replay._print_connections_json(connections, replayed.position)
        assert capsys.readouterr().out == whole
    # A lone surrogate (which neither can print to UTF-8) goes to json, which writes it: orjson refuses it.
    lone = connection_json(dataclasses.replace(rows[0], rejection_reason="\ud800"))
    whole = json.dumps(lone, indent=2, sort_keys=True, ensure_ascii=False)
    assert cli_replay._indented(lone) == "    " + whole.replace("\n", "\n    ")


def test_fast_constructors_build_what_the_dataclasses_build(golden: Path) -> None:
    """The fold's constructors of frozen values (slots set directly) make objects equal to the classes' own."""
    for connection in replay.replay_file(golden).connections.values():
        fields = [getattr(connection, f.name) for f in dataclasses.fields(Connection)]
        assert state._connection(*fields) == Connection(*fields)
        mark = connection.lifecycle
        assert state._mark(mark.event_id, mark.type, mark.position, mark.version) == mark
        for outcome in connection.outcomes:
            made = state._outcome(outcome.name, outcome.status, outcome.attempts, outcome.error, outcome.duration_ms)
            assert made == outcome
            assert hash(made) == hash(outcome)


def test_default_jobs_are_one_for_a_small_log_and_the_cores_for_a_large_one() -> None:
    """Below PARALLEL_FROM records, one process; from it on, one per core this process may use."""
    assert replay.default_jobs(0) == replay.default_jobs(replay.PARALLEL_FROM - 1) == 1
    assert replay.default_jobs(replay.PARALLEL_FROM) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("jobs", JOBS)
def test_progress_is_told_positions_up_to_the_last(golden: Path, jobs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of a few records, progress is told positions that never go back, up to the last one."""
    monkeypatch.setattr(scan, "PAGE", 2)
    monkeypatch.setattr(_replay_jobs, "PROGRESS_EVERY", 1)
    told: list[int] = []
    replayed = replay.replay_file(golden, jobs=jobs, progress=told.append)
    assert told, "progress was never told"
    assert told == sorted(told)
    assert told[-1] == replayed.position
    assert len(told) > 1
