"""Transport and access against a real daemon in process: TLS, mutual TLS, bearer tokens and their scopes.

The CA and the certificates are made by each test (:mod:`tests.support.tls`);
the daemon serves on 127.0.0.1:0 with them. What only a daemon process shows
(start-up refusals, SIGHUP rereading the files, the CLI's options) is in
tests/e2e/test_access_cli.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator import Context, NonRetryable
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.access import fingerprint
from orchestrator.plugins import Registry
from tests.support import grpc as rpc
from tests.support.daemon import Daemon, function, run_daemon
from tests.support.grpc import CREATE, PENDING, VALIDATE, WAIT
from tests.support.tls import Authority, Pair

pytestmark = pytest.mark.anyio

ADMIN = "admin-token-0123456789abcdef"
DEV = "dev-token-0123456789abcdefgh"
DEV_AND_STAGING = "dev-staging-token-0123456789"
UNKNOWN = "nobody-token-0123456789abcd"
MESSAGE = "missing or invalid bearer token"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata of ``token``."""
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class Material:
    """The files of one test: a CA, a server pair it signed, a client pair it signed, and another CA's client pair."""

    ca: Authority
    ca_path: Path
    server: Pair
    client: Pair
    stranger: Pair


@pytest.fixture
def material(tmp_path: Path) -> Material:
    """A fresh CA with server and client certificates, and a client certificate of another CA, written to files."""
    ca = Authority()
    return Material(
        ca=ca,
        ca_path=ca.write(tmp_path / "tls" / "ca.crt"),
        server=ca.server().write(tmp_path / "tls", "server"),
        client=ca.client().write(tmp_path / "tls", "client"),
        stranger=Authority("another CA").client("stranger").write(tmp_path / "tls", "stranger"),
    )


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """Three tokens: one for every environment, one for dev, one for dev and staging."""
    path = tmp_path / "tokens"
    path.write_text(f"# tests\n{ADMIN}\n{DEV} dev   # dev only\n{DEV_AND_STAGING} dev,staging\n")
    path.chmod(0o600)
    return path


@asynccontextmanager
async def tls_daemon(
    database: str, material: Material, *, mutual: bool = False, registry: Registry | None = None, **settings: Any
) -> AsyncIterator[Daemon]:
    """A daemon serving TLS with ``material`` (and requiring client certificates when ``mutual``), running the
    functions of ``registry`` (none by default)."""
    cert, key = material.server.paths
    async with run_daemon(
        database,
        registry=registry or Registry(),
        tls_cert=cert,
        tls_key=key,
        tls_client_ca=material.ca_path if mutual else None,
        credentials=grpc.ssl_channel_credentials(
            root_certificates=material.ca.pem,
            private_key=material.client.key if mutual else None,
            certificate_chain=material.client.cert if mutual else None,
        ),
        **settings,
    ) as daemon:
        yield daemon


async def get_status(channel: grpc.aio.Channel, **call: Any) -> grpc.StatusCode:
    """The status of a GetConnection of an unknown connection on ``channel`` (NOT_FOUND means it got through)."""
    stub = pb_grpc.OrchestratorStub(channel)
    try:
        await stub.GetConnection(pb.GetConnectionRequest(connection=rpc.ref("nobody")), timeout=WAIT, **call)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("GetConnection of an unknown connection answered")


# -- TLS -------------------------------------------------------------------------------


async def test_tls_calls_succeed_with_the_ca_and_fail_without(database: str, material: Material) -> None:
    """Over TLS a client trusting the CA gets through; a plaintext client and one trusting another CA do not."""
    async with tls_daemon(database, material) as daemon:
        response = await rpc.emit(daemon.stub, VALIDATE, "tls-1")
        assert response.state == PENDING
        address = f"127.0.0.1:{daemon.port}"
        async with grpc.aio.insecure_channel(address) as plaintext:
            assert await get_status(plaintext) is grpc.StatusCode.UNAVAILABLE
        other = grpc.ssl_channel_credentials(root_certificates=Authority("another CA").pem)
        async with grpc.aio.secure_channel(address, other) as untrusted:
            assert await get_status(untrusted) is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_of_the_ca(database: str, material: Material) -> None:
    """With --tls-client-ca a client certificate of that CA gets through; none, or another CA's, fails."""
    async with tls_daemon(database, material, mutual=True) as daemon:
        assert await get_status(daemon.channel) is grpc.StatusCode.NOT_FOUND
        address = f"127.0.0.1:{daemon.port}"
        without = grpc.ssl_channel_credentials(root_certificates=material.ca.pem)
        async with grpc.aio.secure_channel(address, without) as channel:
            assert await get_status(channel) is grpc.StatusCode.UNAVAILABLE
        stranger = grpc.ssl_channel_credentials(
            root_certificates=material.ca.pem,
            private_key=material.stranger.key,
            certificate_chain=material.stranger.cert,
        )
        async with grpc.aio.secure_channel(address, stranger) as channel:
            assert await get_status(channel) is grpc.StatusCode.UNAVAILABLE


# -- tokens ----------------------------------------------------------------------------


@pytest.fixture
async def guarded(database: str, material: Material, token_file: Path) -> AsyncIterator[Daemon]:
    """A daemon over TLS that asks for the tokens of ``token_file``."""
    async with tls_daemon(database, material, auth_token_file=token_file) as daemon:
        yield daemon


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-header"),
        pytest.param(bearer(UNKNOWN), id="unknown-token"),
        pytest.param(bearer(ADMIN[:-1]), id="a-prefix-of-a-token"),
        pytest.param((("authorization", f"Basic {ADMIN}"),), id="not-bearer"),
        pytest.param((("authorization", "Bearer "),), id="empty-bearer"),
    ],
)
async def test_a_missing_or_wrong_token_is_unauthenticated(
    guarded: Daemon, metadata: tuple[tuple[str, str], ...]
) -> None:
    """Every RPC answers UNAUTHENTICATED with exactly the one message, whatever was wrong with the token."""
    stub = guarded.stub
    calls = [
        stub.EmitLifecycleEvent(rpc.emit_request(VALIDATE, "x-1"), metadata=metadata, timeout=WAIT),
        stub.GetConnection(pb.GetConnectionRequest(connection=rpc.ref("x-1")), metadata=metadata, timeout=WAIT),
        stub.ListConnections(pb.ListConnectionsRequest(), metadata=metadata, timeout=WAIT),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == MESSAGE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in stub.ReadEvents(pb.ReadEventsRequest(), metadata=metadata, timeout=WAIT)]
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == MESSAGE
    # Nothing was written by the refused emit.
    assert await rpc.records(guarded.stub, metadata=bearer(ADMIN)) == []


async def test_a_request_that_does_not_decode_is_unauthenticated_without_a_token(guarded: Daemon) -> None:
    """Without a token, even bytes that are not the method's message are UNAUTHENTICATED: nothing is told."""
    path = "/orchestrator.v1.Orchestrator/EmitLifecycleEvent"
    call = guarded.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\xff\xff\xff not protobuf", timeout=WAIT)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == MESSAGE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\xff\xff\xff not protobuf", metadata=bearer(ADMIN), timeout=WAIT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_known_token_gets_through(guarded: Daemon) -> None:
    """The right token, with the scheme in any case, is let in."""
    for n, header in enumerate((f"Bearer {ADMIN}", f"bearer {ADMIN}")):
        response = await guarded.stub.EmitLifecycleEvent(
            rpc.emit_request(VALIDATE, f"in-{n}"), metadata=(("authorization", header),), timeout=WAIT
        )
        assert response.state == PENDING


async def test_unauthenticated_calls_are_logged_once_without_the_token(
    guarded: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """Three refused calls in a row are one WARNING line, which names neither the token nor the header."""
    caplog.set_level(logging.DEBUG, logger="orchestrator")
    for _ in range(3):
        assert await get_status(guarded.channel, metadata=bearer(UNKNOWN)) is grpc.StatusCode.UNAUTHENTICATED
    lines = [r for r in caplog.records if "UNAUTHENTICATED" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING
    assert "GetConnection" in lines[0].getMessage()
    assert UNKNOWN not in caplog.text


async def test_health_answers_without_a_token_and_reflection_needs_one(guarded: Daemon) -> None:
    """grpc.health.v1 answers SERVING to a caller with no token; server reflection asks for one."""
    health = health_pb2_grpc.HealthStub(guarded.channel)
    for service in ("", "orchestrator.v1.Orchestrator"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")

    async def listed(metadata: tuple[tuple[str, str], ...]) -> list[str]:
        call = reflection.ServerReflectionInfo(iter([ask]), metadata=metadata, timeout=WAIT)
        return [s.name async for answer in call for s in answer.list_services_response.service]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await listed(())
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "orchestrator.v1.Orchestrator" in await listed(bearer(DEV))


# -- scopes ----------------------------------------------------------------------------


async def test_a_scoped_token_cannot_touch_another_environment(guarded: Daemon) -> None:
    """A dev token: PERMISSION_DENIED for prod's connection (the emit and the credentials write nothing), allowed in
    dev."""
    stub = guarded.stub
    prod = rpc.ref("p-1", environment="prod")
    await stub.EmitLifecycleEvent(rpc.emit_request(VALIDATE, prod), metadata=bearer(ADMIN), timeout=WAIT)
    before = await rpc.records(stub, metadata=bearer(ADMIN))
    get = pb.GetConnectionRequest(connection=prod)
    version = (await stub.GetConnection(get, metadata=bearer(ADMIN), timeout=WAIT)).connection.version

    refused = [
        stub.EmitLifecycleEvent(rpc.emit_request(CREATE, prod), metadata=bearer(DEV), timeout=WAIT),
        stub.GetConnection(pb.GetConnectionRequest(connection=prod), metadata=bearer(DEV), timeout=WAIT),
        stub.ListConnections(pb.ListConnectionsRequest(environment="prod"), metadata=bearer(DEV), timeout=WAIT),
        stub.UpdateCredentials(
            pb.UpdateCredentialsRequest(connection=prod, credentials={"access_token": "from-dev-0123456789"}),
            metadata=bearer(DEV),
            timeout=WAIT,
        ),
    ]
    for call in refused:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "'prod'" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in stub.ReadEvents(rpc.read_request(prod), metadata=bearer(DEV), timeout=WAIT)]
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

    assert await rpc.records(stub, metadata=bearer(ADMIN)) == before, "a refused call wrote something"
    assert (await stub.GetConnection(get, metadata=bearer(ADMIN), timeout=WAIT)).connection.version == version
    dev = await stub.EmitLifecycleEvent(rpc.emit_request(VALIDATE, "d-1"), metadata=bearer(DEV), timeout=WAIT)
    assert dev.state == PENDING


async def test_a_scoped_token_lists_only_its_environments_page_by_page(guarded: Daemon) -> None:
    """Without a filter, ListConnections gives a scoped token its environments' rows only, across pages."""
    stub = guarded.stub
    mine = set()
    for environment in ("dev", "prod", "staging", "dev-eu", "zz"):
        for n in range(3):
            ref = rpc.ref(f"c-{n}", environment=environment)
            await stub.EmitLifecycleEvent(rpc.emit_request(VALIDATE, ref), metadata=bearer(ADMIN), timeout=WAIT)
            if environment in ("dev", "staging"):
                mine.add(f"{environment}/acme/c-{n}")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListConnections(
            pb.ListConnectionsRequest(page_size=2, page_token=token), metadata=bearer(DEV_AND_STAGING), timeout=WAIT
        )
        pages += 1
        seen += [f"{c.ref.environment}/{c.ref.integration}/{c.ref.connection_id}" for c in page.connections]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(mine), "each in-scope row once, in stream order, and no other"
    assert pages >= 3
    everything = await stub.ListConnections(pb.ListConnectionsRequest(), metadata=bearer(ADMIN), timeout=WAIT)
    assert len(everything.connections) == 15
    only_dev = await stub.ListConnections(pb.ListConnectionsRequest(), metadata=bearer(DEV), timeout=WAIT)
    assert {c.ref.environment for c in only_dev.connections} == {"dev"}


async def test_a_scoped_token_reads_no_record_of_another_environment(guarded: Daemon) -> None:
    """ReadEvents leaves out other environments' records, in the history and while following."""
    stub = guarded.stub
    for ref in (rpc.ref("h-1", environment="prod"), rpc.ref("h-1"), rpc.ref("h-2", environment="prod")):
        await stub.EmitLifecycleEvent(rpc.emit_request(VALIDATE, ref), metadata=bearer(ADMIN), timeout=WAIT)

    history = await rpc.records(stub, metadata=bearer(DEV))
    assert {r.stream for r in history} == {"dev/acme/h-1"}
    everything = await rpc.records(stub, metadata=bearer(ADMIN))
    assert {r.stream for r in everything} == {"prod/acme/h-1", "dev/acme/h-1", "prod/acme/h-2"}

    seen: list[pb.EventRecord] = []
    head = max(r.position for r in everything)
    call = stub.ReadEvents(
        pb.ReadEventsRequest(from_position=head + 1, follow=True), metadata=bearer(DEV), timeout=WAIT
    )
    try:
        async with anyio.create_task_group() as tg:

            async def follow() -> None:
                async for record in call:
                    seen.append(record)
                    if record.stream == "dev/acme/f-2":
                        tg.cancel_scope.cancel()

            tg.start_soon(follow)
            for ref in (rpc.ref("f-1", environment="prod"), rpc.ref("f-2")):
                await stub.EmitLifecycleEvent(rpc.emit_request(VALIDATE, ref), metadata=bearer(ADMIN), timeout=WAIT)
    finally:
        call.cancel()
    assert seen, "the follower saw nothing"
    assert {r.stream for r in seen} == {"dev/acme/f-2"}


async def closed(ctx: Context) -> None:
    """A creation function whose job gives up at once."""
    raise NonRetryable("the account is closed")


async def test_a_scoped_token_sees_and_steers_only_its_environments_jobs(
    database: str, material: Material, token_file: Path
) -> None:
    """ListJobs leaves out other environments' jobs (page by page); ListJobs of, RetryJob and CancelJob of a job of
    another environment are PERMISSION_DENIED and write nothing; its own environment's job is retried."""
    registry = Registry.of([function("register", "post-connection-creation", closed)])
    async with tls_daemon(database, material, auth_token_file=token_file, registry=registry) as daemon:
        stub = daemon.stub
        prod = rpc.ref("j-1", environment="prod")
        for ref in (prod, rpc.ref("j-1"), rpc.ref("j-2", environment="staging"), rpc.ref("j-3", environment="zz")):
            request = rpc.emit_request(CREATE, ref, wait=True)
            await stub.EmitLifecycleEvent(request, metadata=bearer(ADMIN), timeout=WAIT)
        everything = await stub.ListJobs(pb.ListJobsRequest(), metadata=bearer(ADMIN), timeout=WAIT)
        jobs = {j.connection.environment: j for j in everything.jobs}
        assert sorted(jobs) == ["dev", "prod", "staging", "zz"]
        assert {j.status for j in jobs.values()} == {pb.JOB_STATUS_GAVE_UP}

        only_dev = await stub.ListJobs(pb.ListJobsRequest(), metadata=bearer(DEV), timeout=WAIT)
        assert [j.id for j in only_dev.jobs] == [jobs["dev"].id]
        seen, token = [], ""
        while True:
            page = await stub.ListJobs(
                pb.ListJobsRequest(page_size=1, page_token=token), metadata=bearer(DEV_AND_STAGING), timeout=WAIT
            )
            seen += [j.connection.environment for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
        assert seen == ["dev", "staging"]

        before = await rpc.records(stub, metadata=bearer(ADMIN))
        refused = [
            stub.ListJobs(pb.ListJobsRequest(connection=prod), metadata=bearer(DEV), timeout=WAIT),
            stub.RetryJob(pb.RetryJobRequest(job_id=jobs["prod"].id), metadata=bearer(DEV), timeout=WAIT),
            stub.CancelJob(pb.CancelJobRequest(job_id=jobs["prod"].id), metadata=bearer(DEV), timeout=WAIT),
        ]
        for call in refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert caught.value.details() == "this token may not touch environment 'prod'"
        for call in (
            stub.ListJobs(pb.ListJobsRequest(), timeout=WAIT),
            stub.RetryJob(pb.RetryJobRequest(job_id=jobs["dev"].id), timeout=WAIT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert await rpc.records(stub, metadata=bearer(ADMIN)) == before, "a refused call wrote something"

        mine = await stub.RetryJob(pb.RetryJobRequest(job_id=jobs["dev"].id), metadata=bearer(DEV), timeout=WAIT)
        assert mine.id == jobs["dev"].id
        after = await rpc.records(stub, "j-1", metadata=bearer(ADMIN))
        retried = [r for r in after if r.type == "function-retried"]
        assert [rpc.as_dict(r.data)["by"] for r in retried] == [fingerprint(DEV)]


async def test_without_a_token_file_no_token_is_asked_for(database: str) -> None:
    """A daemon on loopback without a token file lets every caller in, as before."""
    async with run_daemon(database, registry=Registry()) as daemon:
        response = await rpc.emit(daemon.stub, VALIDATE, "open-1")
        assert response.state == PENDING
