"""One attempt of one event function through the daemon's dispatcher, against a stand-in provider."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias

import anyio
import httpx

from orchestrator import responses
from orchestrator.clock import SystemClock
from orchestrator.config import DispatchConfig, Integration
from orchestrator.context import Buffered, ConnectionInfo, EventInfo
from orchestrator.dispatch import Dispatcher
from orchestrator.errors import InvalidArgument, OrchestratorError
from orchestrator.functions import EventFunction
from orchestrator.model import ConnectionRef, JSONObject, LifecycleEvent
from orchestrator.plugins import Installed, Registry, discover, discover_integrations
from orchestrator.provider import Secrets
from orchestrator.runner import TIMEOUT
from orchestrator.testing._stand_ins import Canned, Nothing, Recording, Replay, Request, UnexpectedRequest

__all__ = [
    "STAND_IN_BASE_URL",
    "Outcome",
    "Provider",
    "Request",
    "Result",
    "Runner",
    "UnexpectedRequest",
    "arun",
    "run",
]

STAND_IN_BASE_URL = "https://provider.test"
"""The base URL of an integration that has none configured (neither a plugin's default nor ``integration=``)."""
EVENT_ID = "01900000-0000-7000-8000-00000000feed"
"""The event id a test's attempt runs for."""
_TEST_CREDENTIALS = {
    "none": {},
    "bearer": {"access_token": "test-access-token"},
    "basic": {"username": "test-user", "password": "test-password"},
    "header": {"api_key": "test-api-key"},
    "query": {"api_key": "test-api-key"},
}
"""The credentials a run has unless given some: what the integration's auth scheme needs."""

Provider: TypeAlias = "httpx.AsyncBaseTransport | Mapping[str, Any] | str | os.PathLike[str] | None"
"""A stand-in provider: a transport, canned answers, or a folder (or file) of saved responses."""


class Outcome(StrEnum):
    """How the attempt ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    """A validate-connection function raised ``Rejected``."""
    TIMED_OUT = "timed out"


@dataclass(frozen=True, slots=True)
class Result:
    """What one run did: its outcome, the metadata after, its log lines and the requests it made."""

    function: str
    outcome: Outcome
    metadata: JSONObject
    """The connection's metadata after the run (the one it started with, and its writes)."""
    logs: list[str]
    requests: list[Request]
    metadata_before: JSONObject = field(default_factory=dict)
    writes: list[JSONObject] = field(default_factory=list)
    """Each metadata write, as its ``metadata-updated`` record has it: ``{"function", "metadata", "merge"}``."""
    error_type: str = ""
    error: str = ""
    """As the ``function-failed`` record would keep it (the credentials redacted)."""
    retryable: bool = False
    """Whether the daemon would retry it (an asynchronous function's job)."""
    traceback: str = ""
    duration_ms: int = 0
    misconfigured: str = ""
    """Why the daemon's proxy refused a call for what the daemon lacks (a ``base_url``, a credential the auth
    scheme needs): the daemon would then refuse the emit (validation) or not retry; empty otherwise."""

    @property
    def ok(self) -> bool:
        """The function succeeded."""
        return self.outcome is Outcome.SUCCEEDED

    @property
    def rejected(self) -> bool:
        """A validate function rejected the connection (``error`` is the rejection's reason)."""
        return self.outcome is Outcome.REJECTED

    def __str__(self) -> str:
        lines = [f"{self.function}: {self.outcome}" + (f": {self.error_type}: {self.error}" if self.error else "")]
        lines += [f"  http  {request}" for request in self.requests]
        lines += [f"  log   {line}" for line in self.logs]
        lines.append(f"  meta  {self.metadata_before} -> {self.metadata}")
        if self.traceback:
            lines += ["  " + line for line in self.traceback.splitlines()]
        return "\n".join(lines)


@functools.cache
def _installed() -> tuple[Registry, dict[str, Integration]]:
    """The installed event functions and the integrations' defaults their plugins ship (read once)."""
    defaults, _ = discover_integrations()
    return discover(), defaults


def _function(function: EventFunction | Installed | str) -> Installed:
    """The installed function ``function`` is (a decorated function not installed is named after its handler)."""
    if isinstance(function, Installed):
        return function
    registry = _installed()[0]
    if isinstance(function, str):
        found = registry.named(function)
        if len(found) != 1:
            known = ", ".join(sorted({f.name for f in registry.functions})) or "none installed"
            several = "several integrations have" if found else "no installed plugin has"
            raise InvalidArgument(f"{several} an event function {function!r} ({known}): pass the function itself")
        return found[0]
    if not isinstance(function, EventFunction):
        raise InvalidArgument(f"{function!r} is not an event function: decorate it with @on_event")
    for item in registry.functions:
        if item.function is function:
            return item
    problem = function.call_problem()  # discovery would call this plugin broken
    if problem is not None:
        raise InvalidArgument(problem)
    name = getattr(function.handler, "__name__", "function").replace("_", "-").strip("-") or "function"
    return Installed(name, function, "(not installed)", "0", function.qualname)


def _integration(name: str, given: Integration | Mapping[str, Any] | None) -> Integration:
    """The integration's settings: the plugin's defaults, then ``given``; a stand-in base URL if none."""
    if isinstance(given, Integration):
        integration = given
    else:
        default = _installed()[1].get(name)
        settings: dict[str, Any] = {}
        if default is not None:
            settings = {
                "base_url": default.base_url,
                "auth": default.auth,
                "timeout": default.timeout,
                "retries": default.retries,
                "settings": dict(default.settings),
                "environments": dict(default.environments),
            }
        integration = Integration.from_settings(name, {**settings, **(given or {})})
    if not integration.base_url:
        integration = Integration.from_settings(
            name,
            {
                "base_url": STAND_IN_BASE_URL,
                "auth": integration.auth,
                "timeout": integration.timeout,
                "retries": integration.retries,
                "settings": dict(integration.settings),
                "environments": dict(integration.environments),
            },
        )
    return integration


def _stand_in(provider: Provider, function: str, base_url: str) -> httpx.AsyncBaseTransport:
    if provider is None:
        return Nothing(base_url)
    if isinstance(provider, httpx.AsyncBaseTransport):
        return provider
    if isinstance(provider, Mapping):
        return Canned(provider, base_url)
    if isinstance(provider, str | os.PathLike):
        path = Path(provider)
        return Replay(responses.load(path, function), base_url, str(path))
    raise InvalidArgument(
        f"provider= is a {type(provider).__name__}: give an httpx.MockTransport, a dict of canned responses or the"
        " folder of responses saved by `orchestrator dryrun --save-responses`"
    )


async def arun(
    function: EventFunction | Installed | str,
    *,
    provider: Provider = None,
    connection_id: str = "test-connection",
    environment: str = "dev",
    connection_config: JSONObject | None = None,
    metadata: JSONObject | None = None,
    payload: JSONObject | None = None,
    credentials: Mapping[str, str] | None = None,
    integration: Integration | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    attempt: int = 1,
    time_limit: float | None = None,
) -> Result:
    """Run ``function`` once as the daemon would, against the stand-in ``provider``; see :mod:`orchestrator.testing`.

    ``function`` is the decorated function (or its installed entry-point name). The connection is
    ``environment/<its integration>/connection_id`` with ``connection_config`` and ``metadata``; the event is the
    function's, with ``payload``, as attempt ``attempt``. ``credentials`` default to stand-ins of what the
    integration's auth scheme needs (``{}``: none). ``integration`` is settings over the plugin's defaults
    (``{"base_url": ..., "settings": {...}}``), ``env`` the environment's variables (``ctx.env``). ``time_limit``
    (seconds) replaces the daemon's default (the function's own timeout, if shorter, still applies).
    """
    installed = _function(function)
    event = installed.function.event
    ref = ConnectionRef.parse(environment, installed.function.integration, connection_id)
    settings = _integration(ref.integration, integration)
    config = dict(connection_config or {})
    try:
        base_url = settings.for_environment(environment).url_for(config)
    except OrchestratorError:  # the attempt fails on it, as in the daemon; requests are named whole
        base_url = ""
    if credentials is None:
        credentials = _TEST_CREDENTIALS[settings.for_environment(environment).auth.partition(":")[0]]
    dispatch = DispatchConfig(variables={environment: dict(env or {})})
    if time_limit is not None:
        dispatch = DispatchConfig(attempt_timeout=time_limit, variables=dispatch.variables)
    deadline = {
        LifecycleEvent.VALIDATE_CONNECTION: dispatch.validate_deadline,
        LifecycleEvent.PRE_CONNECTION_DELETION: dispatch.deletion_deadline,
    }.get(event)
    limit = time_limit if time_limit is not None else deadline  # validate and cleanup run under the emit's deadline
    requests: list[Request] = []
    stand_in = Recording(_stand_in(provider, installed.name, base_url), base_url, requests.append)
    before = dict(metadata or {})
    sink = Buffered(before, installed.name)
    async with httpx.AsyncClient(transport=stand_in) as http:
        dispatcher = Dispatcher(SystemClock(), http=http, integrations={ref.integration: settings}, config=dispatch)
        result = await dispatcher.attempt(
            installed,
            ConnectionInfo(ref, config),
            EventInfo(event, dict(payload or {}), EVENT_ID, attempt),
            sink,
            time_limit=limit,
            secrets=Secrets(credentials),
        )
    if result.ok:
        outcome = Outcome.SUCCEEDED
    elif result.rejected:
        outcome = Outcome.REJECTED
    else:
        outcome = Outcome.TIMED_OUT if result.error_type == TIMEOUT else Outcome.FAILED
    return Result(
        installed.name,
        outcome,
        sink.current(),
        list(result.logs),
        requests,
        before,
        sink.writes,
        result.error_type,
        result.error,
        result.retryable,
        result.traceback,
        result.duration_ms,
        result.misconfigured,
    )


def run(function: EventFunction | Installed | str, **options: Any) -> Result:
    """:func:`arun` from a plain (not async) test; in an async test, ``await arun(...)``."""
    try:
        return anyio.run(functools.partial(arun, function, **options))
    except RuntimeError as exc:
        if "already running" in str(exc).lower():
            raise RuntimeError(
                "orchestrator.testing.run() was called inside a running event loop: `await arun(...)` there"
            ) from None
        raise


class Runner:
    """The ``run_function`` fixture: :func:`run` (or ``await runner.arun(...)``) with defaults, keeping each result.

    ``Runner(connection_config={...}, credentials={...})`` makes every run of a test use those unless told
    otherwise.
    """

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults
        self.results: list[Result] = []
        """Every result so far (the pytest plugin shows them when a test fails)."""

    def __call__(self, function: EventFunction | Installed | str, **options: Any) -> Result:
        result = run(function, **{**self.defaults, **options})
        self.results.append(result)
        return result

    async def arun(self, function: EventFunction | Installed | str, **options: Any) -> Result:
        """``await`` form, for an async test."""
        result = await arun(function, **{**self.defaults, **options})
        self.results.append(result)
        return result
