"""Event functions through a real daemon: gRPC calls, a real SQLite log and a real local HTTP provider.

Each test serves its own functions (``registry=``) for integration ``acme``,
whose base URL is the test's provider on 127.0.0.1. Functions are closures:
they signal the test with anyio events and wait on gates the test opens, so
nothing here sleeps to wait for something to happen; the log is followed
(``ReadEvents(follow=true)``) to see what the daemon did in the background.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from pydantic import BaseModel

from orchestrator import Context, NonRetryable, ProviderError, Rejected, RetryPolicy
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.config import Integration
from orchestrator.plugins import Installed
from tests.support import daemon as in_process
from tests.support import grpc as rpc
from tests.support.daemon import FAST_RETRY, Daemon
from tests.support.grpc import (
    ACTIVE,
    CREATE,
    DELETE,
    DELETED,
    FAILED,
    GAVE_UP,
    PENDING,
    REJECTED,
    SCHEDULED,
    SUCCEEDED,
    VALIDATE,
    WAIT,
    Stub,
    as_dict,
    follow_until,
    records,
)
from tests.support.process import arun
from tests.support.provider import ProviderServer, Reply, WebhookProvider

pytestmark = pytest.mark.anyio

Handler = Callable[..., Any]

TOKEN = "gho_t0k3n-0f-acme-9f8e7d"
"""The connection's access token: it must reach the provider and nothing else."""
NEVER_AGAIN = RetryPolicy(initial_interval=1e6, max_interval=1e6)
"""A retry so far away (full jitter over ~11 days) that the job surely waits for it during a test."""


# -- harness -------------------------------------------------------------------


def validator(name: str, handler: Handler, **options: Any) -> Installed:
    """A validate-connection function."""
    return in_process.function(name, "validate-connection", handler, **options)


def creator(name: str, handler: Handler, **options: Any) -> Installed:
    """A post-connection-creation function."""
    return in_process.function(name, "post-connection-creation", handler, **options)


def cleaner(name: str, handler: Handler, **options: Any) -> Installed:
    """A pre-connection-deletion function."""
    return in_process.function(name, "pre-connection-deletion", handler, **options)


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """The integration's provider: a local HTTP server on 127.0.0.1:0."""
    with ProviderServer() as server:
        yield server


def serving(
    tmp_path: Path, provider: ProviderServer, *functions: Installed, **dispatch: Any
) -> AbstractAsyncContextManager[Daemon]:
    """A daemon running ``functions`` for acme at ``provider``, with fast retries (``dispatch``: DispatchConfig)."""
    acme = {"acme": Integration("acme", base_url=provider.url, auth="bearer")}
    return in_process.serving(tmp_path, *functions, integrations=acme, **dispatch)


async def emit(
    stub: Stub,
    event: int,
    connection_id: str = "acme-1",
    *,
    credentials: dict[str, str] | None = None,
    **fields: Any,
) -> pb.EmitLifecycleEventResponse:
    """Emit ``event`` for ``connection_id`` (with the acme token unless ``credentials`` says otherwise)."""
    token = {"access_token": TOKEN} if credentials is None else credentials
    return await rpc.emit(stub, event, connection_id, credentials=token, **fields)


async def get(stub: Stub, connection_id: str = "acme-1") -> pb.Connection:
    """GetConnection."""
    return await rpc.get(stub, connection_id)


def is_(kind: str, name: str = "", **data: Any) -> Callable[[pb.EventRecord], bool]:
    """A predicate: a record of type ``kind`` (of function ``name``) whose data has ``data``."""

    def match(record: pb.EventRecord) -> bool:
        fields = as_dict(record.data)
        return (
            record.type == kind
            and (not name or fields.get("function") == name)
            and all(fields.get(k) == v for k, v in data.items())
        )

    return match


def data(record: pb.EventRecord) -> dict[str, Any]:
    """A record's data as a dict."""
    return as_dict(record.data)


def outcomes(message: pb.EmitLifecycleEventResponse | pb.Connection) -> dict[str, tuple[int, int]]:
    """Function name -> (status, attempts)."""
    return {o.name: (o.status, o.attempts) for o in message.outcomes}


def summary(log: list[pb.EventRecord]) -> list[tuple[str, str]]:
    """(type, function) of each record."""
    return [(r.type, str(data(r).get("function", ""))) for r in log]


async def hang() -> None:
    """Wait forever (until cancelled)."""
    await anyio.Event().wait()


class Counter:
    """Counts calls of a function, and lets a test await the n-th."""

    def __init__(self) -> None:
        self.count = 0
        self._reached: dict[int, anyio.Event] = {}

    def hit(self) -> int:
        """Count a call; return its number (1-based)."""
        self.count += 1
        self._reached.setdefault(self.count, anyio.Event()).set()
        return self.count

    async def reached(self, n: int) -> None:
        """Return once the n-th call happened."""
        with anyio.fail_after(WAIT):
            await self._reached.setdefault(n, anyio.Event()).wait()


# -- validate-connection ------------------------------------------------------------


async def test_validate_accepts(tmp_path: Path, provider: ProviderServer) -> None:
    """A validate function that succeeds leaves the connection PENDING with a SUCCEEDED outcome, all in the log."""
    provider.route("GET", "/user", Reply(200, {"login": "acme"}))

    async def check_token(ctx: Context) -> None:
        response = await ctx.get("/user")
        ctx.log("logged in as", response.json()["login"])

    async with serving(tmp_path, provider, validator("check-token", check_token)) as daemon:
        response = await emit(daemon.stub, VALIDATE)
        connection = await get(daemon.stub)
        log = await records(daemon.stub)

    assert response.state == PENDING
    assert response.rejection_reason == ""
    assert outcomes(response) == {"check-token": (SUCCEEDED, 1)}
    assert (connection.state, outcomes(connection)) == (PENDING, {"check-token": (SUCCEEDED, 1)})
    assert [r.type for r in log] == [
        "validate-connection",
        "credentials-updated",  # the emit's credentials, sealed: the connection lives on
        "function-succeeded",
        "connection-validated",
    ]
    assert log[0].event_id == response.event_id
    assert {r.causation_id for r in log[1:]} == {response.event_id}
    assert (data(log[1])["names"], data(log[1])["source"]) == (["access_token"], "emit")
    fact = data(log[2])
    assert (fact["function"], fact["attempt"], fact["distribution"], fact["version"]) == (
        "check-token",
        1,
        "test-plugin",
        "1.0",
    )
    assert fact["logs"] == ["info: logged in as acme"]
    assert len(provider.requests_to("GET", "/user")) == 1


async def test_validate_rejects_with_the_functions_message(tmp_path: Path, provider: ProviderServer) -> None:
    """Rejected("...") rejects the connection with "function-name: message"; the verdict is in the log."""
    provider.route("GET", "/user", Reply(200, {"login": "acme"}, headers={"X-OAuth-Scopes": "read:user"}))

    async def check_scopes(ctx: Context) -> None:
        scopes = (await ctx.get("/user")).headers["x-oauth-scopes"].split(", ")
        if "repo" not in scopes:
            raise Rejected("the token lacks the repo scope")

    async def check_nothing(ctx: Context) -> None:
        pass

    functions = [validator("check-scopes", check_scopes), validator("check-nothing", check_nothing)]
    async with serving(tmp_path, provider, *functions) as daemon:
        response = await emit(daemon.stub, VALIDATE)
        connection = await get(daemon.stub)
        log = await records(daemon.stub)

    assert response.state == REJECTED
    assert response.rejection_reason == "check-scopes: the token lacks the repo scope"
    assert (connection.state, connection.rejection_reason) == (REJECTED, response.rejection_reason)
    assert outcomes(response) == {"check-scopes": (FAILED, 1), "check-nothing": (SUCCEEDED, 1)}
    assert sorted(summary(log)) == sorted(
        [
            ("validate-connection", ""),
            ("function-failed", "check-scopes"),
            ("function-succeeded", "check-nothing"),
            ("connection-rejected", "check-scopes"),
        ]
    )
    assert (log[0].type, log[-1].type) == ("validate-connection", "connection-rejected")
    failed = next(data(r) for r in log if r.type == "function-failed")
    assert (failed["error_type"], failed["error"], failed["retryable"]) == (
        "Rejected",
        "the token lacks the repo scope",
        False,
    )
    assert data(log[-1])["reason"] == response.rejection_reason


async def test_a_validate_function_that_raises_rejects_with_its_error(tmp_path: Path, provider: ProviderServer) -> None:
    """Any exception rejects too; the reason carries the exception's message."""
    provider.route("GET", "/user", Reply(401, {"message": "Bad credentials"}))

    async def check_token(ctx: Context) -> None:
        await ctx.get("/user")

    async with serving(tmp_path, provider, validator("check-token", check_token)) as daemon:
        response = await emit(daemon.stub, VALIDATE)

    assert response.state == REJECTED
    assert response.rejection_reason.startswith(f"check-token: GET {provider.url}/user answered 401 Unauthorized")
    assert "Bad credentials" in response.rejection_reason


async def test_a_hanging_validate_function_is_rejected_at_the_deadline(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """At the validate deadline the connection is rejected and every function still running times out, named."""
    slow_finished = False

    async def hangs(ctx: Context) -> None:
        await hang()

    async def slow_but_fine(ctx: Context) -> None:
        nonlocal slow_finished
        with anyio.fail_after(WAIT):
            await hang()
        slow_finished = True

    functions = [validator("a-hangs", hangs), validator("b-slow-but-fine", slow_but_fine)]
    async with serving(tmp_path, provider, *functions, validate_deadline=0.3) as daemon:
        started = time.monotonic()
        response = await emit(daemon.stub, VALIDATE)
        elapsed = time.monotonic() - started
        log = await records(daemon.stub)

    assert response.state == REJECTED
    assert elapsed < WAIT / 2, "the deadline did not end the validation"
    assert not slow_finished
    timed_out = sorted((data(r) for r in log if r.type == "function-failed"), key=lambda d: d["function"])
    assert [d["function"] for d in timed_out] == ["a-hangs", "b-slow-but-fine"]
    assert all(d["error"].startswith("timed out after 0.") for d in timed_out)
    assert not [r for r in log if r.type == "function-cancelled"]
    assert response.rejection_reason == "; ".join(f"{d['function']}: {d['error']}" for d in timed_out)
    assert [r.type for r in log][0::3] == ["validate-connection", "connection-rejected"]


async def test_the_first_failure_cancels_the_other_validations(tmp_path: Path, provider: ProviderServer) -> None:
    """A rejection does not wait for the other validate functions: they are cancelled and say so in the log."""
    waiting = anyio.Event()
    cancelled_seen = anyio.Event()

    async def rejects(ctx: Context) -> None:
        await waiting.wait()  # reject while the other function is surely running
        raise Rejected("no")

    async def waits(ctx: Context) -> None:
        waiting.set()
        try:
            await hang()
        except anyio.get_cancelled_exc_class():
            cancelled_seen.set()
            raise

    functions = [validator("rejects", rejects), validator("waits", waits)]
    async with serving(tmp_path, provider, *functions, validate_deadline=WAIT * 2) as daemon:
        with anyio.fail_after(WAIT):
            response = await emit(daemon.stub, VALIDATE)
        log = await records(daemon.stub)

    assert cancelled_seen.is_set()
    assert response.rejection_reason == "rejects: no"
    assert summary(log) == [
        ("validate-connection", ""),
        ("function-failed", "rejects"),
        ("function-cancelled", "waits"),
        ("connection-rejected", "rejects"),
    ]


async def test_a_refused_emit_runs_no_function_and_writes_nothing(tmp_path: Path, provider: ProviderServer) -> None:
    """An emit refused by its checks (unknown connection, stale expected_version) runs no function, writes nothing."""
    calls = Counter()

    async def count(ctx: Context) -> None:
        calls.hit()

    functions = [validator("check", count), cleaner("cleanup", count)]
    async with serving(tmp_path, provider, *functions) as daemon:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await emit(daemon.stub, DELETE)
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await emit(daemon.stub, VALIDATE, expected_version=3)
        log = await records(daemon.stub)

    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert calls.count == 0
    assert log == []
    assert provider.requests == []


@pytest.mark.parametrize(
    ("configured", "credentials", "says"),
    [
        ({"acme": ""}, None, "set [integrations.acme] base_url in the daemon's config"),
        ({"acmee": "{provider}"}, None, "set [integrations.acme] base_url in the daemon's config"),
        ({"acme": "api.acme.test"}, None, "base_url 'api.acme.test' is not an http:// or https:// URL"),
        ({"acme": "{provider}"}, {}, "has no credential 'access_token', which integration acme's auth 'bearer' needs"),
    ],
    ids=["no-base-url", "settings-under-a-misspelled-name", "no-scheme", "no-credential"],
)
async def test_a_validation_the_daemons_settings_fail_is_refused_and_the_log_is_unchanged(
    tmp_path: Path,
    provider: ProviderServer,
    configured: dict[str, str],
    credentials: dict[str, str] | None,
    says: str,
) -> None:
    """FAILED_PRECONDITION naming the setting to fix; no record (not even the request), no call to the provider:
    the connection is neither rejected nor its earlier state touched."""
    provider.route("GET", "/user", Reply(200, {"login": "acme"}))

    async def check_token(ctx: Context) -> None:
        await ctx.get("/user")

    integrations = {
        name: Integration(name, base_url=url.format(provider=provider.url), auth="bearer")
        for name, url in configured.items()
    }
    functions = [validator("check-token", check_token), creator("noop", lambda ctx: None)]
    async with in_process.serving(tmp_path, *functions, integrations=integrations) as daemon:
        await emit(daemon.stub, CREATE, credentials={}, wait=True)
        before = await records(daemon.stub)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await emit(daemon.stub, VALIDATE, credentials=credentials)
        after = await records(daemon.stub)
        connection = await get(daemon.stub)

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert says in details and "function check-token" in details and "nothing was recorded" in details
    assert after == before
    assert (connection.state, connection.version) == (ACTIVE, before[-1].version)
    assert provider.requests == []


# -- post-connection-creation ---------------------------------------------------------


async def test_post_creation_schedules_its_functions(tmp_path: Path, provider: ProviderServer) -> None:
    """The response lists one SCHEDULED outcome per function; the functions then run and succeed in the log."""
    provider.route("POST", "/webhooks", Reply(201, {"id": "wh_1"}))

    async def register_webhook(ctx: Context) -> None:
        await ctx.post("/webhooks", json={"url": "https://platform.test/hooks"})

    async def welcome(ctx: Context) -> None:
        ctx.log("welcome", ctx.connection.connection_id, ctx.event.payload["plan"])

    functions = [creator("register-webhook", register_webhook), creator("welcome", welcome)]
    async with serving(tmp_path, provider, *functions) as daemon:
        payload = struct_pb2.Struct()
        payload.update({"plan": "pro"})
        response = await emit(daemon.stub, CREATE, payload=payload)
        seen = await follow_until(daemon.stub, is_("function-succeeded", "register-webhook"))
        seen += await follow_until(
            daemon.stub, is_("function-succeeded", "welcome"), from_position=response.position + 1
        )

    assert response.state == ACTIVE
    assert outcomes(response) == {"register-webhook": (SCHEDULED, 0), "welcome": (SCHEDULED, 0)}
    welcome_fact = data(seen[-1])
    assert welcome_fact["logs"] == ["info: welcome acme-1 pro"]
    assert seen[-1].causation_id == response.event_id
    (request,) = provider.requests_to("POST", "/webhooks")
    assert request.json() == {"url": "https://platform.test/hooks"}


async def test_wait_true_answers_with_the_final_outcomes(tmp_path: Path, provider: ProviderServer) -> None:
    """With wait=true the emit returns once the asynchronous functions are done, with their outcomes."""

    async def quick(ctx: Context) -> None:
        pass

    async def never_works(ctx: Context) -> None:
        raise NonRetryable("the account is closed")

    functions = [creator("quick", quick), creator("never-works", never_works)]
    async with serving(tmp_path, provider, *functions) as daemon:
        response = await emit(daemon.stub, CREATE, wait=True)

    assert response.state == ACTIVE
    assert outcomes(response) == {"quick": (SUCCEEDED, 1), "never-works": (GAVE_UP, 1)}
    assert {o.name: o.error for o in response.outcomes}["never-works"] == "the account is closed"


async def test_a_failing_function_is_retried_with_backoff_until_it_succeeds(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """Two failures then a success: function-failed (attempts 1, 2; retryable, delayed), function-succeeded (3)."""

    async def flaky(ctx: Context) -> None:
        if ctx.event.attempt < 3:
            raise RuntimeError(f"the provider is down (attempt {ctx.event.attempt})")

    async with serving(tmp_path, provider, creator("flaky", flaky)) as daemon:
        response = await emit(daemon.stub, CREATE, wait=True)
        log = await records(daemon.stub)

    assert outcomes(response) == {"flaky": (SUCCEEDED, 3)}
    assert log[1].type == "credentials-updated"
    facts = [(r.type, data(r)) for r in log[2:]]
    assert [(kind, fact["attempt"]) for kind, fact in facts] == [
        ("function-failed", 1),
        ("function-failed", 2),
        ("function-succeeded", 3),
    ]
    for attempt, (_, fact) in enumerate(facts[:2], start=1):
        assert (fact["error_type"], fact["retryable"]) == ("RuntimeError", True)
        assert fact["error"] == f"the provider is down (attempt {attempt})"
        assert 0 <= fact["retry_in_ms"] <= FAST_RETRY.ceiling(attempt) * 1000
    assert {r.causation_id for r in log[2:]} == {response.event_id}


async def test_a_function_that_always_fails_gives_up_and_the_connection_stays_active(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """After max_attempts failures the function gives up (function-gave-up); the connection stays ACTIVE."""
    provider.route("POST", "/webhooks", Reply(500, "internal error", headers={"Retry-After": "0"}))
    calls = Counter()

    async def register_webhook(ctx: Context) -> None:
        calls.hit()
        await ctx.post("/webhooks", json={})

    async with serving(tmp_path, provider, creator("register-webhook", register_webhook)) as daemon:
        # The proxy's own retries are part of one attempt; keep them out of the way.
        response = await emit(daemon.stub, CREATE, wait=True)
        connection = await get(daemon.stub)
        log = await records(daemon.stub)

    assert calls.count == FAST_RETRY.max_attempts == 3
    assert outcomes(response) == {"register-webhook": (GAVE_UP, 3)}
    assert connection.state == ACTIVE
    assert [(r.type, data(r)["attempt"]) for r in log[2:]] == [
        ("function-failed", 1),
        ("function-failed", 2),
        ("function-failed", 3),
        ("function-gave-up", 3),
    ]
    assert data(log[-1])["reason"] == "3 attempts exhausted"
    assert "answered 500" in data(log[-1])["error"]


async def test_non_retryable_gives_up_after_one_attempt(tmp_path: Path, provider: ProviderServer) -> None:
    """NonRetryable stops at once: one function-failed (not retryable) and function-gave-up."""
    calls = Counter()

    async def register_webhook(ctx: Context) -> None:
        calls.hit()
        raise NonRetryable("the plan has no webhooks")

    async with serving(tmp_path, provider, creator("register-webhook", register_webhook)) as daemon:
        response = await emit(daemon.stub, CREATE, wait=True)
        log = await records(daemon.stub)

    assert calls.count == 1
    assert outcomes(response) == {"register-webhook": (GAVE_UP, 1)}
    assert [r.type for r in log[1:]] == ["credentials-updated", "function-failed", "function-gave-up"]
    assert data(log[2])["retryable"] is False
    assert data(log[3])["reason"] == "not retryable"


# -- pre-connection-deletion --------------------------------------------------------


async def test_deletion_cancels_pending_creation_jobs_then_runs_cleanup(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A creation job waiting for its retry is cancelled (function-cancelled); then the cleanup functions run."""
    creations = Counter()

    async def register_webhook(ctx: Context) -> None:
        creations.hit()
        raise RuntimeError("the provider is down")

    async def welcome(ctx: Context) -> None:
        pass

    async def delete_webhook(ctx: Context) -> None:
        ctx.log("nothing to delete")

    functions = [
        creator("register-webhook", register_webhook, retry=NEVER_AGAIN),
        creator("welcome", welcome),
        cleaner("delete-webhook", delete_webhook),
    ]
    async with serving(tmp_path, provider, *functions) as daemon:
        created = await emit(daemon.stub, CREATE)
        await follow_until(daemon.stub, is_("function-failed", "register-webhook"))
        await follow_until(daemon.stub, is_("function-succeeded", "welcome"))
        deleted = await emit(daemon.stub, DELETE)
        log = await records(daemon.stub)

    assert creations.count == 1
    assert deleted.state == DELETED
    assert outcomes(deleted) == {"delete-webhook": (SUCCEEDED, 1)}
    after = [r for r in log if r.position >= deleted.position]
    assert summary(after) == [
        ("pre-connection-deletion", ""),
        ("function-cancelled", "register-webhook"),
        ("function-succeeded", "delete-webhook"),
        ("connection-deleted", ""),
        ("credentials-destroyed", ""),  # nothing of it runs any more
    ]
    assert after[1].causation_id == created.event_id, "the cancellation belongs to the creation it cancels"
    assert (data(after[1])["reason"], data(after[1])["attempt"]) == ("the connection is being deleted", 1)
    assert {r.causation_id for r in after[2:-1]} == {deleted.event_id}
    assert not any(r.type == "function-cancelled" and data(r)["function"] == "welcome" for r in log)


async def test_wait_true_returns_once_a_deletion_cancels_its_jobs(tmp_path: Path, provider: ProviderServer) -> None:
    """An emit waiting (wait=true) for a job that a deletion then cancels answers with the CANCELLED outcome."""
    answers: list[pb.EmitLifecycleEventResponse] = []
    answered = anyio.Event()

    async def register_webhook(ctx: Context) -> None:
        raise RuntimeError("the provider is down")

    async def create(stub: Stub) -> None:
        answers.append(await emit(stub, CREATE, wait=True))
        answered.set()

    functions = [creator("register-webhook", register_webhook, retry=NEVER_AGAIN)]
    async with serving(tmp_path, provider, *functions) as daemon:
        async with anyio.create_task_group() as tg:
            tg.start_soon(create, daemon.stub)
            await follow_until(daemon.stub, is_("function-failed", "register-webhook"))
            deleted = await emit(daemon.stub, DELETE)
            with anyio.move_on_after(5):
                await answered.wait()
            tg.cancel_scope.cancel()

    assert answered.is_set(), "the waiting emit never answered"

    assert deleted.state == DELETED
    assert outcomes(answers[0]) == {"register-webhook": (pb.FUNCTION_STATUS_CANCELLED, 1)}


async def test_cleanup_of_a_resource_already_gone_succeeds(tmp_path: Path, provider: ProviderServer) -> None:
    """A cleanup that finds the provider's resource already deleted (404) and treats that as done succeeds."""
    provider.route("POST", "/webhooks", Reply(201, {"id": "wh_7"}))
    provider.route("DELETE", "/webhooks/*", Reply(404, {"message": "Not Found"}))

    class Webhook(BaseModel):
        webhook_id: str | None = None

    async def register_webhook(ctx: Context) -> None:
        response = await ctx.post("/webhooks", json={"url": "https://platform.test/hooks"})
        await ctx.set_metadata(Webhook(webhook_id=response.json()["id"]))

    async def delete_webhook(ctx: Context) -> None:
        webhook = await ctx.get_metadata()
        try:
            await ctx.delete(f"/webhooks/{webhook.webhook_id}")
        except ProviderError as exc:
            if exc.status != 404:
                raise
            ctx.log(f"webhook {webhook.webhook_id} was already gone")

    functions = [
        creator("register-webhook", register_webhook, metadata=Webhook),
        cleaner("delete-webhook", delete_webhook, metadata=Webhook),
    ]
    async with serving(tmp_path, provider, *functions) as daemon:
        await emit(daemon.stub, CREATE, wait=True)
        deleted = await emit(daemon.stub, DELETE)
        log = await records(daemon.stub)

    assert (deleted.state, outcomes(deleted)) == (DELETED, {"delete-webhook": (SUCCEEDED, 1)})
    assert [r.path for r in provider.requests_to("DELETE", "/webhooks/*")] == ["/webhooks/wh_7"]
    cleanup = next(data(r) for r in log if r.type == "function-succeeded" and r.causation_id == deleted.event_id)
    assert cleanup["logs"] == ["info: webhook wh_7 was already gone"]


async def test_a_failing_cleanup_does_not_block_deletion_and_retries_in_the_background(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A retryable cleanup failure still deletes; the cleanup job runs again after the response and succeeds."""
    attempts = Counter()
    gate = anyio.Event()

    async def delete_webhook(ctx: Context) -> None:
        attempts.hit()
        if ctx.event.attempt == 1:
            raise RuntimeError("the provider is down")
        await gate.wait()  # attempt 2 finishes only once the test has seen the deletion answered

    async with serving(tmp_path, provider, cleaner("delete-webhook", delete_webhook)) as daemon:
        await emit(daemon.stub, CREATE)
        deleted = await emit(daemon.stub, DELETE)
        connection = await get(daemon.stub)
        await attempts.reached(2)
        gate.set()
        seen = await follow_until(daemon.stub, is_("function-succeeded", "delete-webhook"))
        again = await get(daemon.stub)

    assert deleted.state == connection.state == DELETED
    assert outcomes(deleted) == {"delete-webhook": (FAILED, 1)}
    assert {o.name: o.error for o in deleted.outcomes}["delete-webhook"] == "the provider is down"
    after = [r for r in seen if r.position >= deleted.position]
    assert summary(after) == [
        ("pre-connection-deletion", ""),
        ("function-failed", "delete-webhook"),
        ("connection-deleted", ""),
        ("function-succeeded", "delete-webhook"),
    ]
    assert data(after[-1])["attempt"] == 2
    assert after[-1].causation_id == deleted.event_id
    assert (again.state, outcomes(again)) == (DELETED, {"delete-webhook": (SUCCEEDED, 2)})


async def test_a_cleanup_past_the_deadline_keeps_retrying_in_the_background(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A cleanup still running at the deletion deadline times out, the deletion completes, and a retry succeeds."""

    async def delete_webhook(ctx: Context) -> None:
        if ctx.event.attempt == 1:
            await hang()

    async with serving(tmp_path, provider, cleaner("delete-webhook", delete_webhook), deletion_deadline=0.3) as daemon:
        await emit(daemon.stub, CREATE)
        deleted = await emit(daemon.stub, DELETE)
        seen = await follow_until(daemon.stub, is_("function-succeeded", "delete-webhook"))

    assert deleted.state == DELETED
    (outcome,) = deleted.outcomes
    assert (outcome.status, outcome.error[:18]) == (FAILED, "timed out after 0.")
    assert summary([r for r in seen if r.position >= deleted.position]) == [
        ("pre-connection-deletion", ""),
        ("function-failed", "delete-webhook"),
        ("connection-deleted", ""),
        ("function-succeeded", "delete-webhook"),
    ]
    assert data(seen[-1])["attempt"] == 2


async def test_a_second_deletion_is_answered_idempotently(tmp_path: Path, provider: ProviderServer) -> None:
    """Deleting again, during or after the deletion, returns the same deletion and runs no cleanup again."""
    cleanups = Counter()
    gate = anyio.Event()
    answers: list[pb.EmitLifecycleEventResponse] = []

    async def delete_webhook(ctx: Context) -> None:
        cleanups.hit()
        await gate.wait()

    async def delete(stub: Stub) -> None:
        answers.append(await emit(stub, DELETE))

    async with serving(tmp_path, provider, cleaner("delete-webhook", delete_webhook)) as daemon:
        await emit(daemon.stub, CREATE)
        async with anyio.create_task_group() as tg:
            tg.start_soon(delete, daemon.stub)
            await cleanups.reached(1)
            tg.start_soon(delete, daemon.stub)  # sent while the first deletion's cleanup runs
            gate.set()
        before = await records(daemon.stub)
        later = await emit(daemon.stub, DELETE)
        after = await records(daemon.stub)

    assert cleanups.count == 1
    first = answers[0]
    assert first.state == DELETED
    for answer in (*answers, later):
        assert (answer.event_id, answer.position, answer.version, answer.state) == (
            first.event_id,
            first.position,
            first.version,
            DELETED,
        )
    assert after == before
    assert [r.type for r in after].count("pre-connection-deletion") == 1


# -- a rejection of an active connection cleans up ------------------------------------


@pytest.fixture
def webhooks() -> Iterator[WebhookProvider]:
    """A provider that creates and deletes webhooks, one path prefix per instance."""
    with WebhookProvider() as server:
        yield server


async def test_a_failed_revalidation_deletes_the_webhook_and_the_rejected_connection_can_then_be_deleted(
    tmp_path: Path, webhooks: WebhookProvider
) -> None:
    """An active connection with a webhook fails its re-validation: the rejection's cleanup deletes the webhook at
    the provider (with the connection's token, its id from the metadata); pre-connection-deletion then ends
    DELETED, running nothing more; the credentials are shredded once no job is left."""

    class Webhook(BaseModel):
        webhook_id: str | None = None

    async def check_token(ctx: Context) -> None:
        if ctx.event.payload.get("revoked"):
            raise Rejected("the token was revoked")

    async def register_webhook(ctx: Context) -> None:
        response = await ctx.post("/webhooks", json={"url": "https://platform.test/hooks"})
        await ctx.set_metadata(Webhook(webhook_id=response.json()["id"]))

    async def delete_webhook(ctx: Context) -> None:
        webhook: Webhook = await ctx.get_metadata()
        if webhook.webhook_id:
            await ctx.delete(f"/webhooks/{webhook.webhook_id}")
            await ctx.set_metadata(Webhook())

    functions = [
        validator("check-token", check_token),
        creator("register-webhook", register_webhook, metadata=Webhook),
        cleaner("delete-webhook", delete_webhook, metadata=Webhook),
    ]
    config = struct_pb2.Struct()
    config.update({"instance": "acme"})
    provider = webhooks
    acme = {"acme": Integration("acme", base_url=provider.url + "/{instance}", auth="bearer")}
    async with in_process.serving(tmp_path, *functions, integrations=acme) as daemon:
        await emit(daemon.stub, CREATE, connection_config=config, wait=True)
        assert list(provider.webhooks) == ["wh1"]
        payload = struct_pb2.Struct()
        payload.update({"revoked": True})
        rejected = await emit(daemon.stub, VALIDATE, payload=payload, credentials={}, wait=True)
        after_rejection = await get(daemon.stub)
        deleted = await emit(daemon.stub, DELETE, credentials={})
        log = await records(daemon.stub)

    assert (rejected.state, rejected.rejection_reason) == (REJECTED, "check-token: the token was revoked")
    assert outcomes(rejected) == {"check-token": (FAILED, 1), "delete-webhook": (SUCCEEDED, 1)}
    assert provider.webhooks == {}
    (deletion,) = provider.requests_to("DELETE", "/acme/webhooks/*")
    assert (deletion.path, deletion.headers["authorization"]) == ("/acme/webhooks/wh1", f"Bearer {TOKEN}")
    assert (after_rejection.state, json_format.MessageToDict(after_rejection.metadata)) == (
        REJECTED,
        {"webhook_id": None},
    )
    assert (deleted.state, list(deleted.outcomes)) == (DELETED, [])
    cleanup = [r for r in log if r.position > rejected.position]
    assert summary(cleanup) == [
        ("function-failed", "check-token"),
        ("connection-rejected", "check-token"),
        ("metadata-updated", "delete-webhook"),
        ("function-succeeded", "delete-webhook"),
        ("credentials-destroyed", ""),
        ("pre-connection-deletion", ""),
        ("connection-deleted", ""),
    ]
    assert {r.causation_id for r in cleanup[2:4]} == {rejected.event_id}


# -- metadata ----------------------------------------------------------------------


class Sync(BaseModel):
    """The metadata model of the metadata tests."""

    webhook_id: str | None = None
    synced: bool = False
    scopes: list[str] = []


async def test_metadata_written_by_a_function_is_in_get_connection_and_the_log(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """set_metadata and update_metadata are recorded as metadata-updated and visible in GetConnection."""
    provider.route("POST", "/webhooks", Reply(201, {"id": "wh_1"}))

    async def register_webhook(ctx: Context) -> None:
        response = await ctx.post("/webhooks", json={})
        await ctx.set_metadata(Sync(webhook_id=response.json()["id"]))
        await ctx.update_metadata({"synced": True})
        current = await ctx.get_metadata()
        ctx.log("now", current.webhook_id, current.synced)

    functions = [creator("register-webhook", register_webhook, metadata=Sync)]
    async with serving(tmp_path, provider, *functions) as daemon:
        response = await emit(daemon.stub, CREATE, wait=True)
        connection = await get(daemon.stub)
        log = await records(daemon.stub)

    assert outcomes(response) == {"register-webhook": (SUCCEEDED, 1)}
    assert as_dict(connection.metadata) == {"webhook_id": "wh_1", "synced": True, "scopes": []}
    updates = [data(r) for r in log if r.type == "metadata-updated"]
    assert updates == [
        {
            "function": "register-webhook",
            "metadata": {"webhook_id": "wh_1", "synced": False, "scopes": []},
            "merge": False,
        },
        {"function": "register-webhook", "metadata": {"synced": True}, "merge": True},
    ]
    assert [r.type for r in log] == [
        "post-connection-creation",
        "credentials-updated",
        "metadata-updated",
        "metadata-updated",
        "function-succeeded",
    ]
    assert data(log[-1])["logs"] == ["info: now wh_1 True"]


async def test_replay_until_shows_metadata_before_and_after_a_function_wrote_it(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """`orchestrator replay --until` shows no webhook id before the metadata-updated record and the id from it on."""
    provider.route("POST", "/webhooks", Reply(201, {"id": "wh_9"}))

    async def register_webhook(ctx: Context) -> None:
        response = await ctx.post("/webhooks", json={})
        await ctx.set_metadata(Sync(webhook_id=response.json()["id"]))

    async with serving(tmp_path, provider, creator("register-webhook", register_webhook, metadata=Sync)) as daemon:
        await emit(daemon.stub, CREATE, wait=True)
        log = await records(daemon.stub)
        written = next(r.position for r in log if r.type == "metadata-updated")

        async def replayed(until: int) -> dict[str, Any]:
            done = await arun("replay", "--json", "--until", str(until), "--database", daemon.database)
            assert done.code == 0, str(done)
            (connection,) = done.json()["connections"]
            return dict(connection["metadata"])

        # The daemon is still running: replay reads the log file directly.
        before, after = await replayed(written - 1), await replayed(written)

    assert before == {}
    assert after == {"webhook_id": "wh_9", "synced": False, "scopes": []}


async def test_metadata_that_does_not_match_the_model_fails_the_function(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A write the model refuses fails the attempt (not retryable) and records nothing."""

    async def register_webhook(ctx: Context) -> None:
        await ctx.update_metadata({"synced": "not a boolean at all"})

    functions = [creator("register-webhook", register_webhook, metadata=Sync)]
    async with serving(tmp_path, provider, *functions) as daemon:
        response = await emit(daemon.stub, CREATE, wait=True)
        connection = await get(daemon.stub)
        log = await records(daemon.stub)

    assert outcomes(response) == {"register-webhook": (GAVE_UP, 1)}
    assert "metadata does not match Sync" in response.outcomes[0].error
    assert as_dict(connection.metadata) == {}
    assert "metadata-updated" not in [r.type for r in log]


async def test_validate_metadata_is_written_atomically_with_the_verdict(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A validate function's metadata write is invisible until the verdict, then appended with it."""
    wrote = anyio.Event()
    gate = anyio.Event()
    answers: list[pb.EmitLifecycleEventResponse] = []

    async def check_scopes(ctx: Context) -> None:
        await ctx.set_metadata(Sync(scopes=["repo", "read:user"]))
        wrote.set()
        await gate.wait()

    async def validate(stub: Stub) -> None:
        answers.append(await emit(stub, VALIDATE))

    functions = [validator("check-scopes", check_scopes, metadata=Sync)]
    async with serving(tmp_path, provider, *functions) as daemon:
        async with anyio.create_task_group() as tg:
            tg.start_soon(validate, daemon.stub)
            with anyio.fail_after(WAIT):
                await wrote.wait()
            during = await records(daemon.stub)
            with pytest.raises(grpc.aio.AioRpcError) as not_yet:
                await get(daemon.stub)
            gate.set()
        connection = await get(daemon.stub)
        log = await records(daemon.stub)

    assert during == []
    assert not_yet.value.code() == grpc.StatusCode.NOT_FOUND
    (response,) = answers
    assert response.state == PENDING
    assert as_dict(connection.metadata) == {"webhook_id": None, "synced": False, "scopes": ["repo", "read:user"]}
    assert [r.type for r in log] == [
        "validate-connection",
        "credentials-updated",
        "function-succeeded",
        "metadata-updated",
        "connection-validated",
    ]
    assert [r.position for r in log] == [1, 2, 3, 4, 5]
    assert data(log[3])["function"] == "check-scopes"


# -- isolation ---------------------------------------------------------------------


async def test_a_sync_function_that_sleeps_does_not_stall_other_connections(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A plain def calling time.sleep on one connection runs in a thread; another connection validates meanwhile."""
    sleeping = anyio.Event()
    finished: list[str] = []

    def check(ctx: Any) -> None:
        if ctx.connection.connection_id == "slow":
            anyio.from_thread.run_sync(sleeping.set)
            time.sleep(1)

    async def validate(stub: Stub, connection_id: str) -> None:
        await emit(stub, VALIDATE, connection_id)
        finished.append(connection_id)

    async with serving(tmp_path, provider, validator("check", check)) as daemon:
        async with anyio.create_task_group() as tg:
            tg.start_soon(validate, daemon.stub, "slow")
            with anyio.fail_after(WAIT):
                await sleeping.wait()
            await validate(daemon.stub, "fast")
        log = await records(daemon.stub)

    assert finished == ["fast", "slow"]
    verdicts = [r.stream.rsplit("/", 1)[1] for r in log if r.type == "connection-validated"]
    assert verdicts == ["fast", "slow"]
    lifecycle = [r.stream.rsplit("/", 1)[1] for r in log if r.type == "validate-connection"]
    assert lifecycle == ["fast", "slow"], "the slow connection's records are appended after the fast one's"


async def test_misbehaving_functions_leave_the_others_intact(tmp_path: Path, provider: ProviderServer) -> None:
    """Functions that raise, return junk, flood logs, call sys.exit or hang harm no other function nor the daemon."""

    async def raises(ctx: Context) -> None:
        raise RuntimeError("boom")

    async def returns_junk(ctx: Context) -> object:
        return object()

    async def floods_logs(ctx: Context) -> None:
        for i in range(10_000):
            ctx.log("flood", i)

    def exits(ctx: Any) -> None:
        sys.exit(1)

    async def hangs(ctx: Context) -> None:
        await hang()

    async def well_behaved(ctx: Context) -> None:
        await ctx.update_metadata({"ok": True})

    functions = [
        creator("raises", raises),
        creator("returns-junk", returns_junk),
        creator("floods-logs", floods_logs),
        creator("exits", exits),
        creator("hangs", hangs, timeout=0.1),
        creator("well-behaved", well_behaved),
    ]
    async with serving(tmp_path, provider, *functions, retry=RetryPolicy(max_attempts=2, initial_interval=0)) as daemon:
        response = await emit(daemon.stub, CREATE, wait=True)
        connection = await get(daemon.stub)
        log = await records(daemon.stub)
        later = await emit(daemon.stub, CREATE, "acme-2", wait=True)

    assert outcomes(response) == {
        "raises": (GAVE_UP, 2),
        "returns-junk": (SUCCEEDED, 1),
        "floods-logs": (SUCCEEDED, 1),
        "exits": (GAVE_UP, 2),
        "hangs": (GAVE_UP, 2),
        "well-behaved": (SUCCEEDED, 1),
    }
    errors = {o.name: o.error for o in response.outcomes}
    assert errors["raises"] == "boom"
    assert errors["hangs"] == "timed out after 0.1s"
    assert connection.state == ACTIVE
    assert as_dict(connection.metadata) == {"ok": True}
    succeeded = {data(r)["function"]: data(r) for r in log if r.type == "function-succeeded"}
    assert succeeded["returns-junk"]["logs"] == ["warning: the function returned object, which is ignored"]
    flood = succeeded["floods-logs"]["logs"]
    assert (len(flood), flood[0], flood[-1]) == (201, "info: flood 0", "(9800 more lines dropped)")
    assert outcomes(later)["well-behaved"] == (SUCCEEDED, 1), "the daemon still serves"


# -- credentials -------------------------------------------------------------------


async def test_the_provider_gets_the_credentials_and_the_log_never_does(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """Every provider call carries Bearer <token> from the emit; no record, outcome or connection view holds it."""
    provider.route("GET", "/user", Reply(200, {"login": "acme"}))
    provider.route("POST", "/webhooks", Reply(201, {"id": "wh_1"}))
    provider.route("DELETE", "/webhooks/wh_1", Reply(204))
    provider.route("GET", "/flaky", Reply(401, {"message": "Bad credentials"}))

    async def check_token(ctx: Context) -> None:
        await ctx.get("/user")

    async def register_webhook(ctx: Context) -> None:
        await ctx.post("/webhooks", json={})
        await ctx.update_metadata({"webhook_id": "wh_1"})
        try:
            await ctx.get("/flaky")
        except ProviderError as exc:
            ctx.log("the provider said", exc)

    async def delete_webhook(ctx: Context) -> None:
        await ctx.delete("/webhooks/wh_1")

    functions = [
        validator("check-token", check_token),
        creator("register-webhook", register_webhook),
        cleaner("delete-webhook", delete_webhook),
    ]
    async with serving(tmp_path, provider, *functions) as daemon:
        config = struct_pb2.Struct()
        config.update({"instance_url": "acme.example"})
        responses = [
            await emit(daemon.stub, VALIDATE, connection_config=config),
            await emit(daemon.stub, CREATE, credentials={}, wait=True),  # the sealed credentials are used
            await emit(daemon.stub, DELETE, credentials={}),
        ]
        connection = await get(daemon.stub)
        listed = await daemon.stub.ListConnections(pb.ListConnectionsRequest())
        log = await records(daemon.stub)

    assert [r.state for r in responses] == [PENDING, ACTIVE, DELETED]
    assert all(o.status == SUCCEEDED for r in responses for o in r.outcomes)
    assert [(r.method, r.path) for r in provider.requests] == [
        ("GET", "/user"),
        ("POST", "/webhooks"),
        ("GET", "/flaky"),
        ("DELETE", "/webhooks/wh_1"),
    ]
    assert {r.headers["authorization"] for r in provider.requests} == {f"Bearer {TOKEN}"}
    shown = [json_format.MessageToJson(m) for m in (*log, *responses, connection, listed)]
    assert len(log) == 11
    assert [r.type for r in log if r.type.startswith("credentials-")] == [
        "credentials-updated",
        "credentials-destroyed",
    ]
    assert not [text for text in shown if TOKEN in text]
    assert any("Bad credentials" in text for text in shown), "the provider's answer is kept, the token is not"


async def test_a_credential_echoed_by_the_provider_never_reaches_the_log(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A provider answering "bad credentials: <token>" does not get the token into the log or the response."""
    provider.route("GET", "/user", Reply(401, f"bad credentials: {TOKEN}"))

    async def check_token(ctx: Context) -> None:
        await ctx.get("/user")

    async with serving(tmp_path, provider, validator("check-token", check_token)) as daemon:
        response = await emit(daemon.stub, VALIDATE)
        log = await records(daemon.stub)

    assert response.state == REJECTED
    assert TOKEN not in response.rejection_reason
    assert "bad credentials" in response.rejection_reason
    assert not [r.type for r in log if TOKEN in json.dumps(data(r))]


async def test_a_credential_a_function_logs_or_raises_never_reaches_the_log(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A function that logs, or raises with, a provider answer echoing the token leaves no token in the log."""
    provider.route("GET", "/whoami", Reply(200, {"token": TOKEN, "login": "acme"}))

    async def inspect_token(ctx: Context) -> None:
        answer = (await ctx.get("/whoami")).text
        ctx.log("the provider said", answer)
        raise NonRetryable(f"unexpected answer {answer}")

    async with serving(tmp_path, provider, creator("inspect-token", inspect_token)) as daemon:
        response = await emit(daemon.stub, CREATE, wait=True)
        log = await records(daemon.stub)

    (outcome,) = response.outcomes
    assert (outcome.status, TOKEN in outcome.error) == (GAVE_UP, False)
    assert "unexpected answer" in outcome.error
    failed = next(data(r) for r in log if r.type == "function-failed")
    assert failed["logs"][0].startswith("info: the provider said")
    assert not [r.type for r in log if TOKEN in json.dumps(data(r))]
