"""A scriptable HTTP provider on ``127.0.0.1:0`` that records every request it gets.

    with ProviderServer() as provider:
        provider.route("POST", "/webhooks", Reply(201, {"id": "wh_1"}))
        provider.route("GET", "/me", Reply(429, headers={"Retry-After": "0"}), Reply(200, {"login": "acme"}))
        ...  # point an integration's base_url at provider.url
        assert provider.requests_to("GET", "/me")[0].headers["authorization"] == "Bearer t0k3n"

It serves from its own threads (:class:`http.server.ThreadingHTTPServer`),
so sync tests, async tests and subprocesses (the CLI, daemons) can all use it,
and a slow reply never blocks a test's event loop. The replies of a route are
used in order and the last one repeats; a route may instead be a function of
the request (for a provider with state: :class:`WebhookProvider` creates and
deletes webhooks). A request nobody routed is answered 404 with a JSON body.
Paths may use :mod:`fnmatch` wildcards (``/webhooks/*``).

Nothing here sleeps to wait: :meth:`ProviderServer.hold` holds requests open
until the test releases them, and :meth:`ProviderServer.wait_for` and
:func:`reached` wait on conditions the serving threads signal.

This is the tests' one HTTP fake (examples/fake_provider.py is the users'
stand-in for the README's tour): the OTLP/HTTP receiver of the observability
tests is one too.
"""

from __future__ import annotations

import fnmatch
import json
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.to_thread

WAIT_TIMEOUT = 10.0
"""Seconds :meth:`ProviderServer.wait_for` waits for requests that are expected to come promptly."""
HOLD_LIMIT = 60.0
"""A held request is answered after this many seconds even if its gate is never released."""
WAIT = 30.0
"""Seconds :func:`reached` waits for a provider thread's event."""


class Headers(dict[str, str]):
    """Request headers by lower-case name; looking one up ignores case (``Authorization`` or ``authorization``)."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """The header ``name`` (any case), or ``default``."""
        return super().get(name.lower(), default)


@dataclass(frozen=True)
class Request:
    """One request as the provider received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Headers
    """Header names in lower case; look-ups ignore case."""
    body: bytes = b""

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def param(self, name: str) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Reply:
    """One scripted answer: ``body`` bytes are sent as is, a str as text, anything else as JSON."""

    status: int = 200
    body: Any = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (cut short when the server stops)."""

    def encoded(self) -> tuple[bytes, str]:
        """(payload, content type)."""
        if self.status in (204, 304):
            return b"", "text/plain"
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return json.dumps(self.body).encode(), "application/json"


Responder = Callable[[Request], Reply]


@dataclass(eq=False)
class Gate:
    """Holds the requests it matches open until :attr:`release` is set (see :meth:`ProviderServer.hold`).

    ``arrived`` is set when the first of them comes in (:attr:`held` counts them); ``answered`` once
    the provider has acted on one (created the webhook), whether or not its caller is still there to
    read the answer.
    """

    method: str
    path: str
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    held: int = 0

    def matches(self, request: Request) -> bool:
        """Whether ``request`` is one this gate holds (while it is closed)."""
        return request.method == self.method and fnmatch.fnmatchcase(request.path, self.path)


async def reached(event: threading.Event, within: float = WAIT) -> bool:
    """Wait (bounded by ``within`` seconds) for an event a provider thread sets; whether it was set."""
    with anyio.fail_after(within + 5):
        return await anyio.to_thread.run_sync(event.wait, within, abandon_on_cancel=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, provider: ProviderServer) -> None:
        self.provider = provider
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout under test) closes its end mid-reply; that is not the server's error.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 10  # an idle keep-alive connection ends after this many seconds

    def log_message(self, *args: Any) -> None:
        pass  # quiet: the tests assert on the recorded requests instead

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            self.command,
            parts.path,
            parse_qs(parts.query, keep_blank_values=True),
            Headers((name.lower(), value) for name, value in self.headers.items()),
            self.rfile.read(length) if length else b"",
        )
        provider = self.server.provider
        reply = provider._answer(request)
        if reply.delay:
            provider._closing.wait(reply.delay)
        payload, content_type = reply.encoded()
        self.send_response(reply.status)
        for name, value in {"Content-Type": content_type, **reply.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


class ProviderServer:
    """A local HTTP provider; use it as a context manager (it starts on entry and stops on exit)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._routes: dict[tuple[str, str], list[Reply] | Responder] = {}
        self._requests: list[Request] = []
        self._gates: list[Gate] = []
        self._closing = threading.Event()
        self.errors: list[BaseException] = []
        """Exceptions raised by responder functions (answered 500); a clean exit requires none."""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life --------------------------------------------------------------------

    def __enter__(self) -> ProviderServer:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="test-provider", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._closing.set()
        for gate in self._gates:
            gate.release.set()
        self._server.shutdown()
        with self._server.connections_lock:
            for connection in list(self._server.connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)  # wakes a handler waiting on a keep-alive connection
                except OSError:
                    pass
        self._server.server_close()
        self._thread.join()
        if exc_type is None and self.errors:
            raise AssertionError(f"a responder of the test provider raised: {self.errors[0]!r}") from self.errors[0]

    @property
    def port(self) -> int:
        """The port it listens on."""
        assert self._server is not None, "the provider is not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    # -- scripting ---------------------------------------------------------------

    def route(self, method: str, path: str, *replies: Reply | Responder) -> None:
        """Answer ``method path`` with ``replies`` in order (the last repeats), or with one responder function."""
        if not replies:
            raise ValueError("route() needs at least one reply")
        script: list[Reply] | Responder
        if len(replies) == 1 and callable(replies[0]):
            script = replies[0]
        elif all(isinstance(r, Reply) for r in replies):
            script = [r for r in replies if isinstance(r, Reply)]
        else:
            raise ValueError("route() takes replies, or a single responder function")
        with self._lock:
            self._routes[(method.upper(), path)] = script

    def hold(self, method: str, path: str = "*") -> Gate:
        """Hold every ``method path`` request open, before it is answered, until the returned gate is released."""
        gate = Gate(method.upper(), path)
        with self._lock:
            self._gates.append(gate)
        return gate

    def _answer(self, request: Request) -> Reply:
        """Record ``request``, hold it while a closed gate matches it, then reply."""
        with self._lock:
            self._requests.append(request)
            self._lock.notify_all()
            gate = next((g for g in self._gates if g.matches(request) and not g.release.is_set()), None)
            if gate is not None:
                gate.held += 1
        if gate is None:
            return self._reply(request)
        gate.arrived.set()
        gate.release.wait(HOLD_LIMIT)
        try:
            return self._reply(request)
        finally:
            gate.answered.set()

    def _reply(self, request: Request) -> Reply:
        """The reply of the route ``request`` matches (404 when none does)."""
        with self._lock:
            script = self._routes.get((request.method, request.path))
            if script is None:
                for (method, pattern), candidate in self._routes.items():
                    if method == request.method and fnmatch.fnmatchcase(request.path, pattern):
                        script = candidate
                        break
            if script is None:
                return Reply(404, {"error": f"no route for {request.method} {request.path}"})
            if isinstance(script, list):
                return script.pop(0) if len(script) > 1 else script[0]
        try:
            return script(request)
        except Exception as exc:  # surfaced when the server stops
            self.errors.append(exc)
            return Reply(500, {"error": f"the test's responder raised {exc!r}"})

    # -- what it saw -------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the requests so far (what comes next is what a test looks at)."""
        with self._lock:
            self._requests.clear()

    def requests_to(self, method: str, path: str) -> list[Request]:
        """The requests for ``method path`` (``path`` may use wildcards)."""
        return [r for r in self.requests if r.method == method.upper() and fnmatch.fnmatchcase(r.path, path)]

    async def wait_for(self, count: int, method: str = "", path: str = "*") -> list[Request]:
        """Wait (in a worker thread, not blocking the loop) until ``count`` matching requests arrived.

        Returns the matching requests; raises :class:`TimeoutError` after :data:`WAIT_TIMEOUT` seconds.
        """

        def matching() -> list[Request]:
            return [
                r
                for r in self._requests
                if (not method or r.method == method.upper()) and fnmatch.fnmatchcase(r.path, path)
            ]

        def wait() -> bool:
            with self._lock:
                return self._lock.wait_for(lambda: len(matching()) >= count, WAIT_TIMEOUT)

        if not await anyio.to_thread.run_sync(wait, abandon_on_cancel=True):
            raise TimeoutError(f"{count} request(s) {method or '*'} {path} did not arrive within {WAIT_TIMEOUT}s")
        with self._lock:
            return matching()


class WebhookProvider(ProviderServer):
    """A webhook API on a :class:`ProviderServer`, shaped like the seed's: one path prefix per instance.

    ``POST /{instance}/webhooks`` answers 201 ``{"id": "wh<n>"}``; ``DELETE /{instance}/webhooks/{id}``
    answers 204 once, then 404. :attr:`fail` makes a method answer a given status instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.webhooks: dict[str, str] = {}
        """Webhook id -> instance, of the webhooks that exist."""
        self.created: list[str] = []
        """Ids of every webhook created, in order."""
        self.fail: dict[str, int] = {}
        """Method -> status code answered instead."""
        self._state = threading.Lock()
        self.route("POST", "/*/webhooks", self._webhooks)
        self.route("DELETE", "/*/webhooks/*", self._webhooks)

    def _webhooks(self, request: Request) -> Reply:
        """Create or delete a webhook, or refuse as :attr:`fail` says."""
        with self._state:
            if request.method in self.fail:
                return Reply(self.fail[request.method], {"error": "refused by the test"})
            parts = request.path.strip("/").split("/")
            if request.method == "POST" and len(parts) == 2:
                webhook_id = f"wh{len(self.created) + 1}"
                self.created.append(webhook_id)
                self.webhooks[webhook_id] = parts[0]
                return Reply(201, {"id": webhook_id})
            if request.method == "DELETE" and len(parts) == 3 and self.webhooks.get(parts[2]) == parts[0]:
                del self.webhooks[parts[2]]
                return Reply(204)
            return Reply(404, {"error": "not found"})


def write_config(path: Path, provider_url: str, *, auth: str = "bearer", **settings: Any) -> Path:
    """A daemon TOML config: salesforce at ``{provider_url}/{instance}``, github at ``provider_url``, no proxy retries.

    ``auth`` is salesforce's scheme (``none`` for tests that send no credentials); ``settings`` are
    top-level keys (``grace_period = 2``).
    """
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    lines += [
        "[integrations.salesforce]",
        f'base_url = "{provider_url}/{{instance}}"',
        f'auth = "{auth}"',
        "retries = 0",
        "[integrations.github]",
        f'base_url = "{provider_url}"',
        'auth = "bearer"',
        "retries = 0",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
