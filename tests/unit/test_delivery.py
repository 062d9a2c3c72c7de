"""The three delivery contracts, pinned by the exact records each emit appends (memory store, fake clock)."""

from __future__ import annotations

from datetime import timedelta

import anyio
import httpx
import pytest

from orchestrator import records
from orchestrator.config import DispatchConfig, Integration
from orchestrator.context import Context
from orchestrator.delivery import DELETION_CANCELLED, REJECTION_CANCELLED, TAKEN_OVER, VALIDATION_CANCELLED
from orchestrator.errors import Misconfigured
from orchestrator.functions import NonRetryable, Rejected
from orchestrator.model import ConnectionState, EmitResult, FunctionStatus, Job, LifecycleEvent, Outcome
from orchestrator.records import (
    ConnectionDeleted,
    ConnectionRejected,
    ConnectionValidated,
    FunctionCancelled,
    FunctionFailed,
    FunctionGaveUp,
    FunctionSucceeded,
    Lifecycle,
    MetadataUpdated,
)
from orchestrator.retry import RetryPolicy
from orchestrator.worker import SUPERSEDED
from tests.support.clock import FakeClock
from tests.support.engine import (
    ACME,
    CREATE,
    DELETE,
    INTEGRATION,
    VALIDATE,
    Append,
    Call,
    Gate,
    Harness,
    SpyStore,
    function,
    jitter,
    running,
    settle,
)

pytestmark = pytest.mark.anyio

S = ConnectionState


async def ok(ctx: Context) -> None:
    """A function that succeeds."""


# -- validate-connection: run now, one deadline, the first failure rejects ----------------------


async def test_validation_passes_when_every_function_succeeds() -> None:
    """Every validate function succeeding appends the request, one success each and connection-validated."""
    seen: list[tuple[str, dict[str, object], dict[str, object], str]] = []

    async def check(ctx: Context) -> None:
        seen.append((ctx.connection.connection_id, ctx.connection.config, ctx.event.payload, ctx.event.event_id))

    functions = [function("check-a", VALIDATE, check), function("check-b", VALIDATE, check)]
    async with running(*functions) as h:
        result = await h.emit(VALIDATE, config={"instance": "acme"}, payload={"scope": "read"})
        log = await h.log()
        assert [r.type for r in log] == [
            "validate-connection",
            "function-succeeded",
            "function-succeeded",
            "connection-validated",
        ]
        lifecycle, *facts = log
        assert {r.causation_id for r in facts} == {lifecycle.event_id}
        bodies = await h.bodies()
        assert bodies[0] == Lifecycle(LifecycleEvent.VALIDATE_CONNECTION, {"instance": "acme"}, {"scope": "read"})
        successes = sorted(
            (b.function, b.attempt, b.distribution, b.version) for b in bodies[1:3] if isinstance(b, FunctionSucceeded)
        )
        assert successes == [("check-a", 1, "acme-plugin", "1.2.3"), ("check-b", 1, "acme-plugin", "1.2.3")]
        assert bodies[3] == ConnectionValidated()
        assert h.store.appends == [Append([r.type for r in log], 0, 0)]
        assert (result.state, result.event_id) == (S.PENDING, lifecycle.event_id)
        assert {(o.name, o.status) for o in result.outcomes} == {
            ("check-a", FunctionStatus.SUCCEEDED),
            ("check-b", FunctionStatus.SUCCEEDED),
        }
        assert seen == [("acme-1", {"instance": "acme"}, {"scope": "read"}, lifecycle.event_id)] * 2


async def test_validation_without_functions_is_validated() -> None:
    """With no validate function installed, the request is validated at once."""
    async with running() as h:
        await h.emit(VALIDATE)
        assert await h.types() == ["validate-connection", "connection-validated"]


async def test_a_rejected_function_rejects_the_connection_with_its_name_and_message() -> None:
    """A function raising Rejected("m") rejects the connection with reason "name: m"."""

    async def check_token(ctx: Context) -> None:
        raise Rejected("invalid API key")

    async with running(function("check-token", VALIDATE, check_token)) as h:
        result = await h.emit(VALIDATE)
        log = await h.log()
        assert [r.type for r in log] == ["validate-connection", "function-failed", "connection-rejected"]
        assert {r.causation_id for r in log[1:]} == {log[0].event_id}
        _, failed, rejected = await h.bodies()
        assert isinstance(failed, FunctionFailed)
        assert (failed.function, failed.attempt, failed.error_type, failed.error, failed.retryable) == (
            "check-token",
            1,
            "Rejected",
            "invalid API key",
            False,
        )
        assert failed.retry_in_ms is None
        assert rejected == ConnectionRejected("check-token: invalid API key", "check-token")
        assert (result.state, result.rejection_reason) == (S.REJECTED, "check-token: invalid API key")
        assert (await h.service.get_connection(ACME)).rejection_reason == "check-token: invalid API key"


async def test_the_first_failure_cancels_the_other_validations() -> None:
    """When one validate function fails, the ones still running are stopped and recorded as cancelled."""
    gate = Gate()

    async def fails(ctx: Context) -> None:
        await gate.arrivals(1)  # the other function is running by now
        raise Rejected("no such account")

    async def hangs(ctx: Context) -> None:
        await gate.enter()

    async with running(function("a-fails", VALIDATE, fails), function("b-hangs", VALIDATE, hangs)) as h:
        result = await h.emit(VALIDATE)
        log = await h.log()
        assert [r.type for r in log] == [
            "validate-connection",
            "function-failed",
            "function-cancelled",
            "connection-rejected",
        ]
        assert {r.causation_id for r in log[1:]} == {log[0].event_id}
        bodies = await h.bodies()
        assert isinstance(bodies[1], FunctionFailed) and bodies[1].function == "a-fails"
        assert bodies[2] == FunctionCancelled("b-hangs", VALIDATION_CANCELLED, 0)
        assert bodies[3] == ConnectionRejected("a-fails: no such account", "a-fails")
        assert (gate.entered, gate.left) == (1, 1)  # it was really stopped, not left running
        assert result.state is S.REJECTED
        assert {(o.name, o.status) for o in result.outcomes} == {
            ("a-fails", FunctionStatus.FAILED),
            ("b-hangs", FunctionStatus.CANCELLED),
        }


async def test_the_deadline_rejects_every_function_still_running_naming_them_all() -> None:
    """At the validate deadline every hanging function times out, and the rejection names each of them."""
    # anyio.fail_after runs on the event loop's real clock, not on the injected one, so the deadline
    # is real time. 1 ms is run_sync's floor, and only functions that never return run under it,
    # so the outcome cannot depend on the machine's speed.
    never = anyio.Event()

    async def hangs(ctx: Context) -> None:
        await never.wait()

    config = DispatchConfig(validate_deadline=0.001)
    async with running(function("hang-a", VALIDATE, hangs), function("hang-b", VALIDATE, hangs), config=config) as h:
        result = await h.emit(VALIDATE)
        assert await h.types() == ["validate-connection", "function-failed", "function-failed", "connection-rejected"]
        bodies = await h.bodies()
        failures = sorted(
            (b.function, b.error_type, b.error, b.retryable) for b in bodies[1:3] if isinstance(b, FunctionFailed)
        )
        assert failures == [
            ("hang-a", "Timeout", "timed out after 0.001s", True),
            ("hang-b", "Timeout", "timed out after 0.001s", True),
        ]
        rejected = bodies[3]
        assert isinstance(rejected, ConnectionRejected)
        assert rejected.reason == "hang-a: timed out after 0.001s; hang-b: timed out after 0.001s"
        assert result.rejection_reason == rejected.reason


async def test_metadata_written_during_validation_lands_in_the_verdicts_append() -> None:
    """A validate function's metadata writes are appended with its outcome and the verdict, in one append."""

    async def check(ctx: Context) -> None:
        await ctx.set_metadata({"account": "acme", "plan": "free"})
        await ctx.update_metadata({"plan": "pro"})
        assert await ctx.get_metadata() == {"account": "acme", "plan": "pro"}

    async with running(function("check", VALIDATE, check)) as h:
        await h.emit(VALIDATE)
        types = [
            "validate-connection",
            "function-succeeded",
            "metadata-updated",
            "metadata-updated",
            "connection-validated",
        ]
        assert await h.types() == types
        assert h.store.appends == [Append(types, 0, 0)]
        bodies = await h.bodies()
        assert bodies[2:4] == [
            MetadataUpdated("check", {"account": "acme", "plan": "free"}, merge=False),
            MetadataUpdated("check", {"plan": "pro"}, merge=True),
        ]
        log = await h.log()
        assert {r.causation_id for r in log[1:]} == {log[0].event_id}
        assert (await h.service.get_connection(ACME)).metadata == {"account": "acme", "plan": "pro"}


# -- validate-connection: a misconfigured daemon is not the customer's fault -------------------


async def call_me(ctx: Context) -> None:
    """A validate function that asks the provider who the credentials belong to."""
    await ctx.get("/me")


@pytest.mark.parametrize(
    ("integration", "credentials", "says"),
    [
        (Integration(INTEGRATION), {}, "integration acme has no base_url"),
        (Integration(INTEGRATION, base_url="acme.test"), {}, "base_url 'acme.test' is not an http:// or https://"),
        (
            Integration(INTEGRATION, base_url="https://acme.test", auth="bearer"),
            {"api_key": "k-123456"},
            "has no credential 'access_token'",
        ),
    ],
    ids=["no-base-url", "no-scheme", "no-credential"],
)
@pytest.mark.parametrize("before", [None, CREATE], ids=["new", "active"])
async def test_a_validation_the_daemons_settings_fail_is_refused_and_writes_nothing(
    integration: Integration, credentials: dict[str, str], says: str, before: LifecycleEvent | None
) -> None:
    """FAILED_PRECONDITION naming the setting; nothing is appended, not even the request; no call is made."""
    async with running(function("check", VALIDATE, call_me), integrations={INTEGRATION: integration}) as h:
        if before is not None:
            await h.emit(before)
        head, connection = await h.head(), await h.store.get_connection(ACME)
        with pytest.raises(Misconfigured) as refused:
            await h.emit(VALIDATE, credentials=credentials)
        message = str(refused.value)
        assert says in message and "function check" in message and "nothing was recorded" in message
        assert "\n" not in message
        assert (await h.head(), await h.store.get_connection(ACME)) == (head, connection)
        assert h.requests == []


async def test_one_misconfigured_function_refuses_a_validation_the_others_pass() -> None:
    """One function meeting the misconfiguration is enough: the emit is refused whatever the others did."""
    async with running(
        function("a-passes", VALIDATE, ok),
        function("b-calls", VALIDATE, call_me),
        integrations={INTEGRATION: Integration(INTEGRATION)},
    ) as h:
        with pytest.raises(Misconfigured, match="function b-calls"):
            await h.emit(VALIDATE)
        assert await h.head() == 0


async def test_a_function_that_wraps_the_proxys_refusal_still_refuses_the_validation() -> None:
    """The mark is the proxy's, not the exception's: a Rejected raised of it still refuses the emit."""

    async def check(ctx: Context) -> None:
        try:
            await ctx.get("/me")
        except Exception as exc:
            raise Rejected("cannot reach the provider") from exc

    async with running(function("check", VALIDATE, check), integrations={INTEGRATION: Integration(INTEGRATION)}) as h:
        with pytest.raises(Misconfigured, match="has no base_url"):
            await h.emit(VALIDATE)
        assert await h.head() == 0


async def test_a_plugin_raising_misconfigured_of_its_own_rejects_as_usual() -> None:
    """A function raising Misconfigured itself (no proxy call refused) is an ordinary failure: a rejection."""

    async def check(ctx: Context) -> None:
        raise Misconfigured("integration acme has no base_url (says the plugin)")

    async with running(function("check", VALIDATE, check)) as h:
        result = await h.emit(VALIDATE)
        assert result.state is S.REJECTED
        assert result.rejection_reason == "check: integration acme has no base_url (says the plugin)"


async def test_a_misconfigured_call_a_function_recovers_from_is_no_refusal() -> None:
    """A function that catches the refusal and passes passes: only a failed attempt is refused."""

    async def check(ctx: Context) -> None:
        try:
            await ctx.get("/me")
        except Misconfigured:
            ctx.log("no provider configured: skipped")

    async with running(function("check", VALIDATE, check), integrations={INTEGRATION: Integration(INTEGRATION)}) as h:
        result = await h.emit(VALIDATE)
        assert result.state is S.PENDING
        assert await h.types() == ["validate-connection", "function-succeeded", "connection-validated"]


# -- post-connection-creation: one durable job per function -------------------------------------


async def test_creation_schedules_one_job_per_function_in_the_events_append() -> None:
    """A creation appends only its request, with one due job per creation function in the same append."""
    ran: list[str] = []

    async def register(ctx: Context) -> None:
        ran.append("register")

    functions = [function("register", CREATE, register), function("sync", CREATE, register)]
    async with running(*functions, function("check", VALIDATE, ok)) as h:
        result = await h.emit(CREATE, payload={"owner": "ops"})
        assert await h.types() == ["post-connection-creation"]
        assert h.store.appends == [Append(["post-connection-creation"], 2, 0)]
        jobs = await h.store.jobs(ACME)
        assert sorted(j.function for j in jobs) == ["register", "sync"]
        for job in jobs:
            assert (job.event, job.causation_id, job.payload) == (CREATE, result.event_id, {"owner": "ops"})
            assert (job.run_at, job.attempt, job.leased) == (h.clock.now(), 0, False)
        assert set(result.outcomes) == {
            Outcome("register", FunctionStatus.SCHEDULED),
            Outcome("sync", FunctionStatus.SCHEDULED),
        }
        assert ran == []  # nothing runs until the worker claims the jobs


# -- pre-connection-deletion: cancel, wait, clean up, delete ------------------------------------


async def test_deletion_cancels_pending_creation_jobs_and_runs_the_cleanup() -> None:
    """Creation jobs not yet started are cancelled (with the creation as cause); then the cleanup runs."""
    ran: list[str] = []

    async def note(ctx: Context) -> None:
        ran.append(ctx.event.type.value)

    functions = [function("register", CREATE, note), function("sync", CREATE, note), function("cleanup", DELETE, note)]
    async with running(*functions) as h:
        created = await h.emit(CREATE)
        deleted = await h.emit(DELETE)
        log = await h.log()
        assert [r.type for r in log] == [
            "post-connection-creation",
            "pre-connection-deletion",
            "function-cancelled",
            "function-cancelled",
            "function-succeeded",
            "connection-deleted",
        ]
        bodies = await h.bodies()
        assert sorted(bodies[2:4], key=repr) == [
            FunctionCancelled("register", DELETION_CANCELLED, 0),
            FunctionCancelled("sync", DELETION_CANCELLED, 0),
        ]
        assert [r.causation_id for r in log[2:]] == [created.event_id] * 2 + [deleted.event_id] * 2
        assert isinstance(bodies[4], FunctionSucceeded) and bodies[4].function == "cleanup"
        assert bodies[5] == ConnectionDeleted()
        assert h.store.appends[-1] == Append([r.type for r in log[1:]], 0, 2)
        assert await h.store.jobs() == []
        assert ran == ["pre-connection-deletion"]
        assert deleted.state is S.DELETED


async def test_deletion_waits_for_a_running_creation_attempt() -> None:
    """A deletion waits for a creation attempt already running, whose outcome is recorded before it."""
    gate = Gate()
    cleaned: list[int] = []

    async def register(ctx: Context) -> None:
        await gate.enter()

    async def cleanup(ctx: Context) -> None:
        cleaned.append(gate.left)

    functions = [function("register", CREATE, register), function("cleanup", DELETE, cleanup)]
    async with running(*functions, worker=True) as h, anyio.create_task_group() as tg:
        await h.emit(CREATE)
        await gate.arrivals(1)
        deletion = Call(tg, lambda: h.emit(DELETE))
        await settle()
        assert (deletion.done.is_set(), cleaned) == (False, [])
        gate.open()
        assert (await deletion.result()).state is S.DELETED
    assert await h.types() == [
        "post-connection-creation",
        "function-succeeded",
        "pre-connection-deletion",
        "function-succeeded",
        "connection-deleted",
    ]
    assert cleaned == [1]  # the cleanup ran after the creation attempt had left


async def test_deletion_cancels_a_creation_job_waiting_for_its_retry() -> None:
    """A creation job between attempts is cancelled by a deletion, which records the attempts made."""

    async def register(ctx: Context) -> None:
        raise RuntimeError("provider down")

    async with running(function("register", CREATE, register), worker=True) as h:
        created = await h.emit(CREATE)
        await h.records_up_to(2)  # the first attempt failed; a retry is scheduled
        (job,) = await h.store.jobs(ACME)
        assert (job.attempt, job.leased) == (1, False)
        await h.emit(DELETE)
        log = await h.log()
        assert [r.type for r in log[2:]] == ["pre-connection-deletion", "function-cancelled", "connection-deleted"]
        assert (await h.bodies())[3] == FunctionCancelled("register", DELETION_CANCELLED, 1)
        assert log[3].causation_id == created.event_id
        assert await h.store.jobs() == []


async def test_a_failed_retryable_cleanup_continues_as_a_background_job() -> None:
    """A cleanup failing retryably does not block the deletion: it is retried later as a job, until it succeeds."""
    failures = [RuntimeError("provider down")]

    async def cleanup(ctx: Context) -> None:
        if failures:
            raise failures.pop()

    async with running(function("cleanup", DELETE, cleanup), worker=True) as h:
        await h.emit(CREATE)
        deleted = await h.emit(DELETE)
        assert deleted.state is S.DELETED
        assert await h.types() == [
            "post-connection-creation",
            "pre-connection-deletion",
            "function-failed",
            "connection-deleted",
        ]
        failed = (await h.bodies())[2]
        assert isinstance(failed, FunctionFailed)
        assert (failed.function, failed.attempt, failed.retryable) == ("cleanup", 1, True)
        assert failed.error == "provider down"
        (job,) = await h.store.jobs(ACME)
        (delay,) = jitter(RetryPolicy().ceiling(1))
        assert (job.function, job.event, job.causation_id, job.attempt) == ("cleanup", DELETE, deleted.event_id, 1)
        assert job.run_at == h.clock.now() + timedelta(seconds=delay)
        assert h.store.appends[-1].jobs == 1
        await h.until_due(job.run_at)
        log = await h.records_up_to(5)
        again = (await h.bodies())[4]
        assert isinstance(again, FunctionSucceeded)
        assert (again.function, again.attempt, log[4].causation_id) == ("cleanup", 2, deleted.event_id)
        assert await h.store.jobs() == []
        assert (await h.service.get_connection(ACME)).state is S.DELETED


async def test_a_cleanup_continued_in_the_background_records_when_it_is_retried() -> None:
    """The function-failed of a cleanup that goes on as a job carries retry_in_ms, like a worker's retry."""

    async def cleanup(ctx: Context) -> None:
        raise RuntimeError("provider down")

    async with running(function("cleanup", DELETE, cleanup)) as h:
        await h.emit(CREATE)
        await h.emit(DELETE)
        (job,) = await h.store.jobs(ACME)
        failed = (await h.bodies())[2]
        assert isinstance(failed, FunctionFailed)
        assert failed.retry_in_ms == int((job.run_at - h.clock.now()).total_seconds() * 1000)


@pytest.mark.parametrize(
    ("error", "retry", "reason"),
    [
        (NonRetryable("webhook already gone"), None, "not retryable"),
        (RuntimeError("webhook already gone"), RetryPolicy(max_attempts=1), "1 attempts exhausted"),
    ],
    ids=["non-retryable", "no-attempts-left"],
)
async def test_a_cleanup_that_cannot_be_retried_gives_up_at_once(
    error: Exception, retry: RetryPolicy | None, reason: str
) -> None:
    """A cleanup failing for good is recorded as failed and given up, and the deletion still completes."""

    async def cleanup(ctx: Context) -> None:
        raise error

    async with running(function("cleanup", DELETE, cleanup, retry=retry)) as h:
        await h.emit(CREATE)
        deleted = await h.emit(DELETE)
        log = await h.log()
        assert [r.type for r in log[1:]] == [
            "pre-connection-deletion",
            "function-failed",
            "function-gave-up",
            "connection-deleted",
        ]
        assert {r.causation_id for r in log[2:]} == {deleted.event_id}
        bodies = await h.bodies()
        assert bodies[3] == FunctionGaveUp("cleanup", 1, "webhook already gone", reason)
        assert await h.store.jobs() == []
        assert deleted.state is S.DELETED


class ClaimPausingStore(SpyStore):
    """A store whose next job claim, once armed, waits at ``gate`` before it reaches the store (a slow backend)."""

    def __init__(self, clock: FakeClock, gate: Gate) -> None:
        super().__init__(clock)
        self.gate = gate
        self.armed = False

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Job]:
        """See :meth:`MemoryEventStore.claim_jobs`; the armed call first waits at the gate."""
        if self.armed:
            self.armed = False
            await self.gate.enter()
        return await super().claim_jobs(limit=limit, lease=lease, exclude=exclude)


async def test_a_deletion_is_not_failed_by_a_claim_already_in_flight() -> None:
    """A deletion that begins while the worker is claiming still completes (it waits for or cancels that job)."""
    claim, cleaning = Gate(), Gate()
    ran: list[str] = []

    async def register(ctx: Context) -> None:
        ran.append("register")

    async def cleanup(ctx: Context) -> None:
        ran.append("cleanup")
        await cleaning.enter()

    clock = FakeClock()
    store = ClaimPausingStore(clock, claim)
    functions = [function("register", CREATE, register), function("cleanup", DELETE, cleanup)]
    async with (
        running(*functions, worker=True, store=store, clock=clock) as h,
        anyio.create_task_group() as tg,
    ):
        await settle()  # the worker is idle, waiting for work
        store.armed = True
        await h.emit(CREATE)
        await claim.arrivals(1)  # the worker is claiming; nothing is held yet
        deletion = Call(tg, lambda: h.emit(DELETE))
        await settle()  # the deletion holds the connection and waits for the claim on its way
        assert ran == []
        claim.open()  # the claim leases the creation job, whose attempt the hold then awaits
        await cleaning.arrivals(1)
        cleaning.open()
        assert (await deletion.result()).state is S.DELETED
        types = await h.types()
    assert ran == ["register", "cleanup"]
    assert types.index("function-succeeded") < types.index("pre-connection-deletion"), types


async def test_a_deletion_stops_a_creation_attempt_that_outlives_its_wait() -> None:
    """A creation attempt still running after running_wait is stopped: recorded cancelled, never succeeded."""
    provisioning = Gate()
    ran: list[str] = []

    async def register(ctx: Context) -> None:
        await provisioning.enter()  # never opened: a provider that hangs
        ran.append("register finished")

    async def cleanup(ctx: Context) -> None:
        ran.append("cleanup")

    functions = [function("register", CREATE, register), function("cleanup", DELETE, cleanup)]
    async with running(*functions, worker=True, config=DispatchConfig(running_wait=0.01)) as h:
        await h.emit(CREATE)
        await provisioning.arrivals(1)
        deleted = await h.emit(DELETE)
        assert deleted.state is S.DELETED
        types = await h.types()
        bodies = await h.bodies()
        assert await h.store.jobs() == []
    assert ran == ["cleanup"]
    assert "function-succeeded" not in types[: types.index("pre-connection-deletion")]
    cancelled = [b for b in bodies if isinstance(b, FunctionCancelled)]
    assert [(c.function, c.reason, c.attempt) for c in cancelled] == [("register", DELETION_CANCELLED, 1)]
    assert types[-1] == "connection-deleted"


async def test_a_deletion_completes_when_its_caller_goes_away() -> None:
    """The caller's cancellation (a client deadline) does not stop an admitted deletion: it is recorded."""
    cleaning = Gate()

    async def cleanup(ctx: Context) -> None:
        await cleaning.enter()

    async with running(function("cleanup", DELETE, cleanup)) as h, anyio.create_task_group() as tg:
        await h.emit(CREATE)
        caller = anyio.CancelScope()

        async def delete() -> None:
            with caller:
                await h.emit(DELETE)

        tg.start_soon(delete)
        await cleaning.arrivals(1)
        caller.cancel()  # the client gives up while the cleanup runs
        await settle()
        cleaning.open()
        head = await h.head()
        await h.store.wait_for(head + 1)
        connection = await h.service.get_connection(ACME)
    assert connection.state is S.DELETED


async def test_a_cleanup_sees_the_metadata_written_by_the_attempt_the_deletion_awaited() -> None:
    """The deletion reads the connection after its wait, so the cleanup gets the webhook id a late creation wrote."""
    provisioning = Gate()
    seen: list[object] = []

    async def register(ctx: Context) -> None:
        await provisioning.enter()
        await ctx.set_metadata({"webhook_id": "wh_1"})

    async def cleanup(ctx: Context) -> None:
        seen.append((await ctx.get_metadata()).get("webhook_id"))

    functions = [function("register", CREATE, register), function("cleanup", DELETE, cleanup)]
    async with running(*functions, worker=True) as h, anyio.create_task_group() as tg:
        await h.emit(CREATE)
        await provisioning.arrivals(1)
        deletion = Call(tg, lambda: h.emit(DELETE))
        await settle()  # the deletion has read the connection and waits for the running attempt
        provisioning.open()
        assert (await deletion.result()).state is S.DELETED
    assert seen == ["wh_1"]


# -- a rejection of an active connection: its cleanup, now ----------------------------------------

TOKEN = "tok-rejected-1234"
WEBHOOKS = {INTEGRATION: Integration(INTEGRATION, base_url="https://acme.test", auth="bearer")}


class Webhooks:
    """A provider that creates webhooks (``POST /webhooks``) and deletes them (``DELETE /webhooks/{id}``)."""

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.created = 0
        self.deleted: list[tuple[str, str]] = []
        """(webhook id, the Authorization header) of each deletion."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.created += 1
            self.live.add(f"wh{self.created}")
            return httpx.Response(201, json={"id": f"wh{self.created}"})
        webhook = request.url.path.rsplit("/", 1)[-1]
        self.deleted.append((webhook, request.headers.get("authorization", "")))
        if webhook not in self.live:
            return httpx.Response(404, json={"error": "not found"})
        self.live.discard(webhook)
        return httpx.Response(204)


async def register_webhook(ctx: Context) -> None:
    """Register a webhook once per incarnation; keep its id."""
    if not (await ctx.get_metadata()).get("webhook_id"):
        response = await ctx.post("/webhooks", json={})
        await ctx.update_metadata({"webhook_id": response.json()["id"]})


async def delete_webhook(ctx: Context) -> None:
    """Delete the webhook the metadata names, if any, and forget it."""
    webhook = (await ctx.get_metadata()).get("webhook_id")
    if webhook:
        await ctx.delete(f"/webhooks/{webhook}")
        await ctx.set_metadata({})


async def rejects_when_asked(ctx: Context) -> None:
    """A validate function that rejects a payload with ``reject``."""
    if ctx.event.payload.get("reject"):
        raise Rejected("token revoked")


REJECT = {"reject": True}


async def test_rejecting_an_active_connection_cancels_creation_jobs_and_schedules_its_cleanup_in_one_append() -> None:
    """The verdict's append also cancels the creation jobs not started and schedules one cleanup job per cleanup
    function, due now, for the rejecting validation; the verdict stays last; nothing runs the cleanup yet."""
    functions = [
        function("check", VALIDATE, rejects_when_asked),
        function("register", CREATE, register_webhook),
        function("delete-a", DELETE, delete_webhook),
        function("delete-b", DELETE, ok),
    ]
    async with running(*functions, integrations=WEBHOOKS) as h:
        created = await h.emit(CREATE, credentials={"access_token": TOKEN})
        rejected = await h.emit(VALIDATE, payload=REJECT)
        log = await h.log()
        assert [r.type for r in log[2:]] == [
            "validate-connection",
            "function-failed",
            "function-cancelled",
            "connection-rejected",
        ]
        assert h.store.appends[-1] == Append([r.type for r in log[2:]], 2, 1)
        bodies = await h.bodies()
        assert bodies[4] == FunctionCancelled("register", REJECTION_CANCELLED, 0)
        assert [r.causation_id for r in log[3:]] == [rejected.event_id, created.event_id, rejected.event_id]
        jobs = await h.store.jobs(ACME)
        assert sorted((j.function, j.event, j.causation_id, j.payload, j.attempt) for j in jobs) == [
            ("delete-a", DELETE, rejected.event_id, {}, 0),
            ("delete-b", DELETE, rejected.event_id, {}, 0),
        ]
        assert {j.run_at for j in jobs} == {h.clock.now()}
        assert rejected.state is S.REJECTED
        assert {(o.name, o.status) for o in rejected.outcomes} == {
            ("check", FunctionStatus.FAILED),
            ("delete-a", FunctionStatus.SCHEDULED),
            ("delete-b", FunctionStatus.SCHEDULED),
        }
        assert (await h.store.sealed_credentials(ACME)) is not None, "kept for the cleanup"
        assert h.requests == []


async def test_a_connection_rejected_while_pending_gets_no_cleanup() -> None:
    """Never active, nothing was set up: the rejection schedules nothing and shreds nothing it did not have."""
    functions = [function("check", VALIDATE, rejects_when_asked), function("delete", DELETE, delete_webhook)]
    async with running(*functions) as h:
        await h.emit(VALIDATE)
        rejected = await h.emit(VALIDATE, payload=REJECT)
        assert rejected.state is S.REJECTED
        assert (await h.types())[-1] == "connection-rejected"
        assert h.store.appends[-1].jobs == 0
        assert await h.store.jobs() == []


async def test_a_rejections_cleanup_deletes_what_creation_made_with_the_connections_credentials() -> None:
    """The worker runs the cleanup: it sees the webhook id (metadata kept), calls with the sealed token (not the
    rejected emit's), clears the metadata; the credentials are shredded once no job is left, not before."""
    provider = Webhooks()
    functions = [
        function("check", VALIDATE, rejects_when_asked),
        function("register", CREATE, register_webhook),
        function("delete", DELETE, delete_webhook),
    ]
    async with running(*functions, worker=True, integrations=WEBHOOKS, provider=provider) as h:
        await h.emit(CREATE, credentials={"access_token": TOKEN}, wait=True)
        assert provider.live == {"wh1"}
        rejected = await h.emit(VALIDATE, payload=REJECT, credentials={"access_token": "tok-revoked-999"}, wait=True)
        log = await h.log()
        assert provider.live == set()
        assert provider.deleted == [("wh1", f"Bearer {TOKEN}")]
        after = [r.type for r in log if r.position > rejected.position]
        assert after[-3:] == ["metadata-updated", "function-succeeded", "credentials-destroyed"]
        assert await h.store.sealed_credentials(ACME) is None
        assert await h.store.jobs() == []
        connection = await h.service.get_connection(ACME)
        assert (connection.state, connection.metadata) == (S.REJECTED, {})
        assert {(o.name, o.status) for o in rejected.outcomes} == {
            ("check", FunctionStatus.FAILED),
            ("delete", FunctionStatus.SUCCEEDED),
        }


async def test_a_rejection_waits_for_a_running_creation_attempt_whose_webhook_the_cleanup_then_deletes() -> None:
    """As a deletion does: the running creation attempt finishes and is recorded before the rejection; the cleanup
    then finds its webhook. A passing re-validation meanwhile does not wait for it."""
    provider, provisioning = Webhooks(), Gate()

    async def slow_register(ctx: Context) -> None:
        await provisioning.enter()
        await register_webhook(ctx)

    functions = [
        function("check", VALIDATE, rejects_when_asked),
        function("register", CREATE, slow_register),
        function("delete", DELETE, delete_webhook),
    ]
    async with (
        running(*functions, worker=True, integrations=WEBHOOKS, provider=provider) as h,
        anyio.create_task_group() as tg,
    ):
        await h.emit(CREATE, credentials={"access_token": TOKEN})
        await provisioning.arrivals(1)
        assert (await h.emit(VALIDATE)).state is S.ACTIVE  # passing: no hold, no wait
        rejection = Call(tg, lambda: h.emit(VALIDATE, payload=REJECT))
        await settle()
        assert not rejection.done.is_set(), "the rejection waits for the running creation attempt"
        provisioning.open()
        rejected = await rejection.result()
        head = await h.head()
        await h.records_up_to(head + 3)  # the cleanup: metadata-updated, function-succeeded, ...
        types = await h.types()
    assert types.index("function-succeeded") < types.index("connection-rejected")
    assert provider.created == 1 and provider.live == set()
    assert rejected.state is S.REJECTED


async def test_a_rejection_stops_a_creation_attempt_that_outlives_its_wait_no_success_after_it() -> None:
    """A creation attempt still running after running_wait is stopped and cancelled: nothing it did is recorded
    after the rejection, and the cleanup runs."""
    provisioning = Gate()
    ran: list[str] = []

    async def hangs(ctx: Context) -> None:
        await provisioning.enter()  # never opened
        ran.append("register finished")

    async def cleanup(ctx: Context) -> None:
        ran.append("cleanup")

    functions = [
        function("check", VALIDATE, rejects_when_asked),
        function("register", CREATE, hangs),
        function("cleanup", DELETE, cleanup),
    ]
    async with running(*functions, worker=True, config=DispatchConfig(running_wait=0.01)) as h:
        await h.emit(CREATE)
        await provisioning.arrivals(1)
        rejected = await h.emit(VALIDATE, payload=REJECT)
        await h.records_up_to(await h.head() + 1)
        bodies = await h.bodies()
        types = await h.types()
    assert ran == ["cleanup"]
    assert [b for b in bodies if isinstance(b, FunctionCancelled)] == [
        FunctionCancelled("register", REJECTION_CANCELLED, 1)
    ]
    verdict = types.index("connection-rejected")
    assert "function-succeeded" not in types[:verdict]
    assert types[verdict + 1 :] == ["function-succeeded"]
    assert rejected.state is S.REJECTED


# -- deleting a rejected connection: whatever cleanup is not done yet -------------------------------


async def rejected_with_a_webhook(h: Harness, provider: Webhooks) -> EmitResult:
    """Create the connection (with :data:`TOKEN`) and its webhook wh1 (recorded as creation would), then reject it:
    the rejection's cleanup job is queued (no worker runs it); the rejection's answer."""
    await h.emit(CREATE, credentials={"access_token": TOKEN})
    await h.store.append(ACME, None, [records.new(MetadataUpdated("register", {"webhook_id": "wh1"}, False))])
    provider.live.add("wh1")
    return await h.emit(VALIDATE, payload=REJECT)


async def test_deleting_a_rejected_connection_takes_over_its_queued_cleanup() -> None:
    """Cleanup jobs still queued are cancelled (taken over) and run now, as the deletion's own, under its deadline."""
    provider = Webhooks()
    functions = [
        function("check", VALIDATE, rejects_when_asked),
        function("delete", DELETE, delete_webhook),
    ]
    async with running(*functions, integrations=WEBHOOKS, provider=provider) as h:
        rejected = await rejected_with_a_webhook(h, provider)
        (job,) = await h.store.jobs(ACME)
        deleted = await h.emit(DELETE)
        log = [r for r in await h.log() if r.position > rejected.position]
        bodies = [records.parse(r.type, r.data) for r in log]
        assert [r.type for r in log] == [
            "function-failed",
            "connection-rejected",
            "pre-connection-deletion",
            "function-cancelled",
            "function-succeeded",
            "metadata-updated",
            "connection-deleted",
            "credentials-destroyed",
        ]
        assert bodies[3] == FunctionCancelled("delete", TAKEN_OVER, 0)
        assert log[3].causation_id == rejected.event_id
        assert {r.causation_id for r in log[4:7]} == {deleted.event_id}
        assert provider.deleted == [("wh1", f"Bearer {TOKEN}")]
        assert (deleted.state, [(o.name, o.status) for o in deleted.outcomes]) == (
            S.DELETED,
            [("delete", FunctionStatus.SUCCEEDED)],
        )
        assert await h.store.jobs() == []
        assert job.causation_id == rejected.event_id


async def test_deleting_a_rejected_connection_whose_cleanup_succeeded_runs_nothing() -> None:
    """The rejection's cleanup is done: the deletion runs no cleanup and ends deleted."""
    calls: list[str] = []

    async def cleanup(ctx: Context) -> None:
        calls.append(ctx.event.event_id)

    functions = [function("check", VALIDATE, rejects_when_asked), function("cleanup", DELETE, cleanup)]
    async with running(*functions, worker=True) as h:
        await h.emit(CREATE)
        rejected = await h.emit(VALIDATE, payload=REJECT, wait=True)
        deleted = await h.emit(DELETE)
        assert calls == [rejected.event_id]
        assert (await h.types())[-2:] == ["pre-connection-deletion", "connection-deleted"]
        assert (deleted.state, deleted.outcomes) == (S.DELETED, ())


async def test_deleting_a_rejected_connection_whose_cleanup_gave_up_runs_it_again() -> None:
    """The rejection's cleanup gave up: the deletion runs it again (with the credentials the deletion brings: the
    connection's were shredded with its last job)."""
    provider = Webhooks()
    attempts: list[tuple[str, int]] = []

    async def cleanup(ctx: Context) -> None:
        attempts.append((ctx.event.type.value, ctx.event.attempt))
        if len(attempts) == 1:
            raise NonRetryable("the provider refused")
        await ctx.delete("/webhooks/wh1")

    functions = [function("check", VALIDATE, rejects_when_asked), function("cleanup", DELETE, cleanup)]
    async with running(*functions, worker=True, integrations=WEBHOOKS, provider=provider) as h:
        await h.emit(CREATE, credentials={"access_token": TOKEN})
        provider.live.add("wh1")
        await h.emit(VALIDATE, payload=REJECT, wait=True)
        assert "function-gave-up" in await h.types()
        assert await h.store.sealed_credentials(ACME) is None
        deleted = await h.emit(DELETE, credentials={"access_token": "tok-for-the-deletion"})
        assert attempts == [("pre-connection-deletion", 1), ("pre-connection-deletion", 1)]
        assert provider.deleted == [("wh1", "Bearer tok-for-the-deletion")]
        assert [(o.name, o.status) for o in deleted.outcomes] == [("cleanup", FunctionStatus.SUCCEEDED)]
        assert deleted.state is S.DELETED


async def test_deleting_a_rejected_connection_takes_over_a_cleanup_waiting_for_its_retry() -> None:
    """A cleanup between attempts is cancelled with the attempts it made, and run now by the deletion."""
    attempts: list[str] = []

    async def cleanup(ctx: Context) -> None:
        attempts.append(ctx.event.event_id)
        if len(attempts) == 1:
            raise RuntimeError("provider down")

    functions = [function("check", VALIDATE, rejects_when_asked), function("cleanup", DELETE, cleanup)]
    async with running(*functions, worker=True) as h:
        await h.emit(CREATE)
        rejected = await h.emit(VALIDATE, payload=REJECT)
        await h.records_up_to(rejected.version + 1)  # the first attempt failed; a retry is scheduled
        (job,) = await h.store.jobs(ACME)
        assert (job.attempt, job.leased) == (1, False)
        deleted = await h.emit(DELETE)
        bodies = await h.bodies()
        assert FunctionCancelled("cleanup", TAKEN_OVER, 1) in bodies
        assert attempts == [rejected.event_id, deleted.event_id]
        assert await h.store.jobs() == []
        assert [(o.name, o.status) for o in deleted.outcomes] == [("cleanup", FunctionStatus.SUCCEEDED)]


async def test_deleting_a_rejected_connection_never_runs_a_cleanup_twice_at_once() -> None:
    """A rejection's cleanup attempt that outlives the deletion's wait goes on in the background: the deletion does
    not run that function; the attempt's retry still runs (same incarnation), and the credentials are kept until
    no job is left."""
    cleaning = Gate()
    runs: list[tuple[str, int]] = []

    async def cleanup(ctx: Context) -> None:
        runs.append((ctx.event.event_id, ctx.event.attempt))
        if ctx.event.attempt == 1:
            await cleaning.enter()
            raise RuntimeError("provider down")

    functions = [function("check", VALIDATE, rejects_when_asked), function("cleanup", DELETE, cleanup)]
    config = DispatchConfig(running_wait=0.01)
    async with running(*functions, worker=True, config=config) as h:
        await h.emit(CREATE, credentials={"access_token": TOKEN})
        rejected = await h.emit(VALIDATE, payload=REJECT)
        await cleaning.arrivals(1)
        deleted = await h.emit(DELETE)
        assert (deleted.state, deleted.outcomes) == (S.DELETED, ())
        assert runs == [(rejected.event_id, 1)]
        assert await h.store.sealed_credentials(ACME) is not None
        cleaning.open()
        await h.records_up_to(deleted.position + 2)  # connection-deleted, then the attempt's failure
        (job,) = await h.store.jobs(ACME)
        await h.until_due(job.run_at)
        log = await h.records_up_to(deleted.position + 4)  # its retry's success, then the shredding
    assert runs == [(rejected.event_id, 1), (rejected.event_id, 2)]
    assert [r.type for r in log[-2:]] == ["function-succeeded", "credentials-destroyed"]
    assert log[-2].causation_id == rejected.event_id


# -- a new incarnation while the previous one's cleanup is left -----------------------------------


@pytest.mark.parametrize("event", [VALIDATE, CREATE], ids=["validate", "create"])
async def test_a_new_incarnation_first_runs_the_cleanup_its_predecessor_left_queued(event: LifecycleEvent) -> None:
    """The rejection's cleanup has not run when the connection is validated (or created) anew: the emit runs it
    now, with the earlier incarnation's metadata and credentials, recorded before its own lifecycle record; the
    new incarnation starts afresh, and the expected version the caller read still holds."""
    provider = Webhooks()
    functions = [
        function("check", VALIDATE, rejects_when_asked),
        function("register", CREATE, ok),
        function("delete", DELETE, delete_webhook),
    ]
    async with running(*functions, integrations=WEBHOOKS, provider=provider) as h:
        rejected = await rejected_with_a_webhook(h, provider)
        again = await h.emit(event, credentials={"access_token": "tok-new-5678"}, expected_version=rejected.version)
        log = [r for r in await h.log() if r.version > rejected.version]
        assert [r.type for r in log[:4]] == [
            "metadata-updated",
            "function-succeeded",
            "credentials-destroyed",
            event.value,
        ]
        assert {r.causation_id for r in log[:2]} == {rejected.event_id}
        assert provider.deleted == [("wh1", f"Bearer {TOKEN}")]
        connection = await h.service.get_connection(ACME)
        assert (connection.incarnation, connection.metadata, again.version) == (2, {}, connection.version)
        assert [j.function for j in await h.store.jobs()] == ([] if event is VALIDATE else ["register"])
        sealed = await h.store.sealed_credentials(ACME)
        assert sealed is not None and sealed.incarnation == 2


async def test_a_taken_over_cleanup_that_fails_again_gives_up_and_the_new_incarnation_begins() -> None:
    """Run once more by the new incarnation's emit and failing, the cleanup is not retried into it: superseded."""
    attempts: list[int] = []

    async def cleanup(ctx: Context) -> None:
        attempts.append(ctx.event.attempt)
        raise RuntimeError("provider down")

    functions = [function("check", VALIDATE, rejects_when_asked), function("cleanup", DELETE, cleanup)]
    async with running(*functions) as h:
        await h.emit(CREATE)
        rejected = await h.emit(VALIDATE, payload=REJECT)
        again = await h.emit(VALIDATE)
        log = [r for r in await h.log() if r.version > rejected.version]
        assert [r.type for r in log[:2]] == ["function-failed", "function-gave-up"]
        assert records.parse(log[1].type, log[1].data) == FunctionGaveUp("cleanup", 1, "provider down", SUPERSEDED)
        assert attempts == [1]
        assert (again.state, await h.store.jobs()) == (S.PENDING, [])


async def test_a_new_incarnation_takes_over_the_background_cleanup_of_a_deletion() -> None:
    """Deleted, its cleanup waiting for a retry, the connection is created anew: the cleanup runs now, before it."""
    attempts: list[tuple[str, int]] = []

    async def cleanup(ctx: Context) -> None:
        attempts.append((ctx.event.event_id, ctx.event.attempt))
        if len(attempts) == 1:
            raise RuntimeError("provider down")

    async with running(function("cleanup", DELETE, cleanup)) as h:
        await h.emit(CREATE)
        deleted = await h.emit(DELETE)
        created = await h.emit(CREATE)
        log = [r for r in await h.log() if r.position > deleted.position]
        assert [r.type for r in log] == [
            "function-failed",
            "connection-deleted",
            "function-succeeded",
            "post-connection-creation",
        ]
        assert attempts == [(deleted.event_id, 1), (deleted.event_id, 2)]
        assert (created.state, await h.store.jobs()) == (S.ACTIVE, [])


async def test_a_cleanup_still_running_when_a_new_incarnation_begins_is_not_retried_into_it() -> None:
    """A rejection's cleanup attempt that outlives the new incarnation's wait finishes; its retry is not run against
    the new incarnation's metadata and credentials: it gives up, unrun (superseded)."""
    cleaning = Gate()
    runs: list[int] = []

    async def cleanup(ctx: Context) -> None:
        runs.append(ctx.event.attempt)
        await cleaning.enter()
        raise RuntimeError("provider down")

    functions = [function("check", VALIDATE, rejects_when_asked), function("cleanup", DELETE, cleanup)]
    async with running(*functions, worker=True, config=DispatchConfig(running_wait=0.01)) as h:
        await h.emit(CREATE)
        rejected = await h.emit(VALIDATE, payload=REJECT)
        await cleaning.arrivals(1)
        again = await h.emit(VALIDATE)
        assert again.state is S.PENDING
        cleaning.open()
        await h.records_up_to(again.position + 3)  # validated, then the running attempt's failure
        (job,) = await h.store.jobs(ACME)
        await h.until_due(job.run_at)
        log = await h.records_up_to(again.position + 4)
        assert await h.store.jobs() == []
    gave_up = records.parse(log[-1].type, log[-1].data)
    assert isinstance(gave_up, FunctionGaveUp)
    assert (gave_up.function, gave_up.attempt, gave_up.reason) == ("cleanup", 1, SUPERSEDED)
    assert log[-1].causation_id == rejected.event_id
    assert runs == [1]


async def test_repeats_of_a_rejection_and_of_a_takeover_answer_as_the_originals() -> None:
    """The verdict stays last in a rejection's append, and a takeover's records come before the new lifecycle
    record: a repeat (same idempotency key) answers the original version, runs nothing and writes nothing."""
    ran: list[str] = []

    async def cleanup(ctx: Context) -> None:
        ran.append(ctx.event.event_id)

    functions = [function("check", VALIDATE, rejects_when_asked), function("cleanup", DELETE, cleanup)]
    async with running(*functions) as h:
        await h.emit(CREATE)
        rejected = await h.emit(VALIDATE, payload=REJECT, idempotency_key="r-1")
        again = await h.emit(VALIDATE, idempotency_key="v-2")
        head = await h.head()
        for original, key, payload in ((rejected, "r-1", REJECT), (again, "v-2", {})):
            repeat = await h.emit(VALIDATE, payload=payload, idempotency_key=key)
            assert repeat.deduplicated
            assert (repeat.event_id, repeat.position, repeat.version, repeat.state) == (
                original.event_id,
                original.position,
                original.version,
                original.state,
            )
        assert await h.head() == head
        assert ran == [rejected.event_id]
