"""``orchestrator serve`` exports its spans over real OTLP (gRPC and HTTP/protobuf) to a receiver on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.grpc import CREATE, RPC_EMIT, emit
from tests.support.process import arun, environment, serve
from tests.support.provider import ProviderServer, Reply, write_config

from ._inproc import new_traceparent
from ._otlp import KIND_CLIENT, KIND_SERVER, Receiver, Span

pytestmark = pytest.mark.anyio


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """A provider accepting salesforce webhooks."""
    with ProviderServer() as server:
        server.route("POST", "/acme/webhooks", Reply(201, {"id": "wh_1"}))
        yield server


def check_resource(span: Span) -> None:
    """The daemon names itself: service.name orchestrator and its version."""
    assert span.resource["service.name"] == "orchestrator"
    assert span.resource["service.version"], span.resource


async def test_spans_arrive_over_otlp_grpc_in_the_callers_trace(tmp_path: Path, provider: ProviderServer) -> None:
    """OTEL_TRACES_EXPORTER=otlp (gRPC): the emit's RPC, append, attempt and provider spans reach the receiver."""
    traceparent, trace_id, caller_span = new_traceparent()
    config = write_config(tmp_path / "o.toml", provider.url)
    with Receiver.grpc() as receiver:
        env = environment(**receiver.environment())
        async with serve(tmp_path / "events.db", "--config", str(config), env=env) as daemon:
            response = await emit(
                daemon.address,
                CREATE,
                "sf-1",
                "salesforce",
                traceparent=traceparent,
                connection_config={"instance": "acme"},
                credentials={"access_token": "tok-abcdef"},
            )
            # Exported while the daemon runs (a 100 ms batch delay), not only at exit.
            spans = await receiver.wait_for(lambda s: s.trace_id == trace_id, count=4)
            assert await daemon.stop() == 0, str(daemon)

    by_name = {s.name: s for s in spans}
    assert set(by_name) == {RPC_EMIT, "append", "function register-webhook", "HTTP POST"}
    rpc = by_name[RPC_EMIT]
    assert rpc.kind == KIND_SERVER
    assert rpc.parent_span_id == caller_span
    assert rpc.attributes["rpc.method"] == "EmitLifecycleEvent"
    assert rpc.attributes["orchestrator.position"] == response.position
    assert by_name["append"].parent_span_id == rpc.span_id
    attempt = by_name["function register-webhook"]
    assert attempt.parent_span_id == rpc.span_id
    assert attempt.attributes["orchestrator.outcome"] == "succeeded"
    assert attempt.attributes["orchestrator.plugin"].startswith("orchestrator-salesforce ")
    call = by_name["HTTP POST"]
    assert call.kind == KIND_CLIENT
    assert call.parent_span_id == attempt.span_id
    [sent] = provider.requests
    assert sent.headers["traceparent"] == f"00-{trace_id}-{call.span_id}-01"
    for span in spans:
        check_resource(span)


async def test_spans_arrive_over_otlp_http_protobuf(tmp_path: Path, provider: ProviderServer) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: an emit from the CLI reaches the receiver's /v1/traces."""
    with Receiver.http() as receiver:
        env = environment(**receiver.environment())
        async with serve(tmp_path / "events.db", env=env) as daemon:
            emitted = await arun(
                "emit", "validate-connection", "c-1", "-i", "plain", "--json", "--address", daemon.address
            )
            assert emitted.code == 0, str(emitted)
            [rpc] = await receiver.wait_for(lambda s: s.name == RPC_EMIT)
            assert await daemon.stop() == 0, str(daemon)
    assert rpc.kind == KIND_SERVER
    assert rpc.parent_span_id == ""
    assert rpc.attributes["orchestrator.connection_id"] == "c-1"
    assert rpc.attributes["orchestrator.event"] == "validate-connection"
    check_resource(rpc)
    [append] = receiver.matching(lambda s: s.name == "append")
    assert (append.trace_id, append.parent_span_id) == (rpc.trace_id, rpc.span_id)
