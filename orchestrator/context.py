"""What an event function sees: :class:`Context`.

A function gets the connection (ref and config), the event (type, payload,
id, attempt), the integration's settings (``ctx.integration``: name, base URL,
auth scheme and its non-secret settings, as the connection's environment sees
them), the environment's function variables (``ctx.env``), HTTP calls to the provider through the proxy (credentials
injected), the credentials themselves read-only for SDKs that need the raw
token (``ctx.credentials``, whose ``repr`` is redacted), the connection's
metadata validated by the function's model, and ``log``. Metadata writes go to
a :class:`MetadataSink` chosen by the caller: appended at once for
asynchronous attempts, gathered into the verdict's atomic append for
synchronous ones, shown as a diff and dropped by ``dryrun``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, TypeVar

import anyio.from_thread
import anyio.lowlevel
import httpx
from pydantic import BaseModel, ValidationError

from orchestrator import limits
from orchestrator.config import Integration
from orchestrator.errors import InvalidArgument
from orchestrator.model import ConnectionRef, JSONObject, LifecycleEvent
from orchestrator.records import MetadataUpdated

T = TypeVar("T")
MAX_LOG_LINES = 200
MAX_LOG_LINE = 2000


class ProviderCalls(Protocol):
    """Where a :class:`Context` sends provider calls: :class:`~orchestrator.provider.Provider`, or a stand-in."""

    @property
    def credentials(self) -> Mapping[str, str]:
        """The connection's credentials as ``ctx.credentials`` shows them (read-only, its ``repr`` redacted)."""
        ...

    async def request(
        self,
        method: str,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request to the provider (see :meth:`orchestrator.provider.Provider.request`)."""
        ...


class MetadataSink(Protocol):
    """Where the connection's metadata is read from and ``set_metadata`` writes go."""

    def current(self) -> JSONObject:
        """The metadata as this attempt last saw or wrote it."""
        ...

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        """Record a ``metadata-updated`` (``merge``: keys merged into the current value by the fold)."""
        ...


class Buffered:
    """Gathers writes as ``metadata-updated`` bodies, for a synchronous run or a dry run (writes nothing itself).

    Several functions may share one (a synchronous run): each writes through
    its own :meth:`for_function` view, which names it as the writer.
    """

    def __init__(self, metadata: JSONObject, function: str = "") -> None:
        self._metadata = dict(metadata)
        self._function = function
        self.updates: list[MetadataUpdated] = []

    @property
    def writes(self) -> list[JSONObject]:
        """The gathered writes as the ``data`` of their records."""
        return [update.to_data() for update in self.updates]

    def current(self) -> JSONObject:
        """See :meth:`MetadataSink.current`."""
        return dict(self._metadata)

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        """See :meth:`MetadataSink.write`."""
        self._write(self._function, metadata, merge)

    def _write(self, function: str, metadata: JSONObject, merge: bool) -> None:
        self._metadata = {**self._metadata, **metadata} if merge else dict(metadata)
        self.updates.append(MetadataUpdated(function, metadata, merge))

    def for_function(self, function: str) -> MetadataSink:
        """A view of this buffer whose writes are recorded as ``function``'s."""
        return _Named(self, function)


class _Named:
    """A view of a shared :class:`Buffered` that names the writing function."""

    def __init__(self, buffer: Buffered, function: str) -> None:
        self._buffer = buffer
        self._function = function

    def current(self) -> JSONObject:
        return self._buffer.current()

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        self._buffer._write(self._function, metadata, merge)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """The connection a function runs for."""

    ref: ConnectionRef
    config: JSONObject

    @property
    def connection_id(self) -> str:
        """Shorthand for ``ref.connection_id``."""
        return self.ref.connection_id


@dataclass(frozen=True, slots=True)
class IntegrationInfo:
    """``ctx.integration``: how the connection's integration is configured for its environment (no secret).

    ``base_url`` is as configured, ``{placeholders}`` and all (the proxy fills them from the
    connection's config); ``settings`` are the integration's own non-secret settings
    (``[integrations.<name>.settings]``, per-environment ones merged in), read-only.
    """

    name: str
    base_url: str = ""
    auth: str = "none"
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, integration: Integration) -> IntegrationInfo:
        """What a function is shown of ``integration`` (already resolved for the connection's environment)."""
        return cls(
            integration.name, integration.base_url, integration.auth, MappingProxyType(dict(integration.settings))
        )

    def to_json(self) -> JSONObject:
        """As the daemon sends it to a worker process."""
        return {"name": self.name, "base_url": self.base_url, "auth": self.auth, "settings": dict(self.settings)}

    @classmethod
    def from_json(cls, data: JSONObject) -> IntegrationInfo:
        """From :meth:`to_json`."""
        return cls(data["name"], data["base_url"], data["auth"], MappingProxyType(dict(data["settings"])))


@dataclass(frozen=True, slots=True)
class EventInfo:
    """The lifecycle event a function runs for."""

    type: LifecycleEvent
    payload: JSONObject
    event_id: str
    attempt: int = 1


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and "…" when it is longer."""
    return text if len(text) <= limit else text[:limit] + "…"


Scrub: TypeAlias = Callable[[str, int], str]
"""Makes a function's text fit to keep: ``scrub(text, limit)`` is at most ``limit`` characters (and
"…"), with the connection's credentials redacted before the cut, so that none is kept halved."""


@dataclass(slots=True)
class AttemptLog:
    """The lines a function logged in one attempt, bounded so a flood cannot exhaust memory."""

    scrub: Scrub = cut
    lines: list[str] = field(default_factory=list)
    dropped: int = 0

    def add(self, line: str) -> None:
        if len(self.lines) >= MAX_LOG_LINES:
            self.dropped += 1
            return
        self.lines.append(self.scrub(line, MAX_LOG_LINE))

    def export(self) -> list[str]:
        """The lines, with a note of how many were dropped."""
        return [*self.lines, f"({self.dropped} more lines dropped)"] if self.dropped else list(self.lines)


class Context:
    """The ``ctx`` argument of an event function."""

    def __init__(
        self,
        *,
        connection: ConnectionInfo,
        event: EventInfo,
        provider: ProviderCalls,
        metadata_model: type[BaseModel] | None,
        sink: MetadataSink,
        log: AttemptLog | None = None,
        integration: IntegrationInfo | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.connection = connection
        self.event = event
        self.integration = integration or IntegrationInfo(connection.ref.integration)
        """The integration's name, base URL, auth scheme and non-secret settings, for this environment."""
        self.env: Mapping[str, str] = MappingProxyType(dict(env or {}))
        """The environment's function variables (``[environments.<env>.variables]``), read-only."""
        self._provider = provider
        self._model = metadata_model
        self._sink = sink
        self._log = log or AttemptLog()

    @property
    def credentials(self) -> Mapping[str, str]:
        """The connection's credentials, read-only (its ``repr`` shows the names only).

        For SDKs that need the raw token; calls through ``ctx.get`` and the like get them
        injected. Raises ``CredentialsUnavailable`` when the stored credentials cannot be opened.
        """
        return self._provider.credentials

    # -- provider calls --------------------------------------------------------

    async def get(
        self,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """GET ``endpoint`` (relative to the integration's base URL) from the provider."""
        return await self._provider.request("GET", endpoint, params=params, json=json, data=data, headers=headers)

    async def post(
        self,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POST to the provider."""
        return await self._provider.request("POST", endpoint, params=params, json=json, data=data, headers=headers)

    async def put(
        self,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """PUT to the provider."""
        return await self._provider.request("PUT", endpoint, params=params, json=json, data=data, headers=headers)

    async def patch(
        self,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """PATCH at the provider."""
        return await self._provider.request("PATCH", endpoint, params=params, json=json, data=data, headers=headers)

    async def delete(
        self,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """DELETE at the provider (some APIs take a body with it)."""
        return await self._provider.request("DELETE", endpoint, params=params, json=json, data=data, headers=headers)

    # -- metadata --------------------------------------------------------------

    def _validate(self, data: JSONObject) -> JSONObject:
        if self._model is None:
            return data
        try:
            return self._model.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            raise InvalidArgument(f"metadata does not match {self._model.__name__}: {exc}") from None

    async def get_metadata(self) -> Any:
        """The connection's metadata: an instance of the function's model, or a dict without one."""
        current = self._sink.current()
        if self._model is None:
            return current
        try:
            return self._model.model_validate(current)
        except ValidationError as exc:
            raise InvalidArgument(f"stored metadata does not match {self._model.__name__}: {exc}") from None

    async def set_metadata(self, value: BaseModel | JSONObject) -> None:
        """Replace the connection's metadata (validated by the model; recorded as ``metadata-updated``).

        At most 64 KiB as JSON per write and 256 KiB in all, nested at most 20 levels deep: beyond,
        ``ResourceExhausted`` (``InvalidArgument`` for the nesting) names the limit, and the attempt
        fails without retries.
        """
        data = value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value)
        limits.check_depth("a metadata write", data)  # first: too deep a value never reaches recursive code
        validated = self._validate(data)
        limits.check_metadata(validated, validated)
        await self._sink.write(validated, merge=False)

    async def update_metadata(self, value: BaseModel | JSONObject) -> None:
        """Merge keys into the connection's metadata (bounded as :meth:`set_metadata`).

        With a model, the merged metadata (the current one with these keys replaced) is what is
        validated, so a partial update of a model with required fields works; the values recorded
        are the validated ones (coerced as the model coerces them). A key the model drops is not
        recorded.
        """
        patch = value.model_dump(mode="json", exclude_unset=True) if isinstance(value, BaseModel) else dict(value)
        limits.check_depth("a metadata write", patch)  # first: too deep a value never reaches recursive code
        current = self._sink.current()
        validated = self._validate({**current, **patch})
        if self._model is not None:
            patch = {key: validated[key] for key in patch if key in validated}
        limits.check_metadata(patch, {**current, **patch})
        await self._sink.write(patch, merge=True)

    # -- logging ---------------------------------------------------------------

    def log(self, *parts: object, level: str = "info") -> None:
        """Keep a line with this attempt's outcome (bounded: a flood is truncated, never fatal)."""
        self._log.add(f"{level}: " + " ".join(str(p) for p in parts))


@dataclass(frozen=True, slots=True)
class Backends:
    """What a :class:`Context` does its work with: provider calls, the metadata sink, the attempt's log.

    A function run in a worker process (:mod:`orchestrator.isolation`) gets a
    context built over stand-ins that forward each call to the daemon, which
    serves it with the backends of the attempt's own context: so the provider
    proxy and the sink never leave the daemon, and the credentials enter a
    worker only when its function reads ``ctx.credentials``.
    """

    provider: ProviderCalls
    sink: MetadataSink
    log: AttemptLog


def backends(ctx: Context) -> Backends:
    """The backends ``ctx`` was built over (for the worker process pool; not part of the plugin API)."""
    return Backends(ctx._provider, ctx._sink, ctx._log)


class LoopCalls(Protocol):
    """How a worker thread has the event loop run a call (the daemon's: :class:`orchestrator.runner.LoopCalls`)."""

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` on the loop, blocking the calling thread until it is done."""
        ...


class SyncContext:
    """The context handed to a plain ``def`` function, which runs in a worker thread.

    Each method blocks the thread, not the event loop, while the call runs on the loop
    (through ``calls``, else anyio's ``from_thread.run`` with ``token``).
    """

    def __init__(
        self, ctx: Context, token: anyio.lowlevel.EventLoopToken | None = None, *, calls: LoopCalls | None = None
    ) -> None:
        self.connection = ctx.connection
        self.event = ctx.event
        self.integration = ctx.integration
        """See :attr:`Context.integration`."""
        self.env = ctx.env
        """See :attr:`Context.env`."""
        self.credentials = ctx.credentials
        """See :attr:`Context.credentials`."""
        self._ctx = ctx
        self._token = token
        self._calls = calls

    def _run(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **kwargs: Any) -> Any:
        if self._calls is not None:
            return self._calls.call(fn, *args, **kwargs)

        async def call() -> Any:
            return await fn(*args, **kwargs)

        return anyio.from_thread.run(call, token=self._token)

    def get(self, endpoint: str, **kwargs: Any) -> httpx.Response:
        """See :meth:`Context.get`."""
        return self._run(self._ctx.get, endpoint, **kwargs)  # type: ignore[no-any-return]

    def post(self, endpoint: str, **kwargs: Any) -> httpx.Response:
        """See :meth:`Context.post`."""
        return self._run(self._ctx.post, endpoint, **kwargs)  # type: ignore[no-any-return]

    def put(self, endpoint: str, **kwargs: Any) -> httpx.Response:
        """See :meth:`Context.put`."""
        return self._run(self._ctx.put, endpoint, **kwargs)  # type: ignore[no-any-return]

    def patch(self, endpoint: str, **kwargs: Any) -> httpx.Response:
        """See :meth:`Context.patch`."""
        return self._run(self._ctx.patch, endpoint, **kwargs)  # type: ignore[no-any-return]

    def delete(self, endpoint: str, **kwargs: Any) -> httpx.Response:
        """See :meth:`Context.delete`."""
        return self._run(self._ctx.delete, endpoint, **kwargs)  # type: ignore[no-any-return]

    def get_metadata(self) -> Any:
        """See :meth:`Context.get_metadata`."""
        return self._run(self._ctx.get_metadata)

    def set_metadata(self, value: BaseModel | JSONObject) -> None:
        """See :meth:`Context.set_metadata`."""
        self._run(self._ctx.set_metadata, value)

    def update_metadata(self, value: BaseModel | JSONObject) -> None:
        """See :meth:`Context.update_metadata`."""
        self._run(self._ctx.update_metadata, value)

    def log(self, *parts: object, level: str = "info") -> None:
        """See :meth:`Context.log` (thread-safe: a list append)."""
        self._ctx.log(*parts, level=level)
