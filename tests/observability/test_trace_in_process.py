"""One emit is one trace: the RPC, the append, every function attempt and every provider call, in-process.

The daemon runs in this process with the session's in-memory span exporter;
the caller's ``traceparent`` goes in the gRPC metadata, as a platform service
with OpenTelemetry's gRPC instrumentation would send it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from orchestrator import Context
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.config import Integration
from tests.support.daemon import function, serving
from tests.support.grpc import CREATE, DELETE, RPC_EMIT, VALIDATE, emit, follow_until, records, ref
from tests.support.provider import ProviderServer, Reply

from ._inproc import Spans, named, new_traceparent, parent_id, span_id, spans_of, wait_for_spans

pytestmark = pytest.mark.anyio


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """The acme provider on 127.0.0.1:0."""
    with ProviderServer() as server:
        yield server


def acme(provider: ProviderServer) -> dict[str, Integration]:
    """Integration acme at ``provider``; the proxy does not retry itself, so each attempt makes one call."""
    return {"acme": Integration("acme", base_url=provider.url, auth="bearer", retries=0)}


async def register(ctx: Context) -> None:
    """A creation function: register a webhook at the provider and keep its id."""
    response = await ctx.post("/webhooks", json={"url": "https://app.example/hooks"})
    await ctx.set_metadata({"webhook_id": response.json()["id"]})


def is_succeeded(record: pb.EventRecord) -> bool:
    """A function-succeeded record."""
    return record.type == "function-succeeded"


def by_attempt(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """Attempt spans ordered by their attempt number."""
    return sorted(spans, key=lambda s: int(s.attributes["orchestrator.attempt"]))  # type: ignore[arg-type, index]


async def register_in_a_new_trace(tmp_path: Path, provider: ProviderServer) -> tuple[str, list[pb.EventRecord]]:
    """Emit a creation whose ``register`` succeeds, in a fresh caller trace; (trace id, the log once it succeeded)."""
    provider.route("POST", "/webhooks", Reply(201, {"id": "wh_1"}))
    traceparent, trace_id, _ = new_traceparent()
    async with serving(
        tmp_path, function("register", "post-connection-creation", register), integrations=acme(provider)
    ) as daemon:
        await emit(daemon.stub, CREATE, "conn-1", traceparent=traceparent, credentials={"access_token": "tok-abcdef"})
        await follow_until(daemon.stub, is_succeeded)
        return trace_id, await records(daemon.stub)


def traceparent_header(value: str) -> tuple[str, str, str, str]:
    """(version, trace id, parent id, flags) of a W3C ``traceparent``."""
    version, trace_id, parent, flags = value.split("-")
    return version, trace_id, parent, flags


async def test_one_post_creation_emit_is_one_trace_from_rpc_to_provider(
    tmp_path: Path, provider: ProviderServer, exporter: Spans
) -> None:
    """RPC, append, a failed and a retried attempt and both provider calls share the caller's trace, properly nested."""
    provider.route("POST", "/webhooks", Reply(503, {"error": "busy"}), Reply(201, {"id": "wh_1"}))
    traceparent, trace_id, caller_span = new_traceparent()
    async with serving(
        tmp_path, function("register", "post-connection-creation", register), integrations=acme(provider)
    ) as daemon:
        response = await emit(
            daemon.stub, CREATE, "conn-1", traceparent=traceparent, credentials={"access_token": "tok-abcdef"}
        )
        await follow_until(daemon.stub, is_succeeded)

    def complete(spans: list[ReadableSpan]) -> bool:
        return len(named(spans, RPC_EMIT)) == 1 and len(named(spans, "function register")) == 2

    spans = await wait_for_spans(exporter, trace_id, complete)
    assert sorted(s.name for s in spans) == sorted(
        [RPC_EMIT, "append", "function register", "function register", "HTTP POST", "HTTP POST"]
    ), [s.name for s in spans]

    [rpc] = named(spans, RPC_EMIT)
    assert rpc.kind is SpanKind.SERVER
    assert rpc.parent is not None and rpc.parent.is_remote
    assert rpc.parent.span_id == int(caller_span, 16)
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert rpc.attributes["orchestrator.connection_id"] == "conn-1"
    assert rpc.attributes["orchestrator.event"] == "post-connection-creation"
    assert rpc.attributes["orchestrator.position"] == response.position

    [append] = named(spans, "append")
    assert parent_id(append) == span_id(rpc)
    assert append.attributes is not None
    assert append.attributes["orchestrator.position"] == response.position
    assert append.attributes["orchestrator.version"] == 1  # the lifecycle record's
    assert response.version == 2, "the stream's after the call: the credentials-updated the emit brought too"
    assert append.attributes["orchestrator.jobs"] == 1

    first, second = by_attempt(named(spans, "function register"))
    for number, attempt, outcome in ((1, first, "failed"), (2, second, "succeeded")):
        # The job ran after the RPC returned, yet joins its trace through the traceparent stored with the job.
        assert parent_id(attempt) == span_id(rpc)
        assert attempt.attributes == {
            "orchestrator.environment": "dev",
            "orchestrator.integration": "acme",
            "orchestrator.connection_id": "conn-1",
            "orchestrator.event": "post-connection-creation",
            "orchestrator.function": "register",
            "orchestrator.attempt": number,
            "orchestrator.plugin": "test-plugin 1.0",
            "orchestrator.outcome": outcome,
        }
    assert first.status.status_code is StatusCode.ERROR
    assert "ProviderError" in (first.status.description or "")
    assert "503" in (first.status.description or "")
    assert [e.name for e in first.events] == ["exception"]
    assert first.events[0].attributes is not None
    assert first.events[0].attributes["exception.type"] == "ProviderError"
    assert second.status.status_code is not StatusCode.ERROR
    assert not second.events

    calls = sorted(named(spans, "HTTP POST"), key=lambda s: s.start_time or 0)
    assert [parent_id(c) for c in calls] == [span_id(first), span_id(second)]
    for call, status in zip(calls, (503, 201), strict=True):
        assert call.kind is SpanKind.CLIENT
        assert call.attributes is not None
        assert call.attributes["http.request.method"] == "POST"
        assert call.attributes["url.full"] == f"{provider.url}/webhooks"
        assert call.attributes["http.response.status_code"] == status
    assert calls[0].status.status_code is StatusCode.ERROR
    assert calls[1].status.status_code is not StatusCode.ERROR

    # The provider was told the trace: the parent it names is the HTTP span that made the request.
    sent = provider.requests_to("POST", "/webhooks")
    assert len(sent) == 2
    for request, call in zip(sent, calls, strict=True):
        version, sent_trace, sent_parent, flags = traceparent_header(request.headers["traceparent"])
        assert (version, sent_trace, flags) == ("00", trace_id, "01")
        assert sent_parent == format(span_id(call), "016x")
        assert request.headers["authorization"] == "Bearer tok-abcdef"


async def test_records_of_an_emit_store_the_rpc_spans_traceparent(
    tmp_path: Path, provider: ProviderServer, exporter: Spans
) -> None:
    """The lifecycle record and the function facts carry the traceparent of the RPC span (which a restart resumes)."""
    trace_id, log = await register_in_a_new_trace(tmp_path, provider)
    spans = await wait_for_spans(exporter, trace_id, lambda spans: bool(named(spans, RPC_EMIT)))
    [rpc] = named(spans, RPC_EMIT)
    expected = f"00-{trace_id}-{span_id(rpc):016x}-01"
    by_type = {r.type: r.traceparent for r in log}
    assert by_type["post-connection-creation"] == expected
    assert by_type["function-succeeded"] == expected


async def test_metadata_written_by_a_job_stores_the_emits_traceparent(
    tmp_path: Path, provider: ProviderServer, exporter: Spans
) -> None:
    """Every record an emit causes, including a job's metadata-updated, carries the emit's traceparent."""
    trace_id, log = await register_in_a_new_trace(tmp_path, provider)
    assert [r.type for r in log] == [
        "post-connection-creation",
        "credentials-updated",
        "metadata-updated",
        "function-succeeded",
    ]
    assert all(trace_id in r.traceparent for r in log), [(r.type, r.traceparent) for r in log]


async def test_validate_attempt_spans_are_children_of_the_rpc_span(
    tmp_path: Path, provider: ProviderServer, exporter: Spans
) -> None:
    """Synchronous validate-connection attempts (and their provider calls) nest under the RPC span."""
    provider.route("GET", "/me", Reply(200, {"login": "acme"}))

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")

    async def quick(ctx: Context) -> None:
        ctx.log("nothing to check")

    functions = (function("whoami", "validate-connection", whoami), function("quick", "validate-connection", quick))
    traceparent, trace_id, caller_span = new_traceparent()
    async with serving(tmp_path, *functions, integrations=acme(provider)) as daemon:
        response = await emit(
            daemon.stub, VALIDATE, "conn-1", traceparent=traceparent, credentials={"access_token": "tok-abcdef"}
        )
    assert response.state == pb.CONNECTION_STATE_PENDING

    spans = await wait_for_spans(exporter, trace_id, lambda spans: bool(named(spans, RPC_EMIT)))
    assert sorted(s.name for s in spans) == sorted(
        [RPC_EMIT, "append", "function whoami", "function quick", "HTTP GET"]
    )
    [rpc] = named(spans, RPC_EMIT)
    assert rpc.parent is not None and rpc.parent.span_id == int(caller_span, 16)
    for name in ("whoami", "quick"):
        [attempt] = named(spans, f"function {name}")
        assert parent_id(attempt) == span_id(rpc)
        assert attempt.attributes is not None
        assert attempt.attributes["orchestrator.event"] == "validate-connection"
        assert attempt.attributes["orchestrator.outcome"] == "succeeded"
    [call] = named(spans, "HTTP GET")
    assert parent_id(call) == span_id(named(spans, "function whoami")[0])
    [sent] = provider.requests_to("GET", "/me")
    assert sent.headers["traceparent"].split("-")[1:3] == [trace_id, format(span_id(call), "016x")]


async def test_a_refused_emit_has_an_error_rpc_span_without_a_traceback(tmp_path: Path, exporter: Spans) -> None:
    """NOT_FOUND is the caller's error: the RPC span is failed with the code, but records no exception."""
    traceparent, trace_id, _ = new_traceparent()
    async with serving(tmp_path) as daemon:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await emit(daemon.stub, DELETE, "nobody", traceparent=traceparent)
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND

    [rpc] = await wait_for_spans(exporter, trace_id, lambda spans: bool(named(spans, RPC_EMIT)))
    assert spans_of(exporter, trace_id) == [rpc], "a refused emit appends nothing"
    assert rpc.status.status_code is StatusCode.ERROR
    assert "NotFound" in (rpc.status.description or "")
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not rpc.events, [e.name for e in rpc.events]
    assert "Traceback" not in rpc.to_json()


async def test_other_rpcs_get_server_spans_in_the_callers_trace(tmp_path: Path, exporter: Spans) -> None:
    """GetConnection and ListConnections are traced too, continuing the caller's traceparent."""
    traceparent, trace_id, caller_span = new_traceparent()
    metadata = (("traceparent", traceparent),)
    async with serving(tmp_path) as daemon:
        await emit(daemon.stub, CREATE, "conn-1")
        await daemon.stub.GetConnection(pb.GetConnectionRequest(connection=ref("conn-1")), metadata=metadata)
        await daemon.stub.ListConnections(pb.ListConnectionsRequest(), metadata=metadata)
    names = {"orchestrator.v1.Orchestrator/GetConnection", "orchestrator.v1.Orchestrator/ListConnections"}
    spans = await wait_for_spans(exporter, trace_id, lambda spans: {s.name for s in spans} >= names)
    for span in spans:
        assert span.kind is SpanKind.SERVER
        assert span.parent is not None and span.parent.span_id == int(caller_span, 16)
        assert span.status.status_code is not StatusCode.ERROR


async def test_log_lines_of_an_emit_carry_its_trace(
    tmp_path: Path, provider: ProviderServer, exporter: Spans, debug_log_lines: list[str]
) -> None:
    """The lifecycle event's (DEBUG) log line names the RPC span; the validate attempt's line the caller's trace."""
    log_lines = debug_log_lines
    traceparent, trace_id, _ = new_traceparent()

    async def quick(ctx: Context) -> None:
        ctx.log("ok")

    async with serving(tmp_path, function("quick", "validate-connection", quick)) as daemon:
        await emit(daemon.stub, VALIDATE, "conn-1", traceparent=traceparent)
    spans = await wait_for_spans(exporter, trace_id, lambda spans: bool(named(spans, RPC_EMIT)))
    [rpc] = named(spans, RPC_EMIT)
    lines = [json.loads(line) for line in log_lines]
    [event_line] = [line for line in lines if line.get("event") == "validate-connection" and "state" in line]
    assert (event_line["trace_id"], event_line["span_id"]) == (trace_id, format(span_id(rpc), "016x"))
    [attempt_line] = [line for line in lines if line.get("function") == "quick"]
    assert attempt_line["trace_id"] == trace_id
    assert attempt_line["outcome"] == "succeeded"


async def test_a_job_attempts_log_line_carries_the_emits_trace(
    tmp_path: Path, provider: ProviderServer, exporter: Spans, debug_log_lines: list[str]
) -> None:
    """The log line of an asynchronous attempt has the trace id of the emit that caused it (and a span id)."""
    trace_id, _ = await register_in_a_new_trace(tmp_path, provider)
    [attempt_line] = [json.loads(line) for line in debug_log_lines if '"function": "register"' in line]
    assert attempt_line["outcome"] == "succeeded"
    assert attempt_line.get("trace_id") == trace_id, attempt_line
    assert "span_id" in attempt_line
