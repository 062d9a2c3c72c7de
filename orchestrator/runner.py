"""Running one attempt of one event function, whatever the function does.

An attempt always ends in an :class:`AttemptResult`: a function that raises,
hangs past its timeout, returns junk, floods its log or calls ``sys.exit``
is recorded as such and harms nothing else. Coroutine functions run on the
loop under ``fail_after``; plain functions run in a worker thread (bounded by
a capacity limiter) so they cannot block the loop, and a thread that outlives
its timeout is abandoned, not waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from orchestrator.context import AttemptLog, Context, SyncContext
from orchestrator.errors import InvalidArgument, ProviderError
from orchestrator.functions import NonRetryable, Rejected
from orchestrator.plugins import Installed
from orchestrator.records import FunctionFailed, FunctionSucceeded

TIMEOUT = "Timeout"
"""The ``error_type`` of an attempt that ran out of time."""


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
        )


def _classify(exc: BaseException) -> tuple[bool, bool]:
    """(retryable, rejected) for an exception a function raised."""
    if isinstance(exc, Rejected):
        return False, True
    if isinstance(exc, NonRetryable | InvalidArgument):
        return False, False
    if isinstance(exc, ProviderError) and 400 <= exc.status < 500 and exc.status not in (408, 429):
        return False, False
    return True, False


async def run_attempt(
    function: Installed,
    make_context: Callable[[AttemptLog], Context],
    *,
    attempt: int,
    time_limit: float,
    limiter: anyio.CapacityLimiter | None = None,
) -> AttemptResult:
    """Run ``function`` once within ``time_limit`` seconds; never raises (except cancellation)."""
    log = AttemptLog()
    started = time.monotonic()

    def result(ok: bool, exc: BaseException | None = None, message: str = "") -> AttemptResult:
        duration_ms = int((time.monotonic() - started) * 1000)
        if exc is None and ok:
            return AttemptResult(function, attempt, True, duration_ms, logs=log.export())
        retryable, rejected = _classify(exc) if exc is not None else (True, False)
        return AttemptResult(
            function,
            attempt,
            False,
            duration_ms,
            error_type=type(exc).__name__ if exc is not None else TIMEOUT,
            error=message or (str(exc) if exc is not None else "") or type(exc).__name__,
            retryable=retryable,
            rejected=rejected,
            logs=log.export(),
        )

    try:
        ctx = make_context(log)
        handler = function.function.handler
        with anyio.fail_after(time_limit):
            if function.function.is_async:
                returned = await handler(ctx)
            else:
                returned = await anyio.to_thread.run_sync(
                    handler, SyncContext(ctx), abandon_on_cancel=True, limiter=limiter
                )
    except TimeoutError:
        return result(False, message=f"timed out after {time_limit:g}s")
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a plugin must not take the daemon down
        return result(False, exc)
    if returned is not None:
        log.add(f"warning: the function returned {type(returned).__name__}, which is ignored")
    return result(True)
