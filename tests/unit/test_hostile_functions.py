"""Hostile event functions: whatever a function raises, blocks or hangs on ends as its own recorded outcome."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest

from orchestrator import records
from orchestrator.config import Integration
from orchestrator.context import AttemptLog, Buffered, ConnectionInfo, Context, EventInfo
from orchestrator.functions import on_event
from orchestrator.model import ConnectionRef, ConnectionState, JSONObject, LifecycleEvent, NewJob
from orchestrator.plugins import Installed
from orchestrator.provider import Provider
from orchestrator.retry import RetryPolicy
from orchestrator.runner import MAX_ERROR, TIMEOUT, AttemptResult, ThreadSlots, run_attempt
from tests.support.engine import ACME, CREATE, VALIDATE, function, running

pytestmark = pytest.mark.anyio

REF = ConnectionRef("dev", "acme", "c1")


class Doom(BaseException):
    """A BaseException that is not an Exception (nor SystemExit, nor KeyboardInterrupt)."""


def installed(handler: Any) -> Installed:
    """``handler`` as an installed post-creation function."""
    return Installed("f", on_event("post-connection-creation", integration="acme")(handler), "dist", "1", "m:f")


async def attempt(handler: Any, *, time_limit: float = 5.0, threads: ThreadSlots | None = None) -> AttemptResult:
    """One attempt of ``handler`` as the daemon runs it (no provider)."""
    function = installed(handler)

    def make(log: AttemptLog) -> Context:
        return Context(
            connection=ConnectionInfo(REF, {}),
            event=EventInfo(LifecycleEvent.POST_CONNECTION_CREATION, {}, "e1"),
            provider=Provider(None, Integration("acme"), {}, {}),  # type: ignore[arg-type]  # never called
            metadata_model=None,
            sink=Buffered({}),
            log=log,
        )

    return await run_attempt(function, make, attempt=1, time_limit=time_limit, threads=threads)


async def test_a_base_exception_is_the_functions_failure_not_the_daemons() -> None:
    """A BaseException subclass raised by a function is recorded as its failure; run_attempt returns."""

    async def handler(ctx: Context) -> None:
        raise Doom("the end")

    result = await attempt(handler)
    assert (result.ok, result.error_type, result.error, result.retryable) == (False, "Doom", "the end", True)


async def test_a_cancellation_raised_by_the_function_is_a_failure() -> None:
    """CancelledError raised by a function itself (nobody cancelled it) is a failure, not a cancellation."""

    async def handler(ctx: Context) -> None:
        raise asyncio.CancelledError()

    result = await attempt(handler)
    assert (result.ok, result.error_type) == (False, "CancelledError")


async def test_a_real_cancellation_still_cancels_the_attempt() -> None:
    """When the caller cancels the attempt (the daemon stopping), the cancellation propagates."""
    started = anyio.Event()

    async def handler(ctx: Context) -> None:
        started.set()
        await anyio.sleep_forever()

    outcome: list[AttemptResult] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            outcome.append(await attempt(handler))

        tg.start_soon(run)
        await started.wait()
        tg.cancel_scope.cancel()
    assert outcome == []


async def test_blocking_the_loop_past_the_timeout_is_a_timeout() -> None:
    """An async function calling time.sleep past its timeout is recorded as timed out, not as succeeded."""

    async def handler(ctx: Context) -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - the hostile behaviour under test

    result = await attempt(handler, time_limit=0.05)
    assert (result.ok, result.error_type) == (False, TIMEOUT)
    assert "without yielding" in result.error


async def test_a_functions_own_timeout_error_is_not_taken_for_the_deadline() -> None:
    """A function raising TimeoutError itself is recorded as that error, not as 'timed out after 60s'."""

    async def handler(ctx: Context) -> None:
        raise TimeoutError("the provider's own timeout")

    result = await attempt(handler)
    assert (result.error_type, result.error) == ("TimeoutError", "the provider's own timeout")


async def test_a_huge_error_message_is_cut() -> None:
    """An error message of megabytes is kept to MAX_ERROR characters."""

    async def handler(ctx: Context) -> None:
        raise RuntimeError("x" * 5_000_000)

    result = await attempt(handler)
    assert len(result.error) == MAX_ERROR + 1


async def test_an_object_with_an_async_call_runs_on_the_loop() -> None:
    """A callable object whose __call__ is async def is awaited, not run in a thread and left unawaited."""
    ran: list[str] = []

    class Handler:
        async def __call__(self, ctx: Context) -> None:
            ran.append("awaited")

    result = await attempt(Handler())
    assert result.ok and ran == ["awaited"]


async def test_hung_sync_functions_hold_a_bounded_pool() -> None:
    """A plain def that never returns times out and keeps its slot; with the pool full, the next one times out too."""
    release = threading.Event()
    threads = ThreadSlots(1)
    entered: list[int] = []

    def hangs(ctx: Any) -> None:
        entered.append(1)
        release.wait()

    first = await attempt(hangs, time_limit=0.05, threads=threads)
    assert (first.ok, first.error_type) == (False, TIMEOUT)
    assert threads.busy == 1, "the abandoned thread still holds its slot"
    second = await attempt(hangs, time_limit=0.05, threads=threads)
    assert (second.ok, second.error_type) == (False, TIMEOUT)
    assert len(entered) == 1, "no second thread ran while the pool was full"
    release.set()
    with anyio.fail_after(5):
        while threads.busy:  # the slot comes back on the loop once the thread returns
            await anyio.lowlevel.checkpoint()
    third = await attempt(lambda ctx: None, threads=threads)
    assert third.ok


async def test_a_job_raising_a_base_exception_leaves_the_worker_running() -> None:
    """A creation job raising BaseException is recorded as failed, and the next job still runs."""
    ran: list[str] = []

    async def doomed(ctx: Context) -> None:
        raise Doom("x")

    async def fine(ctx: Context) -> None:
        ran.append(ctx.connection.connection_id)

    policy = RetryPolicy(max_attempts=1)
    async with running(
        function("doomed", CREATE, doomed, retry=policy), function("fine", CREATE, fine), worker=True
    ) as h:
        await h.emit(CREATE)
        await h.records_up_to(4)
        kinds = sorted(type(b).__name__ for b in (await h.bodies())[1:])
        assert kinds == ["FunctionFailed", "FunctionGaveUp", "FunctionSucceeded"]
        assert ran == ["acme-1"]


async def test_a_validate_function_raising_cancelled_rejects() -> None:
    """A validate function raising CancelledError rejects the connection; it is never recorded as validated."""

    async def check(ctx: Context) -> None:
        raise asyncio.CancelledError()

    async with running(function("check", VALIDATE, check)) as h:
        result = await h.emit(VALIDATE)
        assert result.state is ConnectionState.REJECTED
        assert "connection-validated" not in await h.types()


async def test_a_validate_function_raising_a_base_exception_rejects() -> None:
    """A validate function raising BaseException rejects the connection instead of hanging the call."""

    async def check(ctx: Context) -> None:
        raise Doom("gone")

    async with running(function("check", VALIDATE, check)) as h:
        result = await h.emit(VALIDATE)
        assert (result.state, result.rejection_reason) == (ConnectionState.REJECTED, "check: gone")


async def test_a_job_that_stopped_the_daemon_every_time_is_parked() -> None:
    """A job with more attempts begun than its policy allows (each ended by a crash) is parked, not run again."""
    ran: list[int] = []

    async def register(ctx: Context) -> None:
        ran.append(ctx.event.attempt)

    policy = RetryPolicy(max_attempts=3)
    async with running(function("register", CREATE, register, retry=policy)) as h:
        created = await h.emit(CREATE)  # its job: never attempted
        # A second job as three crashes left it: three attempts began, none was recorded.
        crashed = NewJob("crashed", "register", CREATE, created.event_id, {}, h.clock.now(), attempt=3)
        marker = records.new(records.MetadataUpdated("staging", {}, True))
        await h.store.append(ACME, None, [marker], jobs=[crashed])
        head = await h.head()
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.worker.run)
            await h.store.wait_for(head + 2)
            h.worker.stop_claiming()
        parked = [b for b in await h.bodies() if isinstance(b, records.FunctionGaveUp)]
        assert [(b.reason, b.attempt) for b in parked] == [("parked", 3)]
        assert "never ended" in parked[0].error
        assert ran == [1], "the parked job never ran again; the fresh one ran once"


class Stuck:
    """A metadata sink whose writes wait on the loop until the test opens it, noting the ones that ended."""

    def __init__(self) -> None:
        self.opened = anyio.Event()
        self.written: list[JSONObject] = []
        self.waiting = threading.Event()

    def current(self) -> JSONObject:
        return {}

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        self.waiting.set()
        await self.opened.wait()
        self.written.append(metadata)


async def attempt_with(sink: Stuck, handler: Any, *, time_limit: float, threads: ThreadSlots) -> AttemptResult:
    """One attempt of ``handler`` whose metadata writes go to ``sink``."""

    def make(log: AttemptLog) -> Context:
        return Context(
            connection=ConnectionInfo(REF, {}),
            event=EventInfo(LifecycleEvent.POST_CONNECTION_CREATION, {}, "e1"),
            provider=Provider(None, Integration("acme"), {}, {}),  # type: ignore[arg-type]  # never called
            metadata_model=None,
            sink=sink,
            log=log,
        )

    return await run_attempt(installed(handler), make, attempt=1, time_limit=time_limit, threads=threads)


async def test_a_plain_defs_loop_call_in_flight_at_its_timeout_is_cancelled() -> None:
    """The write a plain def waits for when its attempt times out is cancelled on the loop: the thread gets
    CancelledError and the write never happens."""
    sink = Stuck()
    raised: list[str] = []
    ended = threading.Event()

    def writes(ctx: Any) -> None:
        try:
            ctx.set_metadata({"webhook": "wh_1"})
        except BaseException as exc:
            raised.append(type(exc).__name__)
            raise
        finally:
            ended.set()

    threads = ThreadSlots(1)
    result = await attempt_with(sink, writes, time_limit=0.05, threads=threads)
    assert (result.ok, result.error_type) == (False, TIMEOUT)
    assert await anyio.to_thread.run_sync(ended.wait, 5), "the thread still waits for its call"
    sink.opened.set()
    assert raised == ["CancelledError"]
    assert sink.written == []


async def test_a_call_an_abandoned_plain_def_makes_after_its_attempt_is_refused() -> None:
    """A plain def that outlives its timeout and then calls the context gets CancelledError: its attempt is over."""
    sink = Stuck()
    sink.opened.set()
    go_on, ended = threading.Event(), threading.Event()
    raised: list[str] = []

    def late(ctx: Any) -> None:
        go_on.wait()
        try:
            ctx.set_metadata({"too": "late"})
        except BaseException as exc:
            raised.append(type(exc).__name__)
        finally:
            ended.set()

    threads = ThreadSlots(1)
    result = await attempt_with(sink, late, time_limit=0.01, threads=threads)
    assert (result.ok, result.error_type) == (False, TIMEOUT)
    go_on.set()
    assert await anyio.to_thread.run_sync(ended.wait, 5), "the late call was not answered"
    assert raised == ["CancelledError"]
    assert sink.written == [] and not sink.waiting.is_set()


CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")


async def test_a_plain_def_runs_in_its_attempts_context() -> None:
    """A plain def sees the context variables of the task that runs its attempt (the attempt's span, for one)."""
    seen: list[str] = []

    def reads(ctx: Any) -> None:
        seen.append(CALLER.get())

    CALLER.set("the attempt's task")
    result = await attempt(reads, threads=ThreadSlots(2))
    assert result.ok
    assert seen == ["the attempt's task"]


async def test_plain_defs_reuse_their_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """One after the other, attempts share one worker thread; eight at once take eight (no thread per call)."""
    started: list[str] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    threads = ThreadSlots(8)
    for _ in range(20):
        assert (await attempt(lambda ctx: None, threads=threads)).ok
    assert started.count("orchestrator function") == 1
    gate = threading.Barrier(8, timeout=5)
    results: list[AttemptResult] = []

    async def one() -> None:
        results.append(await attempt(lambda ctx: gate.wait(), threads=threads))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
    assert [r.ok for r in results] == [True] * 8
    assert started.count("orchestrator function") == 8


async def test_a_plain_def_may_call_anyio_from_thread_without_a_token() -> None:
    """As in anyio's own worker threads, ``anyio.from_thread.run_sync`` finds the loop by itself."""
    called = anyio.Event()

    def calls_back(ctx: Any) -> None:
        anyio.from_thread.run_sync(called.set)

    result = await attempt(calls_back, threads=ThreadSlots(1))
    assert result.ok, result.error
    assert called.is_set()
