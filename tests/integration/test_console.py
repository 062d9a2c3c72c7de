"""The web console of a real daemon in process, read over HTTP as a browser would (httpx, no JavaScript).

What a person does in a real browser (clicking through, the live tail's
reconnection) is in tests/browser; here are the rules every page keeps: a
token's environment scope on every page, the session cookie, CSRF on every
form, the live tail's resumption by ``Last-Event-ID``, and the drain.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from orchestrator import Context, NonRetryable
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.config import DispatchConfig
from orchestrator.plugins import Registry
from tests.support import grpc as rpc
from tests.support.daemon import FAST_RETRY, Daemon, function, run_daemon
from tests.support.grpc import CREATE, WAIT

pytestmark = pytest.mark.anyio

ADMIN = "admin-token-0123456789abcdef"
DEV = "dev-token-0123456789abcdefgh"
PROD_ID = "prod-secret-connection"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def give_up(ctx: Context) -> None:
    """A setup function that never succeeds: its job gives up at once."""
    raise NonRetryable("the provider refused the webhook")


REGISTRY = Registry.of([function("register-webhook", "post-connection-creation", give_up)])


@asynccontextmanager
async def console(database: str, **settings: Any) -> AsyncIterator[Daemon]:
    """A daemon with a web console on 127.0.0.1:0 whose creation function gives up."""
    async with run_daemon(
        database,
        registry=REGISTRY,
        dispatch=DispatchConfig(retry=FAST_RETRY),
        web_listen="127.0.0.1:0",
        **settings,
    ) as daemon:
        assert daemon.web.startswith("http://127.0.0.1:")
        yield daemon


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """One token for every environment, one for dev only."""
    path = tmp_path / "tokens"
    path.write_text(f"{ADMIN}\n{DEV} dev\n")
    path.chmod(0o600)
    return path


async def created(daemon: Daemon, connection_id: str, environment: str = "dev", token: str = "") -> int:
    """Create a connection through gRPC, wait until its job gave up; the position of its creation."""
    response = await daemon.stub.EmitLifecycleEvent(
        rpc.emit_request(CREATE, rpc.ref(connection_id, environment=environment), wait=True),
        metadata=bearer(token) if token else None,
        timeout=WAIT,
    )
    assert response.outcomes[0].status == pb.FUNCTION_STATUS_GAVE_UP
    return int(response.position)


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert found is not None, page
    return found[1]


async def logged_in(client: httpx.AsyncClient, token: str) -> None:
    """Log in through the form, as a person does."""
    form = await client.get("/login")
    answer = await client.post("/login", data={"token": token, "csrf": csrf(form.text), "next": "/"})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/"


async def sse(client: httpx.AsyncClient, url: str, count: int, **headers: str) -> list[tuple[int, dict[str, Any]]]:
    """The first ``count`` records the live tail at ``url`` sends: (id, data) each."""
    found: list[tuple[int, dict[str, Any]]] = []
    with anyio.fail_after(WAIT):
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            event: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line:
                    key, _, value = line.partition(": ")
                    event[key] = value
                    continue
                if "data" in event:
                    found.append((int(event["id"]), json.loads(event["data"])))
                    if len(found) == count:
                        return found
                event = {}
    raise AssertionError(f"the stream ended after {found}")


async def test_a_dev_token_sees_no_prod_connection_job_or_event_on_any_page(database: str, token_file: Path) -> None:
    """Every page, the live tail and the functions' figures leave prod out for a dev-scoped token; named, it is 403."""
    async with console(database, auth_token_file=token_file) as daemon:
        await created(daemon, "dev-visible", token=ADMIN)
        await created(daemon, PROD_ID, "prod", token=ADMIN)
        head = await created(daemon, "dev-later", token=ADMIN)
        async with httpx.AsyncClient(base_url=daemon.web) as admin:
            await logged_in(admin, ADMIN)
            assert PROD_ID in (await admin.get("/connections")).text, "the admin sees prod (the test can fail)"
            assert PROD_ID in (await admin.get("/jobs")).text
        async with httpx.AsyncClient(base_url=daemon.web) as client:
            await logged_in(client, DEV)
            pages = ["/", "/connections", "/connections?q=secret", "/jobs", "/jobs?status=gave-up", "/events"]
            pages += ["/functions", "/connections/dev/acme/dev-visible"]
            for path in pages:
                page = await client.get(path)
                assert page.status_code == 200, (path, page.text)
                assert "dev-visible" in page.text or path in ("/functions", "/connections?q=secret"), path
                assert PROD_ID not in page.text and "prod/" not in page.text and ">prod<" not in page.text, path
            for path in [
                f"/connections/prod/acme/{PROD_ID}",
                "/connections?environment=prod",
                "/jobs?environment=prod",
            ]:
                page = await client.get(path)
                assert page.status_code == 403, path
                assert PROD_ID not in page.text
            tail = await sse(client, "/events/stream?after=0", 2 * 3)  # the two dev connections' three records each
            assert {data["stream"].split("/")[0] for _, data in tail} == {"dev"}
            assert [i for i, _ in tail] == sorted(i for i, _ in tail) and tail[-1][0] >= head
            refused = await client.get(f"/events/stream?connection=prod/acme/{PROD_ID}")
            assert refused.status_code == 403


async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(database: str) -> None:
    """Retry without the form's token, with another session's, or from another origin: 403, the job as it was."""
    async with console(database) as daemon, httpx.AsyncClient(base_url=daemon.web) as client:
        await created(daemon, "acme-1")
        page = await client.get("/jobs?status=gave-up")
        job_id = re.search(r'action="/jobs/([0-9a-f-]{36})/retry"', page.text)
        assert job_id is not None, page.text
        url = f"/jobs/{job_id[1]}/retry"
        token = csrf(page.text)
        before = await rpc.records(daemon.stub)
        attempts = [
            await client.post(url, data={"next": "/jobs"}),
            await client.post(url, data={"csrf": "0" * 64}),
            await client.post(url, data={"csrf": token}, headers={"Origin": "http://evil.example"}),
        ]
        async with httpx.AsyncClient(base_url=daemon.web) as another_browser:
            attempts.append(await another_browser.post(url, data={"csrf": token}))
        assert [a.status_code for a in attempts] == [403] * 4
        assert "CSRF" in attempts[0].text
        assert await rpc.records(daemon.stub) == before
        assert "gave-up" in (await client.get("/jobs")).text
        done = await client.post(url, data={"csrf": token, "next": "/jobs?status=queued"})
        assert done.status_code == 303 and done.headers["location"] == "/jobs?status=queued"
        after = await rpc.records(daemon.stub)
        assert "function-retried" in [r.type for r in after[len(before) :]]


async def test_the_session_cookie_is_http_only_strict_and_logout_ends_it(database: str, token_file: Path) -> None:
    """The cookie is HttpOnly and SameSite=Strict; a wrong token is 401; logging out ends the session."""
    async with console(database, auth_token_file=token_file) as daemon:
        async with httpx.AsyncClient(base_url=daemon.web) as client:
            first = await client.get("/")
            assert first.status_code == 303 and first.headers["location"].startswith("/login?next=")
            cookie = first.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
            assert "Secure" not in cookie  # no TLS here
            form = await client.get("/login")
            wrong = await client.post("/login", data={"token": "x" * 30, "csrf": csrf(form.text)})
            assert wrong.status_code == 401 and "not one the daemon knows" in wrong.text
            before = client.cookies["orchestrator_session"]
            await logged_in(client, ADMIN)
            session = client.cookies["orchestrator_session"]
            assert session != before, "a login starts a session under a new id"
            overview = await client.get("/")
            assert overview.status_code == 200 and "token:" in overview.text
            out = await client.post("/logout", data={"csrf": csrf(overview.text)})
            assert out.status_code == 303 and out.headers["location"] == "/login"
        async with httpx.AsyncClient(base_url=daemon.web, cookies={"orchestrator_session": session}) as replay:
            assert (await replay.get("/")).status_code == 303, "the old session id is worth nothing"
            assert (await replay.get("/events/stream")).status_code == 401
        async with httpx.AsyncClient(base_url=daemon.web) as script:
            assert (await script.get("/", headers={"Authorization": f"Bearer {DEV}"})).status_code == 200
            assert (await script.get("/", headers={"Authorization": "Bearer nope-nope-nope-nope"})).status_code == 401


async def test_the_live_tail_resumes_after_the_last_event_id(database: str) -> None:
    """A reconnecting browser's Last-Event-ID wins over ?after=: the stream goes on at the next position."""
    async with console(database) as daemon, httpx.AsyncClient(base_url=daemon.web) as client:
        await created(daemon, "acme-1")
        await created(daemon, "acme-2")
        everything = await sse(client, "/events/stream?after=0", 6)
        assert [i for i, _ in everything] == [1, 2, 3, 4, 5, 6]
        resumed = await sse(client, "/events/stream?after=0", 2, **{"Last-Event-ID": "4"})
        assert [i for i, _ in resumed] == [5, 6]
        assert resumed[0][1]["stream"] == "dev/acme/acme-2" and resumed[0][1]["href"] == "/connections/dev/acme/acme-2"
        one = await sse(client, "/events/stream?after=0&connection=dev/acme/acme-1", 3)
        assert {data["stream"] for _, data in one} == {"dev/acme/acme-1"}
        assert (await client.get("/events/stream?after=x")).status_code == 400


async def test_a_live_tail_ends_when_the_daemon_drains(database: str) -> None:
    """SIGTERM (here: stop) ends an open live tail at once, so the drain does not wait for browsers."""
    async with console(database) as daemon, httpx.AsyncClient(base_url=daemon.web) as client:
        with anyio.fail_after(WAIT):
            async with client.stream("GET", "/events/stream") as response:
                lines = response.aiter_lines()
                assert await anext(lines) == "retry: 2000"
                daemon.stop.set()
                rest = [line async for line in lines]
        assert rest == [""]


async def test_the_timeline_folds_the_records_and_travels_in_time(database: str) -> None:
    """Each record with the state after it; ?until= a position shows the connection as it was; a bad one is 400."""
    async with console(database) as daemon, httpx.AsyncClient(base_url=daemon.web) as client:
        await created(daemon, "acme/with slash")
        url = "/connections/dev/acme/acme%2Fwith%20slash"
        now = await client.get(url)
        assert now.status_code == 200, now.text
        assert re.findall(r'<tr data-position="(\d+)"', now.text) == ["1", "2", "3"]
        assert "NonRetryable" in now.text and "the provider refused the webhook" in now.text
        assert "Traceback" in now.text and "in give_up" in now.text
        then = await client.get(url, params={"until": "1"})
        assert re.findall(r'<tr data-position="(\d+)"', then.text) == ["1"]
        assert "Time travel" in then.text and "data-live" not in then.text
        by_time = await client.get(url, params={"until": "2000-01-01T00:00:00Z"})
        assert "had no record yet" in by_time.text
        bad = await client.get(url, params={"until": "yesterday"})
        assert bad.status_code == 400 and "neither a position nor an ISO-8601 time" in bad.text
        assert (await client.get("/connections/dev/acme/nobody")).status_code == 404
        assert (await client.get("/connections/DEV/acme/x")).status_code == 400


async def test_a_loopback_console_answers_to_loopback_names_only(database: str) -> None:
    """A page of another site resolving to 127.0.0.1 (DNS rebinding) gets 421, not the console."""
    async with console(database) as daemon, httpx.AsyncClient(base_url=daemon.web) as client:
        assert (await client.get("/", headers={"Host": "evil.example"})).status_code == 421
        assert (await client.get("/", headers={"Host": "localhost"})).status_code == 200


async def test_the_pages_carry_no_inline_script_and_forbid_framing(database: str) -> None:
    """Every page says its security headers; scripts and styles are the console's own files, served from it."""
    async with console(database) as daemon, httpx.AsyncClient(base_url=daemon.web) as client:
        page = await client.get("/events")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text and "http://" not in page.text.replace(daemon.web, "")
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert (await client.get(asset)).status_code == 200, asset
