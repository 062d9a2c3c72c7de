"""Replay: ``orchestrator replay``'s fold of a whole log vs a raw ``sqlite3`` + ``json.loads`` scan of it.

The logs: connections living through ten records each, written as the
daemon would append them (validate-connection + connection-validated,
post-connection-creation, function-succeeded, metadata-updated, a reconnect,
function-failed, function-succeeded, pre-connection-deletion +
connection-deleted), 64 connections at a time so that streams interleave; at
10,000, 100,000 and 1,000,000 records (``--quick``: 3,000, 10,000 and
30,000). Writing 1M records through the store's appends would take minutes,
so :func:`build_log` builds the rows with the store's own row encoding
(:func:`~orchestrator.store._sqlite_rows.record_to_row`, checked on the first
connection) and the read model with the fold itself, bulk-inserts them in one
transaction, then opens the log with the store (its checks and migrations) and,
for the smallest log, verifies it. Each log is built once per run.

Baseline: plain :mod:`sqlite3` reading every column in pages of 5000
(``position >= ? ORDER BY position LIMIT 5000``) and ``json.loads`` of each
``data``: the floor any reader of this log pays in Python. Subject:
``orchestrator.replay.replay_file(path, jobs=N)``, what ``orchestrator
replay`` runs before it prints: every connection folded and frozen, with
``N`` the CLI's default (the number of cores) and 1. Each run is a fresh
``python -c`` process (the imports are not timed, the open is). Beside the
rate, the CPU seconds of every process of a run (baseline / replay: above 1
means replay spends less), which neighbours on a shared machine move less than
the rate; and peak RSS, each process's own high-water mark (``ru_maxrss``):
the replaying process's, and its largest worker's (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._harness import Settings, in_child, log, median, paired_ratio

RECORDS_PER_CONNECTION = 10
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (3_000, 10_000, 30_000)
_WRITERS = 64
_COLUMNS = (
    "position, stream, version, event_id, type, data, recorded_at, "
    "causation_id, traceparent, idempotency_key, schema_version"
)
_TIMEOUT = 600


# -- the logs --------------------------------------------------------------------------------


def build_log(path: str, records: int) -> dict[str, Any]:
    """Write about ``records`` records (a multiple of ten) to a new log at ``path``; runs in a child process."""
    import sqlite3

    import anyio

    from orchestrator import codec, state
    from orchestrator.ids import uuid7
    from orchestrator.records import Record
    from orchestrator.replay import verify_file
    from orchestrator.store import open_store
    from orchestrator.store._sqlite_rows import RECORD_COLUMNS, connection_to_row, record_to_row

    started = time.perf_counter()
    connections = max(1, records // RECORDS_PER_CONNECTION)

    async def open_once() -> None:
        async with open_store(f"sqlite://{path}"):
            pass

    anyio.run(open_once)  # a new, migrated, empty log

    config = {"instance_url": "acme.my.salesforce.com", "region": "eu"}

    def function(name: str, attempt: int, **extra: Any) -> dict[str, Any]:
        return {"function": name, "attempt": attempt, "duration_ms": 40 + attempt, **extra}

    failure = function("register-webhook", 1, error="TimeoutError: provider took too long", retryable=True)
    # One life: eight appends of (type, data, cause); a cause is the index of the lifecycle record it follows.
    validate = ("validate-connection", {"config": config, "payload": {}}, None)
    create = ("post-connection-creation", {"config": config, "payload": {"source": "bench"}}, None)
    again = ("post-connection-creation", {"config": {}, "payload": {"reason": "reconnect"}}, None)
    delete = ("pre-connection-deletion", {"config": {}, "payload": {}}, None)
    appends: list[list[tuple[str, dict[str, Any] | None, int | None]]] = [
        [validate, ("connection-validated", {}, 0)],
        [create],
        [("function-succeeded", function("register-webhook", 1), 2)],
        [("metadata-updated", None, 2)],  # the metadata names the connection's own webhook
        [again],
        [("function-failed", failure, 5)],
        [("function-succeeded", function("register-webhook", 2), 5)],
        [delete, ("connection-deleted", {}, 8)],
    ]
    texts = {id(data): codec.dumps(data) for step in appends for _, data, _ in step if data is not None}
    prefix = str(uuid7())[:24]  # event ids: one UUIDv7's time and variant, then a counter
    micros = 1_767_225_600_000_000  # 2026-01-01, in microseconds
    position = 0
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")  # a bench fixture: written once, not a log to keep
        db.execute("BEGIN")
        for first in range(0, connections, _WRITERS):
            batch = range(first, min(first + _WRITERS, connections))
            rows: list[tuple[Any, ...]] = []
            lives: dict[int, tuple[str, list[str], list[Any]]] = {}
            for index in batch:
                stream = f"bench/{('salesforce', 'hubspot', 'slack')[index % 3]}/conn-{index:07d}"
                lives[index] = (stream, [], [None, 0])
            for step in appends:
                for index in batch:
                    stream, ids, (draft, version) = lives[index]
                    micros += 137
                    for type_, data, cause in step:
                        position += 1
                        version += 1
                        event_id = f"{prefix}{position:012x}"
                        ids.append(event_id)
                        if data is None:
                            data = {"function": "register-webhook", "metadata": {"webhook_id": f"wh_{index}"}}
                            text = codec.dumps(data)
                        else:
                            text = texts[id(data)]
                        causation = ids[cause] if cause is not None else ""
                        row = (position, stream, version, event_id, type_, text, micros, causation, "", "", 1)
                        if position <= RECORDS_PER_CONNECTION * _WRITERS and index == 0:
                            record = Record(
                                position, stream, version, event_id, type_, data, codec.from_micros(micros), causation
                            )
                            assert row == record_to_row(record), "the bench's rows are not the store's"
                        rows.append(row)
                        draft = state.step(draft, stream, type_, position, version, event_id, causation, micros, data)
                    lives[index] = (stream, ids, [draft, version])
            db.executemany(f"INSERT INTO events ({RECORD_COLUMNS}) VALUES ({','.join('?' * 11)})", rows)
            db.executemany(
                "INSERT INTO connections (stream, environment, integration, connection_id, state, version,"
                " last_position, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [connection_to_row(life[2][0].freeze(codec.from_micros)) for life in lives.values()],
            )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    anyio.run(open_once)  # the store takes it: its checks, a migration it may lack
    if records <= 20_000 and verify_file(Path(path)):
        raise RuntimeError(f"the bench log {path} has a read model that disagrees with its records")
    return {"records": position, "connections": connections, "seconds": time.perf_counter() - started}


def create_empty(path: str) -> None:
    """Create (and migrate) a log at ``path`` with no records; runs in a child process."""
    import anyio

    from orchestrator.store import open_store

    async def main() -> None:
        async with open_store(f"sqlite://{path}"):
            pass

    anyio.run(main)


# -- one run --------------------------------------------------------------------------------

_BASELINE = """
import json, resource, sqlite3, sys, time
path, page, columns = sys.argv[1], 5000, sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
count, position = 0, 1
while True:
    rows = db.execute(
        f"SELECT {columns} FROM events WHERE position >= ? ORDER BY position LIMIT ?", (position, page)
    ).fetchall()
    for row in rows:
        json.loads(row[5])
    count += len(rows)
    if len(rows) < page:
        break
    position = rows[-1][0] + 1
db.close()
elapsed = time.perf_counter() - started
own = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"records": count, "seconds": elapsed, "rss_mib": own.ru_maxrss / 1024, "workers_rss_mib": 0,
                  "cpu_s": own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime}))
"""

_SUBJECT = """
import json, resource, sys, time
from pathlib import Path
from orchestrator.replay import replay_file
before = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
replayed = replay_file(Path(sys.argv[1]), jobs=int(sys.argv[2]))
elapsed = time.perf_counter() - started
own, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"records": replayed.records, "connections": len(replayed.connections), "seconds": elapsed,
                  "rss_mib": own.ru_maxrss / 1024, "workers_rss_mib": workers.ru_maxrss / 1024,
                  "cpu_s": own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime + workers.ru_utime
                           + workers.ru_stime}))
"""


def _run(code: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"a replay run failed (exit code {done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["rate"] = result["records"] / result["seconds"]
    return result


def measure_one(settings: Settings, log_path: Path, records: int) -> dict[str, Any]:
    """The figures over one log: baseline, replay with ``orchestrator replay``'s default jobs and with one, paired
    round by round (one run of replay when the default is one job)."""
    from orchestrator.replay import default_jobs

    jobs = default_jobs(records)
    names = {"baseline": (_BASELINE, _COLUMNS), "replay": (_SUBJECT, str(jobs)), "replay_1": (_SUBJECT, "1")}
    if jobs == 1:
        del names["replay_1"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    _run(_BASELINE, str(log_path), _COLUMNS)  # untimed: the file into the page cache
    for round_ in range(settings.rounds):
        order = list(names) if round_ % 2 == 0 else list(reversed(names))
        for name in order:
            code, arg = names[name]
            result = _run(code, str(log_path), arg)
            if result["records"] != records:
                raise RuntimeError(f"{name} read {result['records']} records, the log has {records}")
            log(
                f"replay {records:>9,} {name:8} round {round_ + 1}: {result['rate']:,.0f} records/s"
                f" ({result['seconds']:.2f}s, CPU {result['cpu_s']:.2f}s, peak RSS {result['rss_mib']:.0f} MiB"
                f" + workers {result['workers_rss_mib']:.0f} MiB)"
            )
            runs[name].append(result)
    runs.setdefault("replay_1", runs["replay"])
    out: dict[str, Any] = {
        name: {
            "rate": median([r["rate"] for r in rs]),
            "seconds": median([r["seconds"] for r in rs]),
            "cpu_s": median([r["cpu_s"] for r in rs]),
            "rss_mib": max(r["rss_mib"] for r in rs),
            "workers_rss_mib": max(r["workers_rss_mib"] for r in rs),
            "rounds": rs,
        }
        for name, rs in runs.items()
    }
    out["records"] = records
    out["jobs"] = jobs
    out["ratio"] = paired_ratio(runs["replay"], runs["baseline"], "rate")
    out["ratio_1"] = paired_ratio(runs["replay_1"], runs["baseline"], "rate")
    # CPU seconds, every process included: what a loaded machine's neighbours cannot move much.
    out["cpu_ratio"] = paired_ratio(runs["baseline"], runs["replay"], "cpu_s")
    out["cpu_ratio_1"] = paired_ratio(runs["baseline"], runs["replay_1"], "cpu_s")
    return out


def measure(settings: Settings, workdir: Path, built: dict[int, Path] | None = None) -> dict[str, Any]:
    """The replay figures at each size; ``built`` holds logs already written this run (by record count)."""
    sizes = QUICK_SIZES if settings.rounds == 1 else SIZES
    logs = dict(built or {})
    out: dict[str, Any] = {"sizes": {}}
    for size in sizes:
        path = logs.get(size)
        if path is None:
            path = workdir / f"replay-{size}.db"
            log(f"writing a log of {size:,} records (the store's rows, bulk-inserted)")
            made = in_child(build_log, str(path), size, timeout=_TIMEOUT)
            log(f"log written: {made['records']:,} records in {made['seconds']:.1f}s")
            logs[size] = path
        out["sizes"][str(size)] = measure_one(settings, path, size)
    return out


def _jobs(count: int) -> str:
    return f"{count} job{'' if count == 1 else 's'}"


def rows(fig: dict[str, Any], number: Any) -> list[tuple[str, str, str, str]]:
    """The replay section's rows of the table (``number`` formats a figure)."""
    out: list[tuple[str, str, str, str]] = []
    for size, one in fig["sizes"].items():
        base, ours, single = one["baseline"], one["replay"], one["replay_1"]
        also = f"; {number(single['rate'])} (1 job: ratio {number(one['ratio_1'], 2)})" if one["jobs"] > 1 else ""
        out.append(
            (
                f"Replay records/s, {int(size):,} records",
                f"{number(base['rate'])} (sqlite3 + json.loads)",
                f"{number(ours['rate'])} ({_jobs(one['jobs'])}, {number(ours['seconds'], 2)} s){also}",
                number(one["ratio"], 2),
            )
        )
    if fig["sizes"]:
        size, one = max(fig["sizes"].items(), key=lambda item: int(item[0]))
        base, ours, single = one["baseline"], one["replay"], one["replay_1"]
        also = f"; {number(single['cpu_s'], 2)} (1 job: {number(one['cpu_ratio_1'], 2)})" if one["jobs"] > 1 else ""
        out.append(
            (
                f"Replay CPU s, every process, {int(size):,} records (ratio: baseline / replay)",
                f"{number(base['cpu_s'], 2)} (sqlite3 + json.loads)",
                f"{number(ours['cpu_s'], 2)} ({_jobs(one['jobs'])}){also}",
                number(one["cpu_ratio"], 2),
            )
        )
        workers = f", its worker {number(ours['workers_rss_mib'])}" if one["jobs"] > 1 else ""
        also = f"; {number(single['rss_mib'])} (1 job)" if one["jobs"] > 1 else ""
        out.append(
            (
                f"Replay peak RSS MiB, {int(size):,} records",
                f"{number(base['rss_mib'])} (sqlite3 + json.loads)",
                f"{number(ours['rss_mib'])}{workers} ({_jobs(one['jobs'])}){also}",
                number(ours["rss_mib"] / base["rss_mib"], 2),
            )
        )
    return out


def baseline(path: str) -> dict[str, Any]:
    """One run of the raw scan over the log at ``path`` (``sqlite3`` + ``json.loads``): the peer's baseline too."""
    return _run(_BASELINE, path, _COLUMNS)
