"""Jobs seen and steered through the service: listing (paged, filtered, scoped), RetryJob and CancelJob, and
every refusal writing nothing. The store's part is in tests/contract; the gRPC edge in tests/integration."""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator import limits, records
from orchestrator.context import Context
from orchestrator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from orchestrator.functions import NonRetryable
from orchestrator.model import ConnectionRef, FunctionStatus, Job, JobStatus, LifecycleEvent
from orchestrator.retry import RetryPolicy
from orchestrator.service import CANCELLED_BY_REQUEST, Service
from tests.support.clock import FakeClock
from tests.support.engine import (
    ACME,
    CREATE,
    DELETE,
    GLOBEX,
    INTEGRATION,
    Gate,
    Harness,
    SpyStore,
    function,
    running,
    settle,
)

pytestmark = pytest.mark.anyio

LATER = RetryPolicy(max_attempts=3, initial_interval=3600, max_interval=3600)
"""Retries an hour apart at most: a job that failed once waits, queued, while the test looks at it."""
PROD = ConnectionRef("prod", INTEGRATION, "umbrella-1")


class Provider:
    """A creation function whose provider is down (NonRetryable, so it gives up at once) until the test fixes it."""

    def __init__(self) -> None:
        self.down = True
        self.attempts: list[int] = []

    async def register(self, ctx: Context) -> None:
        """The event function."""
        self.attempts.append(ctx.event.attempt)
        if self.down:
            raise NonRetryable("HTTP 403 from the provider: the app is not allowed")


async def only_job(service: Service, ref: ConnectionRef = ACME) -> Job:
    """The one job of ``ref``."""
    (job,) = (await service.list_jobs(ref=ref)).jobs
    return job


async def gave_up(h: Harness, ref: ConnectionRef = ACME) -> Job:
    """Emit a creation on ``ref`` and wait until its one job gave up; the job."""
    head = await h.head()
    await h.emit(CREATE, ref)
    await h.records_up_to(head + 3)  # the creation, function-failed, function-gave-up
    job = await only_job(h.service, ref)
    assert job.status is JobStatus.GAVE_UP
    return job


async def test_a_job_that_gave_up_is_listed_with_its_error_and_retried_with_a_fresh_budget() -> None:
    """GAVE_UP with its last error; RetryJob appends function-retried, the worker runs it again from attempt 1."""
    provider = Provider()
    async with running(function("register", CREATE, provider.register, retry=LATER), worker=True) as h:
        job = await gave_up(h)
        assert (job.attempt, job.max_attempts) == (1, 3)
        assert job.last_error == "HTTP 403 from the provider: the app is not allowed"
        assert job.function == "register" and job.event is LifecycleEvent.POST_CONNECTION_CREATION
        provider.down = False
        head = await h.head()

        retried = await h.service.retry_job(job.job_id, by="token:0123abcd")
        assert (retried.job_id, retried.attempt, retried.max_attempts) == (job.job_id, 0, 3)
        assert retried.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        log = await h.records_up_to(head + 2)
        assert [r.type for r in log[head:]] == ["function-retried", "function-succeeded"]
        assert records.parse(log[head].type, log[head].data) == records.FunctionRetried(
            "register", job.job_id, 1, "gave-up", "token:0123abcd"
        )
        assert {r.causation_id for r in log[head:]} == {job.causation_id}
        assert provider.attempts == [1, 1], "the retried run starts again at attempt 1"
        done = await only_job(h.service)
        assert (done.status, done.attempt, done.last_error) == (JobStatus.SUCCEEDED, 1, "")
        connection = await h.service.get_connection(ACME)
        assert [(o.name, o.status) for o in connection.outcomes] == [("register", FunctionStatus.SUCCEEDED)]


async def test_a_retried_function_shows_as_scheduled_until_it_runs() -> None:
    """Without a running worker the fold shows the function scheduled again, with no attempt of its new run."""
    provider = Provider()
    clock = FakeClock()
    store = SpyStore(clock)
    async with running(function("register", CREATE, provider.register), worker=True, store=store, clock=clock) as h:
        job = await gave_up(h)
    async with running(function("register", CREATE, provider.register), store=store, clock=clock) as h:
        queued = await h.service.retry_job(job.job_id)
        assert (queued.status, queued.run_at) == (JobStatus.QUEUED, clock.now())
        connection = await h.service.get_connection(ACME)
        assert [(o.name, o.status, o.attempts) for o in connection.outcomes] == [
            ("register", FunctionStatus.SCHEDULED, 0)
        ]


async def test_retry_refuses_what_it_cannot_retry_and_writes_nothing() -> None:
    """Malformed, unknown, out of scope, not ended: each refused with a clear error, nothing appended."""
    provider = Provider()
    provider.down = False
    async with running(function("register", CREATE, provider.register), worker=True) as h:
        await h.emit(CREATE)
        await h.records_up_to(2)
        done = await only_job(h.service)
        head = await h.head()
        with pytest.raises(InvalidArgument, match="job_id 'nope' is not a job id"):
            await h.service.retry_job("nope")
        with pytest.raises(InvalidArgument, match="job_id is required"):
            await h.service.retry_job("")
        with pytest.raises(NotFound, match="job 01900000-0000-7000-8000-000000000000 not found"):
            await h.service.retry_job("01900000-0000-7000-8000-000000000000")

        def only_prod(environment: str) -> None:
            if environment != "prod":
                raise PermissionDenied(f"this token may not touch environment {environment!r}")

        with pytest.raises(PermissionDenied, match="'dev'"):
            await h.service.retry_job(done.job_id, check=only_prod)
        with pytest.raises(FailedPrecondition, match="is succeeded: only a job that gave up or was cancelled"):
            await h.service.retry_job(done.job_id)
        assert await h.head() == head


async def test_a_creation_job_of_a_deleted_connection_is_not_retried_but_a_cleanup_job_is() -> None:
    """Once a deletion began only cleanup jobs run: retrying the creation's job is FAILED_PRECONDITION."""
    provider = Provider()
    cleanups: list[int] = []

    async def cleanup(ctx: Context) -> None:
        cleanups.append(ctx.event.attempt)
        if len(cleanups) <= 2:
            raise RuntimeError("the webhook API is down")

    twice = RetryPolicy(max_attempts=2, initial_interval=1, max_interval=1)
    functions = (function("register", CREATE, provider.register), function("unregister", DELETE, cleanup, retry=twice))
    async with running(*functions, worker=True) as h:
        creation = await gave_up(h)
        await h.emit(DELETE)  # the cleanup fails (attempt 1) and goes on in the background
        (background,) = await h.store.jobs(ACME)
        head = await h.head()
        await h.until_due(background.run_at)
        await h.records_up_to(head + 2)  # attempt 2 failed, then gave up
        cleanup_job = await h.service.get_job(background.job_id)
        assert (cleanup_job.status, cleanup_job.attempt) == (JobStatus.GAVE_UP, 2)
        head = await h.head()
        with pytest.raises(FailedPrecondition, match="is deleted and its cleanup has begun"):
            await h.service.retry_job(creation.job_id)
        assert await h.head() == head
        await h.service.retry_job(cleanup_job.job_id)
        log = await h.records_up_to(head + 2)
        assert [r.type for r in log[head:]] == ["function-retried", "function-succeeded"]
        assert cleanups == [1, 2, 1]


async def test_a_job_of_an_earlier_incarnation_or_a_gone_function_is_not_retried() -> None:
    """A connection created anew since, or a function uninstalled since: FAILED_PRECONDITION, nothing written."""
    provider = Provider()
    clock = FakeClock()
    store = SpyStore(clock)
    async with running(function("register", CREATE, provider.register), worker=True, store=store, clock=clock) as h:
        old = await gave_up(h)
        other = await gave_up(h, GLOBEX)
        await h.emit(DELETE)
        await h.emit(CREATE)  # ACME anew: incarnation 2, and a new job that gives up too
        await settle()
        head = await h.head()
        with pytest.raises(FailedPrecondition, match="earlier incarnation of connection dev/acme/acme-1"):
            await h.service.retry_job(old.job_id)
        assert await h.head() == head
    async with running(store=store, clock=clock) as h:  # the plugin is gone
        listed = await h.service.get_job(other.job_id)
        assert listed.max_attempts == 0
        with pytest.raises(FailedPrecondition, match="function register is no longer installed"):
            await h.service.retry_job(other.job_id)
        assert await h.head() == head


async def test_cancel_a_queued_job_then_retry_it() -> None:
    """CancelJob records function-cancelled with the reason and the caller; the cancelled job can be retried."""
    attempts: list[int] = []

    async def flaky(ctx: Context) -> None:
        attempts.append(ctx.event.attempt)
        if len(attempts) == 1:
            raise RuntimeError("timeout talking to the provider")

    async with running(function("register", CREATE, flaky, retry=LATER), worker=True) as h:
        await h.emit(CREATE)
        await h.records_up_to(2)
        waiting = await only_job(h.service)
        assert (waiting.status, waiting.attempt, waiting.last_error) == (
            JobStatus.QUEUED,
            1,
            "timeout talking to the provider",
        )
        assert waiting.run_at > h.clock.now()
        cancelled = await h.service.cancel_job(waiting.job_id, reason="the customer churned", by="token:0123abcd")
        assert cancelled.status is JobStatus.CANCELLED
        log = await h.log()
        assert records.parse(log[-1].type, log[-1].data) == records.FunctionCancelled(
            "register", "the customer churned", 1, "token:0123abcd"
        )
        assert log[-1].causation_id == waiting.causation_id
        head = await h.head()
        with pytest.raises(FailedPrecondition, match=r"has ended \(cancelled\): only a queued job can be cancelled"):
            await h.service.cancel_job(waiting.job_id)
        assert await h.head() == head
        h.clock.advance(7200)
        await settle()
        assert attempts == [1], "a cancelled job is not run when it would have been due"
        await h.service.retry_job(waiting.job_id)
        await h.records_up_to(head + 2)
        assert attempts == [1, 1]
        assert (await only_job(h.service)).status is JobStatus.SUCCEEDED


async def test_cancel_refuses_a_running_job_and_a_bad_reason() -> None:
    """A running attempt is not stopped: FAILED_PRECONDITION saying to wait; a reason must be one printable line."""
    gate = Gate()

    async def slow(ctx: Context) -> None:
        await gate.enter()

    async with running(function("register", CREATE, slow), worker=True) as h:
        await h.emit(CREATE)
        await gate.arrivals()
        running_job = await only_job(h.service)
        assert running_job.status is JobStatus.RUNNING
        head = await h.head()
        with pytest.raises(FailedPrecondition, match=r"is running \(attempt 1\).*wait for it to end"):
            await h.service.cancel_job(running_job.job_id)
        with pytest.raises(InvalidArgument, match="reason contains a control"):
            await h.service.cancel_job(running_job.job_id, reason="one\ntwo")
        with pytest.raises(InvalidArgument, match="reason is 1001 characters long"):
            await h.service.cancel_job(running_job.job_id, reason="x" * 1001)
        assert await h.head() == head
        gate.open()
        await h.records_up_to(head + 1)


async def test_cancel_without_a_reason_says_it_was_by_request() -> None:
    """The default reason."""
    async with running(function("register", CREATE, Provider().register)) as h:  # no worker: the job stays queued
        await h.emit(CREATE)
        job = await only_job(h.service)
        await h.service.cancel_job(job.job_id)
        body = (await h.bodies())[-1]
        assert isinstance(body, records.FunctionCancelled) and body.reason == CANCELLED_BY_REQUEST
        assert await h.store.jobs() == []


async def test_list_jobs_pages_filters_and_scopes() -> None:
    """Pages in (connection, job) order; statuses filter; a scope lists its environments only; tokens are checked."""
    async with running(
        function("register", CREATE, Provider().register), function("audit", CREATE, Provider().register)
    ) as h:
        refs = [ConnectionRef("dev", INTEGRATION, f"c-{n}") for n in range(3)] + [PROD]
        for ref in refs:
            await h.emit(CREATE, ref)
        every = (await h.service.list_jobs(page_size=1000)).jobs
        assert [(j.stream, j.job_id) for j in every] == sorted((j.stream, j.job_id) for j in every)
        assert len(every) == 8

        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await h.service.list_jobs(page_size=3, page_token=token)
            seen += [j.job_id for j in page.jobs]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert (seen, pages) == ([j.job_id for j in every], 3)

        dev = await h.service.list_jobs(page_size=3, environments=frozenset({"dev", "staging"}))
        rest = await h.service.list_jobs(
            page_size=1000, page_token=dev.next_page_token, environments=frozenset({"dev", "staging"})
        )
        assert [j.stream for j in dev.jobs + rest.jobs] == [j.stream for j in every if j.stream.startswith("dev/")]
        assert not rest.next_page_token
        one = await h.service.list_jobs(ref=PROD, environments=frozenset({"dev"}))
        assert {j.stream for j in one.jobs} == {PROD.stream}, "a named connection is checked by the caller, not here"

        (first,) = (await h.service.list_jobs(ref=refs[0], page_size=1)).jobs
        await h.service.cancel_job(first.job_id)
        cancelled = await h.service.list_jobs(statuses=frozenset({JobStatus.CANCELLED}))
        assert [j.job_id for j in cancelled.jobs] == [first.job_id]
        queued = await h.service.list_jobs(statuses=frozenset({JobStatus.QUEUED, JobStatus.RUNNING}), page_size=1000)
        assert len(queued.jobs) == 7

        with pytest.raises(InvalidArgument, match="page_token is not a token this server returned"):
            await h.service.list_jobs(page_token="not-a-token")
        connections = await h.service.list_connections(page_size=1)
        with pytest.raises(InvalidArgument, match="page_token is not a token this server returned"):
            await h.service.list_jobs(page_token=connections.next_page_token)
        page = await h.service.list_jobs(ref=refs[0], page_size=1)
        with pytest.raises(InvalidArgument, match="page_token is of another listing"):
            await h.service.list_jobs(ref=refs[1], page_token=page.next_page_token)
        with pytest.raises(InvalidArgument, match="page_size must be 0 or more"):
            await h.service.list_jobs(page_size=-1)


async def test_a_page_of_jobs_stops_at_its_byte_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs with long errors: a page holds fewer than asked and hands a token, so no reply outgrows the limit."""

    async def verbose(ctx: Context) -> None:
        raise NonRetryable("x" * 4000)

    monkeypatch.setattr(limits, "MAX_PAGE_BYTES", 20_000)
    async with running(function("register", CREATE, verbose), worker=True) as h:
        for n in range(10):
            await h.emit(CREATE, ConnectionRef("dev", INTEGRATION, f"v-{n}"))
        await h.records_up_to(30)
        sizes: list[int] = []
        token = ""
        while True:
            page = await h.service.list_jobs(page_size=1000, page_token=token)
            sizes.append(len(page.jobs))
            token = page.next_page_token
            if not token:
                break
        # Each job weighs a little over 4,256 bytes: four fit in 20,000, the fifth would not.
        assert sizes == [4, 4, 2]


async def test_a_job_is_due_now_when_retried_and_its_next_attempt_is_shown() -> None:
    """The retried job's next attempt is the service clock's now."""
    clock = FakeClock()
    store = SpyStore(clock)
    provider = Provider()
    async with running(function("register", CREATE, provider.register), worker=True, store=store, clock=clock) as h:
        job = await gave_up(h)
    clock.advance(timedelta(hours=1).total_seconds())
    async with running(function("register", CREATE, provider.register), store=store, clock=clock) as h:
        again = await h.service.retry_job(job.job_id)
        assert again.run_at == clock.now() and again.updated_at == clock.now()
