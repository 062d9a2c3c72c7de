"""The console's pages: each asks the service, has :mod:`~orchestrator.console._views` shape the answer, renders.

Every page applies the caller's environment scope as the gRPC servicer does:
``caller.require(environment)`` before reading a named connection or
environment (403 otherwise), ``caller.environments`` passed to the listings
and ``caller.allows(environment)`` to leave out records of other
environments. The buttons are forms that POST with the session's CSRF token
(checked before any handler runs) and go through ``Service.retry_job`` and
``Service.cancel_job``, as ``RetryJob`` and ``CancelJob`` do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

import anyio
import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from orchestrator import codec
from orchestrator._version import VERSION
from orchestrator.access import ANYONE, Principal
from orchestrator.console import _views as views
from orchestrator.console._session import CALLER, COOKIE, SID, Sessions
from orchestrator.errors import InvalidArgument, Unavailable
from orchestrator.logs import Throttle
from orchestrator.model import ConnectionRef, ConnectionState, JobStatus, check_name
from orchestrator.plugins import Registry
from orchestrator.records import Record
from orchestrator.service import Service

log = logging.getLogger(__name__)

T = TypeVar("T")
PAGE = 100
"""Rows of a connections or jobs page."""
SEARCH_SCAN = 5000
"""Connections a search by id looks through per page (the next page searches on)."""
RECENT = 2000
"""Records at the log's end that the overview and the events page look through."""
FUNCTION_WINDOW = 10_000
"""Records at the log's end the functions page counts attempts in."""
HEARTBEAT = 15.0
"""Seconds between two comments on a quiet live tail (proxies and browsers keep it open)."""
CACHED = 3.0
"""Seconds the overview's counts and failures are reused (many open browsers cost one query)."""
FUNCTIONS_CACHED = 15.0


class _Cache:
    """Answers kept for a few seconds, by key (a page and the caller's scope)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._kept: dict[object, tuple[float, object]] = {}

    async def get(self, key: object, ttl: float, make: Callable[[], Awaitable[T]]) -> T:
        now = self._monotonic()
        kept = self._kept.get(key)
        if kept is not None and now - kept[0] < ttl:
            return kept[1]  # type: ignore[return-value]  # what make() returned for this key
        value = await make()
        if len(self._kept) > 256:  # scopes are few; never let it grow
            self._kept.clear()
        self._kept[key] = (now, value)
        return value


def see_other(location: str) -> web.Response:
    """303 to ``location`` (after a form, or to the login form)."""
    return web.Response(status=303, headers={"Location": location})


def safe_next(value: str | None) -> str:
    """A path of this console to go to after a form (anything else: the overview)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if not value.isprintable():
        return "/"
    return value


class Pages:
    """The handlers, over one service."""

    def __init__(
        self,
        service: Service,
        registry: Registry,
        sessions: Sessions,
        templates: jinja2.Environment,
        static: dict[str, bytes],
        *,
        trace_url: str,
        retry_ms: int,
        secure: bool,
    ) -> None:
        self._service = service
        self._registry = registry
        self._sessions = sessions
        self._templates = templates
        self._static = static
        self._etags = {name: hashlib.sha256(body).hexdigest()[:16] for name, body in static.items()}
        self._trace_url = trace_url
        self._retry_ms = retry_ms
        self._secure = secure
        self._cache = _Cache()
        self._throttle = Throttle(log)
        templates.globals.update(asset=self._asset, version=VERSION)

    def routes(self, router: web.UrlDispatcher) -> None:
        """Every page, form and stream."""
        router.add_get("/", self.overview)
        router.add_get("/connections", self.connections)
        router.add_get("/connections/{environment}/{integration}/{connection_id:.+}", self.timeline)
        router.add_get("/jobs", self.jobs)
        router.add_post("/jobs/{job_id}/retry", self.retry)
        router.add_post("/jobs/{job_id}/cancel", self.cancel)
        router.add_get("/events", self.events)
        router.add_get("/events/stream", self.stream)
        router.add_get("/functions", self.functions)
        router.add_get("/login", self.login_form)
        router.add_post("/login", self.login)
        router.add_post("/logout", self.logout)
        router.add_get("/static/{name}", self.asset)

    # -- shared -------------------------------------------------------------------------

    def _asset(self, name: str) -> str:
        return f"/static/{name}?v={self._etags.get(name, '')}"

    def render(self, request: web.Request, template: str, *, status: int = 200, **values: Any) -> web.Response:
        """``template`` with ``values`` and what every page shows (who is looking, the CSRF token, the page)."""
        caller: Principal | None = request.get(CALLER)
        html = self._templates.get_template(template).render(
            caller=caller,
            login=self._sessions.required,
            csrf=self._sessions.csrf(request[SID]),
            here=request.path_qs,
            section=request.path.split("/")[1] or "overview",
            **values,
        )
        return web.Response(text=html, status=status, content_type="text/html")

    def error(self, request: web.Request, status: int, message: str) -> web.Response:
        """A page saying what went wrong, in one line a person can act on."""
        return self.render(request, "error.html", status=status, status_code=status, message=message)

    def refused(self, request: web.Request) -> web.Response:
        """A form without this session's CSRF token, or sent from another site: refused, nothing done."""
        return self.error(
            request,
            403,
            "the form was not sent from this console's own page (its CSRF token is missing or stale):"
            " reload the page and try again",
        )

    def form_ok(self, request: web.Request, form: MultiDictProxy[Any]) -> bool:
        """Whether a POST comes from one of our pages: its CSRF token, and its Origin when the browser sends one."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return False
        sent = form.get("csrf")
        return isinstance(sent, str) and self._sessions.csrf_ok(request[SID], sent)

    def unauthenticated(self, request: web.Request) -> web.StreamResponse:
        """No session: a page goes to the login form (and back after it); a stream or a form is refused."""
        if request.method == "GET" and request.path != "/events/stream":
            return see_other(f"/login?{_query(next=request.path_qs)}")
        return web.Response(status=401, text="log in to the console first")

    @staticmethod
    def caller(request: web.Request) -> Principal:
        """The caller of a page (the guard has refused a request without one)."""
        caller: Principal | None = request[CALLER]
        assert caller is not None
        return caller

    # -- overview -----------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """``/``: connections by state, jobs by status, the recent failures."""
        who = self.caller(request)
        scope = who.environments
        counts = await self._cache.get(("counts", scope), CACHED, lambda: self._service.counts(environments=scope))
        failures = await self._cache.get(("failures", scope), CACHED, lambda: self._recent(who, views.FAILURES, 10))
        return self.render(
            request,
            "overview.html",
            connections=views.count_table(counts.connections, views.STATES),
            jobs=views.count_table(counts.jobs, views.JOB_STATUSES),
            failures=failures,
            window=RECENT,
        )

    async def _recent(self, who: Principal, types: frozenset[str] | None, keep: int) -> list[dict[str, Any]]:
        """The last ``keep`` records (of ``types``) in the caller's scope among the last :data:`RECENT` of the log."""
        head = await self._service.head()
        found: deque[Record] = deque(maxlen=keep)
        async with aclosing(_generator(self._service.read_events(from_position=max(1, head - RECENT + 1)))) as records:
            async for record in records:
                if record.position > head:
                    break
                if (types is None or record.type in types) and who.allows(_environment(record.stream)):
                    found.append(record)
        return [views.tail_item(record) for record in reversed(found)]

    # -- connections --------------------------------------------------------------------

    async def connections(self, request: web.Request) -> web.Response:
        """``/connections``: filtered by environment, integration, state; searched by id."""
        who = self.caller(request)
        query = request.query
        environment = _name(query, "environment")
        integration = _name(query, "integration")
        state_text = query.get("state", "")
        try:
            state = ConnectionState(state_text) if state_text else None
        except ValueError:
            raise InvalidArgument(f"state {state_text!r} is not one of {', '.join(views.STATES)}") from None
        if environment:
            who.require(environment)
        search = query.get("q", "").strip()
        token = query.get("page", "")
        searched = 0
        if search:
            rows, token, searched = await self._search(who, environment, integration, state, search, token)
        else:
            page = await self._service.list_connections(
                environment=environment,
                integration=integration,
                state=state,
                page_size=PAGE,
                page_token=token,
                environments=who.environments,
            )
            rows, token = [views.connection_row(c) for c in page.connections], page.next_page_token
        filters = {"environment": environment, "integration": integration, "state": state_text, "q": search}
        return self.render(
            request,
            "connections.html",
            rows=rows,
            filters=filters,
            states=views.STATES,
            next_href=f"/connections?{_query(**filters, page=token)}" if token else "",
            searched=searched,
        )

    async def _search(
        self,
        who: Principal,
        environment: str,
        integration: str,
        state: ConnectionState | None,
        search: str,
        token: str,
    ) -> tuple[list[views.ConnectionRow], str, int]:
        """Connections whose id holds ``search`` (any case), looking through :data:`SEARCH_SCAN` at most."""
        wanted = search.casefold()
        rows: list[views.ConnectionRow] = []
        searched = 0
        while searched < SEARCH_SCAN and len(rows) < PAGE:
            page = await self._service.list_connections(
                environment=environment,
                integration=integration,
                state=state,
                page_size=1000,
                page_token=token,
                environments=who.environments,
            )
            searched += len(page.connections)
            rows += [views.connection_row(c) for c in page.connections if wanted in c.ref.connection_id.casefold()]
            token = page.next_page_token
            if not token:
                break
        return rows, token, searched

    async def timeline(self, request: web.Request) -> web.Response:
        """``/connections/{environment}/{integration}/{connection_id}``: every record, folded; ``?until=``."""
        who = self.caller(request)
        info = request.match_info
        ref = ConnectionRef.parse(info["environment"], info["integration"], info["connection_id"])
        who.require(ref.environment)
        until = views.parse_until(request.query.get("until", ""))
        current = await self._service.get_connection(ref)
        timeline = views.Timeline(ref, until, self._trace_url)
        async with aclosing(_generator(self._service.read_events(ref=ref))) as records:
            async for record in records:
                if not timeline.add(record):
                    break
        jobs: list[views.JobRow] = []
        if until is None:
            page = await self._service.list_jobs(ref=ref, page_size=PAGE)
            jobs = [views.job_row(job) for job in page.jobs]
        connection = timeline.connection
        live = ""
        if until is None:
            live = f"/events/stream?{_query(connection=ref.stream, after=timeline.last_position)}"
        return self.render(
            request,
            "timeline.html",
            ref=ref,
            timeline=timeline,
            connection=connection,
            current=current,
            created=views.when(connection.created_at) if connection is not None else "",
            updated=views.when(connection.updated_at) if connection is not None else "",
            metadata=codec.dumps(connection.metadata) if connection is not None else "{}",
            config=codec.dumps(connection.config) if connection is not None else "{}",
            outcomes=views.outcome_rows(connection.outcomes) if connection is not None else [],
            jobs=jobs,
            until=until,
            live=live,
            self_href=views.connection_href(ref),
        )

    # -- jobs ---------------------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.Response:
        """``/jobs``: by status (and environment, or one connection), with their buttons."""
        who = self.caller(request)
        query = request.query
        statuses: set[JobStatus] = set()
        for value in query.getall("status", []):
            if not value:
                continue
            try:
                statuses.add(JobStatus(value))
            except ValueError:
                raise InvalidArgument(f"status {value!r} is not one of {', '.join(views.JOB_STATUSES)}") from None
        environment = _name(query, "environment")
        stream = query.get("connection", "")
        ref = ConnectionRef.from_stream(stream) if stream else None
        scope = who.environments
        if ref is not None:
            who.require(ref.environment)
        if environment:
            who.require(environment)
            scope = frozenset({environment})
        page = await self._service.list_jobs(
            ref=ref,
            statuses=frozenset(statuses),
            page_size=PAGE,
            page_token=query.get("page", ""),
            environments=scope,
        )
        chosen = sorted(s.value for s in statuses)
        filters: dict[str, Any] = {"status": chosen, "environment": environment, "connection": stream}
        return self.render(
            request,
            "jobs.html",
            rows=[views.job_row(job) for job in page.jobs],
            statuses=views.JOB_STATUSES,
            chosen=chosen,
            filters=filters,
            next_href=f"/jobs?{_query(**filters, page=page.next_page_token)}" if page.next_page_token else "",
        )

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """POST ``/jobs/{id}/retry``: ``Service.retry_job`` for the caller (its scope checked there)."""
        who = self.caller(request)
        form = await request.post()
        await self._service.retry_job(request.match_info["job_id"], by=who.name, check=who.require)
        return see_other(safe_next(_text(form, "next")))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """POST ``/jobs/{id}/cancel``: ``Service.cancel_job`` for the caller, with the form's reason."""
        who = self.caller(request)
        form = await request.post()
        reason = _text(form, "reason").strip()
        await self._service.cancel_job(request.match_info["job_id"], reason=reason, by=who.name, check=who.require)
        return see_other(safe_next(_text(form, "next")))

    # -- the live tail ------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.Response:
        """``/events``: the last records in the caller's scope, then the live tail (server-sent events)."""
        who = self.caller(request)
        head = await self._service.head()
        recent = await self._recent(who, None, 100)
        return self.render(
            request,
            "events.html",
            rows=recent,
            live=f"/events/stream?{_query(after=head)}",
            window=RECENT,
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``/events/stream``: records after ``?after=`` (or the ``Last-Event-ID`` a reconnecting browser sends).

        Each record is one event whose id is its position, so a browser that reconnects
        resumes after the last one it received and misses nothing. Records of environments
        outside the caller's scope are left out. Ends when the daemon drains.
        """
        who = self.caller(request)
        stream = request.query.get("connection", "")
        ref = ConnectionRef.from_stream(stream) if stream else None
        if ref is not None:
            who.require(ref.environment)
        after = _position(request.headers.get("Last-Event-ID") or request.query.get("after") or "")
        if after is None:
            after = await self._service.head()
        records = _generator(self._service.read_events(from_position=after + 1, ref=ref, follow=True))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold the events back
            }
        )
        await response.prepare(request)
        await response.write(f"retry: {self._retry_ms}\n\n".encode())
        async with aclosing(records), anyio.create_task_group() as tg:

            async def beat() -> None:
                try:
                    while True:
                        await anyio.sleep(HEARTBEAT)
                        await response.write(b": keep-alive\n\n")
                except ConnectionResetError:  # the browser went away while the log was quiet
                    tg.cancel_scope.cancel()

            tg.start_soon(beat)
            try:
                await _pump(records, who, response)
            except Unavailable:
                pass  # the daemon drains: the browser reconnects (to it, or to the next one)
            except ConnectionResetError:
                pass  # the browser went away
            tg.cancel_scope.cancel()
        return response

    # -- functions ------------------------------------------------------------------------

    async def functions(self, request: web.Request) -> web.Response:
        """``/functions``: the installed functions and how their attempts went over the last records."""
        who = self.caller(request)
        stats = await self._cache.get(("functions", who.environments), FUNCTIONS_CACHED, lambda: self._stats(who))
        return self.render(
            request,
            "functions.html",
            rows=stats.rows(self._registry.functions),
            broken=[str(b) for b in self._registry.broken],
            stats=stats,
        )

    async def _stats(self, who: Principal) -> views.FunctionStats:
        stats = views.FunctionStats()
        head = await self._service.head()
        start = max(1, head - FUNCTION_WINDOW + 1)
        async with aclosing(_generator(self._service.read_events(from_position=start))) as records:
            async for record in records:
                if record.position > head:
                    break
                if who.allows(_environment(record.stream)):
                    stats.add(record)
        return stats

    # -- access -------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        """``/login``: the token form (only when the daemon has a token file)."""
        if not self._sessions.required:
            return see_other("/")
        return self.render(request, "login.html", next=safe_next(request.query.get("next")), failed=False)

    async def login(self, request: web.Request) -> web.StreamResponse:
        """POST ``/login``: a token the daemon knows starts a session under a new id."""
        if not self._sessions.required:
            return see_other("/")
        form = await request.post()
        target = safe_next(_text(form, "next"))
        started = self._sessions.login(_text(form, "token").strip())
        if started is None:
            # Neither the token nor anything of it is logged.
            self._throttle.log(
                logging.WARNING, "console login", "a console login from %s failed: unknown token", request.remote
            )
            request[CALLER] = None
            return self.render(request, "login.html", status=401, next=target, failed=True)
        sid, principal = started
        log.info("console login by %s from %s", principal.name, request.remote)
        response = see_other(target)
        response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", secure=self._secure, path="/")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """POST ``/logout``: the session ends, the browser gets a fresh id."""
        self._sessions.logout(request[SID])
        response = see_other("/login" if self._sessions.required else "/")
        response.set_cookie(
            COOKIE, self._sessions.new_id(), httponly=True, samesite="Strict", secure=self._secure, path="/"
        )
        return response

    async def asset(self, request: web.Request) -> web.Response:
        """``/static/{name}``: the console's own script and style sheet (nothing from a CDN)."""
        name = request.match_info["name"]
        body = self._static.get(name)
        if body is None:
            return self.error(request, 404, f"no file {name} here")
        kind = {"css": "text/css", "js": "text/javascript", "svg": "image/svg+xml"}[name.rpartition(".")[2]]
        return web.Response(
            body=body,
            content_type=kind,
            charset="utf-8",
            headers={"Cache-Control": "public, max-age=86400", "ETag": f'"{self._etags[name]}"'},
        )


async def _pump(records: AsyncIterator[Record], who: Principal, response: web.StreamResponse) -> None:
    """Write each record of the caller's scope as one server-sent event (its id: its position)."""
    everything = who is ANYONE or who.environments is None
    async for record in records:
        if not everything and not who.allows(_environment(record.stream)):
            continue
        data = json.dumps(views.tail_item(record), separators=(",", ":"), ensure_ascii=False)
        await response.write(f"id: {record.position}\nevent: record\ndata: {data}\n\n".encode())


def _generator(records: AsyncIterator[Record]) -> AsyncGenerator[Record, None]:
    """``Service.read_events`` is an async generator: closed by ``aclosing`` where a page stops reading early."""
    return cast(AsyncGenerator[Record, None], records)


def _environment(stream: str) -> str:
    return stream.partition("/")[0]


def _name(query: Any, key: str) -> str:
    value = str(query.get(key, "")).strip()
    return check_name(key, value) if value else ""


def _text(form: MultiDictProxy[Any], key: str) -> str:
    value = form.get(key, "")
    return value if isinstance(value, str) else ""


def _position(value: str) -> int | None:
    """A position a browser sent (``after``, ``Last-Event-ID``); None when absent; InvalidArgument when bad."""
    value = value.strip()
    if not value:
        return None
    if not value.isdigit() or int(value) > views.MAX_POSITION:
        raise InvalidArgument(f"{value[:32]!r} is not a position of the log")
    return int(value)


def _query(**values: Any) -> str:
    """A query string of the non-empty ``values`` (lists repeat their key)."""
    return urlencode(
        [(k, v) for k, vs in values.items() for v in (vs if isinstance(vs, list) else [vs]) if v not in ("", None)]
    )
