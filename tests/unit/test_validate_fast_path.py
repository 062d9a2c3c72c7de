"""One validate function runs on the fast path (no task group) and keeps every guarantee of the attempt boundary.

docs/reliability.md: whatever the function does (raises a BaseException or a
cancellation of its own, blocks, never returns, outruns the deadline) ends in its
own recorded outcome, with the connection's credentials redacted from it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from orchestrator.config import DispatchConfig
from orchestrator.context import Context
from orchestrator.model import ConnectionState
from orchestrator.provider import REDACTED
from orchestrator.records import ConnectionRejected, FunctionFailed, FunctionSucceeded
from tests.support.engine import VALIDATE, Harness, function, running

pytestmark = pytest.mark.anyio

TOKEN = "tok-0123456789abcdef-secret"


class Doom(BaseException):
    """A BaseException that is not an Exception (nor SystemExit, nor KeyboardInterrupt)."""


@pytest.fixture
def task_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The modules that open an anyio task group during the test, in order."""
    opened: list[str] = []
    create = anyio.create_task_group

    def noted() -> anyio.abc.TaskGroup:
        opened.append(sys._getframe(1).f_globals["__name__"])
        return create()

    monkeypatch.setattr(anyio, "create_task_group", noted)
    yield opened


async def failure(h: Harness) -> FunctionFailed:
    """The one function-failed record of the validation, after asserting that it rejected the connection."""
    assert await h.types() == ["validate-connection", "function-failed", "connection-rejected"]
    bodies = await h.bodies()
    assert isinstance(bodies[1], FunctionFailed) and isinstance(bodies[2], ConnectionRejected)
    return bodies[1]


async def test_one_validate_function_runs_without_a_task_group(task_groups: list[str]) -> None:
    """A validation with one function (sync or async) opens no task group; one with two does (the control)."""

    def plain(ctx: Any) -> None:
        ctx.log("plain")

    async def coroutine(ctx: Context) -> None:
        ctx.log("async")

    async with running(function("plain", VALIDATE, plain)) as h:
        assert (await h.emit(VALIDATE)).state is ConnectionState.PENDING
    async with running(function("async", VALIDATE, coroutine)) as h:
        assert (await h.emit(VALIDATE)).state is ConnectionState.PENDING
    assert "orchestrator.dispatch" not in task_groups
    async with running(function("plain", VALIDATE, plain), function("async", VALIDATE, coroutine)) as h:
        assert (await h.emit(VALIDATE)).state is ConnectionState.PENDING
    assert task_groups.count("orchestrator.dispatch") == 1


@pytest.mark.parametrize("is_async", [False, True], ids=["def", "async-def"])
async def test_the_only_function_outrunning_the_deadline_times_out(is_async: bool) -> None:
    """A function that never returns fails with a timeout at the validate deadline; the validation rejects."""
    # The deadline is real time (anyio's clock); 1 ms is run_sync's floor, reached only by functions that never
    # return, so the outcome cannot depend on the machine's speed.
    released = threading.Event()
    never = anyio.Event()

    def blocks(ctx: Any) -> None:
        released.wait()

    async def hangs(ctx: Context) -> None:
        await never.wait()

    handler: Callable[..., Any] = hangs if is_async else blocks
    try:
        async with running(function("stuck", VALIDATE, handler), config=DispatchConfig(validate_deadline=0.001)) as h:
            result = await h.emit(VALIDATE)
            failed = await failure(h)
    finally:
        released.set()  # the abandoned thread may end
    assert (failed.error_type, failed.error, failed.retryable) == ("Timeout", "timed out after 0.001s", True)
    assert result.state is ConnectionState.REJECTED
    assert result.rejection_reason == "stuck: timed out after 0.001s"


@pytest.mark.parametrize("is_async", [False, True], ids=["def", "async-def"])
@pytest.mark.parametrize("raised", [Doom, asyncio.CancelledError, SystemExit], ids=lambda t: t.__name__)
async def test_a_base_exception_or_cancellation_of_its_own_is_the_functions_failure(
    is_async: bool, raised: type[BaseException]
) -> None:
    """What the only function raises, BaseException and CancelledError included, is its failure; the emit
    answers and the engine goes on (the next validation passes)."""
    calls = 0

    def plain(ctx: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise raised("the function's own")

    async def coroutine(ctx: Context) -> None:
        plain(ctx)

    handler: Callable[..., Any] = coroutine if is_async else plain
    async with running(function("hostile", VALIDATE, handler)) as h:
        result = await h.emit(VALIDATE)
        failed = await failure(h)
        again = await h.emit(VALIDATE)
        last = (await h.bodies())[-2]
    assert result.state is ConnectionState.REJECTED
    assert failed.error_type == raised.__name__
    assert again.state is ConnectionState.PENDING
    assert isinstance(last, FunctionSucceeded)


@pytest.mark.parametrize("is_async", [False, True], ids=["def", "async-def"])
async def test_the_only_functions_error_log_and_traceback_are_redacted(is_async: bool) -> None:
    """The credential a function logs and puts in its error is redacted from the record and the rejection."""

    def plain(ctx: Any) -> None:
        token = ctx.credentials["access_token"]
        ctx.log("using", token)
        raise RuntimeError(f"the provider refused {token}")

    async def coroutine(ctx: Context) -> None:
        plain(ctx)

    handler: Callable[..., Any] = coroutine if is_async else plain
    async with running(function("leaky", VALIDATE, handler)) as h:
        result = await h.emit(VALIDATE, credentials={"access_token": TOKEN})
        failed = await failure(h)
    assert failed.error == f"the provider refused {REDACTED}"
    assert failed.logs == (f"info: using {REDACTED}",)
    assert TOKEN not in failed.traceback and REDACTED in failed.traceback
    assert TOKEN not in result.rejection_reason and REDACTED in result.rejection_reason
