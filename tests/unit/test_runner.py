"""One attempt of one event function: whatever the function does, the attempt ends in a result."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest

from orchestrator import Context, NonRetryable, Rejected, on_event
from orchestrator.config import Integration
from orchestrator.context import MAX_LOG_LINE, MAX_LOG_LINES, AttemptLog, Buffered, ConnectionInfo, EventInfo
from orchestrator.errors import InvalidArgument, ProviderError
from orchestrator.model import ConnectionRef, LifecycleEvent
from orchestrator.plugins import Installed
from orchestrator.provider import Provider
from orchestrator.runner import AttemptResult, run_attempt

pytestmark = pytest.mark.anyio

REF = ConnectionRef("dev", "acme", "conn-1")


def installed(handler: Callable[..., Any], name: str = "fn") -> Installed:
    """``handler`` as an installed post-connection-creation function of integration acme."""
    function = on_event("post-connection-creation", integration="acme")(handler)
    return Installed(name, function, "test-plugin", "1.0", f"tests:{name}")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client that never reaches a network (every call answers 204)."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(204))) as client:
        yield client


@pytest.fixture
def make_context(http: httpx.AsyncClient) -> Callable[[AttemptLog], Context]:
    """What the dispatcher hands run_attempt: a factory of the attempt's Context."""

    def make(log: AttemptLog) -> Context:
        return Context(
            connection=ConnectionInfo(REF, {}),
            event=EventInfo(LifecycleEvent.POST_CONNECTION_CREATION, {}, "event-1", 1),
            provider=Provider(http, Integration("acme", base_url="http://provider.test"), {}, {}),
            metadata_model=None,
            sink=Buffered({}),
            log=log,
        )

    return make


async def run(
    make_context: Callable[[AttemptLog], Context], handler: Callable[..., Any], time_limit: float = 5, attempt: int = 1
) -> AttemptResult:
    """Run ``handler`` once as an event function."""
    return await run_attempt(installed(handler), make_context, attempt=attempt, time_limit=time_limit)


async def test_success(make_context: Callable[[AttemptLog], Context]) -> None:
    """A function that returns None succeeds; its log lines and plugin are kept in the record data."""

    async def fn(ctx: Context) -> None:
        await ctx.get("/ping")
        ctx.log("registered", 42)

    result = await run(make_context, fn, attempt=2)

    assert result.ok
    assert (result.attempt, result.error, result.retryable, result.rejected) == (2, "", False, False)
    assert result.logs == ["info: registered 42"]
    assert result.duration_ms >= 0
    assert result.outcome().to_data() == {
        "function": "fn",
        "attempt": 2,
        "duration_ms": result.duration_ms,
        "distribution": "test-plugin",
        "version": "1.0",
        "logs": ["info: registered 42"],
    }


async def test_raising_fails_retryably_with_the_error_text(make_context: Callable[[AttemptLog], Context]) -> None:
    """An exception fails the attempt, retryable, with its type and message recorded."""

    async def fn(ctx: Context) -> None:
        ctx.log("about to fail")
        raise RuntimeError("the provider is down")

    result = await run(make_context, fn)

    assert not result.ok
    assert (result.error_type, result.error) == ("RuntimeError", "the provider is down")
    assert result.retryable and not result.rejected
    assert result.logs == ["info: about to fail"]
    data = result.outcome().to_data()
    assert (data["error_type"], data["error"], data["retryable"]) == ("RuntimeError", "the provider is down", True)


async def test_an_exception_without_a_message_is_named_by_its_type(
    make_context: Callable[[AttemptLog], Context],
) -> None:
    """An exception with an empty message still leaves a readable error: its type's name."""

    async def fn(ctx: Context) -> None:
        raise KeyError

    result = await run(make_context, fn)

    assert (result.ok, result.error_type) == (False, "KeyError")
    assert result.error


async def test_rejected_is_a_clean_rejection_not_retried(make_context: Callable[[AttemptLog], Context]) -> None:
    """Rejected marks the result rejected, not retryable, with the function's message as the error."""

    async def fn(ctx: Context) -> None:
        raise Rejected("the token lacks the repo scope")

    result = await run(make_context, fn)

    assert (result.ok, result.rejected, result.retryable) == (False, True, False)
    assert result.error == "the token lacks the repo scope"


@pytest.mark.parametrize(
    "error",
    [NonRetryable("the account was closed"), InvalidArgument("bad metadata"), ProviderError("x", status=404)],
)
async def test_permanent_failures_are_not_retryable(
    make_context: Callable[[AttemptLog], Context], error: Exception
) -> None:
    """NonRetryable, invalid metadata and a provider's 4xx answer stop retrying."""

    async def fn(ctx: Context) -> None:
        raise error

    result = await run(make_context, fn)

    assert (result.ok, result.retryable, result.rejected) == (False, False, False)
    assert result.error_type == type(error).__name__


@pytest.mark.parametrize("status", [0, 408, 429, 500, 503])
async def test_transient_provider_errors_are_retryable(
    make_context: Callable[[AttemptLog], Context], status: int
) -> None:
    """A provider that was unreachable, timed out, throttled or failed with 5xx is worth another attempt."""

    async def fn(ctx: Context) -> None:
        raise ProviderError("try later", status=status)

    result = await run(make_context, fn)

    assert (result.ok, result.retryable) == (False, True)


async def test_an_async_function_past_its_time_limit_times_out(
    make_context: Callable[[AttemptLog], Context],
) -> None:
    """A coroutine that never finishes fails, retryably, with "timed out" at the time limit."""
    never = anyio.Event()

    async def fn(ctx: Context) -> None:
        ctx.log("waiting")
        await never.wait()

    result = await run(make_context, fn, time_limit=0.05)

    assert (result.ok, result.retryable, result.error_type) == (False, True, "Timeout")
    assert result.error == "timed out after 0.05s"
    assert result.logs == ["info: waiting"]


async def test_a_sync_function_that_sleeps_times_out_without_blocking_the_loop(
    make_context: Callable[[AttemptLog], Context],
) -> None:
    """A plain def calling time.sleep runs in a worker thread: other tasks run and the attempt ends on time."""
    sleeping, woke = threading.Event(), threading.Event()
    ticks_while_sleeping = 0

    def fn(ctx: Any) -> None:
        sleeping.set()
        time.sleep(0.2)
        woke.set()

    async def ticker(stop: anyio.Event) -> None:
        nonlocal ticks_while_sleeping
        while not stop.is_set():
            if sleeping.is_set() and not woke.is_set():
                ticks_while_sleeping += 1
            await anyio.lowlevel.checkpoint()

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker, stop)
        result = await run(make_context, fn, time_limit=0.05)
        stop.set()

    assert (result.ok, result.error) == (False, "timed out after 0.05s")
    assert not woke.is_set(), "the attempt waited for the abandoned thread"
    assert ticks_while_sleeping > 0, "no other task ran while the function slept"
    await anyio.to_thread.run_sync(woke.wait)  # let the abandoned thread finish before the loop closes


async def test_a_sync_function_gets_a_blocking_context(make_context: Callable[[AttemptLog], Context]) -> None:
    """A plain def sees the connection and calls ctx methods without awaiting them."""
    seen: list[object] = []

    def fn(ctx: Any) -> None:
        seen.append(ctx.connection.ref)
        seen.append(ctx.get("/ping").status_code)
        ctx.set_metadata({"k": "v"})
        seen.append(ctx.get_metadata())
        ctx.log("from a thread")

    result = await run(make_context, fn)

    assert result.ok, result.error
    assert seen == [REF, 204, {"k": "v"}]
    assert result.logs == ["info: from a thread"]


async def test_returning_junk_succeeds_with_a_warning(make_context: Callable[[AttemptLog], Context]) -> None:
    """A function's return value is ignored: the attempt succeeds and the log says so."""

    async def fn(ctx: Context) -> object:
        return {"status": "ok"}

    result = await run(make_context, fn)

    assert result.ok
    assert result.logs == ["warning: the function returned dict, which is ignored"]


async def test_an_async_def_returning_a_coroutine_instead_of_awaiting_it_fails_saying_so(
    make_context: Callable[[AttemptLog], Context], http: httpx.AsyncClient
) -> None:
    """``return ctx.get(...)`` without await: the call never ran, and the failure says so, naming the coroutine;
    it is not retried (it would do the same again)."""
    called: list[str] = []

    async def fn(ctx: Context) -> Any:
        called.append("fn")
        return ctx.get("/ping")

    result = await run(make_context, fn)

    assert called == ["fn"]
    assert (result.ok, result.error_type, result.retryable) == (False, "TypeError", False)
    assert result.error == (
        "the async def returned a coroutine Context.get() instead of awaiting it, so it never ran:"
        " write `await ...` (or `return await ...`)"
    )


async def test_a_plain_def_returning_an_awaitable_is_told_to_be_async(
    make_context: Callable[[AttemptLog], Context],
) -> None:
    """A plain def that returns a coroutine (a helper's, say): the failure says to make it async def."""

    async def helper() -> None:
        raise AssertionError("never runs")

    def fn(ctx: Any) -> Any:
        return helper()

    result = await run(make_context, fn)

    assert (result.ok, result.error_type, result.retryable) == (False, "TypeError", False)
    assert result.error == (
        "the plain def returned a coroutine test_a_plain_def_returning_an_awaitable_is_told_to_be_async.<locals>"
        ".helper(), which nothing awaits, so it never ran: make it `async def`"
    )


async def test_a_log_flood_is_bounded(make_context: Callable[[AttemptLog], Context]) -> None:
    """10,000 log lines keep the first 200 and a note of how many were dropped."""

    async def fn(ctx: Context) -> None:
        for i in range(10_000):
            ctx.log("line", i)

    result = await run(make_context, fn)

    assert result.ok
    assert len(result.logs) == MAX_LOG_LINES + 1 == 201
    assert result.logs[0] == "info: line 0"
    assert result.logs[199] == "info: line 199"
    assert result.logs[-1] == "(9800 more lines dropped)"


async def test_a_long_log_line_is_truncated(make_context: Callable[[AttemptLog], Context]) -> None:
    """One huge line is cut to the maximum line length."""

    async def fn(ctx: Context) -> None:
        ctx.log("x" * 1_000_000, level="debug")

    result = await run(make_context, fn)

    assert len(result.logs) == 1
    assert result.logs[0].startswith("debug: xxx")
    assert len(result.logs[0]) == MAX_LOG_LINE + 1
    assert result.logs[0].endswith("…")


async def test_sys_exit_in_an_async_function_fails_the_attempt_only(
    make_context: Callable[[AttemptLog], Context],
) -> None:
    """sys.exit inside a coroutine function is recorded as a failure; the process goes on."""

    async def fn(ctx: Context) -> None:
        sys.exit(3)

    result = await run(make_context, fn)

    assert (result.ok, result.error_type, result.retryable) == (False, "SystemExit", True)


async def test_sys_exit_in_a_sync_function_fails_the_attempt_only(
    make_context: Callable[[AttemptLog], Context],
) -> None:
    """sys.exit inside a plain def (a worker thread) is recorded as a failure; the process goes on."""

    def fn(ctx: Any) -> None:
        sys.exit("bye")

    result = await run(make_context, fn)

    assert (result.ok, result.error_type, result.error) == (False, "SystemExit", "bye")


async def test_a_broken_context_factory_is_a_failed_attempt(make_context: Callable[[AttemptLog], Context]) -> None:
    """Even building the context failing (e.g. bad settings) ends in a result, not an exception."""

    def broken(log: AttemptLog) -> Context:
        raise ValueError("no such integration")

    async def fn(ctx: Context) -> None:
        raise AssertionError("must not run")

    result = await run_attempt(installed(fn), broken, attempt=1, time_limit=1)

    assert (result.ok, result.error_type, result.error) == (False, "ValueError", "no such integration")


async def test_cancellation_from_outside_propagates(make_context: Callable[[AttemptLog], Context]) -> None:
    """An attempt cancelled by its owner (a validation that failed elsewhere) is cancelled, not a result."""
    started = anyio.Event()
    finished: list[AttemptResult] = []

    async def fn(ctx: Context) -> None:
        started.set()
        await anyio.Event().wait()

    async with anyio.create_task_group() as tg:

        async def attempt() -> None:
            finished.append(await run(make_context, fn))

        tg.start_soon(attempt)
        await started.wait()
        tg.cancel_scope.cancel()

    assert finished == []
