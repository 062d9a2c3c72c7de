"""The daemon's side of process isolation: a supervised pool of worker processes that run attempts.

:class:`ProcessPool` keeps ``size`` worker processes (``python -m
orchestrator.isolation.child``), each in a seat of its own, and lends an idle
one to each attempt (:meth:`ProcessPool.invoke`, the runner's ``invoke_with``).
The attempt is sent as one message; while the function runs, the daemon
serves the calls its context forwards (provider calls, metadata writes, log
lines, reads of ``ctx.credentials``) with the attempt's own context, so the
proxy and the sink stay in the daemon, and credentials enter a worker only
when its function reads ``ctx.credentials``; the function's end comes back as the runner's
:class:`~orchestrator.runner.Ended`, and the runner makes the result as it
does for an attempt run in the daemon.

Supervision, by each seat:

- an attempt stopped (its timeout, the daemon's drain) kills its process:
  SIGTERM to its process group, SIGKILL after :data:`KILL_GRACE`; the seat
  reaps it and starts another;
- a process that dies during an attempt fails it, retryably (``WorkerDied``:
  the exit code or the signal); one that sends what it should not
  (:class:`~orchestrator.isolation._wire.Garbage`) fails it (``WorkerError``);
  either is replaced;
- a process that cannot start (a plugin that kills the interpreter at import)
  or dies idle before serving is started again after a pause that doubles
  from :data:`FIRST_BACKOFF` to :data:`MAX_BACKOFF`: never a hot loop; while
  every seat is in that state, attempts fail at once (``WorkerUnavailable``,
  retryable) and the daemon serves on;
- when the pool is cancelled (the daemon's drain is over), every process is
  stopped the same way and reaped. A worker also exits by itself when its
  pipe from the daemon closes, and on Linux when the daemon dies
  (``PR_SET_PDEATHSIG``), so a SIGKILLed daemon leaves none behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.buffered import BufferedByteReceiveStream
from opentelemetry import metrics

from orchestrator.clock import Clock, SystemClock
from orchestrator.context import Backends, Context, backends
from orchestrator.errors import ResourceExhausted
from orchestrator.isolation import _wire
from orchestrator.isolation._wire import Garbage
from orchestrator.model import JSONObject
from orchestrator.plugins import Installed
from orchestrator.runner import Ended, Raised

log = logging.getLogger(__name__)
meter = metrics.get_meter(__name__)
RESTARTS = meter.create_counter(
    "orchestrator.worker_processes.replaced", description="Worker processes stopped and replaced, by reason"
)

WORKER_DIED = "WorkerDied"
"""The ``error_type`` of an attempt whose worker process died under it."""
WORKER_ERROR = "WorkerError"
"""The ``error_type`` of an attempt whose worker process sent what it should not."""
WORKER_UNAVAILABLE = "WorkerUnavailable"
"""The ``error_type`` of an attempt that found no worker process able to start."""
START_TIMEOUT = 60.0
"""Seconds a worker process may take to import the plugins and say it is ready."""
KILL_GRACE = 0.5
"""Seconds between SIGTERM and SIGKILL when a worker process is stopped."""
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
"""The pause before a seat starts a process again after one could not start, doubling up to this."""
MAX_CALLS = 256
"""Calls one attempt may have the daemon serve at once (more is taken for a worker process gone wrong)."""
_GONE = (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError)
"""What reading from or writing to a worker process raises once it is gone (or going)."""


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: the daemon's, without its settings (``ORCHESTRATOR_*``) or ``OTEL_*`` (exporter keys)."""
    return {k: v for k, v in environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}


def describe(returncode: int) -> str:
    """An exit status in words: ``exit code 1``, ``signal 9 (SIGKILL)``."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {-returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"signal {-returncode}"


class _Broken(Exception):
    """The attempt's worker process died or misbehaved: the attempt fails with ``kind`` (its type) and ``message``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _StartFailed(Exception):
    """A worker process did not become ready; why."""


Perform = Callable[[], Awaitable[Any]]


def _operation(op: str, args: JSONObject, ctx: Context, parts: Backends) -> Perform:
    """The daemon's side of one forwarded context operation, its arguments checked (:class:`Garbage`)."""
    if op == _wire.REQUEST:
        request = _wire.request_args(args)

        async def send() -> Any:
            return _wire.response(await parts.provider.request(**request))

        return send
    if op == _wire.WRITE:
        metadata, merge = _wire.write_args(args)

        async def write() -> Any:
            # Through the daemon's context: validated by the function's model and bounded again here.
            await (ctx.update_metadata if merge else ctx.set_metadata)(metadata)
            return {"current": parts.sink.current()}

        return write
    if op == _wire.CREDENTIALS:

        async def read() -> Any:
            # The function reads ctx.credentials: as in the daemon, the attempt's as they are now (after a 401's
            # refresh too), or the CredentialsUnavailable that reading them raises.
            return dict(parts.provider.credentials)

        return read
    raise Garbage(f"a call of operation {op[:40]!r}")


class _Child:
    """One worker process: its pipes, and whether its seat is to stop it."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._rx = BufferedByteReceiveStream(process.stdout)
        self._tx = process.stdin
        self._sending = anyio.Lock()
        self.done = anyio.Event()
        """Set when its seat is to stop it: retired by an attempt, or exited."""
        self.busy = False
        self.attempts = 0
        self.exited = False
        """It exited by itself (rather than being stopped)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def retire(self, reason: str) -> None:
        """Have the seat stop this process (at once: the caller does not wait) and start another."""
        if not self.done.is_set():
            RESTARTS.add(1, {"reason": reason})
            self.done.set()

    async def send(self, message: JSONObject) -> None:
        data = _wire.frame(message)
        async with self._sending:
            await self._tx.send(data)

    async def receive(self) -> JSONObject:
        size = _wire.size(await self._rx.receive_exactly(_wire.HEADER.size))
        return _wire.parse(await self._rx.receive_exactly(size))

    async def run(self, function: Installed, ctx: Context) -> Ended:
        """Run one attempt; :class:`_Broken` when the process dies or misbehaves meanwhile."""
        self.attempts += 1
        parts = backends(ctx)
        outcome: Ended | _Broken
        async with anyio.create_task_group() as tg:
            try:
                message = _wire.attempt(self.attempts, function, ctx, parts.sink.current())
                await self.send(message)
                outcome = await self._converse(ctx, parts, tg)
            except Garbage as exc:
                outcome = _Broken(WORKER_ERROR, f"the function's worker process sent {exc}; it was replaced")
            except _GONE:
                outcome = _Broken(WORKER_DIED, await self._death())
            tg.cancel_scope.cancel()  # calls still being served: the function no longer waits for them
        if isinstance(outcome, _Broken):
            raise outcome
        return outcome

    async def _converse(self, ctx: Context, parts: Backends, tg: anyio.abc.TaskGroup) -> Ended:
        calls: dict[int, anyio.CancelScope] = {}
        while True:
            message = await self.receive()
            await anyio.lowlevel.checkpoint()  # a worker that floods the pipe must not hold this loop
            if _wire.field(message, "n", int) != self.attempts:
                continue  # sent for an earlier attempt (by a thread its function left behind): dropped
            kind = message["t"]
            if kind == "log":
                parts.log.add(_wire.field(message, "line", str))
            elif kind == "call":
                number: int = _wire.field(message, "id", int)
                perform = _operation(_wire.field(message, "op", str), _wire.field(message, "args", dict), ctx, parts)
                if number in calls or len(calls) >= MAX_CALLS:
                    raise Garbage(f"call {number} while {len(calls)} are being served")
                calls[number] = scope = anyio.CancelScope()
                tg.start_soon(self._serve, number, perform, scope, calls)
            elif kind == "cancel":
                stopped = calls.pop(_wire.field(message, "id", int), None)
                if stopped is not None:
                    stopped.cancel()
            elif kind == "ended":
                ended, dropped = _wire.ended_from(message)
                parts.log.dropped += dropped
                return ended
            else:
                raise Garbage(f"a message of type {kind[:40]!r} during an attempt")

    async def _serve(
        self, number: int, perform: Perform, scope: anyio.CancelScope, calls: dict[int, anyio.CancelScope]
    ) -> None:
        """Serve one call and send the reply (the error the function is to see, if it failed)."""
        with scope:
            reply: JSONObject
            try:
                reply = {"t": "reply", "id": number, "value": await perform()}
            except Exception as exc:  # the call failed: the function sees it raised, as it would in the daemon
                reply = {"t": "reply", "id": number, "error": _wire.error(exc)}
            calls.pop(number, None)
            with contextlib.suppress(*_GONE):  # a process gone meanwhile: the attempt's reader notices
                try:
                    await self.send(reply)
                except ResourceExhausted as exc:  # an answer too large to send
                    await self.send({"t": "reply", "id": number, "error": _wire.error(exc)})

    async def _death(self) -> str:
        """What the attempt's record says of a process that closed its pipes: how it died."""
        with anyio.move_on_after(KILL_GRACE):
            await self.process.wait()
        code = self.process.returncode
        if code is None:
            return "the function's worker process closed its pipe; it was killed and replaced"
        return f"the function's worker process died: {describe(code)}"

    def _signal(self, signum: signal.Signals) -> None:
        """``signum`` to the process's group (what a plugin started goes too), while it has not been reaped."""
        if self.process.returncode is not None:
            return
        # os.kill, not Process.send_signal: that polls, which would reap the process under the event loop's watcher.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signum)  # in case it left the group

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after :data:`KILL_GRACE`, reap, close the pipes."""
        self._signal(signal.SIGTERM)
        with anyio.move_on_after(KILL_GRACE):
            await self.process.wait()
        self._signal(signal.SIGKILL)
        await self.process.wait()
        await self.process.aclose()


class ProcessPool:
    """``size`` supervised worker processes that run attempts one at a time each (see the module's docstring).

    :meth:`run` (in the daemon's task group) keeps them; :meth:`invoke` lends one to an attempt.
    ``command`` and ``environment`` are the worker's (the tests start stand-ins); the pauses
    between failed starts are taken on ``clock``.
    """

    def __init__(
        self,
        size: int,
        *,
        command: Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        self.size = size
        self._clock = clock or SystemClock()
        self._command = list(command or [sys.executable, "-m", "orchestrator.isolation.child", str(os.getpid())])
        self._environment = dict(environment if environment is not None else child_environment(os.environ))
        self._start_timeout = start_timeout
        self._idle: deque[_Child] = deque()
        self._changed = anyio.Event()
        self._failing: dict[int, str] = {}
        """Seats whose last start failed, and why."""
        self._children: dict[int, _Child] = {}
        self._reported: set[str] = set()
        self.starts = 0
        """Processes started so far (tests and the bench read it)."""

    @property
    def pids(self) -> list[int]:
        """The process ids of the worker processes running now."""
        return [child.pid for child in self._children.values()]

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool's processes until cancelled; then stop them all.

        Started (``tg.start``) once every seat has tried its first process: it is ready, or it failed.
        """
        async with anyio.create_task_group() as tg:
            tried = [anyio.Event() for _ in range(self.size)]
            for seat in range(self.size):
                tg.start_soon(self._seat, seat, tried[seat])
            for first in tried:
                await first.wait()
            task_status.started()

    async def _seat(self, seat: int, tried: anyio.Event) -> None:
        failures = 0
        while True:
            if failures:
                await self._clock.sleep(min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF))
            try:
                child = await self._start()
            except _StartFailed as exc:
                tried.set()
                failures += 1
                pause = min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
                log.warning("a worker process could not start: %s; starting another in %.1f s", exc, pause)
                self._failing[seat] = str(exc)
                self._notify()
                continue
            tried.set()
            self._failing.pop(seat, None)
            self._children[seat] = child
            try:
                self._lend(child)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch, child)
                    await child.done.wait()
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await child.stop()
                del self._children[seat]
            # One that exited by itself before it served an attempt counts as a failed start.
            failures = failures + 1 if child.exited and not child.attempts else 0

    async def _watch(self, child: _Child) -> None:
        code = await child.process.wait()
        if child.done.is_set():
            return  # stopped by us
        child.exited = True
        if not child.busy:
            log.warning("worker process %d exited while idle (%s); starting another", child.pid, describe(code))
        child.retire("exited")

    async def _start(self) -> _Child:
        """A new worker process, once it is ready; :class:`_StartFailed` when it does not get there."""
        try:
            process = await anyio.open_process(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                env=self._environment,
                start_new_session=True,  # its own process group: stopping it stops what a plugin started
            )
        except OSError as exc:
            raise _StartFailed(f"{self._command[0]}: {exc.strerror or exc}") from None
        self.starts += 1
        child = _Child(process)
        try:
            with anyio.fail_after(self._start_timeout):
                ready = await child.receive()
            if ready["t"] != "ready":
                raise Garbage(f"a {ready['t'][:40]!r} message before 'ready'")
            broken: list[Any] = _wire.field(ready, "broken", list)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await child.stop()
            if isinstance(exc, TimeoutError):
                raise _StartFailed(f"not ready within {self._start_timeout:g} s") from None
            if isinstance(exc, Garbage):
                raise _StartFailed(f"it sent {exc}") from None
            if isinstance(exc, _GONE):
                assert process.returncode is not None  # stopped and reaped just above
                raise _StartFailed(f"it exited at start ({describe(process.returncode)})") from None
            raise
        for problem in broken:
            if isinstance(problem, str) and problem not in self._reported and len(self._reported) < 100:
                self._reported.add(problem)
                log.warning("a worker process could not load a plugin: %s", problem[:1000])
        return child

    def _lend(self, child: _Child) -> None:
        """Make ``child`` available to the next attempt."""
        child.busy = False
        if not child.done.is_set():
            self._idle.append(child)
            self._notify()

    async def _take(self) -> _Child:
        """An idle, live worker process; waits for one, but fails at once while no seat can start one."""
        while True:
            while self._idle:
                child = self._idle.popleft()
                if not child.done.is_set():
                    child.busy = True
                    return child
            if len(self._failing) >= self.size:
                reasons = sorted(set(self._failing.values()))
                raise _StartFailed("no worker process could be started (" + "; ".join(reasons)[:1000] + ")")
            await self._changed.wait()

    async def invoke(self, function: Installed, ctx: Context) -> Ended:
        """Run ``function`` with ``ctx`` in a worker process (the runner's ``invoke_with``)."""
        try:
            child = await self._take()
        except _StartFailed as exc:
            return Ended(raised=Raised(WORKER_UNAVAILABLE, str(exc)))
        try:
            ended = await child.run(function, ctx)
        except _Broken as exc:
            child.retire("died" if exc.kind == WORKER_DIED else "invalid message")
            return Ended(raised=Raised(exc.kind, exc.message))
        except BaseException:  # the attempt was stopped (its timeout, the daemon's drain): the process goes
            child.retire("stopped")
            raise
        self._lend(child)
        return ended
