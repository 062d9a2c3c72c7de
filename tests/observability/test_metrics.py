"""The Prometheus endpoint of ``serve --metrics-listen``: every metric of docs/operations.md, by its labels."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from tests.support.grpc import CREATE, DELETE, VALIDATE, as_dict, emit, follow_until
from tests.support.process import serve
from tests.support.provider import ProviderServer, Reply, write_config

from . import _proc

pytestmark = pytest.mark.anyio

TOKEN = {"access_token": "tok-abcdef"}
RETRY_CEILING = "1e9"
"""Seconds (~32 years) the first retry's full jitter spans, cap included: sf-busy's retry is due within the
test's few seconds with a probability of about 1e-8, and the test checks that it was not (from its record)."""
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """GitHub's /user granting only ``repo``; salesforce instance ``ok`` takes webhooks, ``busy`` is down for long."""
    with ProviderServer() as server:
        server.route("GET", "/user", Reply(200, {"login": "acme"}, headers={"X-OAuth-Scopes": "repo"}))
        server.route("POST", "/ok/webhooks", Reply(201, {"id": "wh_1"}))
        # Longer than the proxy waits for: the attempt fails at once, retryably.
        server.route("POST", "/busy/webhooks", Reply(503, {"error": "down"}, headers={"Retry-After": "120"}))
        yield server


def samples(text: str) -> Samples:
    """Sample (name, labels without the otel_scope ones) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope_"))
            out[(sample.name, labels)] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    """The one sample ``name`` with exactly ``labels``."""
    key = (name, frozenset(labels.items()))
    assert key in found, f"no {name}{labels}; have {sorted(n for n, _ in found if n.startswith('orchestrator'))}"
    return found[key]


def labelled(found: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called ``name``."""
    return [dict(labels) for n, labels in found if n == name]


async def test_prometheus_text_has_emits_appends_attempts_jobs_and_connections(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """Counters and histograms count this daemon's work; gauges (read at start) show the log's jobs and states."""
    database = tmp_path / "events.db"
    config = write_config(tmp_path / "o.toml", provider.url)
    retry = ("--retry-initial-interval", RETRY_CEILING, "--retry-max-interval", RETRY_CEILING)
    args = ("--config", str(config), "--metrics-listen", "127.0.0.1:0", *retry)
    async with serve(database, *args) as daemon:
        address = daemon.address
        gh1 = await emit(address, VALIDATE, "gh-1", "github", credentials=TOKEN)
        gh2 = await emit(
            address,
            VALIDATE,
            "gh-2",
            "github",
            connection_config={"required_scopes": ["repo"]},
            credentials=TOKEN,
        )
        ok = await emit(
            address,
            CREATE,
            "sf-ok",
            "salesforce",
            connection_config={"instance": "ok"},
            credentials=TOKEN,
            wait=True,
        )
        await emit(address, CREATE, "sf-busy", "salesforce", connection_config={"instance": "busy"}, credentials=TOKEN)
        # sf-busy's own failure (gh-1's rejection is a function-failed record too).
        *_, busy = await follow_until(address, lambda r: r.type == "function-failed" and r.stream.endswith("/sf-busy"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await emit(address, DELETE, "nobody", "salesforce")
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        text = await _proc.scrape(_proc.metrics_url(daemon))
        assert await daemon.stop() == 0, str(daemon)
    assert (gh1.state, gh2.state) == (pb.CONNECTION_STATE_REJECTED, pb.CONNECTION_STATE_PENDING)
    assert [o.status for o in ok.outcomes] == [pb.FUNCTION_STATUS_SUCCEEDED]

    found = samples(text)
    emits = "orchestrator_emits_total"
    assert value(found, emits, event="validate-connection", outcome="ok") == 2
    assert value(found, emits, event="post-connection-creation", outcome="ok") == 2
    assert value(found, emits, event="pre-connection-deletion", outcome="NotFound") == 1

    appends = "orchestrator_append_duration_milliseconds"
    assert value(found, f"{appends}_count") == 4, "a refused emit appends nothing"
    assert value(found, f"{appends}_bucket", le="+Inf") == 4
    assert value(found, f"{appends}_sum") > 0

    attempts = "orchestrator_function_attempts_total"
    assert value(found, attempts, function="check-token-scopes", outcome="rejected") == 1
    assert value(found, attempts, function="check-token-scopes", outcome="succeeded") == 1
    assert value(found, attempts, function="register-webhook", outcome="succeeded") == 1
    assert value(found, attempts, function="register-webhook", outcome="failed") == 1
    durations = "orchestrator_function_duration_milliseconds"
    assert value(found, f"{durations}_count", function="register-webhook", outcome="failed") == 1
    assert value(found, f"{durations}_bucket", function="register-webhook", outcome="failed", le="+Inf") == 1

    # Gauges are read from the store at start (and every 10 s): this daemon started on an empty log.
    assert value(found, "orchestrator_jobs_queued") == 0
    assert value(found, "orchestrator_jobs_oldest_age_seconds") == 0

    async with serve(database, *args) as again:
        text = await _proc.scrape(_proc.metrics_url(again))
        scraped = datetime.now(UTC)
        assert await again.stop() == 0, str(again)
    retry_in = timedelta(milliseconds=as_dict(busy.data)["retry_in_ms"])
    assert busy.recorded_at.ToDatetime(UTC) + retry_in > scraped, f"sf-busy's retry came due {retry_in} after it failed"
    found = samples(text)
    connections = "orchestrator_connections"
    assert sorted(labelled(found, connections), key=str) == [
        {"state": "active"},
        {"state": "pending"},
        {"state": "rejected"},
    ]
    assert value(found, connections, state="active") == 2
    assert value(found, connections, state="pending") == 1
    assert value(found, connections, state="rejected") == 1
    assert value(found, "orchestrator_jobs_queued") == 1, "sf-busy's retry waits in the outbox"
    assert value(found, "orchestrator_jobs_oldest_age_seconds") == 0, "its retry is not due yet"
    assert labelled(found, emits) == [], "counters start again with the process"
