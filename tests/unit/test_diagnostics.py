"""A failure can be diagnosed from its record: the function's own frames, its own exception type and message."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from orchestrator.context import Context
from orchestrator.records import FunctionFailed
from orchestrator.runner import MAX_TRACEBACK
from tests.support.engine import VALIDATE, function, running

pytestmark = pytest.mark.anyio

TOKEN = "tok-8d1e0f5a9b7c4e2d"


def lookup(settings: dict[str, str], key: str) -> str:
    return settings[key]  # the KeyError is raised here


async def failed_record(handler: object) -> FunctionFailed:
    async with running(function("check", VALIDATE, handler)) as h:
        await h.emit(VALIDATE, credentials={"access_token": TOKEN})
        return next(b for b in await h.bodies() if isinstance(b, FunctionFailed))


async def test_a_key_error_keeps_the_functions_own_frames_redacted() -> None:
    async def check(ctx: Context) -> None:
        lookup({}, TOKEN)

    failed = await failed_record(check)
    assert (failed.error_type, failed.retryable) == ("KeyError", True)
    lines = failed.traceback.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    raise_line = inspect.getsourcelines(lookup)[1] + 1
    assert f'File "{__file__}", line {raise_line}, in lookup' in failed.traceback
    assert f'File "{__file__}"' in lines[1] and "in check" in lines[1], "it starts at the function, not the runner"
    assert "orchestrator/runner.py" not in failed.traceback and "anyio" not in failed.traceback
    assert lines[-1] == "KeyError: '[redacted]'"
    assert TOKEN not in failed.traceback + failed.error


async def test_a_plain_def_keeps_its_frames_too() -> None:
    def check(ctx: object) -> None:
        lookup({}, "region")

    failed = await failed_record(check)
    assert "in check" in failed.traceback.splitlines()[1]
    assert "threading" not in failed.traceback and "concurrent" not in failed.traceback


async def test_a_functions_own_timeout_error_is_its_own_not_a_deadline() -> None:
    async def check(ctx: Context) -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0)

    failed = await failed_record(check)
    assert failed.error_type == "TimeoutError"
    assert "timed out after" not in failed.error
    assert failed.traceback.splitlines()[-1] == "TimeoutError"


async def test_a_deep_recursion_keeps_the_outermost_and_innermost_frames_within_the_bound() -> None:
    def down(n: int) -> None:  # down and across alternate, so that Python does not fold repeated frames
        if n == 0:
            raise ValueError("bottom")
        across(n - 1)

    def across(n: int) -> None:
        down(n)

    async def check(ctx: Context) -> None:
        down(300)

    failed = await failed_record(check)
    lines = failed.traceback.splitlines()
    assert len(failed.traceback) <= MAX_TRACEBACK
    assert "in check" in lines[1] and "frame(s) omitted" in failed.traceback
    assert lines[-1] == "ValueError: bottom" and "in down" in lines[-3]
