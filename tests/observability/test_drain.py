"""Running it in production: SIGTERM under load drains cleanly, ``serve --check``, SIGHUP reopens ``--log-file``."""

from __future__ import annotations

import itertools
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.support.grpc import CREATE, VALIDATE, emit, follow_until, records, ref
from tests.support.process import READY, arun, serve, snapshot, sqlite_url, start
from tests.support.provider import ProviderServer, Reply, write_config

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

WORKERS = 6
"""Clients emitting concurrently, each until a call of its own is refused (the test's fail_after bounds them)."""
LOADED = 12
"""Acknowledged emits before SIGTERM is sent, so that it lands in the middle of the load."""
CONCURRENCY = 4
"""The daemon's function concurrency: the attempts running (held at the provider) when SIGTERM is sent."""
GRACE = 5.0
"""The drain's grace period: the held attempts are released within milliseconds of the last refusal."""
WAIT = 30.0
STEP = 0.02
"""Seconds between looks at a log file (a file offers nothing to wait on)."""


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """A salesforce provider answering every instance's webhook registration."""
    with ProviderServer() as server:
        server.route("POST", "/*/webhooks", Reply(201, {"id": "wh"}))
        yield server


@dataclass
class Load:
    """What the clients saw."""

    answered: dict[str, pb.EmitLifecycleEventResponse] = field(default_factory=dict)
    """Connection id -> the response."""
    failed: dict[str, grpc.StatusCode] = field(default_factory=dict)
    """Connection id -> the status of a call that got no response."""
    loaded: anyio.Event = field(default_factory=anyio.Event)
    """Set once :data:`LOADED` calls are answered."""
    refused: anyio.Event = field(default_factory=anyio.Event)
    """Set once every client has had a call refused."""


async def client(address: str, worker: int, load: Load) -> None:
    """Emit post-connection-creation for fresh connections until a call fails."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        for call in itertools.count():
            connection_id = f"w{worker}-{call}"
            request = pb.EmitLifecycleEventRequest(
                connection=ref(connection_id, "salesforce"),
                event=CREATE,
                connection_config={"instance": connection_id},
            )
            try:
                load.answered[connection_id] = await stub.EmitLifecycleEvent(request, timeout=WAIT)
            except grpc.aio.AioRpcError as exc:
                load.failed[connection_id] = exc.code()
                if len(load.failed) == WORKERS:
                    load.refused.set()
                return
            if len(load.answered) >= LOADED:
                load.loaded.set()


async def watch_health(address: str, seen: list[int], watching: anyio.Event) -> None:
    """Record the health statuses the daemon reports, until it reports NOT_SERVING (or the stream ends)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for update in call:
                seen.append(update.status)
                watching.set()
                if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return  # hanging on would hold the server's stop for the whole grace period
        except grpc.aio.AioRpcError:
            pass
        finally:
            call.cancel()


async def test_sigterm_under_load_answers_every_acknowledged_call_and_loses_no_job(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """SIGTERM amid concurrent emits: exit 0 within the grace period, no INTERNAL, every job done after a restart."""
    database = tmp_path / "events.db"
    config = write_config(tmp_path / "o.toml", provider.url, auth="none")
    args = ("--config", str(config), "--grace-period", str(GRACE), "--concurrency", str(CONCURRENCY))
    load = Load()
    health: list[int] = []
    watching = anyio.Event()
    # The webhook registrations wait at the provider until the test lets them go: the attempts are
    # provably running when SIGTERM comes, and the drain provably lasts until every client has been refused.
    held = provider.hold("POST", "/*/webhooks")
    with anyio.fail_after(90):
        async with serve(database, *args) as daemon:
            stopped: dict[str, float] = {}

            async def terminate() -> None:
                await watching.wait()
                await load.loaded.wait()
                await provider.wait_for(CONCURRENCY, "POST", "/*/webhooks")  # every attempt slot is busy
                began = time.monotonic()
                daemon.process.send_signal(signal.SIGTERM)
                await load.refused.wait()  # each client kept calling until the draining daemon refused it
                held.release.set()
                stopped["code"] = await daemon.wait()
                stopped["took"] = time.monotonic() - began

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_health, daemon.address, health, watching)
                for worker in range(WORKERS):
                    tg.start_soon(client, daemon.address, worker, load)
                tg.start_soon(terminate)

        assert stopped["code"] == 0, str(daemon)
        assert stopped["took"] < GRACE + 2, f"took {stopped['took']:.1f}s to exit; grace is {GRACE}s"
        assert "Traceback" not in daemon.text, str(daemon)
        assert "received SIGTERM: draining" in daemon.text
        assert health[0] == health_pb2.HealthCheckResponse.SERVING
        assert health[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, health
        assert len(load.answered) >= LOADED
        # Calls that got no answer were refused as a closing server refuses them, never INTERNAL: UNAVAILABLE once
        # the listener is closed; CANCELLED (grpc core) for a stream that raced server.stop() and was never
        # handled. Either way nothing was written for them (checked below), so retrying them is safe.
        assert load.failed, "no call was refused: SIGTERM came after the load"
        assert set(load.failed.values()) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, load.failed

        before = snapshot(database)
        finished = [row for row in before["events"] if "function-succeeded" in row]
        assert finished, "the attempts running at SIGTERM did not finish in the grace period"
        assert before["jobs"], "no job was left for the restart: SIGTERM came too late to test the resume"
        assert len(before["jobs"]) + len(finished) == len(load.answered), "a job was lost or duplicated"

        async with serve(database, *args) as again:
            # Jobs left over resume at once; wait until every answered emit's function has succeeded.
            done: set[str] = set()

            def all_done(record: pb.EventRecord) -> bool:
                if record.type == "function-succeeded":
                    done.add(record.connection.connection_id)
                return done >= set(load.answered)

            await follow_until(again.address, all_done)
            log = await records(again.address)
            assert await again.stop() == 0, str(again)

    lifecycle = {r.connection.connection_id: r for r in log if r.type == "post-connection-creation"}
    assert set(lifecycle) == set(load.answered), "the log holds exactly the acknowledged emits"
    assert not set(lifecycle) & set(load.failed), "a call that failed was written: retrying it would not be safe"
    for connection_id, response in load.answered.items():
        record = lifecycle[connection_id]
        assert (record.event_id, record.position, record.version) == (
            response.event_id,
            response.position,
            response.version,
        )
    succeeded = Counter(r.connection.connection_id for r in log if r.type == "function-succeeded")
    assert succeeded == Counter(set(load.answered)), "every job ran to success exactly once"
    assert not [r for r in log if r.type in ("function-failed", "function-gave-up", "function-cancelled")]
    # Attempts running at SIGTERM were given the grace period to finish: nothing was called twice.
    calls = Counter(r.path for r in provider.requests)
    assert calls == Counter(f"/{c}/webhooks" for c in load.answered), calls
    assert snapshot(database)["jobs"] == []
    verified = await arun("replay", "--database", sqlite_url(database), "--verify")
    assert verified.code == 0, str(verified)


async def test_serve_check_validates_the_config_without_starting(tmp_path: Path) -> None:
    """``serve --check``: 0 and a summary on a good config; a usage error naming an unknown key or a bad value."""
    database = tmp_path / "events.db"
    good = tmp_path / "good.toml"
    good.write_text(
        'listen = "127.0.0.1:0"\ngrace_period = 2\nisolation = "process"\nprocesses = 2\n'
        '[integrations.acme]\nbase_url = "https://x.test"\n'
    )
    checked = await arun("serve", "--config", str(good), "--database", sqlite_url(database), "--check")
    assert checked.code == 0, str(checked)
    assert "configuration is valid: listen 127.0.0.1:0" in checked.out
    assert "integration acme: base_url https://x.test, auth none" in checked.out
    assert "isolation: process, 2 worker process(es)" in checked.out
    assert "serving" not in checked.err
    assert not database.exists(), "--check opened the log"

    unknown = tmp_path / "unknown.toml"
    unknown.write_text('listen = "127.0.0.1:0"\nlisten_port = 50051\n')
    refused = await arun("serve", "--config", str(unknown), "--database", sqlite_url(database), "--check")
    assert refused.code == 2, str(refused)  # docs/cli.md: a bad option or config key is a usage error
    assert "unknown setting(s) listen_port" in refused.err
    assert refused.out == ""

    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('[integrations.acme]\nauth = "magic"\n')
    failed = await arun("serve", "--config", str(bad_value), "--database", sqlite_url(database), "--check")
    assert failed.code == 2, str(failed)  # a bad value in the file is a usage error too, naming the file
    assert failed.err.startswith(f"orchestrator: error: {bad_value}: integrations.acme.auth = 'magic'")
    assert "Traceback" not in failed.err
    assert not database.exists()


async def wait_for_line(path: Path, pattern: str) -> dict[str, object]:
    """The first JSON line of ``path`` matching ``pattern``, looking every :data:`STEP` seconds for :data:`WAIT`."""
    file = anyio.Path(path)
    for _ in range(int(WAIT / STEP)):
        if await file.exists():
            for line in (await file.read_text()).splitlines():
                if re.search(pattern, line):
                    parsed: dict[str, object] = json.loads(line)
                    return parsed
        await anyio.sleep(STEP)
    raise AssertionError(f"{path} got no line matching {pattern!r}")


async def test_sighup_reopens_the_log_file(tmp_path: Path) -> None:
    """After logrotate moves ``--log-file`` away, SIGHUP makes the daemon write to a new file at the same path."""
    log_file = tmp_path / "orchestrator.log"
    rotated = tmp_path / "orchestrator.log.1"
    database = sqlite_url(tmp_path / "events.db")
    args = ("serve", "--listen", "127.0.0.1:0", "--database", database, "--log-file", str(log_file))
    # Each emit's line is at DEBUG: the test's landmarks.
    async with start(*args, "--log-level", "debug", cwd=tmp_path) as daemon:
        ready = await wait_for_line(log_file, READY.pattern)
        match = READY.search(str(ready["message"]))
        assert match is not None
        address = f"127.0.0.1:{match[1]}"
        await emit(address, VALIDATE, "before", "plain")
        await wait_for_line(log_file, "validate-connection dev/plain/before")

        log_file.rename(rotated)
        daemon.process.send_signal(signal.SIGHUP)
        await wait_for_line(log_file, "received SIGHUP: log file reopened")
        await emit(address, VALIDATE, "after", "plain")
        line = await wait_for_line(log_file, "validate-connection dev/plain/after")
        assert line["state"] == "pending"
        assert await daemon.stop() == 0
        assert daemon.text == "", "with --log-file nothing goes to stderr"

    old, new = rotated.read_text(), log_file.read_text()
    assert "dev/plain/before" in old and "dev/plain/after" not in old
    assert "dev/plain/after" in new and "dev/plain/before" not in new
    assert "stopped; the event log is closed" in new
