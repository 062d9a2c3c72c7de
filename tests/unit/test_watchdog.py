"""The loop watchdog names the function that holds the event loop, and stays quiet while it turns."""

from __future__ import annotations

import logging
import time

import anyio
import anyio.lowlevel
import pytest

from orchestrator.functions import on_event
from orchestrator.plugins import Installed
from orchestrator.watchdog import LoopWatchdog

pytestmark = pytest.mark.anyio


async def hog(ctx: object) -> None:
    """An async event function that blocks the loop (the hostile behaviour under test)."""
    time.sleep(0.8)  # noqa: ASYNC251


HOG = Installed("hog", on_event("post-connection-creation", integration="acme")(hog), "acme-plugin", "2.0", "m:hog")


async def test_a_blocking_function_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """While an async function calls time.sleep, the watchdog logs a WARNING naming it and its plugin."""
    watchdog = LoopWatchdog(threshold=0.2, interval=0.02)
    caplog.set_level(logging.INFO, logger="orchestrator.watchdog")
    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog.run)
        await anyio.lowlevel.checkpoint()  # the watchdog's thread is started
        with watchdog.watching(HOG):
            await hog(None)
        tg.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert watchdog.episodes == 1
    assert len(warnings) == 1 and "function hog (acme-plugin 2.0) has held the event loop" in warnings[0].getMessage()


async def test_a_loop_that_turns_raises_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A loop kept busy by awaiting (not blocking) for several thresholds gives no warning."""
    watchdog = LoopWatchdog(threshold=0.5, interval=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog.run)
        with watchdog.watching(HOG):
            await anyio.sleep(0.6)
        tg.cancel_scope.cancel()
    assert watchdog.episodes == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
