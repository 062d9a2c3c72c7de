"""The job worker on a fake clock: attempts, backoff, giving up, fencing, hold, draining, async metadata writes."""

from __future__ import annotations

import logging
from datetime import timedelta

import anyio
import httpx
import pytest

from orchestrator import records
from orchestrator.config import DispatchConfig, Integration
from orchestrator.context import Context
from orchestrator.errors import LeaseLost, Misconfigured
from orchestrator.functions import NonRetryable
from orchestrator.provider import Provider
from orchestrator.records import FunctionFailed, FunctionGaveUp, FunctionSucceeded, MetadataUpdated
from orchestrator.retry import RetryPolicy
from orchestrator.worker import MISCONFIGURED, NOT_INSTALLED
from tests.support.clock import FakeClock
from tests.support.engine import (
    ACME,
    CREATE,
    GLOBEX,
    INTEGRATION,
    Append,
    Call,
    Gate,
    SpyStore,
    function,
    jitter,
    running,
    settle,
)

pytestmark = pytest.mark.anyio


class Failing:
    """A creation function that raises each of ``errors`` in turn, then succeeds; counts its attempts."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.attempts: list[int] = []

    async def handler(self, ctx: Context) -> None:
        """The event function (a bound coroutine method, so it runs on the loop)."""
        self.attempts.append(ctx.event.attempt)
        if self.errors:
            raise self.errors.pop(0)


async def test_a_successful_job_is_recorded_and_removed() -> None:
    """A due job is claimed, its success recorded against the creation, and the job removed in that write."""
    run = Failing()
    async with running(function("register", CREATE, run.handler), worker=True) as h:
        created = await h.emit(CREATE)
        log = await h.records_up_to(2)
        assert [r.type for r in log] == ["post-connection-creation", "function-succeeded"]
        assert log[1].causation_id == created.event_id
        body = (await h.bodies())[1]
        assert isinstance(body, FunctionSucceeded)
        assert (body.function, body.attempt) == ("register", 1)
        assert await h.store.jobs() == []
        assert run.attempts == [1]
        connection = await h.service.get_connection(ACME)
        assert [(o.name, o.status.value, o.attempts) for o in connection.outcomes] == [("register", "succeeded", 1)]


async def test_a_retryable_failure_is_retried_only_once_the_fake_clock_passes_its_due_time() -> None:
    """A failure records retry_in_ms, reschedules the job at now + the seeded delay, and runs it again only then."""
    run = Failing(RuntimeError("provider hiccup"))
    async with running(function("register", CREATE, run.handler), worker=True) as h:
        start = h.clock.now()
        await h.emit(CREATE)
        await h.records_up_to(2)
        (delay,) = jitter(RetryPolicy().ceiling(1))
        failed = (await h.bodies())[1]
        assert isinstance(failed, FunctionFailed)
        assert (failed.attempt, failed.error, failed.retryable) == (1, "provider hiccup", True)
        assert failed.retry_in_ms == int(delay * 1000)
        (job,) = await h.store.jobs(ACME)
        assert (job.run_at, job.attempt, job.leased) == (start + timedelta(seconds=delay), 1, False)

        await h.clock.wait_for_sleepers(1, until=job.run_at + timedelta(seconds=1))  # parked until it is due
        h.clock.advance_to(job.run_at - timedelta(milliseconds=1))
        await settle()
        assert (run.attempts, await h.head()) == ([1], 2)  # not yet due: nothing ran

        h.clock.advance(0.01)
        await h.records_up_to(3)
        again = (await h.bodies())[2]
        assert isinstance(again, FunctionSucceeded)
        assert again.attempt == 2
        assert run.attempts == [1, 2]
        assert await h.store.jobs() == []


async def test_a_job_gives_up_when_its_attempts_run_out() -> None:
    """After max_attempts retryable failures the last one is recorded and the function gives up, naming why."""
    run = Failing(*(RuntimeError("provider down") for _ in range(3)))
    policy = RetryPolicy(max_attempts=3, initial_interval=1.0, backoff=2.0)
    async with running(function("register", CREATE, run.handler, retry=policy), worker=True) as h:
        await h.emit(CREATE)
        for records_so_far in (2, 3):
            await h.records_up_to(records_so_far)
            (job,) = await h.store.jobs(ACME)
            await h.until_due(job.run_at)
        log = await h.records_up_to(5)
        assert [r.type for r in log] == [
            "post-connection-creation",
            "function-failed",
            "function-failed",
            "function-failed",
            "function-gave-up",
        ]
        failures = [b for b in await h.bodies() if isinstance(b, FunctionFailed)]
        delays = jitter(policy.ceiling(1), policy.ceiling(2))
        assert [(f.attempt, f.retry_in_ms) for f in failures] == [
            (1, int(delays[0] * 1000)),
            (2, int(delays[1] * 1000)),
            (3, None),
        ]
        assert (await h.bodies())[4] == FunctionGaveUp("register", 3, "provider down", "3 attempts exhausted")
        assert await h.store.jobs() == []
        assert run.attempts == [1, 2, 3]


async def test_a_non_retryable_failure_gives_up_after_one_attempt() -> None:
    """NonRetryable is recorded as a failure that is not retryable, and the function gives up at once."""
    run = Failing(NonRetryable("account closed"))
    async with running(function("register", CREATE, run.handler), worker=True) as h:
        await h.emit(CREATE)
        log = await h.records_up_to(3)
        assert [r.type for r in log] == ["post-connection-creation", "function-failed", "function-gave-up"]
        failed, gave_up = (await h.bodies())[1:]
        assert isinstance(failed, FunctionFailed)
        assert (failed.error_type, failed.retryable, failed.retry_in_ms) == ("NonRetryable", False, None)
        assert gave_up == FunctionGaveUp("register", 1, "account closed", "not retryable")
        assert await h.store.jobs() == []
        await settle()
        assert run.attempts == [1]


class Calling:
    """A creation function that calls the provider (``GET /me``), optionally wrapping what the proxy raises."""

    def __init__(self, wrap: bool = False) -> None:
        self.wrap = wrap
        self.attempts: list[int] = []

    async def handler(self, ctx: Context) -> None:
        """The event function."""
        self.attempts.append(ctx.event.attempt)
        try:
            await ctx.get("/me")
        except Exception as exc:
            if self.wrap:
                raise RuntimeError("could not reach the provider") from exc
            raise


@pytest.mark.parametrize("wrap", [False, True], ids=["let-through", "wrapped"])
@pytest.mark.parametrize(
    ("integration", "raised", "says"),
    [
        (Integration(INTEGRATION), "Misconfigured", "integration acme has no base_url"),
        (
            Integration(INTEGRATION, base_url="https://acme.test", auth="bearer"),
            "CredentialsUnavailable",
            "has no credential 'access_token'",
        ),
    ],
    ids=["no-base-url", "no-credential"],
)
async def test_a_job_the_daemons_settings_fail_gives_up_after_one_attempt_naming_the_setting(
    integration: Integration, raised: str, says: str, wrap: bool
) -> None:
    """A misconfigured call fails the job once, not retried, and its give-up names the setting (even when the
    function raised something else of it)."""
    run = Calling(wrap)
    async with running(
        function("register", CREATE, run.handler), worker=True, integrations={INTEGRATION: integration}
    ) as h:
        await h.emit(CREATE)
        log = await h.records_up_to(3)
        assert [r.type for r in log] == ["post-connection-creation", "function-failed", "function-gave-up"]
        failed, gave_up = (await h.bodies())[1:]
        assert isinstance(failed, FunctionFailed) and isinstance(gave_up, FunctionGaveUp)
        assert (failed.retryable, failed.retry_in_ms) == (False, None)
        assert failed.error_type == ("RuntimeError" if wrap else raised)
        assert (gave_up.function, gave_up.attempt, gave_up.reason) == ("register", 1, MISCONFIGURED)
        assert says in gave_up.error
        assert await h.store.jobs() == []
        await settle()
        assert run.attempts == [1]
        assert h.requests == []


async def test_a_plugin_raising_misconfigured_itself_is_an_ordinary_failure() -> None:
    """The mark comes from the daemon's proxy: a function that raises Misconfigured of its own is not marked."""
    run = Failing(Misconfigured("integration acme has no base_url (says the plugin)"))
    async with running(function("register", CREATE, run.handler), worker=True) as h:
        await h.emit(CREATE)
        await h.records_up_to(3)
        gave_up = (await h.bodies())[2]
        assert gave_up == FunctionGaveUp(
            "register", 1, "integration acme has no base_url (says the plugin)", "not retryable"
        )


async def test_a_job_whose_function_is_no_longer_installed_gives_up() -> None:
    """A job left by a function that was uninstalled since gives up without running anything."""
    clock = FakeClock()
    store = SpyStore(clock)
    run = Failing()
    async with running(function("register", CREATE, run.handler), store=store, clock=clock) as before_upgrade:
        created = await before_upgrade.emit(CREATE)
    async with running(store=store, clock=clock, worker=True) as h:  # the plugin is gone
        log = await h.records_up_to(2)
        assert log[1].causation_id == created.event_id
        assert (await h.bodies())[1] == FunctionGaveUp("register", 1, NOT_INSTALLED)
        assert await h.store.jobs() == []
    assert run.attempts == []


async def test_an_outcome_from_a_stale_claim_is_refused() -> None:
    """finish_job with the lease token of an earlier claim raises LeaseLost and writes nothing (fencing)."""
    async with running(function("register", CREATE, Failing().handler)) as h:
        created = await h.emit(CREATE)
        (stale,) = await h.store.claim_jobs(limit=1, lease=5)
        assert await h.store.claim_jobs(limit=1, lease=5) == []  # leased
        h.clock.advance(6)  # the lease runs out
        (fresh,) = await h.store.claim_jobs(limit=1, lease=5)
        assert (stale.lease_token, fresh.lease_token, fresh.attempt) == (1, 2, 2)
        outcome = records.new(
            FunctionSucceeded("register", stale.attempt, 1, "acme-plugin", "1.2.3"), causation_id=created.event_id
        )
        with pytest.raises(LeaseLost, match="was claimed again"):
            await h.store.finish_job(stale, [outcome])
        assert await h.head() == 1
        await h.store.finish_job(fresh, [outcome])
        assert await h.types() == ["post-connection-creation", "function-succeeded"]


async def test_an_attempt_that_outlived_its_lease_has_its_outcome_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """When a lease runs out the job is claimed again; the first attempt's outcome is refused, the second's kept."""
    gate = Gate()

    async def register(ctx: Context) -> None:
        await gate.enter()

    config = DispatchConfig()
    async with running(function("register", CREATE, register), worker=True, config=config) as h:
        await h.emit(CREATE)
        await gate.arrivals(1)
        await h.clock.wait_for_sleepers(1)  # the worker waits for the lease to run out
        h.clock.advance(config.attempt_timeout + config.lease_margin + 1)
        await gate.arrivals(2)  # claimed again while the first attempt still runs
        gate.open()
        await h.records_up_to(2)
        await settle()
        assert gate.left == 2
        assert await h.types() == ["post-connection-creation", "function-succeeded"]
        body = (await h.bodies())[1]
        assert isinstance(body, FunctionSucceeded) and body.attempt == 2
        assert await h.store.jobs() == []
    assert any(r.levelno == logging.WARNING and "was claimed again" in r.getMessage() for r in caplog.records)


async def test_hold_keeps_the_worker_off_that_connections_jobs() -> None:
    """While a connection is held its due jobs are not claimed (others' are); on release they run."""
    ran: list[str] = []

    async def register(ctx: Context) -> None:
        ran.append(ctx.connection.connection_id)

    async with running(function("register", CREATE, register), worker=True) as h:
        async with h.worker.hold(ACME):
            await h.emit(CREATE)
            await h.emit(CREATE, ref=GLOBEX)
            await h.records_up_to(3)  # GLOBEX's job ran
            await settle()
            (held,) = await h.store.jobs(ACME)
            assert (ran, held.attempt, held.leased) == (["globex-1"], 0, False)
        await h.records_up_to(4)
        assert ran == ["globex-1", "acme-1"]
        assert await h.store.jobs() == []


async def test_stop_claiming_then_idle_returns_once_running_attempts_finish() -> None:
    """After stop_claiming() nothing new is claimed, and idle() returns when the running attempt has finished."""
    gate = Gate()

    async def register(ctx: Context) -> None:
        await gate.enter()

    async with running(function("register", CREATE, register), worker=True) as h, anyio.create_task_group() as tg:
        await h.emit(CREATE)
        await gate.arrivals(1)
        h.worker.stop_claiming()
        idle = Call(tg, h.worker.idle)
        await h.emit(CREATE, ref=GLOBEX)
        await settle()
        assert not idle.done.is_set()
        gate.open()
        await idle.result()
        assert await h.types() == ["post-connection-creation", "post-connection-creation", "function-succeeded"]
        (left,) = await h.store.jobs()
        assert (left.stream, left.attempt, left.leased) == (GLOBEX.stream, 0, False)  # kept for the next start
        assert gate.entered == 1


async def test_metadata_written_by_a_job_is_appended_at_once() -> None:
    """An asynchronous attempt's metadata write is its own append, made while the attempt is still running."""
    gate = Gate()

    async def register(ctx: Context) -> None:
        await ctx.update_metadata({"webhook_id": "wh_1"})
        await gate.enter()

    async with running(function("register", CREATE, register), worker=True) as h:
        created = await h.emit(CREATE)
        await gate.arrivals(1)
        log = await h.log()
        assert [r.type for r in log] == ["post-connection-creation", "metadata-updated"]
        assert log[1].causation_id == created.event_id
        assert (await h.bodies())[1] == MetadataUpdated("register", {"webhook_id": "wh_1"}, merge=True)
        assert h.store.appends[-1] == Append(["metadata-updated"], 0, 0)
        assert (await h.service.get_connection(ACME)).metadata == {"webhook_id": "wh_1"}
        gate.open()
        assert [r.type for r in await h.records_up_to(3)][2] == "function-succeeded"


# -- the provider proxy's pauses -----------------------------------------------------------


async def test_a_provider_retry_after_waits_on_the_injected_clock() -> None:
    """Provider honours Retry-After: 5 by sleeping on its clock: the retry goes out only once fake time passed 5 s."""
    clock = FakeClock()
    replies = [httpx.Response(503, headers={"Retry-After": "5"}, text="busy"), httpx.Response(200, json={"id": 1})]
    sent: list[httpx.Request] = []

    def provider(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return replies.pop(0)

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http,
        anyio.create_task_group() as tg,
    ):
        proxy = Provider(http, Integration(INTEGRATION, base_url="https://acme.example"), {}, {}, clock=clock)
        call = Call(tg, lambda: proxy.request("GET", "/me"))
        with anyio.fail_after(5):  # a real 5 s sleep would trip this before the fake clock is ever asked
            await clock.wait_for_sleepers(1)
        assert clock.wake_times() == [clock.now() + timedelta(seconds=5)]
        assert len(sent) == 1
        clock.advance(4.999)
        await settle()
        assert (len(sent), call.done.is_set()) == (1, False)
        clock.advance(0.001)
        response = await call.result()
    assert response.status_code == 200
    assert len(sent) == 2
    assert proxy.calls == ["GET https://acme.example/me -> 503", "GET https://acme.example/me -> 200"]


async def test_a_jobs_provider_calls_pause_on_the_engines_clock() -> None:
    """Inside a job, a provider's Retry-After pause is taken on the clock the engine was assembled with."""
    replies = [httpx.Response(503, headers={"Retry-After": "5"}), httpx.Response(201, json={"id": "wh_1"})]

    async def register(ctx: Context) -> None:
        response = await ctx.post("/webhooks", json={"url": "https://example.com/hook"})
        await ctx.set_metadata({"webhook_id": response.json()["id"]})

    integrations = {INTEGRATION: Integration(INTEGRATION, base_url="https://acme.example")}
    async with running(
        function("register", CREATE, register),
        worker=True,
        provider=lambda request: replies.pop(0),
        integrations=integrations,
    ) as h:
        start = h.clock.now()
        await h.emit(CREATE)
        await h.clock.wait_for_sleepers(1, until=start + timedelta(seconds=5))
        assert (len(h.requests), await h.head()) == (1, 1)
        h.clock.advance(5)
        log = await h.records_up_to(3)
        assert [r.type for r in log] == ["post-connection-creation", "metadata-updated", "function-succeeded"]
        assert [str(r.url) for r in h.requests] == ["https://acme.example/webhooks"] * 2
        assert (await h.service.get_connection(ACME)).metadata == {"webhook_id": "wh_1"}
