"""Replay: ``orchestrator.replay.replay`` over the whole log vs reading the same rows with sqlite3.

The log is written by the orchestrator's own store (so every record is one
the fold accepts): connections go through a full life of ten records,
appended as the daemon would (validate-connection + connection-validated,
post-connection-creation, function-succeeded, metadata-updated, a reconnect,
function-failed, function-succeeded, pre-connection-deletion +
connection-deleted), 64 connections at a time so that streams interleave.

Baseline: plain :mod:`sqlite3`, the same columns in the same pages of 5000
(``position >= ? ORDER BY position LIMIT 5000``), ``json.loads`` of each
``data``: the floor any reader of this log pays. Subject: ``replay(store)``
over ``open_store(url, readonly=True)`` (build Records, fold them with
``state.apply``), on the plain asyncio loop as ``orchestrator replay`` runs.
Each run is a fresh process; the open is included in both.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench._harness import Settings, in_child, log, median, paired_ratio

RECORDS_PER_CONNECTION = 10
_WRITERS = 64
_PAGE = 5000
_COLUMNS = (
    "position, stream, version, event_id, type, data, recorded_at, "
    "causation_id, traceparent, idempotency_key, schema_version"
)


def build_log(path: str, records: int) -> dict[str, Any]:
    """Write about ``records`` records (a multiple of ten) to a new log at ``path``; runs in a child process."""
    import anyio

    from orchestrator.ids import uuid7
    from orchestrator.model import ConnectionRef
    from orchestrator.records import NewEvent
    from orchestrator.store import open_store

    connections = max(1, records // RECORDS_PER_CONNECTION)
    config = {"instance_url": "acme.my.salesforce.com", "region": "eu"}

    def event(type_: str, data: dict[str, Any], cause: str = "") -> NewEvent:
        return NewEvent(event_id=str(uuid7()), type=type_, data=data, causation_id=cause)

    def function(name: str, attempt: int, **extra: Any) -> dict[str, Any]:
        return {"function": name, "attempt": attempt, "duration_ms": 40 + attempt, **extra}

    async def life(store: Any, index: int) -> None:
        ref = ConnectionRef("bench", ("salesforce", "hubspot", "slack")[index % 3], f"conn-{index:07d}")
        version = 0

        async def append(*events: NewEvent) -> None:
            nonlocal version
            appended = await store.append(ref, version, list(events))
            version = appended.connection.version

        validate = event("validate-connection", {"config": config, "payload": {}})
        await append(validate, event("connection-validated", {}, validate.event_id))
        created = event("post-connection-creation", {"config": config, "payload": {"source": "bench"}})
        await append(created)
        await append(event("function-succeeded", function("register-webhook", 1), created.event_id))
        await append(event("metadata-updated", {"metadata": {"webhook_id": f"wh_{index}"}}, created.event_id))
        again = event("post-connection-creation", {"config": {}, "payload": {"reason": "reconnect"}})
        await append(again)
        failure = function("register-webhook", 1, error="TimeoutError: provider took too long", retryable=True)
        await append(event("function-failed", failure, again.event_id))
        await append(event("function-succeeded", function("register-webhook", 2), again.event_id))
        delete = event("pre-connection-deletion", {"config": {}, "payload": {}})
        await append(delete, event("connection-deleted", {}, delete.event_id))

    async def main() -> int:
        async with open_store(f"sqlite://{path}") as store:

            async def writer(first: int) -> None:
                for index in range(first, connections, _WRITERS):
                    await life(store, index)

            async with anyio.create_task_group() as tg:
                for first in range(_WRITERS):
                    tg.start_soon(writer, first)
            return await store.head()

    started = time.perf_counter()
    head = anyio.run(main)
    return {"records": head, "connections": connections, "seconds": time.perf_counter() - started}


def create_empty(path: str) -> None:
    """Create (and migrate) a log at ``path`` with no records; runs in a child process."""
    import anyio

    from orchestrator.store import open_store

    async def main() -> None:
        async with open_store(f"sqlite://{path}"):
            pass

    anyio.run(main)


def baseline(path: str) -> dict[str, Any]:
    """Read every row in pages and ``json.loads`` its data; runs in a child process."""
    started = time.perf_counter()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    count, position = 0, 1
    try:
        while True:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM events WHERE position >= ? ORDER BY position LIMIT ?", (position, _PAGE)
            ).fetchall()
            for row in rows:
                json.loads(row[5])
            count += len(rows)
            if len(rows) < _PAGE:
                break
            position = rows[-1][0] + 1
    finally:
        db.close()
    elapsed = time.perf_counter() - started
    return {"records": count, "seconds": elapsed, "rate": count / elapsed}


def subject(path: str) -> dict[str, Any]:
    """``replay(store)`` over the read-only store, as ``orchestrator replay`` does; runs in a child process."""
    import anyio

    from orchestrator.replay import replay
    from orchestrator.store import open_store

    async def main() -> tuple[int, int]:
        async with open_store(f"sqlite://{path}", readonly=True) as store:
            replayed = await replay(store)
        return replayed.records, len(replayed.connections)

    started = time.perf_counter()
    count, connections = anyio.run(main)
    elapsed = time.perf_counter() - started
    return {"records": count, "connections": connections, "seconds": elapsed, "rate": count / elapsed}


def measure(settings: Settings, log_path: Path, records: int) -> dict[str, Any]:
    """The replay figures over the log at ``log_path`` (``records`` long)."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "replay": []}
    for round_ in range(settings.rounds):
        for name in ("baseline", "replay") if round_ % 2 == 0 else ("replay", "baseline"):
            fn = baseline if name == "baseline" else subject
            result = in_child(fn, str(log_path), timeout=600)
            if result["records"] != records:
                raise RuntimeError(f"{name} read {result['records']} records, the log has {records}")
            log(f"replay {name:8} round {round_ + 1}: {result['rate']:,.0f} records/s ({result['seconds']:.2f}s)")
            runs[name].append(result)
    out: dict[str, Any] = {
        name: {"rate": median([r["rate"] for r in rs]), "seconds": median([r["seconds"] for r in rs]), "rounds": rs}
        for name, rs in runs.items()
    }
    out["records"] = records
    out["ratio"] = paired_ratio(runs["replay"], runs["baseline"], "rate")
    return out
