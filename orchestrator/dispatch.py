"""Running event functions: one traced attempt, or a set of functions under one deadline.

:class:`Dispatcher` owns every function attempt, whoever asks for it: the
synchronous delivery contracts (validate-connection, pre-connection-deletion)
through :meth:`Dispatcher.run_sync`, the job worker (:mod:`orchestrator.worker`)
and ``orchestrator dryrun`` through :meth:`Dispatcher.attempt`. An attempt
gets its context (the provider proxy with the connection's credentials, as
the caller opened them into a :class:`~orchestrator.provider.Secrets`; the
metadata sink), runs within the daemon's function concurrency (in the daemon,
or in a worker process of a :class:`~orchestrator.isolation.ProcessPool`), is traced as
``function NAME`` and counted, and its error and log lines are redacted of
every credential it had. Nothing here writes to the log: callers turn
results into records.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import anyio
import httpx
from opentelemetry import metrics, trace

from orchestrator import tracing
from orchestrator.clock import Clock
from orchestrator.config import DispatchConfig, Integration
from orchestrator.context import (
    AttemptLog,
    Buffered,
    ConnectionInfo,
    Context,
    EventInfo,
    IntegrationInfo,
    MetadataSink,
    Scrub,
    backends,
    cut,
)
from orchestrator.isolation import ProcessPool
from orchestrator.model import JSONObject, LifecycleEvent
from orchestrator.plugins import Installed
from orchestrator.provider import Provider, Secrets, redact_excerpt
from orchestrator.records import MetadataUpdated
from orchestrator.retry import RetryPolicy
from orchestrator.runner import MAX_ERROR, TIMEOUT, AttemptResult, ThreadSlots, run_attempt
from orchestrator.watchdog import LoopWatchdog

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
meter = metrics.get_meter(__name__)
ATTEMPTS = meter.create_counter("orchestrator.function.attempts", description="Function attempts by outcome")
ATTEMPT_MS = meter.create_histogram("orchestrator.function.duration", unit="ms", description="Function attempt time")


def _outcome(result: AttemptResult) -> str:
    return "succeeded" if result.ok else ("rejected" if result.rejected else "failed")


@functools.cache
def _attempt_labels(function: str, outcome: str) -> Mapping[str, str]:
    """The attributes of one attempt's metrics, made once per (function, outcome): installed functions only."""
    return MappingProxyType({"function": function, "outcome": outcome})


def _log_attempt(function: Installed, info: ConnectionInfo, event: EventInfo, result: AttemptResult) -> None:
    """A failure is a WARNING line; a success, or a validation's rejection (the emit's INFO line says it), DEBUG."""
    verdict = result.rejected and event.type is LifecycleEvent.VALIDATE_CONNECTION
    level = logging.DEBUG if result.ok or verdict else logging.WARNING
    if not log.isEnabledFor(level):
        return
    outcome = _outcome(result)
    log.log(
        level,
        "function %s attempt %d on %s: %s%s",
        function.name,
        event.attempt,
        info.ref,
        outcome,
        f" ({result.error_type}: {result.error})" if not result.ok else "",
        extra={
            "function": function.name,
            "attempt": event.attempt,
            "connection": info.ref.stream,
            "event": event.type.value,
            "outcome": outcome,
            "duration_ms": result.duration_ms,
            "error": result.error,
        },
    )


@dataclass(slots=True)
class SyncRun:
    """What a synchronous run produced, for the caller's atomic append."""

    results: list[AttemptResult] = field(default_factory=list)
    cancelled: list[Installed] = field(default_factory=list)
    """Functions stopped before finishing because another failed (validation)."""
    metadata_updates: list[MetadataUpdated] = field(default_factory=list)

    @property
    def failures(self) -> list[AttemptResult]:
        """The attempts that failed, in order of completion."""
        return [r for r in self.results if not r.ok]


def _misconfigured(result: AttemptResult, ctx: Context | None, scrub: Callable[[str, int], str]) -> AttemptResult:
    """``result``, marked misconfigured (and not retried) when it failed after the daemon's proxy refused a call.

    The proxy is the daemon's own (with ``--isolation process`` too: a worker's calls are made by it), so the
    mark comes from what the daemon saw, never from the name of what the function raised.
    """
    provider = backends(ctx).provider if ctx is not None else None
    reason = provider.misconfiguration if isinstance(provider, Provider) else ""
    if result.ok or not reason:
        return result
    return dataclasses.replace(result, misconfigured=scrub(reason, MAX_ERROR), retryable=False)


class Dispatcher:
    """Runs function attempts: traced, bounded by the daemon's concurrency, redacted."""

    def __init__(
        self,
        clock: Clock,
        *,
        http: httpx.AsyncClient,
        integrations: Mapping[str, Integration] | None = None,
        config: DispatchConfig | None = None,
        watchdog: LoopWatchdog | None = None,
        pool: ProcessPool | None = None,
    ) -> None:
        self.clock = clock
        self._watchdog = watchdog
        self.config = config or DispatchConfig()
        self._http = http
        self._integrations = dict(integrations or {})
        self._pool = pool
        # With a pool each attempt holds one of its processes: no more run at once than it has.
        self._limiter = anyio.CapacityLimiter(pool.size if pool is not None else self.config.concurrency)
        self.threads = ThreadSlots(self.config.concurrency)

    @property
    def free(self) -> int:
        """Attempts that could start now without waiting for a slot."""
        return int(self._limiter.available_tokens)

    def integration(self, name: str, environment: str = "") -> Integration:
        """The settings of integration ``name`` (no base URL when not configured), as ``environment`` has them."""
        return (self._integrations.get(name) or Integration(name)).for_environment(environment)

    def timeout(self, function: Installed) -> float:
        """The time one attempt of ``function`` may take (its own, or the daemon's default)."""
        return function.function.timeout or self.config.attempt_timeout

    def policy(self, function: Installed) -> RetryPolicy:
        """How ``function`` is retried (its own policy, or the daemon's default)."""
        return function.function.retry or self.config.retry

    def _context(
        self,
        function: Installed,
        info: ConnectionInfo,
        event: EventInfo,
        sink: MetadataSink,
        log: AttemptLog,
        secrets: Secrets,
        calls: list[str] | None = None,
    ) -> Context:
        integration = self.integration(info.ref.integration, info.ref.environment)
        provider = Provider(
            self._http,
            integration,
            info.config,
            secrets,
            calls=calls,
            clock=self.clock,
            connection=str(info.ref),
        )
        return Context(
            connection=info,
            event=event,
            provider=provider,
            metadata_model=function.function.metadata,
            sink=sink,
            log=log,
            integration=IntegrationInfo.of(integration),
            env=self.config.variables.get(info.ref.environment, {}),
        )

    async def attempt(
        self,
        function: Installed,
        info: ConnectionInfo,
        event: EventInfo,
        sink: MetadataSink,
        *,
        time_limit: float | None = None,
        calls: list[str] | None = None,
        traceparent: str | None = None,
        secrets: Secrets | None = None,
    ) -> AttemptResult:
        """One attempt, within the daemon's function concurrency, in its own span.

        The span's parent is the current span, or the span ``traceparent``
        names (a job's emit, possibly from before a restart). ``secrets`` are
        the connection's credentials (none when not given).
        """
        secrets = secrets if secrets is not None else Secrets()
        limit = min(time_limit, self.timeout(function)) if time_limit is not None else self.timeout(function)

        made: list[Context] = []

        def make(log: AttemptLog) -> Context:  # the runner owns the attempt's log
            made.append(self._context(function, info, event, sink, log, secrets, calls))
            return made[0]

        # Whatever a function raises or logs, the connection's secrets never reach the log: redacted, then cut.
        # Every set the attempt had counts (``seen`` grows when a 401 brings fresh ones).
        seen = secrets.seen

        def scrub(text: str, limit: int) -> str:
            return cut(redact_excerpt(text, seen, limit + 1), limit)

        if not tracing.traces_on():
            result = await self._run(function, make, event, limit, scrub)
            result = _misconfigured(result, made[0] if made else None, scrub)
            _log_attempt(function, info, event, result)
        else:
            parent = tracing.context_from(traceparent) if traceparent is not None else None
            ref = info.ref
            attributes = {
                "orchestrator.environment": ref.environment,
                "orchestrator.integration": ref.integration,
                "orchestrator.connection_id": ref.connection_id,
                "orchestrator.event": event.type.value,
                "orchestrator.function": function.name,
                "orchestrator.attempt": event.attempt,
                "orchestrator.plugin": f"{function.distribution} {function.version}",
            }
            name = f"function {function.name}"
            with tracer.start_as_current_span(name, context=parent, attributes=attributes) as span:
                result = await self._run(function, make, event, limit, scrub)
                result = _misconfigured(result, made[0] if made else None, scrub)
                span.set_attribute("orchestrator.outcome", _outcome(result))
                if not result.ok:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{result.error_type}: {result.error}"[:500]))
                    span.add_event(
                        "exception", {"exception.type": result.error_type, "exception.message": result.error}
                    )
                _log_attempt(function, info, event, result)  # in the span: the line names its trace
        if tracing.metrics_on():
            labels = _attempt_labels(function.name, _outcome(result))
            ATTEMPTS.add(1, labels)
            ATTEMPT_MS.record(result.duration_ms, labels)
        return result

    async def _run(
        self, function: Installed, make: Callable[[AttemptLog], Context], event: EventInfo, limit: float, scrub: Scrub
    ) -> AttemptResult:
        """The attempt itself, within the daemon's function concurrency (in the daemon or a worker process)."""
        pool = self._pool
        limiter = self._limiter
        # A free slot is taken at once, without a pass through the event loop; otherwise wait for one.
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            # An async function in the daemon could hold the loop: the watchdog names it. A plain def runs
            # in a thread and one in a worker process cannot: nothing to watch.
            if self._watchdog is not None and pool is None and function.function.is_async:
                with self._watchdog.watching(function):
                    return await run_attempt(
                        function, make, attempt=event.attempt, time_limit=limit, threads=self.threads, scrub=scrub
                    )
            return await run_attempt(
                function,
                make,
                attempt=event.attempt,
                time_limit=limit,
                threads=self.threads,
                invoke_with=pool.invoke if pool is not None else None,
                scrub=scrub,
            )
        finally:
            limiter.release()

    async def run_sync(
        self,
        functions: Sequence[Installed],
        info: ConnectionInfo,
        event: EventInfo,
        metadata: JSONObject,
        *,
        deadline: float,
        stop_on_failure: bool,
        secrets: Secrets | None = None,
    ) -> SyncRun:
        """Run ``functions`` concurrently under one ``deadline``.

        With ``stop_on_failure`` (validation) the first failure cancels the
        others, which are reported in ``cancelled``. A function still running
        at the deadline fails with a timeout.
        """
        out = SyncRun()
        buffer = Buffered(metadata)
        if len(functions) == 1:
            # One function (the usual validation): nothing to run beside it or to stop, so no task group;
            # the attempt's own deadline is the run's.
            [function] = functions
            sink = buffer.for_function(function.name)
            limit = max(deadline, 0.001)
            out.results.append(await self.attempt(function, info, event, sink, time_limit=limit, secrets=secrets))
            out.metadata_updates = buffer.updates
            return out
        done: set[str] = set()
        started = self.clock.now()

        async def one(function: Installed, tg: anyio.abc.TaskGroup) -> None:
            remaining = deadline - (self.clock.now() - started).total_seconds()
            sink = buffer.for_function(function.name)
            result = await self.attempt(function, info, event, sink, time_limit=max(remaining, 0.001), secrets=secrets)
            done.add(function.name)
            out.results.append(result)
            # At the shared deadline every function still running times out alike:
            # only a failure of its own stops the others.
            if not result.ok and stop_on_failure and result.error_type != TIMEOUT:
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for function in functions:
                tg.start_soon(one, function, tg)
        out.cancelled = [f for f in functions if f.name not in done]
        out.metadata_updates = buffer.updates
        return out
