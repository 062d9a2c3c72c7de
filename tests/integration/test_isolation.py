"""Process isolation (``--isolation process``): event functions run in supervised worker processes.

First the pool behind the real dispatcher (real worker processes, a local HTTP
provider), then an in-process daemon whose functions run in worker processes.
The functions are ``orchestrator_isolated``'s (tests/support/plugin), found
through entry points by this process and by the workers alike; stand-in
workers (:data:`FAKE_WORKER`) send what a real one never would. Nothing waits
on time: a function that blocks or hangs calls the provider's ``/started``
first, and the tests wait for that request; the pauses between failed starts
are taken on a fake clock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
import pytest
from google.protobuf import struct_pb2

from orchestrator import sealing
from orchestrator.clock import Clock, SystemClock
from orchestrator.config import DispatchConfig, Integration
from orchestrator.context import Buffered, ConnectionInfo, Context, EventInfo, MetadataSink
from orchestrator.dispatch import Dispatcher
from orchestrator.isolation import WORKER_DIED, WORKER_ERROR, WORKER_UNAVAILABLE, ProcessPool, _wire
from orchestrator.isolation.pool import FIRST_BACKOFF, describe
from orchestrator.model import ConnectionRef, LifecycleEvent
from orchestrator.plugins import Installed
from orchestrator.provider import CredentialsUnavailable, Provider, Secrets
from orchestrator.records import MetadataUpdated
from orchestrator.retry import RetryPolicy
from orchestrator.runner import TIMEOUT, AttemptResult
from tests.support import grpc as rpc
from tests.support.clock import FakeClock
from tests.support.daemon import serving
from tests.support.plugins import BROKEN_IN_WORKERS, ISOLATED, PLUGIN, discovered, install, pythonpath
from tests.support.provider import ProviderServer, Reply, Request

pytestmark = pytest.mark.anyio

INTEGRATION = "isolated"
REF = ConnectionRef("dev", INTEGRATION, "c1")
TOKEN = "isolated-t0k3n-5e3f9a77"
"""The connection's access token: it must reach the provider, and a worker process only through ctx.credentials."""
STALE = "isolated-stale-t0k3n-0b2c4d"
"""A token the provider no longer takes (401), which the resolver replaces with :data:`TOKEN`."""
FAKE_WORKER = """
import json, os, signal, struct, sys
body = json.dumps({"t": "ready", "functions": 0, "broken": []}).encode()
os.write(1, struct.pack(">I", len(body)) + body)
os.read(0, 1 << 20)  # the attempt
if sys.argv[1].startswith("signal:"):
    os.kill(os.getpid(), int(sys.argv[1][7:]))
os.write(1, bytes.fromhex(sys.argv[1]))
os.read(0, 1)  # until it is stopped
"""
"""A worker process that says it is ready, then answers an attempt with the bytes (in hex) or the signal it is given."""
EXIT_WAIT = 10.0
"""Seconds a worker may take to notice its pipe closed (it takes milliseconds; the function would sleep 30 s)."""


def frame(message: Any) -> bytes:
    """``message`` as a worker would frame it."""
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plugin, found by this process and (through ``PYTHONPATH``) by the worker processes it starts."""
    installed = install(tmp_path / "site", "orchestrator-isolated", ISOLATED)
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.setenv("PYTHONPATH", pythonpath(PLUGIN, installed))
    return installed


@pytest.fixture
def functions(site: Path) -> dict[str, Installed]:
    """The plugin's functions by name, as the daemon discovers them."""
    return {f.name: f for f in discovered(site).functions}


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """The integration's provider: webhooks, and ``/started`` for functions to say they are running."""
    with ProviderServer() as server:
        server.route("POST", "/webhooks", Reply(201, {"id": "wh1"}))
        server.route("GET", "/started", Reply(200, {}))
        yield server


def integrations(provider: ProviderServer) -> dict[str, Any]:
    """The integration's settings: the test's provider, with a bearer token; in prod, other settings."""
    prod = {"base_url": provider.url + "/prod", "settings": {"region": "eu"}}
    return {
        INTEGRATION: Integration(
            INTEGRATION, base_url=provider.url, auth="bearer", settings={"tier": "gold"}, environments={"prod": prod}
        )
    }


VARIABLES = {"prod": {"SLACK_APP_ID": "A0PROD"}}
"""The daemon's ``[environments.prod.variables]``."""


def context(event: EventInfo) -> Context:
    """A context of connection c1 for ``event``, as a pool's attempt message is made of one."""
    integration = Integration(INTEGRATION)
    return Context(
        connection=ConnectionInfo(REF, {}),
        event=event,
        provider=Provider(httpx.AsyncClient(), integration, {}, {}),
        metadata_model=None,
        sink=Buffered({}),
    )


@asynccontextmanager
async def dispatching(
    provider: ProviderServer, size: int = 1, settings: dict[str, Any] | None = None, **pool: Any
) -> AsyncIterator[tuple[Dispatcher, ProcessPool]]:
    """A dispatcher whose attempts run in a pool of ``size`` worker processes (``pool``: its options), with the
    integrations ``settings`` (by default :func:`integrations`)."""
    async with httpx.AsyncClient() as http, anyio.create_task_group() as tg:
        processes = ProcessPool(size, **pool)
        await tg.start(processes.run)  # each worker ready (or failed), as the daemon waits before serving
        clock: Clock = SystemClock()
        chosen = settings if settings is not None else integrations(provider)
        config = DispatchConfig(variables=VARIABLES)
        yield (
            Dispatcher(clock, http=http, integrations=chosen, pool=processes, config=config),
            processes,
        )
        tg.cancel_scope.cancel()


async def attempt(
    dispatcher: Dispatcher,
    function: Installed,
    *,
    number: int = 1,
    sink: MetadataSink | None = None,
    secrets: Secrets | None = None,
    config: dict[str, Any] | None = None,
    ref: ConnectionRef = REF,
) -> AttemptResult:
    """Attempt ``number`` of ``function`` on connection ``ref`` (c1), as a job would run it (with :data:`TOKEN`
    unless ``secrets`` are given, as the vault would have opened them)."""
    event = EventInfo(LifecycleEvent.POST_CONNECTION_CREATION, {}, "event-1", number)
    return await dispatcher.attempt(
        function,
        ConnectionInfo(ref, config or {}),
        event,
        sink or Buffered({}, function.name),
        secrets=secrets if secrets is not None else Secrets({"access_token": TOKEN}),
    )


def pid(result: AttemptResult) -> int:
    """The pid the function logged (the process it ran in)."""
    match = re.search(r"\bpid (\d+)", " ".join(result.logs))
    assert match, result.logs
    return int(match[1])


async def alive(process: int) -> bool:
    """Whether process ``process`` exists (a zombie counts: nobody reaped it)."""
    return await anyio.Path(f"/proc/{process}").exists()


# -- the pool -----------------------------------------------------------------------------


async def test_provider_calls_and_metadata_writes_are_made_by_the_daemon(
    functions: dict[str, Installed], provider: ProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's ctx.post reaches the provider with the token, its writes reach the sink; the token stays here."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=exporter-secret")
    monkeypatch.setenv("ORCHESTRATOR_DATABASE", "sqlite:///daemon-only.db")
    shared = Buffered({"kept": True})
    async with dispatching(provider) as (dispatcher, pool):
        result = await attempt(dispatcher, functions["registers"], sink=shared.for_function("registers"))
        synced = await attempt(dispatcher, functions["registers-sync"], sink=shared.for_function("registers-sync"))
        [worker] = pool.pids
        environ = await anyio.Path(f"/proc/{worker}/environ").read_bytes()
        cmdline = await anyio.Path(f"/proc/{worker}/cmdline").read_bytes()
    assert (result.ok, synced.ok) == (True, True), (result, synced)
    assert pid(result) == pid(synced) == worker != os.getpid()
    assert result.logs == [f"info: registered wh1 pid {worker} metadata {{'webhook_id': 'wh1'}}"]
    posts = provider.requests_to("POST", "/webhooks")
    assert [(r.headers["authorization"], r.json()) for r in posts] == [(f"Bearer {TOKEN}", {"connection": "c1"})] * 2
    assert shared.updates == [
        MetadataUpdated("registers", {"webhook_id": "wh1"}, False),
        MetadataUpdated("registers-sync", {"sync_webhook_id": "wh1"}, True),
    ]
    assert TOKEN.encode() not in environ + cmdline
    assert b"exporter-secret" not in environ and b"daemon-only" not in environ
    assert b"PYTHONPATH=" in environ, "the worker has the daemon's environment otherwise"


async def test_a_function_that_ends_its_process_fails_retryably_and_the_next_attempt_gets_a_new_one(
    functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """os._exit(1) fails the attempt (retryable, the exit code named, its log kept); attempt 2 runs in a new process."""
    async with dispatching(provider) as (dispatcher, pool):
        died = await attempt(dispatcher, functions["exits-once"], number=1)
        again = await attempt(dispatcher, functions["exits-once"], number=2)
    assert (died.ok, died.error_type, died.retryable) == (False, WORKER_DIED, True)
    assert died.error == "the function's worker process died: exit code 1"
    assert died.logs == [f"info: pid {pid(died)}"], "a line logged before the process died is kept"
    assert again.ok, again
    assert pid(again) != pid(died)
    assert pool.starts == 2


async def test_a_hung_plain_def_is_killed_at_its_timeout_and_the_pool_keeps_its_size(
    functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """A def that never returns times out; its process is killed and replaced, and the pool never grows."""
    hung: list[AttemptResult] = []
    after: list[AttemptResult] = []
    async with dispatching(provider) as (dispatcher, pool):
        for _ in range(2):
            hung.append(await attempt(dispatcher, functions["hangs"]))
            # The next attempt (a minute to run) waits for the replacement: the hung one then finds one ready.
            after.append(await attempt(dispatcher, functions["registers"]))
        assert len(pool.pids) == 1
    for result in hung:
        assert (result.ok, result.error_type, result.error, result.retryable) == (
            False,
            TIMEOUT,
            "timed out after 1s",
            True,
        )
    assert [result.ok for result in after] == [True, True]
    # One seat: each process was reaped before the next one started, which served the next attempts.
    assert pool.starts == 3
    assert pid(hung[0]) != pid(after[0]) == pid(hung[1]) != pid(after[1]) != pid(hung[0])
    assert not await alive(pid(hung[0])) and not await alive(pid(hung[1]))


@pytest.mark.parametrize(
    ("sent", "says"),
    [
        pytest.param(frame(["not", "a", "message"]), "a frame that is not a message", id="not-a-message"),
        pytest.param(struct.pack(">I", 5) + b"\xff\xfe{{{", "a frame that is not JSON", id="not-json"),
        pytest.param(struct.pack(">I", 2**32 - 1), "a frame of 4294967295 bytes", id="too-large"),
        pytest.param(frame({"t": "surprise", "n": 1}), "a message of type 'surprise'", id="unknown-type"),
        pytest.param(frame({"t": "log", "line": "x"}), "'log'.n is NoneType", id="no-attempt-number"),
        pytest.param(
            frame({"t": "call", "n": 1, "id": 1, "op": "exec", "args": {}}), "operation 'exec'", id="unknown-call"
        ),
        pytest.param(
            frame({"t": "call", "n": 1, "id": 1, "op": "request", "args": {"method": "TRACE", "endpoint": "/"}}),
            "request method 'TRACE'",
            id="bad-method",
        ),
        pytest.param(
            frame({"t": "ended", "n": 1, "returned": None, "awaitable": "no", "raised": None, "dropped": 0}),
            "'ended'.awaitable is str",
            id="bad-field",
        ),
    ],
)
async def test_what_a_worker_should_not_send_fails_the_attempt_and_replaces_it(
    functions: dict[str, Installed], provider: ProviderServer, sent: bytes, says: str
) -> None:
    """Garbage from a worker is never trusted: the attempt fails (WorkerError, retryable) and a new process serves."""
    command = [sys.executable, "-c", FAKE_WORKER, sent.hex()]
    async with dispatching(provider, command=command) as (dispatcher, pool):
        results = [await attempt(dispatcher, functions["registers"]) for _ in range(2)]
    for result in results:
        assert (result.ok, result.error_type, result.retryable) == (False, WORKER_ERROR, True)
        assert result.error.startswith("the function's worker process sent ")
        assert says in result.error
    assert pool.starts == 2, "each attempt had a process of its own"
    assert provider.requests == []


async def test_what_a_worker_sends_for_an_earlier_attempt_is_dropped(
    functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """A call and a log line of attempt 0 (a thread a function left behind) reach neither provider nor record."""
    stale = frame({"t": "call", "n": 0, "id": 1, "op": "request", "args": {"method": "GET", "endpoint": "/started"}})
    stale += frame({"t": "log", "n": 0, "line": "info: from before"})
    ended = frame({"t": "ended", "n": 1, "returned": None, "awaitable": False, "raised": None, "dropped": 0})
    command = [sys.executable, "-c", FAKE_WORKER, (stale + ended).hex()]
    async with dispatching(provider, command=command) as (dispatcher, _):
        result = await attempt(dispatcher, functions["registers"])
    assert (result.ok, result.logs) == (True, [])
    assert provider.requests == []


async def test_a_worker_killed_by_a_signal_is_named(functions: dict[str, Installed], provider: ProviderServer) -> None:
    """A worker that dies of a signal (a segfault) fails the attempt naming the signal."""
    command = [sys.executable, "-c", FAKE_WORKER, f"signal:{int(signal.SIGSEGV)}"]
    async with dispatching(provider, command=command) as (dispatcher, _):
        result = await attempt(dispatcher, functions["registers"])
    assert (result.error_type, result.error) == (WORKER_DIED, "the function's worker process died: signal 11 (SIGSEGV)")


@pytest.mark.parametrize(("code", "words"), [(0, "exit code 0"), (3, "exit code 3"), (-9, "signal 9 (SIGKILL)")])
def test_exit_statuses_in_words(code: int, words: str) -> None:
    """How an exit status is named in an attempt's error."""
    assert describe(code) == words


@pytest.fixture
def broken_in_workers(tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also a plugin that ends each worker process that imports it (found by the workers only)."""
    broken = install(tmp_path / "broken", "orchestrator-isolated-broken", BROKEN_IN_WORKERS)
    monkeypatch.setenv("PYTHONPATH", pythonpath(PLUGIN, site, broken))


@pytest.mark.usefixtures("broken_in_workers")
async def test_a_worker_that_cannot_start_is_started_again_after_a_doubling_pause(
    functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """A plugin that kills each worker at import: one start per pause, the pause doubling; attempts fail at once."""
    clock = FakeClock()
    async with dispatching(provider, clock=clock) as (dispatcher, pool):
        await clock.wait_for_sleepers(1)
        # Time stands still, so the seat waits in its pause: no start can follow the failed one.
        assert (pool.starts, clock.next_wake) == (1, clock.now() + timedelta(seconds=FIRST_BACKOFF))
        refused = await attempt(dispatcher, functions["registers"])
        assert (refused.ok, refused.error_type, refused.retryable) == (False, WORKER_UNAVAILABLE, True)
        assert refused.error == "no worker process could be started (it exited at start (exit code 3))"
        clock.advance(FIRST_BACKOFF)
        await clock.wait_for_sleepers(1)
        assert (pool.starts, clock.next_wake) == (2, clock.now() + timedelta(seconds=2 * FIRST_BACKOFF))
        assert (await attempt(dispatcher, functions["registers"])).error == refused.error, "the same cause, again"
    assert provider.requests == []


def test_a_worker_exits_when_its_pipe_closes_even_while_a_function_holds_its_loop(
    functions: dict[str, Installed],
) -> None:
    """A worker whose function blocks its event loop still ends at once when the daemon's end of its pipe closes.

    This test process stays alive, so only the pipe's end can stop it (not the daemon's death).
    """
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.isolation.child", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert worker.stdin is not None and worker.stdout is not None
    stdin, stdout = worker.stdin, worker.stdout

    def receive() -> dict[str, Any]:
        return _wire.parse(stdout.read(_wire.size(stdout.read(_wire.HEADER.size))))

    def send(message: dict[str, Any]) -> None:
        stdin.write(_wire.frame(message))
        stdin.flush()

    try:
        assert receive()["t"] == "ready"
        event = EventInfo(LifecycleEvent.POST_CONNECTION_CREATION, {}, "event-1")
        send(_wire.attempt(1, functions["holds-the-loop"], context(event), {}))
        assert receive()["t"] == "log"
        call = receive()
        assert (call["t"], call["args"]["endpoint"]) == ("call", "/started")
        started = httpx.Response(200, request=httpx.Request("GET", "http://provider.test/started"))
        send({"t": "reply", "id": call["id"], "value": _wire.response(started)})
        assert receive() == {"t": "log", "line": "info: holding the loop", "n": 1}  # and then time.sleep(30)
        stdin.close()
        assert worker.wait(timeout=EXIT_WAIT) == 0
    finally:
        worker.kill()
        worker.wait()
        stdout.close()


# -- what else a context has, in a worker process -----------------------------------------


@pytest.mark.parametrize("name", ["shows-its-context", "shows-its-context-sync"])
async def test_a_worker_sees_the_integration_and_the_environment_as_the_daemon_does(
    functions: dict[str, Installed], provider: ProviderServer, name: str
) -> None:
    """In a worker, ctx.integration (prod's settings over the defaults) and ctx.env are the daemon's; GET and
    DELETE carry a body; update_metadata of one required field records the model's value: as in a thread."""
    provider.route("GET", "/prod/query", Reply(200, {}))
    provider.route("DELETE", "/prod/webhooks", Reply(204))
    prod = ConnectionRef("prod", INTEGRATION, "c1")
    stored = {"webhook_id": "wh1", "retries": 0}
    async with dispatching(provider) as (dispatcher, pool):
        in_worker = Buffered(stored, name)
        worker = await attempt(dispatcher, functions[name], ref=prod, sink=in_worker)
        [pid_] = pool.pids
    async with httpx.AsyncClient() as http:
        config = DispatchConfig(variables=VARIABLES)
        in_daemon = Dispatcher(SystemClock(), http=http, integrations=integrations(provider), config=config)
        in_thread = Buffered(stored, name)
        thread = await attempt(in_daemon, functions[name], ref=prod, sink=in_thread)
    assert pid_ != os.getpid()
    for result, sink in ((worker, in_worker), (thread, in_thread)):
        assert result.ok, result
        assert result.logs == [
            f"info: integration {INTEGRATION} {provider.url}/prod {{'tier': 'gold', 'region': 'eu'}}",
            "info: env {'SLACK_APP_ID': 'A0PROD'}",
            "info: metadata {'webhook_id': 'wh1', 'retries': 3}",
        ]
        assert sink.updates == [MetadataUpdated(name, {"retries": 3}, True)]
    queries = provider.requests_to("GET", "/prod/query")
    deletions = provider.requests_to("DELETE", "/prod/webhooks")
    assert [r.json() for r in queries] == [{"q": "all"}] * 2
    assert [r.body for r in deletions] == [b"id=wh1"] * 2
    assert {r.headers["authorization"] for r in queries + deletions} == {f"Bearer {TOKEN}"}


# -- ctx.credentials in a worker process -------------------------------------------------


def sdk_routes(provider: ProviderServer) -> dict[str, Any]:
    """``/me`` takes :data:`TOKEN` only (401 otherwise), ``/sdk`` anything; the connection config naming ``/sdk``."""

    def me(request: Request) -> Reply:
        if request.headers.get("authorization") == f"Bearer {TOKEN}":
            return Reply(200, {"login": "acme"})
        return Reply(401, {"error": "expired"})

    provider.route("GET", "/me", me)
    provider.route("GET", "/sdk", Reply(200, {}))
    return {"sdk_url": provider.url + "/sdk"}


def bearers(provider: ProviderServer, path: str) -> list[str]:
    """The authorization header of each request to ``GET path``."""
    return [request.headers["authorization"] for request in provider.requests_to("GET", path)]


@pytest.mark.parametrize("name", ["uses-an-sdk", "uses-an-sdk-sync"])
async def test_ctx_credentials_in_a_worker_is_answered_by_the_daemon_and_kept_out_of_the_log(
    functions: dict[str, Installed], provider: ProviderServer, name: str
) -> None:
    """A worker's ctx.credentials is the daemon's answer (an async def's SDK call carries the token); its repr names
    the keys only, and the token a function logs is redacted."""
    config = sdk_routes(provider)
    async with dispatching(provider) as (dispatcher, pool):
        result = await attempt(dispatcher, functions[name], config=config)
        [worker] = pool.pids
    assert result.ok, result
    assert pid(result) == worker != os.getpid()
    assert bearers(provider, "/me") == [f"Bearer {TOKEN}"], "the daemon's proxy injected it"
    if name == "uses-an-sdk":
        assert bearers(provider, "/sdk") == [f"Bearer {TOKEN}"], "the worker held the raw token for its SDK"
        assert result.logs == [
            f"info: pid {worker} sees Credentials(access_token=[redacted]) token [redacted]",
        ]
    else:
        assert result.logs == [f"info: pid {worker} names ['access_token'] token [redacted]"]


async def test_a_401_in_a_worker_is_refreshed_in_the_daemon_and_ctx_credentials_then_reads_the_fresh_token(
    functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """The worker's ctx.get is answered 401: the daemon's proxy asks for fresh credentials once and sends it again;
    ctx.credentials then answers with the fresh token; neither token reaches the log."""
    config = sdk_routes(provider)
    asked: list[str] = []

    async def fresh() -> dict[str, str]:
        asked.append("resolver")
        return {"access_token": TOKEN}

    secrets = Secrets({"access_token": STALE}, refresh=fresh)
    async with dispatching(provider) as (dispatcher, _):
        result = await attempt(dispatcher, functions["uses-an-sdk"], config=config, secrets=secrets)
    assert result.ok, result
    assert asked == ["resolver"]
    assert bearers(provider, "/me") == [f"Bearer {STALE}", f"Bearer {TOKEN}"]
    assert bearers(provider, "/sdk") == [f"Bearer {TOKEN}"]
    assert secrets.seen == [{"access_token": STALE}, {"access_token": TOKEN}]
    assert STALE not in " ".join(result.logs) and TOKEN not in " ".join(result.logs)


@pytest.mark.parametrize("name", ["uses-an-sdk", "uses-an-sdk-sync"])
async def test_credentials_that_cannot_be_opened_fail_the_attempt_without_retries_in_either_mode(
    functions: dict[str, Installed], provider: ProviderServer, name: str
) -> None:
    """Sealed under a key that is not configured: the proxy's call (async) or the read of ctx.credentials (def)
    raises CredentialsUnavailable in the daemon, and the attempt fails, not retried, as it does in a thread."""
    why = "the credentials of dev/isolated/c1 cannot be opened: key id 1234abcd is not configured"
    config = sdk_routes(provider)
    async with dispatching(provider) as (dispatcher, _):
        in_worker = await attempt(dispatcher, functions[name], config=config, secrets=Secrets(unavailable=why))
    async with httpx.AsyncClient() as http:
        in_daemon = Dispatcher(SystemClock(), http=http, integrations=integrations(provider))
        in_thread = await attempt(in_daemon, functions[name], config=config, secrets=Secrets(unavailable=why))
    for result in (in_worker, in_thread):
        assert (result.ok, result.error_type, result.retryable) == (False, CredentialsUnavailable.__name__, False)
        assert result.error == why
    assert provider.requests == []


def no_base_url() -> dict[str, Any]:
    """The integration's settings without a base_url: the daemon's configuration is at fault."""
    from orchestrator.config import Integration

    return {INTEGRATION: Integration(INTEGRATION, auth="bearer")}


async def test_a_misconfiguration_met_in_a_worker_is_marked_by_the_daemon_as_in_a_thread(
    functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """No base_url: the daemon's proxy refuses the worker's call; the function sees Misconfigured (rebuilt, naming
    the setting), lets it through, and the attempt comes back marked misconfigured, not retried, as in a thread."""
    async with dispatching(provider, settings=no_base_url()) as (dispatcher, _):
        in_worker = await attempt(dispatcher, functions["registers"])
    async with httpx.AsyncClient() as http:
        in_daemon = Dispatcher(SystemClock(), http=http, integrations=no_base_url())
        in_thread = await attempt(in_daemon, functions["registers"])
    for result in (in_worker, in_thread):
        assert (result.ok, result.error_type, result.retryable) == (False, "Misconfigured", False), result
        assert result.misconfigured.startswith("integration isolated has no base_url"), result
        assert "set [integrations.isolated] base_url in the daemon's config" in result.misconfigured
        assert result.error == result.misconfigured
    assert provider.requests == []


async def test_a_plugin_claiming_a_misconfiguration_in_a_worker_is_not_marked(
    functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """The mark is the daemon's finding: a worker's function raising Misconfigured of its own is a plain failure."""
    async with dispatching(provider) as (dispatcher, _):
        result = await attempt(dispatcher, functions["claims-misconfigured"])
    assert (result.ok, result.error_type, result.retryable, result.misconfigured) == (
        False,
        "Misconfigured",
        False,
        "",
    )


def test_misconfigured_is_rebuilt_in_a_worker_with_its_setting() -> None:
    """The daemon's Misconfigured reaches a worker's function as Misconfigured, its message and setting intact."""
    from orchestrator.errors import Misconfigured

    sent = Misconfigured("integration isolated has no base_url", setting="integrations.isolated.base_url")
    rebuilt = _wire.error_from(json.loads(json.dumps(_wire.error(sent))))
    assert isinstance(rebuilt, Misconfigured)
    assert (str(rebuilt), rebuilt.setting) == (str(sent), sent.setting)


# -- a daemon ----------------------------------------------------------------------------


def normalised(records: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each record's type and data, without what differs from run to run (durations, the pid in log lines)."""
    out = []
    for record in records:
        data = rpc.as_dict(record.data)
        data.pop("duration_ms", None)
        if "logs" in data:
            data["logs"] = [re.sub(r"\bpid \d+", "pid N", line) for line in data["logs"]]
        out.append((record.type, data))
    return out


async def run_registers(
    tmp_path: Path, provider: ProviderServer, function: Installed, isolation: str, key: str
) -> list[Any]:
    """The log of a daemon (``isolation``, sealing under ``key``) that ran ``function`` for one creation."""
    await anyio.Path(tmp_path / isolation).mkdir()
    async with serving(
        tmp_path / isolation, function, integrations=integrations(provider), isolation=isolation, secret_key=key
    ) as d:
        await rpc.emit(d.stub, rpc.CREATE, "c1", INTEGRATION, credentials={"access_token": TOKEN})
        await rpc.follow_until(d.stub, lambda r: r.type == "function-succeeded")
        return await rpc.records(d.stub)


async def test_a_job_in_a_worker_process_is_recorded_as_one_run_in_the_daemon(
    tmp_path: Path, functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """The same function, in a thread of the daemon and in a worker process: the same records, but for its pid."""
    key = sealing.generate()  # the same fingerprint for the same credentials in both logs
    threads = await run_registers(tmp_path, provider, functions["registers"], "thread", key)
    processes = await run_registers(tmp_path, provider, functions["registers"], "process", key)
    assert normalised(processes) == normalised(threads)
    assert [type_ for type_, _ in normalised(processes)] == [
        "post-connection-creation",
        "credentials-updated",
        "metadata-updated",
        "function-succeeded",
    ]
    [in_thread, in_process] = [rpc.as_dict(log[-1].data)["logs"][0] for log in (threads, processes)]
    assert f"pid {os.getpid()} " in in_thread
    assert f"pid {os.getpid()} " not in in_process


async def job(
    tmp_path: Path,
    provider: ProviderServer,
    function: Installed,
    until: str,
    meanwhile: Callable[[], Awaitable[Any]] | None = None,
    **dispatch: Any,
) -> tuple[list[Any], Any]:
    """A daemon running ``function`` in worker processes: a creation of c1, then (after ``meanwhile``) a validation
    of c2; c1's records up to the first ``until`` (the log is followed), and the validation's answer."""
    async with serving(
        tmp_path, function, integrations=integrations(provider), isolation="process", **dispatch
    ) as daemon:
        await rpc.emit(daemon.stub, rpc.CREATE, "c1", INTEGRATION, credentials={"access_token": TOKEN})
        if meanwhile is not None:
            await meanwhile()
        validated = await rpc.emit(daemon.stub, rpc.VALIDATE, "c2", INTEGRATION)
        log = await rpc.follow_until(daemon.stub, lambda record: record.type == until)
    return [record for record in log if record.connection.connection_id == "c1"], validated


async def test_a_function_holding_its_loop_does_not_hold_the_daemon(
    tmp_path: Path, functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """While an async def sleeps 30 s without yielding, another emit is answered; the attempt times out at 2 s."""

    async def started() -> None:
        await provider.wait_for(1, "GET", "/started")  # the function now blocks its worker's loop

    once = RetryPolicy(max_attempts=1)
    log, answered = await job(tmp_path, provider, functions["holds-the-loop"], "function-failed", started, retry=once)
    failed = rpc.as_dict(log[-1].data)
    assert (failed["error_type"], failed["error"]) == (TIMEOUT, "timed out after 2s")
    assert answered.position < log[-1].position, "the other emit was answered while the function held its loop"


async def test_a_job_whose_process_dies_is_retried_in_a_new_one(
    tmp_path: Path, functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """os._exit in a job: a retryable failure, and the retry succeeds in a new process; the daemon is unharmed."""
    log, validated = await job(tmp_path, provider, functions["exits-once"], "function-succeeded")
    failed, succeeded = (rpc.as_dict(r.data) for r in log[-2:])
    assert [r.type for r in log] == [
        "post-connection-creation",
        "credentials-updated",
        "function-failed",
        "function-succeeded",
    ]
    assert (failed["error_type"], failed["retryable"], failed["attempt"]) == (WORKER_DIED, True, 1)
    assert "retry_in_ms" in failed
    assert succeeded["attempt"] == 2
    assert failed["logs"] != succeeded["logs"], "another process (another pid) ran the retry"
    assert validated.state == rpc.PENDING


@pytest.mark.usefixtures("broken_in_workers")
async def test_a_daemon_whose_workers_cannot_start_serves_and_fails_attempts_retryably(
    tmp_path: Path, functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """No worker can start: the daemon still serves; a job's attempts fail (WorkerUnavailable) until it gives up."""
    log, validated = await job(tmp_path, provider, functions["registers"], "function-gave-up")
    failures = [rpc.as_dict(r.data) for r in log if r.type == "function-failed"]
    assert [(f["error_type"], f["retryable"]) for f in failures] == [(WORKER_UNAVAILABLE, True)] * 3
    assert "exit code 3" in failures[0]["error"]
    assert validated.state == rpc.PENDING
    assert provider.requests == []


async def test_a_validation_a_misconfigured_daemon_fails_in_a_worker_is_refused_and_writes_nothing(
    tmp_path: Path, functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """Over gRPC, the validate function in a worker process: FAILED_PRECONDITION naming the setting; no record."""
    async with serving(tmp_path, functions["checks"], integrations=no_base_url(), isolation="process") as daemon:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rpc.emit(daemon.stub, rpc.VALIDATE, "c1", INTEGRATION, credentials={"access_token": TOKEN})
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "set [integrations.isolated] base_url in the daemon's config" in (refused.value.details() or "")
        assert await rpc.records(daemon.stub) == []
    assert provider.requests == []


async def test_a_job_in_a_worker_process_gets_fresh_credentials_from_the_resolver_after_a_401(
    tmp_path: Path, functions: dict[str, Installed], provider: ProviderServer
) -> None:
    """A creation with a stale token, its function in a worker: the daemon's proxy gets 401, the resolver's token is
    sealed (source resolver) and used, by the proxy and by ctx.credentials; no token is in the log."""
    config = struct_pb2.Struct()
    config.update(sdk_routes(provider))

    async def resolver(connection: ConnectionRef) -> dict[str, str]:
        return {"access_token": TOKEN}

    async with serving(
        tmp_path, functions["uses-an-sdk"], integrations=integrations(provider), isolation="process", resolver=resolver
    ) as daemon:
        await rpc.emit(
            daemon.stub, rpc.CREATE, "c1", INTEGRATION, connection_config=config, credentials={"access_token": STALE}
        )
        log = await rpc.follow_until(daemon.stub, lambda record: record.type == "function-succeeded")
    assert [record.type for record in log] == [
        "post-connection-creation",
        "credentials-updated",
        "credentials-updated",
        "function-succeeded",
    ]
    assert [rpc.as_dict(r.data)["source"] for r in log if r.type == "credentials-updated"] == ["emit", "resolver"]
    assert bearers(provider, "/me") == [f"Bearer {STALE}", f"Bearer {TOKEN}"]
    assert bearers(provider, "/sdk") == [f"Bearer {TOKEN}"]
    written = " ".join(str(rpc.as_dict(record.data)) for record in log)
    assert STALE not in written and TOKEN not in written
