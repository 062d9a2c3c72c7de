"""The console's server: an aiohttp application on the daemon's own event loop, and its life.

:class:`Console` is one more task of the daemon (:meth:`Console.run`): it
binds, reports its port, serves until :meth:`Console.stop` (the drain), then
closes within a deadline. Every page asks the same
:class:`~orchestrator.service.Service` the gRPC server uses; the middlewares
here decide who is asking (:mod:`orchestrator.console._session`), refuse a
form without its CSRF token, map the service's errors to HTTP statuses in
one table (:data:`STATUSES`) and add the security headers. Templates and
static files are read once, off the loop, before the first request.

aiohttp rather than an ASGI server: it measured the same CPU per page as
Starlette on uvicorn (and half Hypercorn's), needs no bridge between two
frameworks, runs inside an existing loop with awaitable start and stop (no
signal handlers of its own) and streams server-sent events as plain writes
(docs/console.md has the figures).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import anyio
import anyio.abc
import jinja2
from aiohttp import web

from orchestrator import errors
from orchestrator.access import Tokens
from orchestrator.config import is_loopback, split_host_port
from orchestrator.console import _pages
from orchestrator.console._session import CALLER, COOKIE, SID, Sessions
from orchestrator.ids import uuid7
from orchestrator.plugins import Registry
from orchestrator.service import Service

log = logging.getLogger(__name__)

STOP_GRACE = 1.0
"""Seconds requests still open get once the console stops (live tails have ended by then)."""
MAX_BODY = 64 * 1024
"""Bytes a form may have (the biggest is a cancellation's reason)."""
STATUSES: dict[type[errors.OrchestratorError], int] = {
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.FailedPrecondition: 409,
    errors.VersionConflict: 409,
    errors.LeaseLost: 409,
    errors.IdempotencyConflict: 409,
    errors.PluginError: 409,
    errors.ResourceExhausted: 429,
    errors.Unavailable: 503,
    errors.ProviderError: 503,
    errors.StoreError: 500,
}
"""The HTTP status of each error of the service (the nearest mapped base class wins), as gRPC's table does."""
PUBLIC = frozenset({"/login"})
"""Pages answered without a session: the login form."""
_SECURITY_HEADERS = {
    # No inline script or style: every script and sheet is a file of the console's own.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def http_status(exc: errors.OrchestratorError) -> int:
    """The HTTP status for an error of the service."""
    for cls in type(exc).__mro__:
        if cls in STATUSES:
            return STATUSES[cls]
    return 500


def tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The console's TLS: the daemon's certificate and key (and client CA: mutual TLS); blocks (reads files)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load_assets() -> tuple[dict[str, str], dict[str, bytes]]:
    """The templates and the static files, read from the package (blocks: run it on a thread)."""
    root = resources.files("orchestrator.console")
    templates = {
        item.name: item.read_text(encoding="utf-8")
        for item in root.joinpath("templates").iterdir()
        if item.name.endswith(".html")
    }
    static = {
        item.name: item.read_bytes()
        for item in root.joinpath("static").iterdir()
        if item.name.endswith((".css", ".js", ".svg"))
    }
    return templates, static


class Console:
    """The web console over ``service``: :meth:`run` serves it until :meth:`stop`."""

    def __init__(
        self,
        service: Service,
        registry: Registry,
        *,
        tokens: Callable[[], Tokens | None] = lambda: None,
        tls: ssl.SSLContext | None = None,
        trace_url: str = "",
        retry_ms: int = 2000,
    ) -> None:
        self._service = service
        self._registry = registry
        self.sessions = Sessions(tokens)
        self._tls = tls
        self._trace_url = trace_url
        self._retry_ms = retry_ms
        self._stopping = anyio.Event()
        self.url = ""
        """Where it serves (once :meth:`run` has started)."""

    def stop(self) -> None:
        """Stop serving: requests still open get :data:`STOP_GRACE` seconds."""
        self._stopping.set()

    def reload_tls(self, cert: Path, key: Path) -> None:
        """Serve new connections with the certificate and key in these files (SIGHUP); blocks (reads them)."""
        if self._tls is not None:
            self._tls.load_cert_chain(cert, key)

    async def run(self, listen: str, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind ``listen``, report the port through ``task_status``, serve until :meth:`stop`, then close."""
        templates, static = await anyio.to_thread.run_sync(load_assets)
        host, port = split_host_port(listen)
        pages = _pages.Pages(
            self._service,
            self._registry,
            self.sessions,
            _environment(templates),
            static,
            trace_url=self._trace_url,
            retry_ms=self._retry_ms,
            secure=self._tls is not None,
        )
        app = build(pages, self.sessions, loopback=is_loopback(host), secure=self._tls is not None)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=STOP_GRACE)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port, ssl_context=self._tls).start()
            except OSError as exc:
                raise errors.InvalidArgument(
                    f"cannot serve the web console on {listen}: {exc.strerror or exc}"
                    " (pass --web-listen HOST:PORT, or --web-listen '' to turn the console off)"
                ) from None
            bound = runner.addresses[0][1]
            shown = f"[{host}]" if ":" in host else host
            self.url = f"{'https' if self._tls is not None else 'http'}://{shown}:{bound}/"
            task_status.started(bound)
            await self._stopping.wait()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GRACE + 1):
                await runner.cleanup()


def _environment(templates: dict[str, str]) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.DictLoader(templates),
        autoescape=True,
        auto_reload=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build(pages: _pages.Pages, sessions: Sessions, *, loopback: bool, secure: bool) -> web.Application:
    """The application: routes, and the middlewares that check who asks and what they send."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) is the same origin to the
        # browser: a console on a loopback address answers only to loopback names.
        if loopback and not is_loopback(_host_name(request.host)):
            return web.Response(status=421, text="this console answers to loopback names only (127.0.0.1, localhost)")
        sid = request.cookies.get(COOKIE, "")
        fresh = len(sid) != 43 or not sid.replace("-", "").replace("_", "").isalnum()
        if fresh:
            sid = sessions.new_id()
        request[SID] = sid
        bearer = _bearer(request)
        if bearer is not None and request.method in ("GET", "HEAD"):
            request[CALLER] = sessions.bearer(bearer)
            if request[CALLER] is None:
                return web.Response(status=401, text="missing or invalid bearer token")
        else:
            request[CALLER] = sessions.caller(sid)
        try:
            if request.method == "POST" and not pages.form_ok(request, await request.post()):
                response: web.StreamResponse = pages.refused(request)
            elif request[CALLER] is None and request.path not in PUBLIC and not request.path.startswith("/static/"):
                response = pages.unauthenticated(request)
            else:
                response = await handler(request)
        except web.HTTPException as exc:  # the router's: no such page, or not with this method
            response = pages.error(request, exc.status, f"{exc.reason}: {request.method} {request.path}")
        except errors.OrchestratorError as exc:
            response = pages.error(request, http_status(exc), str(exc))
        if fresh and not response.prepared:
            response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", secure=secure, path="/")
        return response

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(_SECURITY_HEADERS)
        if not request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")

    @web.middleware
    async def incidents(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPException, errors.OrchestratorError):
            raise
        except Exception as exc:
            if isinstance(exc, ConnectionResetError):  # the browser went away mid-answer
                raise
            incident = uuid7()
            log.exception("internal error %s in the web console (%s %s)", incident, request.method, request.path)
            return pages.error(request, 500, f"internal error {incident}; see the daemon's log")

    app = web.Application(middlewares=[guard, incidents], client_max_size=MAX_BODY)
    app.on_response_prepare.append(headers)
    pages.routes(app.router)
    return app


def _host_name(host: str | None) -> str:
    """The name of a ``Host`` header, without its port (an IPv6 address without its brackets)."""
    if not host:
        return ""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
