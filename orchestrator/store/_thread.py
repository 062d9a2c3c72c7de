"""A thread of one's own: runs blocking calls one at a time, in order, and answers through the event loop.

The SQLite writer hands each batch to its thread and awaits the answer. A
general-purpose worker pool (``anyio.to_thread``) costs, per call, a capacity
limiter, a condition-variable queue, a cancel scope and a look-up of the async
library; here a call is one ``SimpleQueue.put`` to wake the thread and one
``call_soon_threadsafe`` to wake the loop: one wake-up each way per batch.

The thread is a daemon thread: a call that never returns cannot keep the
interpreter alive at exit. Calls queued after :meth:`OwnThread.stop` are refused.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class OwnThread:
    """One thread that runs the calls given to :meth:`call`, in order."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._stopped = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the thread and return (or raise) what it did.

        Cancelling the caller does not stop a call that has started (the thread runs it
        to its end); callers that need its outcome shield the wait.
        """
        if self._stopped or not self._thread.is_alive():
            raise RuntimeError("the thread is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((fn, args, loop, future))
        return await future

    def start(self) -> None:
        """Start the thread (waits for it to start: call it off the event loop, e.g. with ``anyio.to_thread``)."""
        self._thread.start()

    def stop(self) -> None:
        """Run what is queued, then end the thread (does not wait for it)."""
        if not self._stopped:
            self._stopped = True
            self._calls.put(None)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (blocks: call it off the event loop)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, loop, future = call
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
            del call, fn, args, future  # nothing of a finished call is kept alive by the idle thread


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
