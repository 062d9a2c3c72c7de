"""``orchestrator dryrun``: one function against a connection's recorded state, without the daemon.

Provider calls are real. Metadata writes are gathered and shown as a diff;
nothing is written unless ``commit`` is set, in which case the attempt's
outcome and metadata writes are appended like any other attempt's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial

import anyio
import httpx

from orchestrator import records
from orchestrator.clock import SystemClock
from orchestrator.config import Integration
from orchestrator.context import Buffered, ConnectionInfo, EventInfo
from orchestrator.dispatch import Dispatcher
from orchestrator.errors import InvalidArgument, LogInUse, NotFound
from orchestrator.model import ConnectionRef, JSONObject
from orchestrator.plugins import Installed, Registry
from orchestrator.provider import Secrets
from orchestrator.runner import AttemptResult
from orchestrator.store import locate, open_store


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


async def dryrun(
    database: str,
    function: Installed,
    connection_id: str,
    environment: str,
    *,
    payload: JSONObject,
    credentials: Mapping[str, str],
    integrations: Mapping[str, Integration],
    commit: bool = False,
    time_limit: float | None = None,
) -> DryRun:
    """Run ``function`` once against the connection as the log records it.

    ``commit`` needs the log to exist and no daemon to own it (one process writes an SQLite log).
    """
    ref = ConnectionRef.parse(environment, function.function.integration, connection_id)
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
            raise NotFound(f"connection {ref} not found in {database}")
        async with httpx.AsyncClient() as http:
            dispatcher = Dispatcher(SystemClock(), http=http, integrations=integrations)
            sink = Buffered(connection.metadata, function.name)
            calls: list[str] = []
            event = EventInfo(function.function.event, payload, connection.lifecycle.event_id)
            result = await dispatcher.attempt(
                function,
                ConnectionInfo(ref, connection.config),
                event,
                sink,
                time_limit=time_limit,
                calls=calls,
                secrets=Secrets(credentials),
            )
        run = DryRun(function, ref, result, calls, connection.metadata, sink.current())
        if commit:
            cause = connection.lifecycle.event_id
            bodies: list[records.Body] = [
                *(dataclasses.replace(update, dryrun=True) for update in sink.updates),
                result.outcome(dryrun=True),
            ]
            with anyio.CancelScope(shield=True):
                await store.append(ref, None, [records.new(body, causation_id=cause) for body in bodies])
            run.committed = True
        return run


def _in_use(path: object, holder: str) -> LogInUse:
    return LogInUse(
        f"the event log {path} is in use by pid {holder} (a running daemon): stop the daemon or omit --commit"
        " (without it, dryrun only reads the log, which works while the daemon runs)",
        path=path,
        holder=holder,
    )
