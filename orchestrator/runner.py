"""Running one attempt of one event function, whatever the function does.

An attempt always ends in an :class:`AttemptResult`: a function that raises
anything (``BaseException`` and ``CancelledError`` included), hangs past its
timeout, blocks the event loop, returns junk, floods its log or calls
``sys.exit`` is recorded as such and harms nothing else. Coroutine functions
run on the loop under a deadline; plain functions run in worker threads,
bounded by :class:`ThreadSlots`, so they cannot block the loop, and a
thread that outlives its timeout is abandoned, not waited for.

What Python cannot do: pre-empt code that never yields. An ``async def``
that calls ``time.sleep(30)`` holds the whole event loop for 30 s; its
attempt is then recorded as timed out, and the loop watchdog names it in the
log, but the daemon was frozen meanwhile. Nor can it stop a hung thread, or
survive a function that calls ``os._exit`` or crashes the interpreter. For
that, ``serve --isolation process`` runs each attempt in a supervised worker
process (:mod:`orchestrator.isolation`), which is killed at the attempt's
timeout: :func:`run_attempt` then takes the pool's ``invoke`` in place of
:func:`invoke` (the function called here, in the daemon), and the result is
built the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

# anyio's record of the loop a worker thread belongs to: ours keep it as anyio's own threads do, so that
# a plain def calling anyio.from_thread.run() without a token works in both.
from anyio._core._eventloop import threadlocals as _anyio_thread

from orchestrator.context import AttemptLog, Context, Scrub, SyncContext, cut
from orchestrator.errors import InvalidArgument, Misconfigured, ProviderError, ResourceExhausted
from orchestrator.functions import NonRetryable, Rejected
from orchestrator.plugins import Installed
from orchestrator.records import FunctionFailed, FunctionSucceeded

T = TypeVar("T")
TIMEOUT = "Timeout"
"""The ``error_type`` of an attempt that ran out of time."""
MAX_ERROR = 8192
"""Characters of a function's error message kept in its record (a longer one is cut)."""
MAX_TRACEBACK = 8192
"""Characters of a failure's traceback kept in its record (frames from the middle go first)."""
_MAX_RAW = 4 * MAX_ERROR
"""Characters of a message carried to the record's scrub (redacted, then cut to :data:`MAX_ERROR`)."""
_MAX_EXCEPTION_LINE = 1000
"""Characters of the exception's line that a traceback keeps room for when it drops frames."""
_PLUMBING = (
    *(str(Path(m.__file__).parent) + os.sep for m in (sys.modules["orchestrator"], anyio, asyncio) if m.__file__),
    str(Path(concurrent.futures.__file__).parent) + os.sep,
    threading.__file__,
    contextlib.__file__,
)
"""Where the frames that call a function come from: the orchestrator's, anyio's, asyncio's, the thread pools'."""


def own_traceback(exc: BaseException, handler: Callable[..., Any] | None) -> str:
    """The traceback of ``exc`` from the function's own first frame on (the frames that called it are ours,
    not the author's): the outermost frame and as many of the innermost as fit in :data:`MAX_TRACEBACK`
    characters with the exception's line last. That line is bounded here only, like the message (it may hold
    a credential): the traceback is redacted, then cut to its final size, where the record is made. Empty
    when ``exc`` carries no frames of the function."""
    frames = traceback.extract_tb(exc.__traceback__)
    home = getattr(getattr(handler, "__code__", None), "co_filename", None)
    start = next((i for i, frame in enumerate(frames) if frame.filename == home), None)
    if start is None:  # a wrapped handler: skip the frames of the machinery that called it
        start = next((i for i, frame in enumerate(frames) if not frame.filename.startswith(_PLUMBING)), len(frames))
    lines = traceback.format_list(frames[start:])
    if not lines:
        return ""
    last = "".join(traceback.format_exception_only(exc))
    last = last if len(last) <= _MAX_RAW else last[:_MAX_RAW] + "…\n"
    head = "Traceback (most recent call last):\n"
    omitted = 0
    room = min(len(last), _MAX_EXCEPTION_LINE)
    while len(lines) > 2 and len(head) + sum(map(len, lines)) + room + 40 > MAX_TRACEBACK:
        del lines[1]
        omitted += 1
    if omitted:
        lines.insert(1, f"  ... {omitted} frame(s) omitted ...\n")
    return head + "".join(lines) + last


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How one attempt ended."""

    function: Installed
    attempt: int
    ok: bool
    duration_ms: int
    error_type: str = ""
    error: str = ""
    retryable: bool = False
    rejected: bool = False
    """The function raised :class:`Rejected` (a clean verdict for validate-connection)."""
    logs: list[str] = field(default_factory=list)
    traceback: str = ""
    """Where the function raised: its own frames (see :func:`own_traceback`)."""
    misconfigured: str = ""
    """Why the daemon's provider proxy refused one of the attempt's calls, when it failed after that: a setting
    the daemon lacks (a ``base_url``, a credential the auth scheme needs). Set by the dispatcher from the proxy
    itself, never from what the function raised, so no plugin can claim it; such a failure is not retried."""

    def outcome(self, *, retry_in_ms: int | None = None, dryrun: bool = False) -> FunctionSucceeded | FunctionFailed:
        """The body of this attempt's ``function-succeeded`` or ``function-failed`` record."""
        f = self.function
        if self.ok:
            return FunctionSucceeded(
                f.name, self.attempt, self.duration_ms, f.distribution, f.version, tuple(self.logs), dryrun
            )
        return FunctionFailed(
            f.name,
            self.attempt,
            self.duration_ms,
            f.distribution,
            f.version,
            self.error_type,
            self.error,
            self.retryable,
            tuple(self.logs),
            retry_in_ms,
            dryrun,
            self.traceback,
        )


def _classify(exc: BaseException) -> tuple[bool, bool]:
    """(retryable, rejected) for an exception a function raised."""
    if isinstance(exc, Rejected):
        return False, True
    if isinstance(exc, NonRetryable | InvalidArgument | ResourceExhausted | Misconfigured):
        return False, False
    if isinstance(exc, ProviderError) and 400 <= exc.status < 500 and exc.status not in (408, 429):
        return False, False
    return True, False


_IDLE_THREAD_S = 10.0
"""Seconds a worker thread waits for another function before it ends."""
_running_lock = threading.Lock()
_running = 0


def running_threads() -> int:
    """Plain ``def`` functions running in this process's worker threads now (hung ones included)."""
    return _running


class _Workers:
    """Worker threads of one event loop, fed from one queue: a thread for each job with none waiting.

    Every count is kept on the loop (no lock the loop could wait for behind a worker): ``_idle`` is the
    threads waiting for a job that no job has been promised to. A worker reports each job done through
    the loop (:meth:`_finished`), which counts it idle again before it answers the job's caller. A worker
    idle for :data:`_IDLE_THREAD_S` asks the loop to let one idle thread go (:meth:`_retire`): a ``None``
    on the queue, which the first waiting thread takes and ends on. They are daemon threads: a function
    that never returns cannot keep the process from exiting (``orchestrator serve`` says how many it
    leaves behind: :func:`running_threads`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, token: anyio.lowlevel.EventLoopToken) -> None:
        self.loop = loop
        self._token = token
        self._jobs: queue.SimpleQueue[Callable[[], Callable[[], None]] | None] = queue.SimpleQueue()
        self._idle = 0

    def submit(self, job: Callable[[], Callable[[], None]]) -> None:
        """Run ``job`` in a worker thread; it returns what the loop then calls (the answer to its caller)."""
        if self._idle:
            self._idle -= 1
        else:
            threading.Thread(target=self._work, name="orchestrator function", daemon=True).start()
        self._jobs.put(job)

    def _finished(self, answer: Callable[[], None]) -> None:  # on the loop
        self._idle += 1
        answer()

    def _retire(self) -> None:  # on the loop
        if self._idle:
            self._idle -= 1
            self._jobs.put(None)

    def _work(self) -> None:
        global _running
        # What anyio's worker threads have: a function may call anyio.from_thread.run() without a token.
        _anyio_thread.current_token = self._token
        while True:
            try:
                job = self._jobs.get(timeout=_IDLE_THREAD_S)
            except queue.Empty:
                try:
                    self.loop.call_soon_threadsafe(self._retire)
                except RuntimeError:  # the loop is closed: nobody will ask for this thread again
                    return
                continue
            if job is None:
                return
            with _running_lock:
                _running += 1
            try:
                answer = job()
            finally:
                with _running_lock:
                    _running -= 1
            del job
            try:
                self.loop.call_soon_threadsafe(self._finished, answer)
            except RuntimeError:  # the loop is closed: nobody waits for the answer
                return


class LoopCalls:
    """The calls a plain ``def``'s :class:`SyncContext` makes to the loop, ended with its attempt.

    Each runs as a task on the loop, in the worker thread's context (so a provider call joins the
    attempt's span). :meth:`close` cancels those still running and refuses later ones, so a function
    abandoned at its timeout cannot keep calling the provider.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` on the loop; blocks the calling (worker) thread until it is done."""

        async def run() -> T:
            if self._closed:
                raise asyncio.CancelledError("the attempt has ended")
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                return await fn(*args, **kwargs)
            finally:
                self._tasks.discard(task)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def close(self) -> None:
        """The attempt ended (on the loop): cancel the calls in flight, refuse the next ones."""
        self._closed = True
        for task in self._tasks:
            task.cancel()


class ThreadSlots:
    """Worker threads for plain ``def`` functions: at most ``size`` alive at once, hung ones included.

    A thread that outlives its attempt's timeout is abandoned, not waited for,
    but it keeps its slot until it returns: hung functions can fill the pool
    (new sync attempts then time out waiting for a slot) but never grow it.
    ``orchestrator serve`` exits after its drain even if some are still hung.
    A call is one hand-off each way: a job on a queue to a waiting thread, the
    result back with ``call_soon_threadsafe``, in the caller's context.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots = anyio.CapacityLimiter(size)
        self._workers: _Workers | None = None

    @property
    def busy(self) -> int:
        """Slots held, by running and by abandoned threads."""
        return int(self._slots.borrowed_tokens)

    async def run(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """``fn(arg)`` in a worker thread; cancelling the wait abandons the thread, whose slot stays held."""
        borrower = object()
        try:  # a free slot is taken without a pass through the event loop
            self._slots.acquire_on_behalf_of_nowait(borrower)
        except anyio.WouldBlock:
            await self._slots.acquire_on_behalf_of(borrower)
        loop = asyncio.get_running_loop()
        workers = self._workers
        if workers is None or workers.loop is not loop:
            workers = self._workers = _Workers(loop, anyio.lowlevel.current_token())
        future: asyncio.Future[Any] = loop.create_future()
        context = contextvars.copy_context()
        lock = threading.Lock()
        state = ["pending"]  # pending -> running -> done, or pending -> dropped (cancelled before it began)

        def release() -> None:  # on the loop
            self._slots.release_on_behalf_of(borrower)

        def job() -> Callable[[], None]:  # in a worker thread; what it returns is called on the loop
            with lock:
                if state[0] == "dropped":
                    return _nothing
                state[0] = "running"
            result: Any = None
            error: BaseException | None = None
            try:
                result = context.run(fn, arg)
            except BaseException as exc:  # whatever the function raised is the attempt's to judge
                error = exc
            with lock:
                state[0] = "done"

            def answer() -> None:
                release()
                if future.done():  # the attempt was cancelled: nobody waits for this
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            return answer

        workers.submit(job)
        try:
            return await future
        except BaseException:
            with lock:
                never_began = state[0] == "pending"
                if never_began:
                    state[0] = "dropped"
            if never_began:
                release()
            raise


def _nothing() -> None:
    """The answer of a job dropped before it began (its slot was released then)."""


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (ours), rather than a function raising one itself."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return True
    return task is None or task.cancelling() > 0


@dataclass(frozen=True, slots=True)
class Raised:
    """What a function raised, as its record names it: the type, the message, and whether it is retried."""

    type: str
    message: str
    retryable: bool = True
    rejected: bool = False
    traceback: str = ""
    """The function's own frames down to where it raised (see :func:`own_traceback`); none for a rejection."""

    @classmethod
    def of(cls, exc: BaseException, handler: Callable[..., Any] | None = None) -> Raised:
        """``exc`` as its record names it; the message and traceback are bounded here, and redacted then cut
        to their final size where the record is made (so that no credential is kept halved)."""
        retryable, rejected = _classify(exc)
        name = type(exc).__name__
        trace = "" if rejected else own_traceback(exc, handler)
        return cls(name, cut(str(exc) or name, _MAX_RAW), retryable, rejected, trace)


@dataclass(frozen=True, slots=True)
class Ended:
    """How the function itself ended: what it raised, or the type of what it returned."""

    returned: str | None = None
    """The type of a value other than ``None`` that it returned (ignored, with a warning)."""
    awaitable: bool = False
    """What it returned was an awaitable it never awaited (an ``async def`` that forgot an ``await``, or a plain
    ``def`` that returned a coroutine)."""
    raised: Raised | None = None

    @classmethod
    def returning(cls, value: Any) -> Ended:
        """A function that returned ``value`` (a coroutine it returned is closed, never run, and named)."""
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
                return cls(f"coroutine {value.__qualname__}()", awaitable=True)
            return cls(type(value).__name__, awaitable=True)
        return cls(None if value is None else type(value).__name__)


def never_awaited(function: Installed, returned: str) -> str:
    """The error of an attempt whose function returned an awaitable (``returned``) instead of awaiting it."""
    if function.function.is_async:
        return (
            f"the async def returned a {returned} instead of awaiting it, so it never ran:"
            " write `await ...` (or `return await ...`)"
        )
    return f"the plain def returned a {returned}, which nothing awaits, so it never ran: make it `async def`"


Invoke = Callable[[Installed, Context], Awaitable[Ended]]
"""Calls a function with its context and reports how it ended: :func:`invoke` here, or a worker process pool's."""


async def invoke(function: Installed, ctx: Context, threads: ThreadSlots | None = None) -> Ended:
    """Call the handler here and catch whatever it raises, except a cancellation of the attempt itself.

    Coroutine functions run on the event loop, plain ones in ``threads`` (or anyio's default threads).
    """
    handler = function.function.handler
    try:
        if function.function.is_async:
            return Ended.returning(await handler(ctx))
        if threads is None:
            sync = SyncContext(ctx, anyio.lowlevel.current_token())
            return Ended.returning(await anyio.to_thread.run_sync(handler, sync, abandon_on_cancel=True))
        calls = LoopCalls(asyncio.get_running_loop())
        try:
            return Ended.returning(await threads.run(handler, SyncContext(ctx, calls=calls)))
        finally:
            calls.close()
    except anyio.get_cancelled_exc_class() as exc:
        if _being_cancelled():
            raise  # the attempt's deadline, or the daemon stopping: not the function's doing
        # the function raised a cancellation of its own: a failure like any other
        return Ended(raised=Raised.of(exc, handler))
    except BaseException as exc:  # any exception of a plugin's, BaseException included, is its outcome
        return Ended(raised=Raised.of(exc, handler))


async def run_attempt(
    function: Installed,
    make_context: Callable[[AttemptLog], Context],
    *,
    attempt: int,
    time_limit: float,
    threads: ThreadSlots | None = None,
    invoke_with: Invoke | None = None,
    scrub: Scrub = cut,
) -> AttemptResult:
    """Run ``function`` once within ``time_limit`` seconds; never raises (except the attempt's own cancellation).

    Whatever the function does ends in a result: an exception of any kind
    (``BaseException`` and a cancellation it raised itself included) is a
    failure; running past ``time_limit`` is a timeout, also when it blocked
    the event loop so long that the deadline could not interrupt it. The
    function is called by ``invoke_with`` (a worker process pool's), by
    default by :func:`invoke` in this process with ``threads``. Its error
    message, traceback and log lines are kept through ``scrub``.
    """
    log = AttemptLog(scrub)
    started = time.monotonic()

    def result(raised: Raised | None = None) -> AttemptResult:
        duration_ms = int((time.monotonic() - started) * 1000)
        if raised is None:
            return AttemptResult(function, attempt, True, duration_ms, logs=log.export())
        return AttemptResult(
            function,
            attempt,
            False,
            duration_ms,
            error_type=raised.type,
            error=scrub(raised.message, MAX_ERROR),
            retryable=raised.retryable,
            rejected=raised.rejected,
            logs=log.export(),
            traceback=scrub(raised.traceback, MAX_TRACEBACK) if raised.traceback else "",
        )

    try:
        ctx = make_context(log)
    except Exception as exc:  # our own context could not be built (a configuration error): the attempt fails
        return result(Raised.of(exc))
    with anyio.move_on_after(time_limit) as scope:
        if invoke_with is None:
            ended = await invoke(function, ctx, threads)
        else:
            ended = await invoke_with(function, ctx)
    elapsed = time.monotonic() - started
    if scope.cancelled_caught:
        return result(Raised(TIMEOUT, f"timed out after {time_limit:g}s"))
    if elapsed > time_limit:
        # It held the event loop (a blocking call in an async function), so the deadline could not interrupt it.
        return result(Raised(TIMEOUT, f"timed out after {time_limit:g}s: it ran {elapsed:.1f}s without yielding"))
    if ended.raised is not None:
        return result(ended.raised)
    if ended.awaitable:
        return result(Raised("TypeError", never_awaited(function, ended.returned or "awaitable"), retryable=False))
    if ended.returned is not None:
        log.add(f"warning: the function returned {ended.returned}, which is ignored")
    return result()
