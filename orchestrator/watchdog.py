"""The loop watchdog: notices when the event loop stops turning, and names the function that holds it.

Python cannot pre-empt code that never yields: an ``async def`` event
function that calls ``time.sleep(30)`` freezes every connection for 30 s.
The watchdog cannot prevent that, but it makes it visible at once: a thread
beats the loop's heart every ``interval`` seconds, and when a beat is
``threshold`` seconds late it looks at the loop thread's stack for the
handler of a running attempt, logs a WARNING naming the function and its
plugin, and counts ``orchestrator.loop.blocked``. (The attempt itself is
recorded as timed out by the runner when it overran its timeout.) With
``serve --isolation process`` functions run in worker processes instead,
where such a function holds only its own worker, which is killed at its
timeout (:mod:`orchestrator.isolation`); the watchdog then has nothing to name.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType

import anyio
from opentelemetry import metrics

from orchestrator.plugins import Installed

log = logging.getLogger(__name__)
meter = metrics.get_meter(__name__)
BLOCKED = meter.create_counter(
    "orchestrator.loop.blocked", description="Times the event loop was held past the watchdog's threshold, by function"
)

THRESHOLD = 1.0
"""Seconds the loop may go without turning before the watchdog speaks."""


def _code(function: Installed) -> CodeType | None:
    handler = function.function.handler
    target = handler if inspect.isroutine(handler) else type(handler).__call__
    code = getattr(target, "__code__", None)
    return code if isinstance(code, CodeType) else None


class LoopWatchdog:
    """Watches the running event loop from a thread of its own (see the module's docstring)."""

    def __init__(self, *, threshold: float = THRESHOLD, interval: float | None = None) -> None:
        self.threshold = threshold
        self._interval = interval if interval is not None else min(threshold / 4, 0.25)
        self._codes: dict[CodeType, Installed] = {}
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.episodes = 0
        """How many times the loop was found blocked (for tests and the log)."""

    @contextmanager
    def watching(self, function: Installed) -> Iterator[None]:
        """While the block runs, ``function``'s handler on the loop's stack is named as the culprit."""
        code = _code(function)
        if code is None:
            yield
            return
        with self._lock:
            self._codes[code] = function
        try:
            yield
        finally:
            with self._lock:
                self._codes.pop(code, None)

    async def run(self) -> None:
        """Watch until cancelled (the thread is a daemon thread and stops with it)."""
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        stop = threading.Event()

        def beat() -> None:
            self._last = time.monotonic()

        def watch() -> None:
            blocked_since: float | None = None
            while not stop.wait(self._interval):
                try:
                    loop.call_soon_threadsafe(beat)
                except RuntimeError:  # the loop is closed
                    return
                late = time.monotonic() - self._last
                if late > self.threshold and blocked_since is None:
                    blocked_since = self._last
                    self._report(loop_thread, late)
                elif late <= self.threshold and blocked_since is not None:
                    log.info("the event loop turns again after %.1fs", time.monotonic() - blocked_since)
                    blocked_since = None

        self._last = time.monotonic()
        thread = threading.Thread(target=watch, name="orchestrator loop watchdog", daemon=True)
        thread.start()
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()

    def _report(self, loop_thread: int, late: float) -> None:
        self.episodes += 1
        culprit = self._culprit(loop_thread)
        if culprit is None:
            log.warning("the event loop has not turned for %.1fs (no event function on its stack)", late)
            BLOCKED.add(1, {"function": ""})
            return
        log.warning(
            "function %s (%s %s) has held the event loop for %.1fs: every connection waits. Make its blocking"
            " calls awaitable, or make it a plain def (it then runs in a thread)",
            culprit.name,
            culprit.distribution,
            culprit.version,
            late,
            extra={"function": culprit.name, "blocked_s": round(late, 1)},
        )
        BLOCKED.add(1, {"function": culprit.name})

    def _culprit(self, loop_thread: int) -> Installed | None:
        frame = sys._current_frames().get(loop_thread)
        with self._lock:
            codes = dict(self._codes)
        while frame is not None:
            if frame.f_code in codes:
                return codes[frame.f_code]
            frame = frame.f_back
        return None
