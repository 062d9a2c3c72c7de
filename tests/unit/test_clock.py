"""The tests' fake clock (tests/support/clock.py): time moves only when the test moves it, and sleepers wait for it."""

from __future__ import annotations

from datetime import timedelta

import anyio
import pytest

from orchestrator.clock import Clock
from tests.support.clock import START, FakeClock

pytestmark = pytest.mark.anyio


def test_it_is_a_clock_that_stands_still() -> None:
    """FakeClock satisfies the Clock protocol and tells the same time until it is moved."""
    clock: Clock = FakeClock()
    assert clock.now() == START
    assert clock.now() == START


async def test_sleep_waits_until_the_time_is_advanced_past_its_deadline() -> None:
    """A sleeper of 10 s stays asleep after 9.5 s of fake time and wakes once 10 s have passed, with no real wait."""
    clock = FakeClock()
    woke: list[timedelta] = []

    async def sleeper() -> None:
        """Sleep on the fake clock, then note the wake-up."""
        await clock.sleep(10)
        woke.append(clock.now() - START)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            await clock.sleeping()
            clock.advance(9.5)
            await anyio.wait_all_tasks_blocked()
            assert woke == []
            assert clock.sleepers == 1
            clock.advance(0.5)
    assert woke == [timedelta(seconds=10)]
    assert clock.sleepers == 0


async def test_advance_wakes_only_the_sleepers_that_are_due() -> None:
    """Of sleepers for 1, 5 and 60 s, advancing 5 s wakes the first two, in any order, and leaves the third."""
    clock = FakeClock()
    woke: set[float] = set()

    async def sleeper(seconds: float) -> None:
        """Sleep on the fake clock, then note the wake-up."""
        await clock.sleep(seconds)
        woke.add(seconds)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for seconds in (1, 5, 60):
                tg.start_soon(sleeper, seconds)
            await clock.sleeping(3)
            clock.advance(5)
            await anyio.wait_all_tasks_blocked()
            assert woke == {1, 5}
            tg.cancel_scope.cancel()
    assert clock.sleepers == 0, "a cancelled sleeper is forgotten"


async def test_a_sleep_that_is_not_in_the_future_returns_at_once() -> None:
    """sleep(0) and negative sleeps return without anyone advancing the clock."""
    clock = FakeClock()
    with anyio.fail_after(5):
        await clock.sleep(0)
        await clock.sleep(-1)
    assert clock.now() == START


async def test_set_may_move_back_and_does_not_wake_early() -> None:
    """set() jumps back like a corrected wall clock; a sleeper's deadline stays where it was."""
    clock = FakeClock()
    woke = anyio.Event()

    async def sleeper() -> None:
        """Sleep on the fake clock, then note the wake-up."""
        await clock.sleep(10)
        woke.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            await clock.sleeping()
            clock.set(START - timedelta(hours=1))
            assert clock.now() == START - timedelta(hours=1)
            clock.advance(3600 + 9)
            await anyio.wait_all_tasks_blocked()
            assert not woke.is_set()
            clock.set(START + timedelta(seconds=10))
            await woke.wait()
