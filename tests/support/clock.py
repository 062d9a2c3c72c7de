"""A fake :class:`orchestrator.clock.Clock` whose time moves only when the test moves it.

    clock = FakeClock(datetime(2025, 6, 1, tzinfo=UTC))
    ...  # hand it to open_store(url, clock=clock) or run_daemon(..., clock=clock)
    await clock.sleeping()  # a task is now waiting in clock.sleep()
    clock.advance(30)  # wakes every sleeper whose deadline has passed

:meth:`FakeClock.sleep` never sleeps for real: it waits until :meth:`advance`
or :meth:`set` moves the time to its deadline. :meth:`set` may also move the
time back, as a wall clock corrected by NTP does. Use it from the event loop
that sleeps on it (``now()`` may be read from any thread).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel

START = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
"""Where a :class:`FakeClock` starts unless told otherwise."""


class FakeClock:
    """The time a test sets; ``sleep`` waits for the test to advance it past the sleeper's deadline."""

    def __init__(self, start: datetime = START) -> None:
        if start.tzinfo is None:
            raise ValueError("a Clock tells timezone-aware times")
        self._now = start
        self._sleepers: list[tuple[datetime, anyio.Event]] = []
        self._slept = anyio.Event()

    def now(self) -> datetime:
        """The current fake time."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the fake time reaches now + ``seconds`` (a checkpoint only, when that is not in the future)."""
        deadline = self._now + timedelta(seconds=max(seconds, 0.0))
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        woken = anyio.Event()
        sleeper = (deadline, woken)
        self._sleepers.append(sleeper)
        slept, self._slept = self._slept, anyio.Event()
        slept.set()
        try:
            await woken.wait()
        finally:
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)

    def advance(self, seconds: float) -> None:
        """Move the time forward by ``seconds`` and wake the sleepers whose deadline has come."""
        if seconds < 0:
            raise ValueError("advance() moves forward; set() may move back")
        self.set(self._now + timedelta(seconds=seconds))

    def set(self, when: datetime) -> None:
        """Jump to ``when`` (forward or back) and wake the sleepers whose deadline has come."""
        if when.tzinfo is None:
            raise ValueError("a Clock tells timezone-aware times")
        self._now = when
        due = [sleeper for sleeper in self._sleepers if sleeper[0] <= when]
        for sleeper in due:
            self._sleepers.remove(sleeper)
            sleeper[1].set()

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting in :meth:`sleep`."""
        return len(self._sleepers)

    async def sleeping(self, count: int = 1) -> None:
        """Return once at least ``count`` tasks wait in :meth:`sleep` (so that advancing now wakes them)."""
        while len(self._sleepers) < count:
            await self._slept.wait()
