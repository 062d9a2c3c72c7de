"""The web console in a real browser (headless Chromium): what an operator does when "the webhook never arrived".

A real daemon runs in process on 127.0.0.1:0 with a web console; events are
emitted through gRPC, as a platform service emits them; the browser clicks
through the pages as a person would, JavaScript on. Each test saves the pages
it shows when ``CONSOLE_SCREENSHOTS`` is set (see conftest.py): the README's
screenshots are these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import expect

from orchestrator import Context, Rejected
from orchestrator.config import DispatchConfig
from orchestrator.plugins import Registry
from tests.browser.conftest import screenshot
from tests.support import grpc as rpc
from tests.support.daemon import FAST_RETRY, Daemon, function, run_daemon
from tests.support.grpc import CREATE, DELETE, VALIDATE, WAIT

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
BROKEN = {"hubspot": True}
"""Whether the hubspot function fails (a test fixes the provider, then retries the job that gave up)."""


def _lookup(scopes: dict[str, str], name: str) -> str:
    return scopes[name]  # the KeyError a failed validation shows in its traceback


async def check_token_scopes(ctx: Context) -> None:
    """Rejects a connection whose token lacks a scope (its id says so)."""
    if ctx.connection.connection_id.startswith("narrow"):
        _lookup({"repo": "granted"}, "read:org")
    if ctx.connection.connection_id.startswith("denied"):
        raise Rejected("the token lacks the scope read:org; reconnect and grant it")


async def register_webhook(ctx: Context) -> None:
    """Records the webhook it "registered" in the metadata."""
    await ctx.update_metadata({"webhook_id": f"wh_{ctx.connection.connection_id}", "events": ["contact.updated"]})


async def delete_webhook(ctx: Context) -> None:
    """Forgets the webhook."""
    await ctx.update_metadata({"webhook_id": None})


async def snapshot_properties(ctx: Context) -> None:
    """Fails while the provider is "down", then records what it read."""
    if BROKEN["hubspot"]:
        raise ConnectionError("portal 4711 answered 503 Service Unavailable")
    await ctx.set_metadata({"properties": ["email", "lifecycle_stage"]})


REGISTRY = Registry.of(
    [
        function("check-token-scopes", "validate-connection", check_token_scopes, integration="github"),
        function("register-webhook", "post-connection-creation", register_webhook, integration="salesforce"),
        function("delete-webhook", "pre-connection-deletion", delete_webhook, integration="salesforce"),
        function("snapshot-properties", "post-connection-creation", snapshot_properties, integration="hubspot"),
    ]
)


@asynccontextmanager
async def console(database: str, web_listen: str = "127.0.0.1:0", **settings: Any) -> AsyncIterator[Daemon]:
    """A daemon with a web console running the functions above (three attempts, milliseconds apart)."""
    async with run_daemon(
        database,
        registry=REGISTRY,
        dispatch=DispatchConfig(retry=FAST_RETRY),
        web_listen=web_listen,
        trace_url="http://localhost:16686/trace/{trace_id}",
        **settings,
    ) as daemon:
        yield daemon


async def emit(daemon: Daemon, event: int, connection_id: str, integration: str, environment: str = "dev") -> Any:
    """One emit through gRPC, waiting for its functions."""
    request = rpc.emit_request(event, rpc.ref(connection_id, integration, environment), wait=True)
    request.connection_config.update({"instance_url": f"{connection_id}.example.com"})
    request.credentials["access_token"] = "tok-" + connection_id
    caller = (("traceparent", f"00-{TRACE_ID}-{'1' * 16}-01"),)  # the platform's trace, which records join
    return await daemon.stub.EmitLifecycleEvent(request, metadata=caller, timeout=WAIT)


async def seeded(daemon: Daemon) -> None:
    """A few connections of every kind: active with metadata, rejected, deleted, one whose job gave up."""
    await emit(daemon, CREATE, "acme-1", "salesforce")
    await emit(daemon, CREATE, "globex-1", "salesforce", "prod")
    await emit(daemon, DELETE, "globex-1", "salesforce", "prod")
    await emit(daemon, VALIDATE, "narrow-octo", "github")
    await emit(daemon, VALIDATE, "denied-octo", "github")
    await emit(daemon, VALIDATE, "octo", "github")
    await emit(daemon, CREATE, "initech", "hubspot")


@pytest.fixture(autouse=True)
def provider_down() -> None:
    """Each test starts with the hubspot provider failing."""
    BROKEN["hubspot"] = True


async def test_overview_to_a_timeline_its_traceback_and_time_travel(tmp_path: Path, page: Any) -> None:
    """The overview counts; a connection's timeline shows each record's state, a failure's traceback, ?until=."""
    async with console(f"sqlite://{tmp_path}/events.db") as daemon:
        await seeded(daemon)
        await page.goto(daemon.web)
        await expect(page.locator("h1")).to_have_text("Overview")
        await expect(page.locator("table.counts").first).to_contain_text("prod")
        await expect(page.locator("table.tail")).to_contain_text("KeyError")
        await screenshot(page, "overview")

        await page.get_by_role("link", name="Connections", exact=True).click()
        await expect(page.locator("table.connections tbody tr")).to_have_count(6)
        await page.select_option("select[name=state]", "rejected")
        await page.get_by_role("button", name="Show").click()
        await expect(page.locator("table.connections tbody tr")).to_have_count(2)
        await page.select_option("select[name=state]", "")
        await page.get_by_role("button", name="Show").click()
        await screenshot(page, "connections")

        await page.get_by_role("link", name="narrow-octo").click()
        await expect(page.locator("h1")).to_contain_text("narrow-octo")
        await expect(page.locator("h1 .state")).to_have_text("rejected")
        failed = page.locator("table.timeline tr", has_text="function-failed")
        await expect(failed).to_contain_text("KeyError")
        await failed.locator("summary", has_text="Traceback").click()
        traceback = failed.locator("details.traceback pre")
        await expect(traceback).to_be_visible()
        await expect(traceback).to_contain_text("in _lookup")
        await expect(traceback).to_contain_text("KeyError: 'read:org'")
        trace_link = failed.locator("a", has_text="trace")
        await expect(trace_link).to_have_attribute("href", f"http://localhost:16686/trace/{TRACE_ID}")
        await screenshot(page, "timeline-failure")

        await page.goto(daemon.web + "connections/dev/salesforce/acme-1")
        rows = page.locator("table.timeline tbody tr")
        await expect(rows.filter(has_text="metadata-updated")).to_contain_text("+ webhook_id")
        await expect(page.locator("[data-metadata]")).to_contain_text("wh_acme-1")
        first = await rows.first.get_attribute("data-position")
        await page.fill("input[name=until]", first or "")
        await page.locator("form.timetravel button").click()
        await expect(page.locator(".notice")).to_contain_text(f"after position {first}")
        await expect(rows).to_have_count(1)
        await expect(page.locator("[data-metadata]")).to_have_text("{}")
        await screenshot(page, "timeline-time-travel")
        await page.get_by_role("link", name="Back to now").click()
        await expect(page.locator("[data-metadata]")).to_contain_text("wh_acme-1")
        await screenshot(page, "timeline")

        await page.get_by_role("link", name="Functions").click()
        row = page.locator("table.functions tr", has_text="check-token-scopes")
        await expect(row).to_contain_text("test-plugin 1.0")
        await screenshot(page, "functions")


async def test_retry_a_job_that_gave_up_and_watch_its_outcome_appear(tmp_path: Path, page: Any) -> None:
    """Retry on the jobs page re-queues the job; once the provider is back its row turns succeeded by itself."""
    async with console(f"sqlite://{tmp_path}/events.db") as daemon:
        await seeded(daemon)
        await page.goto(daemon.web + "jobs")
        row = page.locator("table.jobs tbody tr", has_text="snapshot-properties")
        await expect(row.locator(".status")).to_have_text("gave-up")
        await expect(row).to_contain_text("503 Service Unavailable")
        await screenshot(page, "jobs")
        BROKEN["hubspot"] = False
        await row.get_by_role("button", name="Retry").click()
        await expect(page).to_have_url(daemon.web + "jobs")
        await expect(row.locator(".status")).to_have_text("succeeded", timeout=WAIT * 1000)
        await page.goto(daemon.web + "connections/dev/hubspot/initech")
        await expect(page.locator("table.timeline")).to_contain_text("function-retried")
        await expect(page.locator("table.timeline")).to_contain_text("function-succeeded")


async def test_the_live_tail_receives_an_event_emitted_after_the_page_opened(tmp_path: Path, page: Any) -> None:
    """The events page shows the last records, then each new one as it is committed (no reload)."""
    async with console(f"sqlite://{tmp_path}/events.db") as daemon:
        await seeded(daemon)
        await page.goto(daemon.web + "events")
        await expect(page.locator("[data-live-status]")).to_have_text("live")
        response = await emit(daemon, CREATE, "late-1", "salesforce")
        await expect(page.locator(f'tr[data-position="{response.position}"]')).to_contain_text("dev/salesforce/late-1")
        await screenshot(page, "live-tail")


async def test_reload_after_a_dropped_stream_misses_nothing(tmp_path: Path, page: Any) -> None:
    """The daemon restarts under an open live tail: the browser reconnects with Last-Event-ID and catches up;
    a reload then shows every record once."""
    database = f"sqlite://{tmp_path}/events.db"
    async with console(database) as first:
        await emit(first, CREATE, "before-1", "salesforce")
        await page.goto(first.web + "events")
        await expect(page.locator("[data-live-status]")).to_have_text("live")
        web = first.web
    await expect(page.locator("[data-live-status]")).to_have_text("reconnecting…")
    port = web.rstrip("/").rpartition(":")[2]
    async with console(database, web_listen=f"127.0.0.1:{port}") as second:
        # Emitted before the browser's retry (2 s) reconnects: only Last-Event-ID brings them.
        await emit(second, CREATE, "while-away", "salesforce")
        head = (await rpc.records(second.stub))[-1].position
        await expect(page.locator(f'tr[data-position="{head}"]')).to_be_visible(timeout=WAIT * 1000)
        shown = await positions(page)
        assert shown == list(range(head, 0, -1)), shown
        await page.reload()
        await expect(page.locator("[data-live-status]")).to_have_text("live")
        assert await positions(page) == list(range(head, 0, -1))


async def positions(page: Any) -> list[int]:
    """The positions of the live tail's rows, top to bottom."""
    with anyio.fail_after(WAIT):
        values = await page.locator("tbody[data-tail] tr").evaluate_all("rows => rows.map(r => r.dataset.position)")
    return [int(v) for v in values]
