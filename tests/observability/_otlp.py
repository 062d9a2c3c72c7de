"""A minimal OTLP trace receiver for the tests: gRPC (``TraceService/Export``) or HTTP/protobuf (``POST /v1/traces``).

    with Receiver.grpc() as receiver:
        env = {**environment(), **receiver.environment()}  # the daemon exports here
        ...
        span = await receiver.wait_for(lambda s: s.name == "append")

It serves from its own threads (the HTTP one is a
:class:`~tests.support.provider.ProviderServer`), so a daemon subprocess can
export to it while the test's event loop waits. Every span received is kept as a :class:`Span`
(ids in lower-case hex, attributes as plain Python values, its resource's
attributes); :meth:`Receiver.wait_for` waits on a condition the export
handler notifies, never by sleeping.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from tests.support.provider import ProviderServer, Reply, Request

WAIT = 20.0
"""Seconds a test waits for spans a daemon exports within a fraction of a second (OTEL_BSP_SCHEDULE_DELAY=100)."""


def value_of(value: common_pb2.AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes_of(pairs: Any) -> dict[str, Any]:
    """Repeated OTLP ``KeyValue`` as a dict."""
    return {kv.key: value_of(kv.value) for kv in pairs}


@dataclass(frozen=True)
class Event:
    """A span event."""

    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    """One span as received."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    """``Status.StatusCode``: 0 unset, 1 ok, 2 error."""
    status_message: str
    events: tuple[Event, ...]
    resource: dict[str, Any]
    raw: str = field(repr=False)
    """The span and its resource as protobuf text, for searches."""


STATUS_ERROR = 2
KIND_SERVER = 2
KIND_CLIENT = 3


class Receiver:
    """Keeps every span exported to it; use it as a context manager (serving on entry, stopped on exit)."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.spans: list[Span] = []
        self._changed = threading.Condition()
        self._stop: Callable[[], None] = lambda: None
        self.port = 0

    @classmethod
    def grpc(cls) -> Receiver:
        """A receiver speaking OTLP/gRPC."""
        return cls("grpc")

    @classmethod
    def http(cls) -> Receiver:
        """A receiver speaking OTLP/HTTP with protobuf bodies."""
        return cls("http/protobuf")

    def environment(self) -> dict[str, str]:
        """The ``OTEL_*`` variables that make a daemon export its traces here, fast."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": self.protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }

    def accept(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        """Keep the spans of one export request."""
        received = [
            Span(
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                kind=span.kind,
                attributes=attributes_of(span.attributes),
                status_code=span.status.code,
                status_message=span.status.message,
                events=tuple(Event(e.name, attributes_of(e.attributes)) for e in span.events),
                resource=attributes_of(resource_spans.resource.attributes),
                raw=f"{span}\n{resource_spans.resource}",
            )
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._changed:
            self.spans.extend(received)
            self._changed.notify_all()

    def matching(self, predicate: Callable[[Span], bool]) -> list[Span]:
        """The spans received so far that match ``predicate``."""
        with self._changed:
            return [s for s in self.spans if predicate(s)]

    async def wait_for(self, predicate: Callable[[Span], bool], count: int = 1, within: float = WAIT) -> list[Span]:
        """Wait (in a worker thread) until ``count`` received spans match ``predicate``; those spans."""

        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: len([s for s in self.spans if predicate(s)]) >= count, within)

        with anyio.fail_after(within + 5):
            arrived = await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
        if not arrived:
            names = sorted({s.name for s in self.matching(lambda s: True)})
            raise AssertionError(f"{count} matching span(s) did not arrive within {within}s; received: {names}")
        return self.matching(predicate)

    # -- serving -----------------------------------------------------------------

    def __enter__(self) -> Receiver:
        if self.protocol == "grpc":
            self._serve_grpc()
        else:
            self._serve_http()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _serve_grpc(self) -> None:
        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                receiver.accept(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._stop = lambda: server.stop(None).wait()

    def _serve_http(self) -> None:
        http = ProviderServer().__enter__()
        http.route("POST", "/v1/traces", self._export_http)
        self.port = http.port
        self._stop = lambda: http.__exit__(None, None, None)

    def _export_http(self, request: Request) -> Reply:
        """``POST /v1/traces``: an ExportTraceServiceRequest, maybe compressed."""
        body = request.body
        encoding = request.headers.get("content-encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        self.accept(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return Reply(200, payload, headers={"Content-Type": "application/x-protobuf"})
