"""Three ``orchestrator serve`` daemons on one PostgreSQL log, under concurrent clients, a SIGKILL and a long pause.

What the issue asks of several daemons, shown with real processes:

- many clients emit at once, round-robin over the daemons, to connections they share:
  every acknowledged emit is in the log once, each connection's versions have no gap,
  and ``ReadEvents(follow)`` on every daemon delivers every record, the others' too, in
  position order;
- a daemon killed (SIGKILL) in the middle of a slow job: another daemon runs the job
  once its lease (``--database-lease``) runs out;
- a daemon paused (SIGSTOP) in the middle of a slow job, and resumed (SIGCONT) once
  another daemon has run it: its late outcome is refused;
- ``orchestrator replay --verify`` finds the read model in step with the log.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import grpc
import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.model import JobQuery, JobStatus
from orchestrator.records import Fact
from orchestrator.store import open_store
from tests.contract.test_store_contract import LIMIT_ALL, assert_gap_free
from tests.support import grpc as rpc
from tests.support.plugins import LEASE, PLUGIN, install, pythonpath
from tests.support.postgres import Schemas
from tests.support.process import Daemon, arun, environment
from tests.support.provider import ProviderServer, Reply

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(120)]

LEASE_SECONDS = 1.5
"""The daemons' ``--database-lease``: how soon a dead or paused daemon's job is taken over."""
CLIENTS = 12
EMITS = 20
"""Emits per client."""
SHARED = 6
"""Connections the clients emit to, all of them to each."""
WAIT = 30.0


class Follower:
    """``ReadEvents(follow=true)`` on one daemon from position 1, keeping what it delivers."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen: list[pb.EventRecord] = []
        self._changed = anyio.Event()

    async def run(self) -> None:
        """Follow until cancelled, or until the daemon goes away."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = pb_grpc.OrchestratorStub(channel).ReadEvents(pb.ReadEventsRequest(from_position=1, follow=True))
            try:
                async for record in call:
                    self.seen.append(record)
                    self._changed.set()
                    self._changed = anyio.Event()
            except grpc.aio.AioRpcError:
                return  # its daemon was killed
            finally:
                call.cancel()

    async def reached(self, position: int) -> None:
        """Return once a record at ``position`` or later was delivered."""
        with anyio.fail_after(WAIT):
            while not self.seen or self.seen[-1].position < position:
                await self._changed.wait()


async def emit_all(addresses: list[str]) -> list[tuple[str, str, int, int]]:
    """``CLIENTS`` clients, each ``EMITS`` emits round-robin over the daemons to the shared connections at once;
    every acknowledged emit as (stream, idempotency key, position, version)."""
    acknowledged: list[tuple[str, str, int, int]] = []

    async def client(c: int) -> None:
        channels = [grpc.aio.insecure_channel(address) for address in addresses]
        try:
            stubs = [pb_grpc.OrchestratorStub(channel) for channel in channels]
            for n in range(EMITS):
                connection = f"shared-{(c + n) % SHARED}"
                key = f"client-{c}-{n}"
                request = rpc.emit_request(rpc.CREATE, connection, "plain", idempotency_key=key)
                answer = await stubs[(c + n) % len(stubs)].EmitLifecycleEvent(request, timeout=WAIT)
                acknowledged.append((f"dev/plain/{connection}", key, answer.position, answer.version))
        finally:
            for channel in channels:
                await channel.close()

    async with anyio.create_task_group() as tg:
        for c in range(CLIENTS):
            tg.start_soon(client, c)
    return acknowledged


def pid_of(request_path: str) -> int:
    """The daemon's pid in a ``/slow|quick/<connection>/<attempt>/<pid>`` request of the plugin."""
    return int(request_path.rsplit("/", 1)[1])


@contextmanager
def provider_for_the_plugin() -> Iterator[ProviderServer]:
    """The integration ``lease``'s provider: it answers every GET (the gates the test sets hold some)."""
    with ProviderServer() as provider:
        provider.route("GET", "/*", Reply(200, {}))
        yield provider


async def test_three_daemons_share_a_log_take_over_a_killed_ones_jobs_and_refuse_a_paused_ones_outcome(
    postgres_schemas: Schemas, tmp_path: Path
) -> None:
    """Concurrent emits over three daemons: once each, gapless, followed everywhere in order; a SIGKILLed daemon's
    job is run by another after the lease; a SIGSTOPped one's late outcome is refused; replay --verify is clean."""
    url = await postgres_schemas.new()
    made = await arun("keygen")
    assert made.code == 0, str(made)
    with provider_for_the_plugin() as provider:
        config = tmp_path / "orchestrator.toml"
        config.write_text(f'[integrations.lease]\nbase_url = "{provider.url}"\nauth = "none"\n')
        site = install(tmp_path / "site", "orchestrator-lease", LEASE)
        env = environment(
            ORCHESTRATOR_SECRET_KEY=made.out.strip(),
            ORCHESTRATOR_CONFIG=str(config),
            ORCHESTRATOR_DATABASE_LEASE=str(LEASE_SECONDS),
            PYTHONPATH=pythonpath(PLUGIN, site),
        )
        daemons: list[Daemon] = []
        stopped: Daemon | None = None
        try:
            for name in ("a", "b", "c"):  # one after the other: each start is awaited on a thread
                daemon = await anyio.to_thread.run_sync(partial(Daemon, tmp_path / name, url=url, env=env))
                daemons.append(daemon)
            by_pid = {d.process.pid: d for d in daemons}
            followers = [Follower(d.address) for d in daemons]
            async with anyio.create_task_group() as tg:
                for follower in followers:
                    tg.start_soon(follower.run)

                # Many clients, overlapping connections, all three daemons.
                acknowledged = await emit_all([d.address for d in daemons])
                head = max(position for _, _, position, _ in acknowledged)
                for follower in followers:
                    await follower.reached(head)

                # A daemon killed in the middle of a slow job: another runs it once the lease runs out.
                first = provider.hold("GET", "/slow/s1/*")
                await rpc.emit(daemons[0].address, rpc.CREATE, "s1", "lease")
                (slow,) = await provider.wait_for(1, "GET", "/slow/s1/*")
                killed = by_pid[pid_of(slow.path)]
                assert await anyio.to_thread.run_sync(killed.signal, signal.SIGKILL) == -signal.SIGKILL
                survivors = [d for d in daemons if d is not killed]
                (quick,) = await provider.wait_for(1, "GET", "/quick/s1/*")
                assert by_pid[pid_of(quick.path)] in survivors
                await rpc.follow_until(survivors[0].address, lambda r: is_success(r, "s1"))

                # A daemon paused in the middle of a slow job: the other runs it; resumed, its outcome is refused.
                second = provider.hold("GET", "/slow/s2/*")
                await rpc.emit(survivors[0].address, rpc.CREATE, "s2", "lease")
                (slow,) = await provider.wait_for(1, "GET", "/slow/s2/*")
                stopped = by_pid[pid_of(slow.path)]
                assert stopped in survivors
                stopped.send_signal(signal.SIGSTOP)
                (running,) = [d for d in survivors if d is not stopped]
                (quick,) = await provider.wait_for(1, "GET", "/quick/s2/*")
                assert by_pid[pid_of(quick.path)] is running
                await rpc.follow_until(running.address, lambda r: is_success(r, "s2"))
                stopped.send_signal(signal.SIGCONT)
                stopped, paused = None, stopped
                second.release.set()
                first.release.set()
                refusal = await anyio.to_thread.run_sync(
                    paused.stderr.wait_for, r"job \S+ \(registers-slowly on dev/lease/s2\) was claimed again", WAIT
                )
                assert "outcome dropped" in refusal.string

                head = await final_head(url)
                for follower in followers:
                    if follower.address != killed.address:
                        await follower.reached(head)
                tg.cancel_scope.cancel()
        finally:
            if stopped is not None:
                stopped.send_signal(signal.SIGCONT)
            codes = [await anyio.to_thread.run_sync(d.signal, signal.SIGTERM) for d in daemons]

    assert sorted(codes) == [-signal.SIGKILL, 0, 0], "\n".join(map(str, daemons))
    async with open_store(url, readonly=True) as store:
        log = await store.read(from_position=1, limit=LIMIT_ALL)
        jobs = await store.list_jobs(JobQuery(limit=LIMIT_ALL))
    assert_gap_free(log)  # positions 1..n, and each connection's versions 1..k
    by_position = {r.position: r for r in log}
    for stream, key, position, version in acknowledged:
        record = by_position[position]
        assert (record.stream, record.idempotency_key, record.version) == (stream, key, version)
    keys = Counter(r.idempotency_key for r in log if r.idempotency_key)
    assert len(acknowledged) == CLIENTS * EMITS and keys == Counter(key for _, key, _, _ in acknowledged)
    for follower in followers:
        expected = log if follower.address != killed.address else log[: len(follower.seen)]
        assert [r.event_id for r in follower.seen] == [r.event_id for r in expected], follower.address
    for connection in ("s1", "s2"):
        outcomes = [r for r in log if r.stream == f"dev/lease/{connection}" and r.type.startswith("function-")]
        assert [(r.type, r.data["attempt"]) for r in outcomes] == [(Fact.FUNCTION_SUCCEEDED.value, 2)], outcomes
    assert sorted(j.status for j in jobs) == [JobStatus.SUCCEEDED] * 2
    verified = await arun("replay", "--database", url, "--verify")
    assert verified.code == 0 and "read model matches the log" in verified.out, str(verified)


def is_success(record: pb.EventRecord, connection: str) -> bool:
    """Whether ``record`` is a function-succeeded of ``connection`` (integration lease)."""
    return record.connection.connection_id == connection and record.type == Fact.FUNCTION_SUCCEEDED.value


async def final_head(url: str) -> int:
    """The log's head, read from the database."""
    async with open_store(url, readonly=True) as store:
        return await store.head()
