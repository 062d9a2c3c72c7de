"""Durability under SIGKILL: what the daemon acknowledged is in the log exactly once after a restart.

Eight client threads emit ``post-connection-creation`` events with unique
idempotency keys to a few connections of one daemon; after a few hundred
acknowledged calls the daemon is killed with calls in flight, restarted on the
same SQLite file, and the log is read back with ``orchestrator events --json``.
The calls that were not acknowledged are then retried with the same keys.
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.support.process import Daemon, environment, run

pytestmark = pytest.mark.slow

WORKERS = 8
STREAMS = 4
KILL_AFTER = 300
"""Acknowledged calls before the SIGKILL (a count, not a time)."""
MAX_CALLS = 3000
"""Calls at most, whatever happens (the kill normally comes long before)."""
CALL_TIMEOUT = 10.0
LOAD_TIMEOUT = 60.0


@dataclass(frozen=True)
class Attempt:
    """One emit a worker made, identified by its idempotency key."""

    integration: str
    connection: str
    key: str

    @property
    def stream(self) -> str:
        """The connection's stream name in the log."""
        return f"dev/{self.integration}/{self.connection}"

    def request(self) -> pb.EmitLifecycleEventRequest:
        """The request; the same message every time it is sent."""
        return pb.EmitLifecycleEventRequest(
            connection=pb.ConnectionRef(environment="dev", integration=self.integration, connection_id=self.connection),
            event=pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION,
            idempotency_key=self.key,
        )


@dataclass(frozen=True)
class Ack:
    """An acknowledged emit and what the daemon said about it."""

    attempt: Attempt
    event_id: str
    position: int
    version: int


class Load:
    """Workers that emit until their first failed call; the main thread kills the daemon meanwhile."""

    def __init__(self, stub: pb_grpc.OrchestratorStub, integration: str) -> None:
        self._stub = stub
        self._integration = integration
        self._lock = threading.Lock()
        self._calls = itertools.count()
        self.acked: list[Ack] = []
        self.unacked: list[tuple[Attempt, grpc.StatusCode]] = []
        self.enough = threading.Event()
        """Set once :data:`KILL_AFTER` calls are acknowledged."""

    def work(self, worker: int) -> None:
        """Emit to the connections in turn, each call with a new key, until a call fails (or the budget is spent)."""
        for n in range(MAX_CALLS):
            if next(self._calls) >= MAX_CALLS:
                return
            attempt = Attempt(self._integration, f"conn-{(worker + n) % STREAMS}", f"w{worker}-{n}")
            try:
                response = self._stub.EmitLifecycleEvent(attempt.request(), timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                with self._lock:
                    self.unacked.append((attempt, code))
                return
            assert not response.deduplicated, attempt
            with self._lock:
                self.acked.append(Ack(attempt, response.event_id, response.position, response.version))
                if len(self.acked) >= KILL_AFTER:
                    self.enough.set()


def read_log(daemon: Daemon) -> list[dict[str, Any]]:
    """Every record of the log, through ``orchestrator events --json``."""
    result = run("events", "--json", env=environment(ORCHESTRATOR_ADDRESS=daemon.address))
    assert result.code == 0, str(result)
    return result.json_lines()


def check_invariants(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Positions strictly increase, versions go 1..n per stream, ids and keys are unique; records by (stream, key)."""
    positions = [r["position"] for r in records]
    assert positions == sorted(set(positions)), "positions do not strictly increase"
    versions: dict[str, list[int]] = {}
    for record in records:
        versions.setdefault(record["stream"], []).append(record["version"])
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"{stream}: versions {seen}"
    assert len({r["event_id"] for r in records}) == len(records), "an event_id appears twice"
    keys = Counter((r["stream"], r["idempotency_key"]) for r in records if r["idempotency_key"])
    assert [key for key, count in keys.items() if count > 1] == [], "an idempotency key appears twice"
    return {(r["stream"], r["idempotency_key"]): r for r in records if r["idempotency_key"]}


def test_acknowledged_emits_survive_sigkill_exactly_once(
    start_daemon: Callable[..., Daemon], tmp_path: Path, name: str
) -> None:
    """After SIGKILL under load and a restart, every acknowledged emit is in the log once and retries land once."""
    database = tmp_path / "events.db"
    first = start_daemon(database)
    with grpc.insecure_channel(first.address) as channel:
        load = Load(pb_grpc.OrchestratorStub(channel), name)
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            workers = [pool.submit(load.work, n) for n in range(WORKERS)]
            reached = load.enough.wait(timeout=LOAD_TIMEOUT)
            # Eight workers call back to back: calls are in flight now.
            killed = first.kill()
            for worker in workers:
                worker.result(timeout=LOAD_TIMEOUT)
    assert reached, f"only {len(load.acked)} calls acknowledged in {LOAD_TIMEOUT:.0f}s"
    assert killed == -signal.SIGKILL, str(first)
    assert len(load.unacked) == WORKERS, "every worker ends with the call the kill interrupted or refused"
    # A dropped connection is UNAVAILABLE (UNKNOWN for a stream cut mid-response); any other code came from the daemon.
    assert {code for _, code in load.unacked} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN}, load.unacked

    second = start_daemon(database)
    before = read_log(second)
    by_key = check_invariants(before)
    for ack in load.acked:
        record = by_key.get((ack.attempt.stream, ack.attempt.key))
        assert record is not None, f"acknowledged {ack} is not in the log"
        assert (record["event_id"], record["position"], record["version"], record["type"]) == (
            ack.event_id,
            ack.position,
            ack.version,
            "post-connection-creation",
        )

    # Retry what was not acknowledged, with the same keys: a call that had committed is answered from the log.
    committed = {attempt: by_key.get((attempt.stream, attempt.key)) for attempt, _ in load.unacked}
    with grpc.insecure_channel(second.address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        for attempt, earlier in committed.items():
            response = stub.EmitLifecycleEvent(attempt.request(), timeout=CALL_TIMEOUT)
            assert response.deduplicated is (earlier is not None), attempt
            if earlier is not None:
                assert (response.event_id, response.position) == (earlier["event_id"], earlier["position"])

    after = read_log(second)
    by_key = check_invariants(after)
    assert after[: len(before)] == before, "records already in the log changed"
    assert len(after) == len(before) + sum(earlier is None for earlier in committed.values())
    assert {(a.attempt.stream, a.attempt.key) for a in load.acked} | {(a.stream, a.key) for a in committed} == set(
        by_key
    )

    verify = run("replay", "--verify", "--database", second.url)
    assert (verify.code, verify.out) == (0, "read model matches the log\n"), str(verify)
    assert second.stop() == 0, str(second)
