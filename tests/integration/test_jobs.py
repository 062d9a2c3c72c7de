"""Jobs seen and steered through a real daemon: ListJobs, RetryJob and CancelJob over gRPC, a real SQLite log
and a real local HTTP provider that fails until the test fixes it. The log is followed (``ReadEvents``) to see
what the worker did; nothing sleeps to wait. Scopes: tests/integration/test_access.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator import Context, NonRetryable, RetryPolicy
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.config import Integration
from tests.support import daemon as in_process
from tests.support.daemon import FAST_RETRY
from tests.support.grpc import ACTIVE, CREATE, GAVE_UP, SUCCEEDED, WAIT, Stub, as_dict, emit, follow_until, records, ref
from tests.support.provider import ProviderServer, Reply

pytestmark = pytest.mark.anyio

NEVER_AGAIN = RetryPolicy(max_attempts=3, initial_interval=1e6, max_interval=1e6)
"""A retry so far away that the job surely waits, queued, during a test."""


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """The integration's provider: a local HTTP server on 127.0.0.1:0."""
    with ProviderServer() as server:
        yield server


def acme(provider: ProviderServer) -> dict[str, Integration]:
    """Integration acme at the provider, without the proxy's own retries (one request per attempt)."""
    return {"acme": Integration("acme", base_url=provider.url, auth="bearer", retries=0)}


async def register_webhook(ctx: Context) -> None:
    """The creation function: registers a webhook at the provider."""
    await ctx.post("/webhooks", json={"url": "https://platform.test/hooks"})


async def jobs_of(stub: Stub, connection_id: str, *statuses: int) -> list[pb.Job]:
    """ListJobs of one connection of acme in dev (every page)."""
    request = pb.ListJobsRequest(connection=ref(connection_id), statuses=list(statuses))
    return list((await stub.ListJobs(request, timeout=WAIT)).jobs)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    """The error a call fails with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_job_that_gave_up_is_listed_then_retried_once_the_provider_is_fixed(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """Gave up against a failing provider: ListJobs says so with the error; RetryJob after the fix: it succeeds."""
    provider.route("POST", "/webhooks", Reply(503, "maintenance"))
    function = in_process.function("register-webhook", "post-connection-creation", register_webhook)
    async with in_process.serving(tmp_path, function, integrations=acme(provider)) as daemon:
        stub = daemon.stub
        created = await emit(stub, CREATE, "acme-1", credentials={"access_token": "t0k3n"}, wait=True)
        assert [(o.name, o.status) for o in created.outcomes] == [("register-webhook", GAVE_UP)]

        (job,) = await jobs_of(stub, "acme-1")
        assert job.status == pb.JOB_STATUS_GAVE_UP
        assert (job.function, job.event, job.event_id) == ("register-webhook", CREATE, created.event_id)
        assert (job.attempts, job.max_attempts) == (FAST_RETRY.max_attempts, FAST_RETRY.max_attempts)
        assert "answered 503" in job.last_error
        assert not job.HasField("next_attempt_at")
        assert job.connection == ref("acme-1")
        gave_up = await stub.ListJobs(pb.ListJobsRequest(statuses=[pb.JOB_STATUS_GAVE_UP]), timeout=WAIT)
        assert [j.id for j in gave_up.jobs] == [job.id]
        head = (await records(stub))[-1].position

        provider.route("POST", "/webhooks", Reply(201, {"id": "wh_1"}))
        retried = await stub.RetryJob(pb.RetryJobRequest(job_id=job.id), timeout=WAIT)
        assert retried.id == job.id
        assert retried.status in (pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_RUNNING, pb.JOB_STATUS_SUCCEEDED)
        seen = await follow_until(stub, lambda r: r.type == "function-succeeded", from_position=head + 1)

        assert [r.type for r in seen] == ["function-retried", "function-succeeded"]
        assert as_dict(seen[0].data) == {
            "function": "register-webhook",
            "job_id": job.id,
            "attempts_before": 3,
            "status_before": "gave-up",
            "by": "anonymous",
        }
        assert as_dict(seen[1].data)["attempt"] == 1, "a fresh attempt budget"
        assert {r.causation_id for r in seen} == {created.event_id}
        (done,) = await jobs_of(stub, "acme-1")
        assert (done.status, done.attempts, done.last_error) == (pb.JOB_STATUS_SUCCEEDED, 1, "")
        connection = (
            await stub.GetConnection(pb.GetConnectionRequest(connection=ref("acme-1")), timeout=WAIT)
        ).connection
        assert connection.state == ACTIVE
        assert [(o.name, o.status, o.attempts) for o in connection.outcomes] == [("register-webhook", SUCCEEDED, 1)]
    assert len(provider.requests_to("POST", "/webhooks")) == 4


async def test_a_queued_job_is_cancelled_and_bad_requests_change_nothing(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """CancelJob of a job waiting for its next attempt; each refused call is its status code and writes nothing."""
    provider.route("POST", "/webhooks", Reply(503, "maintenance"), Reply(201, {"id": "wh_2"}))
    function = in_process.function("register-webhook", "post-connection-creation", register_webhook, retry=NEVER_AGAIN)
    async with in_process.serving(tmp_path, function, integrations=acme(provider)) as daemon:
        stub = daemon.stub
        created = await emit(stub, CREATE, "acme-2", credentials={"access_token": "t0k3n"})
        await follow_until(stub, lambda r: r.type == "function-failed")
        (job,) = await jobs_of(stub, "acme-2", pb.JOB_STATUS_QUEUED)
        assert (job.attempts, job.HasField("next_attempt_at")) == (1, True)
        assert "answered 503" in job.last_error

        cancelled = await stub.CancelJob(pb.CancelJobRequest(job_id=job.id, reason="customer churned"), timeout=WAIT)
        assert cancelled.status == pb.JOB_STATUS_CANCELLED and not cancelled.HasField("next_attempt_at")
        log = await records(stub)
        assert (log[-1].type, log[-1].causation_id) == ("function-cancelled", created.event_id)
        assert as_dict(log[-1].data) == {
            "function": "register-webhook",
            "reason": "customer churned",
            "attempt": 1,
            "by": "anonymous",
        }

        unknown = "01900000-0000-7000-8000-000000000000"
        calls = {
            grpc.StatusCode.FAILED_PRECONDITION: [
                stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=WAIT),
            ],
            grpc.StatusCode.NOT_FOUND: [
                stub.RetryJob(pb.RetryJobRequest(job_id=unknown), timeout=WAIT),
                stub.CancelJob(pb.CancelJobRequest(job_id=unknown), timeout=WAIT),
            ],
            grpc.StatusCode.INVALID_ARGUMENT: [
                stub.RetryJob(pb.RetryJobRequest(job_id="job-1"), timeout=WAIT),
                stub.RetryJob(pb.RetryJobRequest(), timeout=WAIT),
                stub.CancelJob(pb.CancelJobRequest(job_id=job.id, reason="a\nb"), timeout=WAIT),
                stub.ListJobs(pb.ListJobsRequest(page_token="bm90IG91cnM"), timeout=WAIT),
                stub.ListJobs(pb.ListJobsRequest(statuses=[pb.JOB_STATUS_UNSPECIFIED]), timeout=WAIT),
                stub.ListJobs(pb.ListJobsRequest(page_size=-1), timeout=WAIT),
                stub.ListJobs(pb.ListJobsRequest(connection=ref("x", environment="Not Valid")), timeout=WAIT),
            ],
        }
        for code, failing in calls.items():
            for call in failing:
                error = await refused(call)
                assert error.code() == code, error.details()
                assert error.details() and "\n" not in error.details()
        assert await records(stub) == log, "a refused call wrote something"

        head = log[-1].position
        await stub.RetryJob(pb.RetryJobRequest(job_id=job.id), timeout=WAIT)
        seen = await follow_until(stub, lambda r: r.type == "function-succeeded", from_position=head + 1)
        assert [r.type for r in seen] == ["function-retried", "function-succeeded"]
        assert as_dict(seen[0].data)["status_before"] == "cancelled"


async def test_a_creation_job_of_a_deleted_connection_is_not_retried(tmp_path: Path, provider: ProviderServer) -> None:
    """Once the connection's deletion began, its creation job is FAILED_PRECONDITION to RetryJob."""

    async def closed(ctx: Context) -> None:
        raise NonRetryable("the account is closed")

    function = in_process.function("register-webhook", "post-connection-creation", closed)
    async with in_process.serving(tmp_path, function, integrations=acme(provider)) as daemon:
        stub = daemon.stub
        await emit(stub, CREATE, "acme-3", wait=True)
        await emit(stub, pb.LIFECYCLE_EVENT_PRE_CONNECTION_DELETION, "acme-3")
        (job,) = await jobs_of(stub, "acme-3")
        before = await records(stub)
        error = await refused(stub.RetryJob(pb.RetryJobRequest(job_id=job.id), timeout=WAIT))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "connection dev/acme/acme-3 is deleted and its cleanup has begun" in (error.details() or "")
        assert await records(stub) == before
