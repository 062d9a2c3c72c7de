"""``orchestrator dryrun``: one function against a connection's recorded state, or a given one, without the daemon.

Provider calls are real: before the first one that is not a GET or HEAD, the
caller's ``before_change`` is asked (the CLI warns, or asks on a terminal),
and the requests that change something are counted. Every exchange can be
kept (:mod:`orchestrator.responses`) for ``orchestrator.testing`` to replay.
Metadata writes are gathered and shown as a diff; nothing is written to the
log unless ``commit`` is set, in which case the attempt's outcome and
metadata writes are appended like any other attempt's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import httpx

from orchestrator import records, responses
from orchestrator.clock import SystemClock
from orchestrator.config import DispatchConfig, Integration
from orchestrator.context import Buffered, ConnectionInfo, EventInfo
from orchestrator.dispatch import Dispatcher
from orchestrator.errors import InvalidArgument, LogInUse, NotFound, OrchestratorError
from orchestrator.ids import uuid7
from orchestrator.model import ConnectionRef, JSONObject
from orchestrator.plugins import Installed, Registry
from orchestrator.provider import Secrets, redact
from orchestrator.runner import AttemptResult
from orchestrator.store import locate, open_store

SAFE_METHODS = frozenset({"GET", "HEAD"})
"""Requests that change nothing at the provider: every other one is counted, and warned about first."""

BeforeChange = Callable[[str], Awaitable[bool]]
"""Called once, before the first request that changes the provider, with ``METHOD URL`` (redacted): whether to send
it. When it says no, the request fails with :class:`ChangeDeclined` and nothing else is asked."""


class ChangeDeclined(Exception):
    """The dry run was told not to send a request that changes the provider."""


@dataclass(frozen=True, slots=True)
class Given:
    """A connection that is not (or need not be) in the log: its config and metadata, given."""

    config: JSONObject = field(default_factory=dict)
    metadata: JSONObject = field(default_factory=dict)


@dataclass(slots=True)
class DryRun:
    """What one dry run did."""

    function: Installed
    ref: ConnectionRef
    result: AttemptResult
    calls: list[str] = field(default_factory=list)
    before: JSONObject = field(default_factory=dict)
    after: JSONObject = field(default_factory=dict)
    committed: bool = False
    changing: int = 0
    """Requests sent that were neither GET nor HEAD."""
    saved: Path | None = None
    """Where the exchanges were saved (``save_to``)."""
    exchanges: int = 0
    """HTTP exchanges with the provider (each retry counts)."""
    in_log: bool = True
    """The connection was read from the log (not given)."""


def find_function(registry: Registry, name: str, integration: str) -> Installed:
    """The installed function called ``name`` (of ``integration`` when several integrations have one)."""
    found = registry.named(name, integration)
    if not found:
        known = ", ".join(sorted({f.name for f in registry.functions})) or "none installed"
        raise NotFound(f"no event function {name!r}" + (f" for {integration}" if integration else "") + f" ({known})")
    if len(found) > 1:
        choices = ", ".join(sorted(f.function.integration for f in found))
        raise InvalidArgument(f"function {name!r} exists for several integrations ({choices}): pass --integration")
    return found[0]


class _Sending(httpx.AsyncBaseTransport):
    """The real transport, counting (and first clearing) the requests that change the provider, keeping every
    answer read."""

    def __init__(self, before_change: BeforeChange | None, credentials: Mapping[str, str]) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._before_change = before_change
        self._credentials = credentials
        self._cleared: bool | None = None
        self.changing = 0
        self.answers: list[httpx.Response] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method not in SAFE_METHODS:
            if self._cleared is None:
                shown = f"{request.method} {redact(str(request.url), self._credentials)}"
                self._cleared = self._before_change is None or await self._before_change(shown)
            if not self._cleared:
                raise ChangeDeclined(f"{request.method} {request.url.path} was not sent: the change was not confirmed")
            self.changing += 1
        response = await self._inner.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        self.answers.append(response)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass(frozen=True, slots=True)
class Settings:
    """How a dry run runs its function: what ``orchestrator dryrun``'s options and the daemon's config say."""

    payload: JSONObject = field(default_factory=dict)
    credentials: Mapping[str, str] = field(default_factory=dict)
    integrations: Mapping[str, Integration] = field(default_factory=dict)
    variables: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """``[environments.<env>.variables]``, for ``ctx.env``."""
    time_limit: float | None = None
    before_change: BeforeChange | None = None
    save_to: Path | None = None
    """A folder to save the run's exchanges in (``<function>.json``)."""


async def dryrun(
    database: str,
    function: Installed,
    connection_id: str,
    environment: str,
    settings: Settings,
    *,
    commit: bool = False,
    given: Given | None = None,
) -> DryRun:
    """Run ``function`` once against the connection as the log records it, or as ``given`` (the log unread).

    ``commit`` needs the log to exist and no daemon to own it (one process writes an SQLite log).
    """
    ref = ConnectionRef.parse(environment, function.function.integration, connection_id)
    if given is not None:
        if commit:
            raise InvalidArgument(
                "--commit records the run in the log, which does not have a connection given with --connection-config"
                " or --metadata: emit it first, or drop --commit"
            )
        run, _ = await _run(function, ConnectionInfo(ref, given.config), given.metadata, str(uuid7()), settings)
        run.in_log = False
        return run
    if commit:
        location = await anyio.to_thread.run_sync(partial(locate, database, create_directory=True, write=True))
        if location.path is not None and not location.exists:
            raise NotFound(f"no event log at {location.path}: --commit records into an existing log")
        if location.holder:
            raise _in_use(location.path, location.holder)
    async with AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(open_store(database, readonly=not commit))
        except LogInUse as exc:  # a daemon took it meanwhile
            raise _in_use(exc.path, exc.holder) from None
        connection = await store.get_connection(ref)
        if connection is None:
            raise NotFound(
                f"connection {ref} not found in {database} (to try one that is not in the log, give it with"
                " --connection-config and --metadata)"
            )
        cause = connection.lifecycle.event_id
        info = ConnectionInfo(ref, connection.config)
        run, updates = await _run(function, info, connection.metadata, cause, settings)
        if commit:
            bodies: list[records.Body] = [
                *(dataclasses.replace(update, dryrun=True) for update in updates),
                run.result.outcome(dryrun=True),
            ]
            with anyio.CancelScope(shield=True):
                await store.append(ref, None, [records.new(body, causation_id=cause) for body in bodies])
            run.committed = True
        return run


async def _run(
    function: Installed, info: ConnectionInfo, metadata: JSONObject, event_id: str, settings: Settings
) -> tuple[DryRun, list[records.MetadataUpdated]]:
    """One attempt through the daemon's dispatcher, on a transport that counts, clears and keeps the exchanges."""
    sending = _Sending(settings.before_change, settings.credentials)
    config = DispatchConfig(variables=settings.variables)
    async with httpx.AsyncClient(transport=sending) as http:
        dispatcher = Dispatcher(SystemClock(), http=http, integrations=settings.integrations, config=config)
        sink = Buffered(metadata, function.name)
        calls: list[str] = []
        result = await dispatcher.attempt(
            function,
            info,
            EventInfo(function.function.event, settings.payload, event_id),
            sink,
            time_limit=settings.time_limit,
            calls=calls,
            secrets=Secrets(settings.credentials),
        )
    run = DryRun(function, info.ref, result, calls, metadata, sink.current(), changing=sending.changing)
    run.exchanges = len(sending.answers)
    if settings.save_to is not None:
        integration = dispatcher.integration(info.ref.integration, info.ref.environment)
        try:
            base_url = integration.url_for(info.config)
        except OrchestratorError:  # the proxy failed on it too (the attempt says why): nothing to be relative to
            base_url = ""
        credentials = [settings.credentials]
        run.saved = responses.save(
            responses.file_for(settings.save_to, function.name),
            function=function.name,
            integration=integration.name,
            base_url=redact(base_url, credentials),
            exchanges=[responses.record(answer, base_url, credentials) for answer in sending.answers],
        )
    return run, sink.updates


def _in_use(path: object, holder: str) -> LogInUse:
    return LogInUse(
        f"the event log {path} is in use by pid {holder} (a running daemon): stop the daemon or omit --commit"
        " (without it, dryrun only reads the log, which works while the daemon runs)",
        path=path,
        holder=holder,
    )
