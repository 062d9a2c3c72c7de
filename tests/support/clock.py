"""A fake :class:`~orchestrator.clock.Clock` whose time moves only when the test says so.

    clock = FakeClock()                       # 2025-06-01 12:00 UTC, frozen
    store = MemoryEventStore(clock=clock)     # anything that takes a Clock
    ...
    await clock.wait_for_sleepers(1)          # the code under test is parked on clock.sleep() (or: sleeping())
    clock.advance(5)                          # five seconds pass; sleepers due by then wake up
    clock.set(when)                           # jump, even back, as a corrected wall clock does

Nothing here reads the wall clock or sleeps in real time: :meth:`FakeClock.sleep`
parks its caller until :meth:`FakeClock.advance` (or :meth:`FakeClock.advance_to`)
moves the fake time to or past the caller's wake-up time, and
:meth:`FakeClock.wait_for_sleepers` lets a test wait, on an event, until the
code under test is parked before it moves time. So a test that retries after
a backoff, or a provider call that honours ``Retry-After: 5``, runs in
microseconds and always the same way.

Readings. ``FakeClock(t0, t1, t2, ...)`` starts at ``t0`` and, while more
readings are queued, each :meth:`~FakeClock.now` answers the current time and
then steps to the next reading (which may lie in the past: that is how the
store contract tests check that ``recorded_at`` never goes back). Once the
queue is empty the time stays put until advanced. This is exactly what the
contract tests' ``SteppingClock(*times)`` does, so ``FakeClock`` can replace it
without changing a call.

Sleeping. ``sleep(seconds)`` with ``seconds <= 0`` (or below the microsecond
resolution of :class:`~datetime.datetime`) is only a checkpoint, like
``anyio.sleep(0)``. Otherwise the caller wakes once the time is at or past
``now() + seconds``; a cancelled sleeper simply stops waiting. Sleepers wake in
order of their wake-up times (ties: in the order they went to sleep).

Everything waits on :class:`anyio.Event` objects, created lazily, so a clock
may be built outside an event loop (say, at import time of a test module) and
used from any anyio backend.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel

EPOCH = START = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
"""Where a :class:`FakeClock` starts unless told otherwise."""

_order = itertools.count()


@dataclass(order=True)
class _Sleeper:
    """One caller parked in :meth:`FakeClock.sleep`."""

    wake_at: datetime
    seq: int
    woken: anyio.Event = field(compare=False)


class FakeClock:
    """A :class:`~orchestrator.clock.Clock` for tests: frozen until :meth:`advance`, sleeps parked on fake time."""

    def __init__(self, *readings: datetime) -> None:
        times = readings or (EPOCH,)
        for when in times:
            if when.tzinfo is None:
                raise ValueError(f"FakeClock readings must be timezone-aware, not {when!r}")
        self._now = times[0]
        self._queued = list(times[1:])
        self._sleepers: list[_Sleeper] = []
        self._changed: anyio.Event | None = None

    # -- the Clock protocol -------------------------------------------------------------

    def now(self) -> datetime:
        """The fake time (then the next queued reading, if any, becomes the time)."""
        current = self._now
        if self._queued:
            self._now = self._queued.pop(0)
            self._wake_due()
        return current

    async def sleep(self, seconds: float) -> None:
        """Park until the fake time reaches ``now() + seconds``; a checkpoint when that is not in the future."""
        wake_at = self._now + timedelta(seconds=max(seconds, 0.0))
        if wake_at <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper(wake_at, next(_order), anyio.Event())
        self._sleepers.append(sleeper)
        self._sleepers.sort()
        self._notify()
        try:
            await sleeper.woken.wait()
        finally:
            if sleeper in self._sleepers:  # cancelled before it was woken
                self._sleepers.remove(sleeper)
                self._notify()

    # -- moving time ----------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the time ``seconds`` forward and wake every sleeper due by then (they run at their next turn)."""
        if seconds < 0:
            raise ValueError(f"a FakeClock never goes back: advance({seconds})")
        self.advance_to(self._now + timedelta(seconds=seconds))

    def advance_to(self, when: datetime) -> None:
        """Move the time forward to ``when`` (no earlier than now) and wake every sleeper due by then."""
        if when < self._now:
            raise ValueError(f"a FakeClock never goes back: advance_to({when}) but it is {self._now}")
        self._now = when
        self._wake_due()

    def set(self, when: datetime) -> None:
        """Jump to ``when``, forward or back (a wall clock corrected by NTP); wake every sleeper due by then."""
        if when.tzinfo is None:
            raise ValueError(f"FakeClock times must be timezone-aware, not {when!r}")
        self._now = when
        self._wake_due()

    # -- observing sleepers ---------------------------------------------------------------

    @property
    def sleepers(self) -> int:
        """How many callers are parked in :meth:`sleep` right now."""
        return len(self._sleepers)

    @property
    def next_wake(self) -> datetime | None:
        """The earliest wake-up time of a parked caller (None when nobody sleeps)."""
        return self._sleepers[0].wake_at if self._sleepers else None

    def wake_times(self) -> list[datetime]:
        """The wake-up times of every parked caller, earliest first."""
        return [s.wake_at for s in self._sleepers]

    async def wait_for_sleepers(self, count: int = 1, *, until: datetime | None = None) -> None:
        """Return once at least ``count`` callers are parked in :meth:`sleep` (waits on an event, never on time).

        With ``until``, only callers that wake at or before ``until`` count:
        code that is parked on a long timer already (a job's lease, say) is
        then not mistaken for the sleep the test is waiting for.
        """
        while self._count(until) < count:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    async def sleeping(self, count: int = 1) -> None:
        """Return once at least ``count`` callers are parked in :meth:`sleep` (so that moving time wakes them)."""
        await self.wait_for_sleepers(count)

    def _count(self, until: datetime | None) -> int:
        return sum(1 for s in self._sleepers if until is None or s.wake_at <= until)

    def _wake_due(self) -> None:
        due = [s for s in self._sleepers if s.wake_at <= self._now]
        if not due:
            return
        self._sleepers = [s for s in self._sleepers if s.wake_at > self._now]
        for sleeper in due:
            sleeper.woken.set()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()}, {len(self._sleepers)} sleeping, {len(self._queued)} queued)"
