"""Shared setup of the engine's unit tests: the service, delivery and worker over the memory store.

    async with running(function("check", "validate-connection", check)) as h:
        result = await h.emit("validate-connection")
        assert await h.types() == ["validate-connection", "function-succeeded", "connection-validated"]

Everything runs in-process on a :class:`~tests.support.clock.FakeClock`: the
provider is an :class:`httpx.MockTransport`, the retry jitter is seeded
(``random.Random(0)``), and the worker, when asked for, runs in the test's own
task group. Each test is bounded by :data:`GUARD` seconds of real time so that
a hang fails fast instead of at the 120 s timeout; nothing ever waits on real
time otherwise.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx

from orchestrator import records
from orchestrator.config import DispatchConfig, Integration
from orchestrator.functions import on_event
from orchestrator.model import ConnectionRef, EmitRequest, EmitResult, Job, LifecycleEvent, NewJob, SealedCredentials
from orchestrator.plugins import Installed, Registry
from orchestrator.records import NewEvent, Record
from orchestrator.retry import RetryPolicy
from orchestrator.service import Engine, Service, assemble
from orchestrator.store import Appended
from orchestrator.store.memory import MemoryEventStore
from orchestrator.worker import Worker
from tests.support.clock import FakeClock

INTEGRATION = "acme"
ACME = ConnectionRef("dev", INTEGRATION, "acme-1")
GLOBEX = ConnectionRef("dev", INTEGRATION, "globex-1")
VALIDATE = LifecycleEvent.VALIDATE_CONNECTION
CREATE = LifecycleEvent.POST_CONNECTION_CREATION
DELETE = LifecycleEvent.PRE_CONNECTION_DELETION
GUARD = 10.0
"""Seconds of real time after which a test is taken to hang (it normally takes milliseconds)."""
SEED = 0
"""The seed of the engine's retry jitter: ``delay(n)`` is then :func:`jitter` 's answer."""


def function(
    name: str,
    event: LifecycleEvent | str,
    handler: Callable[..., Any],
    *,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
) -> Installed:
    """``handler`` installed as event function ``name`` of integration acme."""
    decorated = on_event(event, integration=INTEGRATION, retry=retry, timeout=timeout)(handler)
    return Installed(name, decorated, "acme-plugin", "1.2.3", f"acme_plugin:{name.replace('-', '_')}")


def jitter(*ceilings: float) -> list[float]:
    """The delays a seeded engine draws for retries whose ceilings are ``ceilings``, in turn."""
    rng = random.Random(SEED)
    return [rng.uniform(0.0, ceiling) for ceiling in ceilings]


def no_provider(request: httpx.Request) -> httpx.Response:
    """The default provider: every call is a test bug."""
    return httpx.Response(599, text=f"no provider in this test: {request.method} {request.url}")


@dataclass(frozen=True)
class Append:
    """One call of :meth:`SpyStore.append` that committed."""

    types: list[str]
    jobs: int
    cancelled: int


class SpyStore(MemoryEventStore):
    """The memory store, keeping each committed :meth:`append` (to tell one atomic append from several)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.appends: list[Append] = []

    async def append(
        self,
        ref: ConnectionRef,
        expected_version: int | None,
        events: Sequence[NewEvent],
        *,
        jobs: Sequence[NewJob] = (),
        cancel_jobs: Sequence[Job] = (),
        seal: SealedCredentials | None = None,
    ) -> Appended:
        """See :meth:`MemoryEventStore.append`; a committed append is noted in :attr:`appends`."""
        appended = await super().append(ref, expected_version, events, jobs=jobs, cancel_jobs=cancel_jobs, seal=seal)
        self.appends.append(Append([e.type for e in events], len(jobs), len(cancel_jobs)))
        return appended


@dataclass
class Harness:
    """An engine over a :class:`SpyStore` on a :class:`FakeClock`, and what the provider was asked."""

    clock: FakeClock
    store: SpyStore
    engine: Engine
    requests: list[httpx.Request] = field(default_factory=list)

    @property
    def service(self) -> Service:
        """The service under test."""
        return self.engine.service

    @property
    def worker(self) -> Worker:
        """The engine's job worker (running only when :func:`running` was asked for it)."""
        return self.engine.worker

    async def emit(self, event: LifecycleEvent | str, ref: ConnectionRef = ACME, **fields: Any) -> EmitResult:
        """Emit ``event`` on ``ref`` through the service (``fields`` as in :class:`EmitRequest`)."""
        return await self.service.emit(EmitRequest(ref, LifecycleEvent(event), **fields))

    async def log(self, ref: ConnectionRef | None = None) -> list[Record]:
        """The whole log (of one connection, or all)."""
        return await self.store.read(ref=ref, limit=100_000)

    async def types(self, ref: ConnectionRef | None = None) -> list[str]:
        """The record types of the log, in order."""
        return [r.type for r in await self.log(ref)]

    async def bodies(self, ref: ConnectionRef | None = None) -> list[records.Body | None]:
        """Every record's body, parsed as :func:`records.parse` reads it."""
        return [records.parse(r.type, r.data) for r in await self.log(ref)]

    async def head(self) -> int:
        """The position of the last record."""
        return await self.store.head()

    async def records_up_to(self, position: int) -> list[Record]:
        """Wait (on the store's commit event) until the log reaches ``position``; then the whole log."""
        await self.store.wait_for(position)
        return await self.log()

    async def until_due(self, when: datetime, *, past: float = 0.01) -> None:
        """Wait until somebody is parked on the clock to wake by ``when`` (+1 s), then move time ``past`` it."""
        await self.clock.wait_for_sleepers(1, until=when + timedelta(seconds=1))
        self.clock.advance_to(max(when + timedelta(seconds=past), self.clock.now()))


async def settle() -> None:
    """Return once every other task on the loop is blocked, so that a test can assert that nothing happened.

    Like :func:`anyio.wait_all_tasks_blocked` (and by the same asyncio internals), but it
    yields with zero-length checkpoints where that one sleeps 0.1 s of real time between looks.
    """
    this = asyncio.current_task()
    for _ in range(10_000):
        await anyio.lowlevel.checkpoint()
        waiters = [getattr(t, "_fut_waiter", None) for t in asyncio.all_tasks() if t is not this]
        if all(w is not None and not w.done() for w in waiters):
            return
    raise AssertionError("the event loop never went quiet: some task keeps running")


class Gate:
    """Lets a test hold a function inside its attempt: ``await gate.enter()`` parks it until :meth:`open`."""

    def __init__(self) -> None:
        self.entered = 0
        self.left = 0
        self._opened = anyio.Event()
        self._arrivals = anyio.Event()

    async def enter(self) -> None:
        """Called by the function: note the arrival, then wait for the gate to open."""
        self.entered += 1
        arrivals, self._arrivals = self._arrivals, anyio.Event()
        arrivals.set()
        try:
            await self._opened.wait()
        finally:
            self.left += 1

    async def arrivals(self, count: int = 1) -> None:
        """Return once ``count`` callers have entered (on an event)."""
        while self.entered < count:
            await self._arrivals.wait()

    def open(self) -> None:
        """Let every caller through, now and later."""
        self._opened.set()


@asynccontextmanager
async def running(
    *functions: Installed,
    worker: bool = False,
    config: DispatchConfig | None = None,
    provider: Callable[[httpx.Request], httpx.Response] = no_provider,
    integrations: Mapping[str, Integration] | None = None,
    store: SpyStore | None = None,
    clock: FakeClock | None = None,
) -> AsyncIterator[Harness]:
    """An engine with ``functions`` installed; with ``worker``, its worker runs until the block ends."""
    clock = clock or FakeClock()
    store = store if store is not None else SpyStore(clock)
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return provider(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        engine = assemble(
            store,
            Registry.of(functions),
            clock,
            http=http,
            integrations=integrations,
            config=config,
            rng=random.Random(SEED),
        )
        harness = Harness(clock, store, engine, requests)
        with anyio.fail_after(GUARD):
            try:
                async with anyio.create_task_group() as tg:
                    if worker:
                        tg.start_soon(engine.worker.run)
                    yield harness
                    tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # the test's own failure, not the task group's
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise


class Call:
    """An awaitable started in a task group, to be collected later: :meth:`result` waits for it (on an event)."""

    def __init__(self, tg: anyio.abc.TaskGroup, call: Callable[[], Awaitable[Any]]) -> None:
        self.done = anyio.Event()
        self._value: Any = None
        self._error: Exception | None = None
        tg.start_soon(self._run, call)

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            self._value = await call()
        except Exception as exc:  # handed to whoever collects the result
            self._error = exc
        finally:
            self.done.set()

    async def result(self) -> Any:
        """The call's result once it has returned; its exception re-raised if it raised."""
        await self.done.wait()
        if self._error is not None:
            raise self._error
        return self._value
