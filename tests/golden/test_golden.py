"""Golden event logs: logs written by earlier releases must still open, read, fold and verify the same.

Each folder next to this file holds one log as an earlier release wrote it
(``events.db``), every record of it (``records.jsonl``) and the connections
its fold gave then (``expected.json``); README.md says which commit wrote
them. These files are never regenerated or edited: a change that can no longer
read one of them breaks compatibility with logs already in production.

Only the names that outlive refactorings are used here: ``open_store``,
``replay.replay`` / ``verify`` / ``Until``, ``codec.connection_to_json`` /
``record_to_json``, and the store's ``read``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator import codec, replay
from orchestrator.records import RECORD_TYPES, parse
from orchestrator.store import open_store

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent
LOGS = sorted(path.parent for path in HERE.glob("*/events.db"))
PAGE = 16

KNOWN_TYPES = frozenset(
    {
        "validate-connection",
        "post-connection-creation",
        "pre-connection-deletion",
        "connection-validated",
        "connection-rejected",
        "connection-deleted",
        "function-succeeded",
        "function-failed",
        "function-gave-up",
        "function-cancelled",
        "function-retried",
        "metadata-updated",
        "credentials-updated",
        "credentials-destroyed",
    }
)
"""Every record type the orchestrator writes. Add a new type here, and a golden log that contains it."""
UNKNOWN_TYPES = frozenset({"future-fact"})
"""Types no release writes, planted to pin that the fold skips a type it does not know."""


def records_of(log: Path) -> list[dict[str, Any]]:
    """The records of ``log`` as its records.jsonl lists them."""
    lines = (log / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def expected_of(log: Path) -> dict[str, Any]:
    """The expected.json of ``log``."""
    loaded: dict[str, Any] = json.loads((log / "expected.json").read_text(encoding="utf-8"))
    return loaded


async def read_all(store: Any) -> list[dict[str, Any]]:
    """Every record of the open ``store``, in log order, in its JSON form."""
    read: list[dict[str, Any]] = []
    position = 1
    while True:
        page = await store.read(from_position=position, limit=PAGE)
        read.extend(codec.record_to_json(record) for record in page)
        if len(page) < PAGE:
            return read
        position = page[-1].position + 1


def assert_connections(connections: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """``connections`` (by stream) are ``expected`` (their JSON forms), compared stream by stream."""
    got = {stream: codec.connection_to_json(connection) for stream, connection in connections.items()}
    assert sorted(got) == sorted(expected), f"{where}: streams differ"
    for stream in sorted(expected):
        assert got[stream] == expected[stream], f"{where}: {stream}"


@pytest.fixture(params=LOGS, ids=[log.name for log in LOGS])
def log(request: pytest.FixtureRequest) -> Path:
    """One golden log's folder."""
    folder: Path = request.param
    return folder


@pytest.fixture
def url(log: Path, tmp_path: Path) -> str:
    """The URL of a copy of the log's events.db (the checked-in file is never opened)."""
    copy = tmp_path / "events.db"
    shutil.copyfile(log / "events.db", copy)
    return f"sqlite:///{copy}"


def test_golden_logs_exist() -> None:
    """The golden logs are where the tests look for them, each with its three files and nothing else."""
    assert LOGS, f"no golden logs under {HERE}"
    for log in LOGS:
        assert sorted(p.name for p in log.iterdir()) == ["events.db", "expected.json", "records.jsonl"], log.name


async def test_replay_gives_the_expected_connections(url: str, log: Path) -> None:
    """Folding the whole log read-only gives every connection exactly as the writing release did."""
    expected = expected_of(log)
    async with open_store(url, readonly=True) as store:
        replayed = await replay.replay(store)
    assert_connections(replayed.connections, expected["connections"], "the whole log")
    assert (replayed.records, replayed.position) == (expected["records"], expected["position"])


async def test_replay_until_a_position_gives_the_states_then(url: str, log: Path) -> None:
    """Folding up to an intermediate position gives the states recorded for it (time travel)."""
    expected = expected_of(log)
    assert expected["at"], f"{log.name} pins no intermediate position"
    async with open_store(url, readonly=True) as store:
        for position, connections in expected["at"].items():
            replayed = await replay.replay(store, until=replay.Until(position=int(position)))
            assert_connections(replayed.connections, connections, f"up to position {position}")


async def test_records_read_back_as_written(url: str, log: Path) -> None:
    """Every record reads back from the database with the fields and data records.jsonl holds."""
    async with open_store(url, readonly=True) as store:
        read = await read_all(store)
    assert read == records_of(log)


async def test_read_model_agrees_with_the_log(url: str) -> None:
    """The read model stored with the log agrees with its fold, read-only and after opening read-write (migrations)."""
    async with open_store(url, readonly=True) as store:
        assert await replay.verify(store) == []
    async with open_store(url) as store:
        assert await replay.verify(store) == []


async def test_replay_after_opening_read_write_is_unchanged(url: str, log: Path) -> None:
    """Opening the log read-write (which migrates it) changes neither its records nor its fold."""
    async with open_store(url):
        pass
    async with open_store(url, readonly=True) as store:
        replayed = await replay.replay(store)
        read = await read_all(store)
    assert_connections(replayed.connections, expected_of(log)["connections"], "after a read-write open")
    assert read == records_of(log)


def test_golden_logs_cover_every_record_type() -> None:
    """The golden logs together hold every known record type, and the planted unknown one."""
    seen = {record["type"] for log in LOGS for record in records_of(log)}
    assert seen == KNOWN_TYPES | UNKNOWN_TYPES


def test_known_types_are_the_types_this_release_writes() -> None:
    """The list above is ``records.RECORD_TYPES``: a new record type without a golden log fails here first."""
    assert frozenset(RECORD_TYPES) == KNOWN_TYPES


@pytest.mark.parametrize("log", LOGS, ids=lambda path: path.name)
def test_every_golden_record_parses_and_is_rebuilt_as_written(log: Path) -> None:
    """Each record's typed parser reads the old ``data``, and its constructor writes exactly that ``data`` again."""
    for record in records_of(log):
        body = parse(record["type"], record["data"])
        if record["type"] in UNKNOWN_TYPES:
            assert body is None
            continue
        assert body is not None, record["type"]
        assert body.to_data() == record["data"], f"position {record['position']} ({record['type']})"
