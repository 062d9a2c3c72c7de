"""Credentials through a real daemon: UpdateCredentials, the resolver after a 401, a key that is not configured."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from orchestrator import Context, sealing
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.config import Integration
from orchestrator.model import ConnectionRef
from orchestrator.plugins import Registry
from tests.support.daemon import function, run_daemon, serving
from tests.support.grpc import (
    CREATE,
    DELETE,
    VALIDATE,
    WAIT,
    as_dict,
    emit,
    follow_until,
    records,
    ref,
)
from tests.support.provider import ProviderServer, Reply, Request, reached

pytestmark = pytest.mark.anyio

OLD_TOKEN = "old-t0ken-1234"
NEW_TOKEN = "new-t0ken-5678"


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """A local provider: /webhooks answers 201, /me 200 for the new token only."""
    with ProviderServer() as server:

        def me(request: Request) -> Reply:
            ok = request.headers.get("authorization") == f"Bearer {NEW_TOKEN}"
            return Reply(200, {"login": "acme"}) if ok else Reply(401, {"error": "token expired"})

        server.route("GET", "/me", me)
        server.route("POST", "/webhooks", Reply(503, {"error": "busy"}), Reply(201, {"id": "wh_1"}))
        yield server


def acme(provider: ProviderServer) -> dict[str, Integration]:
    """Integration acme at the provider, bearer auth, no proxy retries."""
    return {"acme": Integration("acme", base_url=provider.url, auth="bearer", retries=0)}


def update(connection_id: str, credentials: Mapping[str, str]) -> pb.UpdateCredentialsRequest:
    """An UpdateCredentials request for ``connection_id`` of acme."""
    return pb.UpdateCredentialsRequest(connection=ref(connection_id), credentials=dict(credentials))


async def test_update_credentials_reaches_the_next_attempt_and_says_when_nothing_changed(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A job's retry uses credentials updated between its attempts; the same credentials again write nothing."""
    held = provider.hold("POST", "/webhooks")

    async def register(ctx: Context) -> None:
        await ctx.post("/webhooks")

    async with serving(
        tmp_path, function("register", "post-connection-creation", register), integrations=acme(provider)
    ) as daemon:
        await emit(daemon.stub, CREATE, "c1", credentials={"access_token": OLD_TOKEN})
        assert await reached(held.arrived)
        first = await daemon.stub.UpdateCredentials(update("c1", {"access_token": NEW_TOKEN}), timeout=WAIT)
        again = await daemon.stub.UpdateCredentials(update("c1", {"access_token": NEW_TOKEN}), timeout=WAIT)
        held.release.set()
        await follow_until(daemon.stub, lambda r: r.type == "function-succeeded")
        log = await records(daemon.stub)

    assert [r.headers["authorization"] for r in provider.requests] == [f"Bearer {OLD_TOKEN}", f"Bearer {NEW_TOKEN}"]
    assert (first.changed, again.changed) == (True, False)
    assert first.fingerprint == again.fingerprint and len(first.fingerprint) == 16
    assert (first.version, again.version) == (3, 3)
    updated = [as_dict(r.data) for r in log if r.type == "credentials-updated"]
    assert [(u["source"], u["names"]) for u in updated] == [("emit", ["access_token"]), ("update", ["access_token"])]
    assert updated[1]["fingerprint"] == first.fingerprint and updated[1]["key_id"] == first.key_id
    assert updated[0]["fingerprint"] != first.fingerprint
    assert not [r for r in log if NEW_TOKEN in str(r) or OLD_TOKEN in str(r)]


async def test_an_emit_and_its_repeat_answer_the_version_after_the_credentials_it_sealed(tmp_path: Path) -> None:
    """A creation's answer counts the credentials-updated it appended; its repeat (same key) answers the same."""
    async with serving(tmp_path) as daemon:
        sent = {"credentials": {"access_token": OLD_TOKEN}, "idempotency_key": "create-1"}
        first = await emit(daemon.stub, CREATE, "c1", **sent)
        again = await emit(daemon.stub, CREATE, "c1", **sent)
        log = await records(daemon.stub)
    assert [r.type for r in log] == ["post-connection-creation", "credentials-updated"]
    assert (first.version, first.deduplicated) == (2, False)
    assert (again.version, again.deduplicated, again.event_id) == (2, True, first.event_id)


async def test_update_credentials_refuses_bad_requests_and_writes_nothing(tmp_path: Path) -> None:
    """Unknown connection: NOT_FOUND; no credentials: INVALID_ARGUMENT; ended with nothing left: FAILED_PRECONDITION."""
    async with serving(tmp_path) as daemon:
        await emit(daemon.stub, CREATE, "c1")
        await emit(daemon.stub, DELETE, "c1")
        head = len(await records(daemon.stub))
        cases = [
            (update("ghost", {"access_token": NEW_TOKEN}), grpc.StatusCode.NOT_FOUND, "not found"),
            (update("c1", {}), grpc.StatusCode.INVALID_ARGUMENT, "credentials is required"),
            (pb.UpdateCredentialsRequest(), grpc.StatusCode.INVALID_ARGUMENT, "connection is required"),
            (update("c1", {"access_token": NEW_TOKEN}), grpc.StatusCode.FAILED_PRECONDITION, "is deleted"),
        ]
        for request, code, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await daemon.stub.UpdateCredentials(request, timeout=WAIT)
            assert refused.value.code() == code, request
            assert message in (refused.value.details() or "")
            assert NEW_TOKEN not in (refused.value.details() or "")
        assert len(await records(daemon.stub)) == head


async def test_a_401_asks_the_resolver_once_reseals_and_the_job_succeeds(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """A job's call answered 401: the resolver gives a fresh token, sealed (source resolver), and the call succeeds."""
    asked: list[ConnectionRef] = []

    async def resolver(connection: ConnectionRef) -> Mapping[str, str]:
        asked.append(connection)
        return {"access_token": NEW_TOKEN}

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")

    functions = [function("whoami", "post-connection-creation", whoami)]
    async with serving(tmp_path, *functions, integrations=acme(provider), resolver=resolver) as daemon:
        created = await emit(daemon.stub, CREATE, "c1", credentials={"access_token": OLD_TOKEN}, wait=True)
        log = await records(daemon.stub)

    assert [o.status for o in created.outcomes] == [pb.FUNCTION_STATUS_SUCCEEDED]
    assert asked == [ConnectionRef("dev", "acme", "c1")]
    assert [r.headers["authorization"] for r in provider.requests] == [f"Bearer {OLD_TOKEN}", f"Bearer {NEW_TOKEN}"]
    updates = [r for r in log if r.type == "credentials-updated"]
    assert [as_dict(r.data)["source"] for r in updates] == ["emit", "resolver"]
    assert {r.causation_id for r in updates} == {created.event_id}, "both answer the creation"
    assert not [r for r in log if NEW_TOKEN in str(r) or OLD_TOKEN in str(r)]


async def test_a_validation_refreshed_by_the_resolver_seals_the_fresh_credentials_in_its_append(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """In a synchronous run the fresh credentials join the emit's own append (right after its lifecycle record)."""

    async def resolver(connection: ConnectionRef) -> Mapping[str, str]:
        return {"access_token": NEW_TOKEN}

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")

    functions = [function("whoami", "validate-connection", whoami)]
    async with serving(tmp_path, *functions, integrations=acme(provider), resolver=resolver) as daemon:
        validated = await emit(daemon.stub, VALIDATE, "c1", credentials={"access_token": OLD_TOKEN})
        log = await records(daemon.stub)

    assert validated.state == pb.CONNECTION_STATE_PENDING
    assert [r.type for r in log] == [
        "validate-connection",
        "credentials-updated",
        "function-succeeded",
        "connection-validated",
    ]
    assert as_dict(log[1].data)["source"] == "resolver"


async def test_credentials_sealed_under_a_key_no_longer_configured_refuse_a_validation_naming_the_key_id(
    tmp_path: Path, provider: ProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    """After a key change the start-up log names the missing key id; a validation needing the credentials is refused
    on it (FAILED_PRECONDITION: the daemon's key ring is at fault, not the connection), and nothing is written: the
    connection is not rejected (its cleanup does not run), its credentials are kept, and they open once the key is
    configured again."""
    database = f"sqlite://{tmp_path}/events.db"
    first, second = sealing.generate(), sealing.generate()
    old_id = sealing.Keyring.parse(first, "k").sealing.id
    async with run_daemon(database, registry=Registry(), secret_key=first) as daemon:
        await emit(daemon.stub, CREATE, "c1", credentials={"access_token": OLD_TOKEN})
        before = await records(daemon.stub)

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")

    registry = Registry.of([function("whoami", "validate-connection", whoami)])
    caplog.set_level(logging.WARNING, "orchestrator.daemon")
    async with run_daemon(database, registry=registry, integrations=acme(provider), secret_key=second) as daemon:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await emit(daemon.stub, VALIDATE, "c1")
        after = await records(daemon.stub)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert f"key id {old_id}, which is not configured" in details and "function whoami" in details
    assert after == before
    assert provider.requests == []
    assert any(f"under key id {old_id}, which is not configured" in r.getMessage() for r in caplog.records)
    provider.route("GET", "/me", Reply(200, {"login": "acme"}))
    async with run_daemon(
        database, registry=registry, integrations=acme(provider), secret_key=f"{second},{first}"
    ) as daemon:
        validated = await emit(daemon.stub, VALIDATE, "c1")
    assert validated.state == pb.CONNECTION_STATE_ACTIVE
    assert [r.headers["authorization"] for r in provider.requests_to("GET", "/me")] == [f"Bearer {OLD_TOKEN}"]


async def test_a_job_without_the_credential_its_scheme_needs_gives_up_at_once_saying_how_to_supply_it(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """No credentials: one attempt, NonRetryable, naming the connection, the scheme and the command to run."""

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")

    functions = [function("whoami", "post-connection-creation", whoami)]
    async with serving(tmp_path, *functions, integrations=acme(provider)) as daemon:
        created = await emit(daemon.stub, CREATE, "c 1", wait=True)
        log = await records(daemon.stub)

    assert [(o.status, o.attempts) for o in created.outcomes] == [(pb.FUNCTION_STATUS_GAVE_UP, 1)]
    failed = next(as_dict(r.data) for r in log if r.type == "function-failed")
    assert (failed["error_type"], failed["retryable"]) == ("CredentialsUnavailable", False)
    assert failed["error"] == (
        "connection dev/acme/c 1 has no credential 'access_token', which integration acme's auth 'bearer' needs:"
        " supply it with UpdateCredentials (`orchestrator credentials set 'c 1' -i acme -e dev --credential"
        " access_token=...`) or with the connection's next emit"
    )
    gave_up = next(as_dict(r.data) for r in log if r.type == "function-gave-up")
    assert (gave_up["attempt"], gave_up["reason"], gave_up["error"]) == (1, "misconfigured", failed["error"])
    assert provider.requests == []
