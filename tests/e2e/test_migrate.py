"""``orchestrator migrate``: an SQLite log with thousands of records, jobs and credentials, copied and verified."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import asyncpg
import pytest

from orchestrator import records, sealing
from orchestrator.model import ConnectionQuery, ConnectionRef, JobQuery, JobStatus
from orchestrator.records import Fact
from orchestrator.store import EventStore, open_store
from tests.contract.test_store_contract import (
    LIMIT_ALL,
    assert_gap_free,
    created,
    deleted,
    job,
    outcome,
    validated,
)
from tests.support.postgres import Schemas
from tests.support.process import Daemon, arun, environment, sqlite_url, start

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CONNECTIONS = 450
SECRET = sealing.generate()
KEYS = sealing.Keyring.parse(SECRET, "the test")


async def build(url: str, connections: int = CONNECTIONS) -> None:
    """A log of ``connections`` lifecycles: validated, credentials sealed, created with a job; the jobs then
    succeeded (a tenth of those connections deleted after, their credentials shredded), gave up, left running
    or queued."""
    async with open_store(url) as store:
        limit = anyio.Semaphore(64)

        async def one(i: int) -> None:
            ref = ConnectionRef("dev" if i % 2 else "prod", "acme" if i % 3 else "globex", f"c{i:04d}")
            async with limit:
                await store.append(ref, 0, validated())
                creation = created(key=f"create-{i}")
                appended = await store.append(ref, 2, creation, jobs=[job(creation[0])])
                sealed = sealing.seal(KEYS, ref, appended.connection.incarnation, {"api_key": f"secret-{i}"})
                body = records.CredentialsUpdated(sealed.fingerprint, sealed.key_id, ("api_key",), "emit")
                await store.append(ref, 3, [records.new(body)], seal=sealed)

        async with anyio.create_task_group() as tg:
            for i in range(connections):
                tg.start_soon(one, i)
        claimed = await store.claim_jobs(limit=connections * 3 // 4, lease=3600)
        for n, claim in enumerate(claimed):
            if n % 3 == 0:
                await store.finish_job(claim, [outcome(Fact.FUNCTION_SUCCEEDED, claim)])
                if n % 30 == 0:
                    current = await store.get_connection(claim.ref)
                    assert current is not None
                    await store.append(claim.ref, current.version, deleted())
            elif n % 3 == 1:
                error = "503 from the provider"
                await store.finish_job(
                    claim, [outcome(Fact.FUNCTION_FAILED, claim, error), outcome(Fact.FUNCTION_GAVE_UP, claim, error)]
                )
            # the others stay running (claimed); a quarter of the jobs were never claimed (queued)


async def contents(store: EventStore) -> tuple[object, ...]:
    """Everything a log holds, as its store reads it: records, read model, jobs, sealed rows."""
    connections = await store.list_connections(ConnectionQuery(limit=LIMIT_ALL))
    sealed = [await store.sealed_credentials(c.ref) for c in connections]
    return (
        await store.read(from_position=1, limit=LIMIT_ALL),
        connections,
        await store.list_jobs(JobQuery(limit=LIMIT_ALL)),
        sealed,
        await store.head(),
    )


async def test_a_log_of_thousands_of_records_is_copied_to_postgres_verified_and_served(
    postgres_schemas: Schemas, tmp_path: Path
) -> None:
    """Records, read model, jobs of every status and sealed rows are the same on both sides; a daemon on the copy
    serves them, and its first emit continues the positions and the connection's versions."""
    source = sqlite_url(tmp_path / "events.db")
    await build(source)
    target = await postgres_schemas.new()
    migrated = await arun("migrate", "--from", source, "--to", target, "--batch-size", "500", "--json")
    assert migrated.code == 0, str(migrated)
    report = migrated.json()
    assert report["ok"] is True and report["problems"] == []
    async with open_store(source, readonly=True) as before, open_store(target, readonly=True) as after:
        want, have = await contents(before), await contents(after)
    records, connections, jobs, sealed, head = want
    assert len(records) >= 2000 and report["head"] == head == len(records)
    assert {j.status for j in jobs} == {JobStatus.SUCCEEDED, JobStatus.GAVE_UP, JobStatus.RUNNING, JobStatus.QUEUED}
    assert any(s is None for s in sealed) and sum(s is not None for s in sealed) > CONNECTIONS // 2  # some shredded
    assert report["rows"] == {
        "events": len(records),
        "connections": len(connections),
        "jobs": len(jobs),
        "credentials": sum(s is not None for s in sealed),
    }
    assert have == want  # records verbatim (positions, ids, times, keys...), jobs with their history, sealed bytes

    active = next(c for c in connections if c.state.value == "active" and c.ref.environment == "dev")
    daemon = await anyio.to_thread.run_sync(
        partial(Daemon, tmp_path / "daemon", url=target, env=environment(ORCHESTRATOR_SECRET_KEY=SECRET))
    )
    try:
        at = environment(ORCHESTRATOR_ADDRESS=daemon.address)
        got = await arun("connections", "get", active.ref.connection_id, "-i", active.ref.integration, "--json", env=at)
        assert got.code == 0, str(got)
        assert (got.json()["state"], got.json()["version"]) == ("active", active.version)
        emitted = await arun(
            "emit", "post-connection-creation", "brand-new", "-i", "acme", "--idempotency-key", "n1", "--json", env=at
        )
        assert emitted.code == 0, str(emitted)
        assert emitted.json()["position"] > head and emitted.json()["version"] == 1
        again = await arun(
            "emit", "pre-connection-deletion", active.ref.connection_id, "-i", active.ref.integration, "--json", env=at
        )
        assert again.code == 0, str(again)
        assert again.json()["version"] > active.version
    finally:
        code = await anyio.to_thread.run_sync(daemon.signal, signal.SIGTERM)
    assert code == 0, str(daemon)
    async with open_store(target, readonly=True) as after:
        everything = await after.read(from_position=1, limit=LIMIT_ALL)
    assert_gap_free(everything)
    assert everything[: len(records)] == records
    verified = await arun("replay", "--database", target, "--verify")
    assert verified.code == 0, str(verified)


async def test_a_target_holding_records_is_refused_with_nothing_written(
    postgres_schemas: Schemas, tmp_path: Path
) -> None:
    """A second migration into the same log is refused, saying how to start over; the target is unchanged."""
    source = sqlite_url(tmp_path / "events.db")
    await build(source, connections=5)
    target = await postgres_schemas.new()
    first = await arun("migrate", "--from", source, "--to", target)
    assert first.code == 0 and "the copy matches the source" in first.out, str(first)
    async with open_store(target, readonly=True) as store:
        before = await contents(store)
    second = await arun("migrate", "--from", source, "--to", target)
    assert second.code == 1, str(second)
    assert "is not empty" in second.err and "DROP SCHEMA" in second.err, str(second)
    async with open_store(target, readonly=True) as store:
        assert await contents(store) == before


async def test_a_source_a_daemon_runs_on_is_refused(tmp_path: Path, postgres_schemas: Schemas) -> None:
    """While a daemon owns the SQLite log, migrate refuses it, naming the daemon's pid, and writes nothing."""
    database = tmp_path / "events.db"
    target = await postgres_schemas.new()
    daemon = await anyio.to_thread.run_sync(partial(Daemon, database))
    try:
        refused = await arun("migrate", "--from", sqlite_url(database), "--to", target)
    finally:
        await anyio.to_thread.run_sync(daemon.signal, signal.SIGTERM)
    assert refused.code == 1, str(refused)
    assert f"in use by pid {daemon.process.pid}" in refused.err and "stop that daemon first" in refused.err
    con = await asyncpg.connect(target, timeout=5)
    try:
        tables = await con.fetchval("SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()")
    finally:
        await con.close()
    assert tables == 0


async def test_an_interrupted_migration_leaves_the_target_empty_and_a_rerun_copies_it(
    postgres_schemas: Schemas, tmp_path: Path
) -> None:
    """Killed (SIGKILL) after its first batches, the copy (one transaction) left no row: the same command then
    copies and verifies the whole log."""
    source = sqlite_url(tmp_path / "events.db")
    await build(source, connections=150)
    target = await postgres_schemas.new()
    async with start("migrate", "--from", source, "--to", target, "--batch-size", "50") as migrating:
        await migrating.wait_for(r"migrate: copied \d+ of \d+ rows")
        assert await migrating.stop(signal.SIGKILL) == -signal.SIGKILL
    con = await asyncpg.connect(target, timeout=5)
    try:
        counts = [await con.fetchval(f"SELECT COUNT(*) FROM {t}") for t in ("events", "connections", "jobs")]
        head = await con.fetchval("SELECT position FROM log_head")
    finally:
        await con.close()
    assert (counts, head) == ([0, 0, 0], 0)
    rerun = await arun("migrate", "--from", source, "--to", target, "--json")
    assert rerun.code == 0 and rerun.json()["ok"] is True, str(rerun)


async def test_sqlite_to_sqlite_copies_the_same_rows(tmp_path: Path) -> None:
    """An SQLite target (made when missing) gets the same rows; no PostgreSQL needed."""
    source = sqlite_url(tmp_path / "events.db")
    await build(source, connections=20)
    target = sqlite_url(tmp_path / "copy" / "events.db")
    migrated = await arun("migrate", "--from", source, "--to", target, "--json")
    assert migrated.code == 0 and migrated.json()["ok"] is True, str(migrated)
    async with open_store(source, readonly=True) as before, open_store(target, readonly=True) as after:
        assert await contents(after) == await contents(before)
    same = await arun("migrate", "--from", source, "--to", source)
    assert same.code != 0 and "the source itself" in same.err, str(same)
