"""Store append: one SQLite transaction per event vs ``SQLiteEventStore.append`` (group commit).

Baseline: plain :mod:`sqlite3` on a fresh file in WAL mode with
``synchronous=FULL``, the orchestrator's own schema (its migration, so the
table and indexes are the same), one ``BEGIN; INSERT; COMMIT`` per event, one
caller: what an append costs when every event pays its own fsync.

Subject: ``orchestrator.store.open_store("sqlite:///...")`` on a fresh file,
``append`` of one ``post-connection-creation`` event at a time from 1 or 64
concurrent appenders (each owning its connections, so none conflicts), on
uvloop when importable as the daemon runs. Each append is acknowledged only
once durable; concurrent ones share a commit.
"""

from __future__ import annotations

import sqlite3
import time
from importlib import resources
from pathlib import Path
from typing import Any

from bench._harness import Settings, closed_loop, in_child, log, median, paired_ratio, percentile

APPENDERS = (1, 64)
CONNECTIONS_PER_APPENDER = 64
_CONFIG = {"instance_url": "acme.my.salesforce.com"}
_PAYLOAD = {"source": "bench", "scopes": ["api", "refresh_token"]}


def _schema() -> str:
    return (resources.files("orchestrator.store") / "sql" / "sqlite" / "0001_initial.sql").read_text(encoding="utf-8")


def baseline(path: str, warmup_s: float, duration_s: float, max_ops: int) -> dict[str, Any]:
    """One INSERT + COMMIT per event with sqlite3, one caller; runs in a child process."""
    from orchestrator import codec
    from orchestrator.ids import uuid7

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(_schema())
        versions: dict[str, int] = {}
        data = codec.dumps({"config": _CONFIG, "payload": _PAYLOAD})
        sql = (
            "INSERT INTO events (stream, version, event_id, type, data, recorded_at, causation_id, traceparent,"
            " idempotency_key, schema_version) VALUES (?, ?, ?, ?, ?, ?, '', '', '', 1)"
        )
        n = 0
        opened = time.perf_counter() + warmup_s
        closes = opened + duration_s
        latencies: list[float] = []
        ended = opened
        while len(latencies) < max_ops:
            began = time.perf_counter()
            if began >= closes:
                break
            stream = f"bench/salesforce/a0-{n % CONNECTIONS_PER_APPENDER}"
            version = versions.get(stream, 0) + 1
            db.execute("BEGIN IMMEDIATE")
            db.execute(sql, (stream, version, str(uuid7()), "post-connection-creation", data, time.time_ns() // 1000))
            db.execute("COMMIT")
            versions[stream] = version
            n += 1
            if began >= opened:
                ended = time.perf_counter()
                latencies.append(ended - began)
    finally:
        db.close()
    latencies.sort()
    elapsed = ended - opened
    return {
        "ops": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "errors": 0,
        "first_error": "",
        "in_flight": 1,
    }


def store(path: str, appenders: int, warmup_s: float, duration_s: float, max_ops: int) -> dict[str, Any]:
    """``SQLiteEventStore.append`` from ``appenders`` concurrent tasks; runs in a child process."""
    import anyio

    from orchestrator.ids import uuid7
    from orchestrator.model import ConnectionRef
    from orchestrator.records import NewEvent
    from orchestrator.store import open_store

    async def main() -> dict[str, Any]:
        async with open_store(f"sqlite://{path}") as events:
            versions: dict[ConnectionRef, int] = {}

            async def call(worker: int, n: int) -> None:
                ref = ConnectionRef("bench", "salesforce", f"a{worker}-{n % CONNECTIONS_PER_APPENDER}")
                event = NewEvent(
                    event_id=str(uuid7()),
                    type="post-connection-creation",
                    data={"config": _CONFIG, "payload": _PAYLOAD},
                )
                appended = await events.append(ref, versions.get(ref, 0), [event])
                versions[ref] = appended.connection.version

            return await closed_loop(
                call, in_flight=appenders, warmup_s=warmup_s, duration_s=duration_s, max_ops=max_ops
            )

    options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401 - optional, as for the daemon

        options["use_uvloop"] = True
    except ImportError:
        pass
    return anyio.run(main, backend="asyncio", backend_options=options)


def measure(settings: Settings, workdir: Path) -> dict[str, Any]:
    """The append figures: the baseline, the store at each concurrency, and their ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], **{f"store_{a}": [] for a in APPENDERS}}
    timeout = settings.warmup_s + settings.duration_s + 120
    for round_ in range(settings.rounds):
        order = ["baseline", *(f"store_{a}" for a in APPENDERS)]
        if round_ % 2:
            order.reverse()
        for name in order:
            path = workdir / f"append-{name}-{round_}.db"
            if name == "baseline":
                args: tuple[Any, ...] = (str(path),)
                fn: Any = baseline
            else:
                args = (str(path), int(name.split("_")[1]))
                fn = store
            result = in_child(fn, *args, settings.warmup_s, settings.duration_s, settings.max_ops, timeout=timeout)
            log(f"append {name:9} round {round_ + 1}: {result['rate']:,.0f} appends/s, errors {result['errors']}")
            runs[name].append(result)
            for leftover in workdir.glob(f"{path.name}*"):
                leftover.unlink()
    out: dict[str, Any] = {
        name: {
            "rate": median([r["rate"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "first_error": next((r["first_error"] for r in rs if r.get("first_error")), ""),
            "rounds": rs,
        }
        for name, rs in runs.items()
    }
    out["ratio"] = {str(a): paired_ratio(runs[f"store_{a}"], runs["baseline"], "rate") for a in APPENDERS}
    return out
