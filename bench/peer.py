"""A peer: the ``eventsourcing`` library (PyPI) storing the same events in SQLite, against the same baselines.

``eventsourcing`` is Python's best-known event-sourcing library: aggregates
whose methods record domain events, an ``Application`` that saves them through
a recorder, and a SQLite recorder (``PERSISTENCE_MODULE=eventsourcing.sqlite``,
``SQLITE_DBNAME``: WAL, one transaction per ``save``, SQLite's default
``synchronous=FULL``, so an acknowledged save is on disk as ours is). Its
aggregate here, :class:`PeerConnection`, has one method per record type of a
connection's life, each carrying the data our record carries; its state is a
small part of our fold's (state, config, metadata, the functions' outcomes).

Two figures, each a ratio to the baseline of the same figure of ours,
measured in the same run, back to back:

- **appends/s**: one event per ``save`` (a ``post-connection-creation``, its
  config and payload), from 1 caller and from 64 threads (its API is
  synchronous; its connection pool lets writers in one at a time), each
  caller owning 64 aggregates as in the store section; baseline: plain
  ``sqlite3``, one ``INSERT`` + ``COMMIT`` per event (``bench/append.py``).
- **replay records/s**: the replay section's lives (ten records per
  connection, 64 connections interleaved) saved with ``eventsourcing``, then
  read back in order through its notification log in pages of 5,000, each
  event rebuilt as its domain event and applied to its aggregate (the
  library's own way of reconstructing aggregates); baseline: plain
  ``sqlite3`` + ``json.loads`` over our log of the same records
  (``bench/fold.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import time
from pathlib import Path
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench import append, fold
from bench._harness import Settings, closed_loop, in_child, log, median, paired_ratio, run_loop, summarise

APPENDERS = (1, 64)
WINDOW_S = 2.0
"""The timed window of an appends run at most (``--quick``'s is shorter)."""
_PAGE = 5000
_CONFIG = {"instance_url": "acme.my.salesforce.com"}
_PAYLOAD = {"source": "bench", "scopes": ["api", "refresh_token"]}
_LIFE_CONFIG = {"instance_url": "acme.my.salesforce.com", "region": "eu"}
_INTERLEAVED = 64
"""Connections whose lives are saved side by side, as the replay section's log interleaves them."""


class PeerConnection(Aggregate):
    """A connection as an ``eventsourcing`` aggregate: one event per record type of ours, with the same data."""

    @event("ValidateConnection")
    def __init__(self, ref: str, config: dict[str, Any], payload: dict[str, Any]) -> None:
        self.ref = ref
        self.state = "pending"
        self.config = config
        self.metadata: dict[str, Any] = {}
        self.outcomes: dict[str, Any] = {}

    @classmethod
    def create_id(cls, ref: str, *args: Any, **kwargs: Any) -> UUID:
        """The aggregate's id is a function of the connection's reference, as our stream name is."""
        return uuid5(NAMESPACE_URL, ref)

    @event("ConnectionValidated")
    def validated(self) -> None:
        """``connection-validated``."""

    @event("PostConnectionCreation")
    def created(self, config: dict[str, Any], payload: dict[str, Any]) -> None:
        """``post-connection-creation``: active, a non-empty config replaces the stored one."""
        self.state = "active"
        if config:
            self.config = config
        self.outcomes = {}

    @event("FunctionSucceeded")
    def function_succeeded(self, function: str, attempt: int, duration_ms: int) -> None:
        """``function-succeeded``."""
        self.outcomes[function] = {"status": "succeeded", "attempt": attempt, "duration_ms": duration_ms}

    @event("FunctionFailed")
    def function_failed(self, function: str, attempt: int, duration_ms: int, error: str, retryable: bool) -> None:
        """``function-failed``."""
        self.outcomes[function] = {"status": "failed", "attempt": attempt, "error": error, "retryable": retryable}

    @event("MetadataUpdated")
    def metadata_updated(self, metadata: dict[str, Any]) -> None:
        """``metadata-updated``."""
        self.metadata.update(metadata)

    @event("PreConnectionDeletion")
    def deletion(self, config: dict[str, Any], payload: dict[str, Any]) -> None:
        """``pre-connection-deletion``."""
        self.state = "deleting"
        self.outcomes = {}

    @event("ConnectionDeleted")
    def deleted(self) -> None:
        """``connection-deleted``."""
        self.state = "deleted"


class Connections(Application[UUID]):
    """The peer's application: nothing beyond the library's own, with no snapshots."""

    is_snapshotting_enabled = False


def open_app(path: str) -> Connections:
    """The application on the SQLite file at ``path`` (created if missing)."""
    return Connections(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path})


def appends(path: str, appenders: int, warmup_s: float, duration_s: float, max_ops: int) -> dict[str, Any]:
    """One event per ``save`` from ``appenders`` callers (threads beyond one), each owning 64 aggregates.

    Runs in a child process. The first save of an aggregate records its
    creation, later ones a ``post-connection-creation``: one event each.
    """
    app = open_app(path)
    owned: dict[tuple[int, int], PeerConnection] = {}

    def save(worker: int, n: int) -> None:
        key = (worker, n % append.CONNECTIONS_PER_APPENDER)
        aggregate = owned.get(key)
        if aggregate is None:
            aggregate = owned[key] = PeerConnection(f"bench/salesforce/a{key[0]}-{key[1]}", _CONFIG, _PAYLOAD)
        else:
            aggregate.created(_CONFIG, _PAYLOAD)
        app.save(aggregate)

    async def main() -> dict[str, Any]:
        if appenders == 1:

            async def call(worker: int, n: int) -> None:
                save(worker, n)  # one caller: called directly, as the baseline calls sqlite3
                await asyncio.sleep(0)  # lets the loop close the window

        else:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=appenders)
            loop = asyncio.get_running_loop()

            async def call(worker: int, n: int) -> None:
                await loop.run_in_executor(pool, save, worker, n)

        try:
            return await closed_loop(
                call, in_flight=appenders, warmup_s=warmup_s, duration_s=duration_s, max_ops=max_ops
            )
        finally:
            if appenders > 1:
                pool.shutdown()

    try:
        return run_loop(main())
    finally:
        app.close()


def build_log(path: str, records: int) -> dict[str, Any]:
    """Save about ``records`` events (the replay section's lives, ten per connection) at ``path``; a child process.

    Lives advance side by side, :data:`_INTERLEAVED` connections at a time,
    each step of theirs saved in one transaction (``save`` of several
    aggregates), so the notification log interleaves them as our log does.
    """
    started = time.perf_counter()
    app = open_app(path)
    connections = max(1, records // fold.RECORDS_PER_CONNECTION)

    def function(name: str, attempt: int) -> dict[str, Any]:
        return {"function": name, "attempt": attempt, "duration_ms": 40 + attempt}

    steps = [
        lambda c, i: (c.validated(),),
        lambda c, i: (c.created(_LIFE_CONFIG, {"source": "bench"}),),
        lambda c, i: (c.function_succeeded(**function("register-webhook", 1)),),
        lambda c, i: (c.metadata_updated({"webhook_id": f"wh_{i}"}),),
        lambda c, i: (c.created({}, {"reason": "reconnect"}),),
        lambda c, i: (
            c.function_failed(
                **function("register-webhook", 1), error="TimeoutError: provider took too long", retryable=True
            ),
        ),
        lambda c, i: (c.function_succeeded(**function("register-webhook", 2)),),
        lambda c, i: (c.deletion({}, {}), c.deleted()),
    ]
    try:
        for first in range(0, connections, _INTERLEAVED):
            batch = {
                i: PeerConnection(f"bench/{('salesforce', 'hubspot', 'slack')[i % 3]}/conn-{i:07d}", _LIFE_CONFIG, {})
                for i in range(first, min(connections, first + _INTERLEAVED))
            }
            for step in steps:
                for i, aggregate in batch.items():
                    step(aggregate, i)  # type: ignore[no-untyped-call]  # the lambdas above
                app.save(*batch.values())
        head = app.recorder.max_notification_id() or 0
    finally:
        app.close()
    return {"records": head, "connections": connections, "seconds": time.perf_counter() - started}


def replay(path: str) -> dict[str, Any]:
    """Read every event back in order and rebuild every aggregate from them; runs in a child process."""
    started = time.perf_counter()
    app = open_app(path)
    aggregates: dict[UUID | str, Any] = {}
    count, position = 0, 1
    try:
        while True:
            notifications = app.recorder.select_notifications(position, _PAGE)
            for notification in notifications:
                domain_event: Any = app.mapper.to_domain_event(notification)
                aggregates[notification.originator_id] = domain_event.mutate(aggregates.get(notification.originator_id))
            count += len(notifications)
            if len(notifications) < _PAGE:
                break
            position = notifications[-1].id + 1
    finally:
        app.close()
    elapsed = time.perf_counter() - started
    deleted = sum(1 for a in aggregates.values() if a.state == "deleted")
    return {
        "records": count,
        "connections": len(aggregates),
        "deleted": deleted,
        "seconds": elapsed,
        "rate": count / elapsed,
    }


def measure(settings: Settings, workdir: Path, log_path: Path, records: int) -> dict[str, Any]:
    """The peer's figures: appends/s at each concurrency and replay records/s, each to our baseline's."""
    timeout = settings.warmup_s + settings.duration_s + 120
    out: dict[str, Any] = {"appenders": list(APPENDERS)}

    out["version"] = importlib.metadata.version("eventsourcing")
    # appends/s: the sqlite3 baseline, then the peer at each concurrency, order alternating per round
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], **{f"peer_{a}": [] for a in APPENDERS}}
    for round_ in range(settings.rounds):
        order = ["baseline", *(f"peer_{a}" for a in APPENDERS)]
        if round_ % 2:
            order.reverse()
        for name in order:
            path = workdir / f"peer-{name}-{round_}.db"
            window = (settings.warmup_s, min(settings.duration_s, WINDOW_S), settings.max_ops)
            if name == "baseline":
                result = in_child(append.baseline, str(path), *window, timeout=timeout)
            else:
                result = in_child(appends, str(path), int(name.split("_")[1]), *window, timeout=timeout)
            log(f"peer append {name:8} round {round_ + 1}: {result['rate']:,.0f} appends/s, errors {result['errors']}")
            runs[name].append(result)
            for leftover in workdir.glob(f"{path.name}*"):
                leftover.unlink()
    out["append"] = {name: summarise(rs) for name, rs in runs.items()}
    out["append"]["ratio"] = {str(a): paired_ratio(runs[f"peer_{a}"], runs["baseline"], "rate") for a in APPENDERS}
    # replay: the same lives in the peer's store, read back; the baseline reads our log of as many records
    peer_log = workdir / "peer-replay.db"
    built = in_child(build_log, str(peer_log), records, timeout=600)
    log(f"peer: {built['records']:,} events saved with eventsourcing in {built['seconds']:.1f}s")
    if built["records"] != records:
        raise RuntimeError(f"the peer's log has {built['records']} events, ours {records}")
    reads: dict[str, list[dict[str, Any]]] = {"baseline": [], "peer": []}
    for round_ in range(settings.rounds):
        for name in ("baseline", "peer") if round_ % 2 == 0 else ("peer", "baseline"):
            if name == "baseline":
                result = in_child(fold.baseline, str(log_path), timeout=600)
            else:
                result = in_child(replay, str(peer_log), timeout=600)
                if result["deleted"] != built["connections"]:
                    raise RuntimeError(
                        f"the peer rebuilt {result['deleted']} deleted connections of {built['connections']}"
                    )
            if result["records"] != records:
                raise RuntimeError(f"peer replay {name} read {result['records']} records, the log has {records}")
            log(f"peer replay {name:8} round {round_ + 1}: {result['rate']:,.0f} records/s ({result['seconds']:.2f}s)")
            reads[name].append(result)
    out["replay"] = {
        name: {"rate": median([r["rate"] for r in rs]), "seconds": median([r["seconds"] for r in rs]), "rounds": rs}
        for name, rs in reads.items()
    }
    out["replay"]["records"] = records
    out["replay"]["ratio"] = paired_ratio(reads["peer"], reads["baseline"], "rate")
    out["replay"]["build_seconds"] = built["seconds"]
    return out
