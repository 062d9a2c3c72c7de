"""OpenTelemetry wiring: traces, metrics, the Prometheus endpoint, and the W3C traceparent helpers.

Exporters are chosen with the standard variables, read once by the CLI into
:class:`TelemetryConfig`: ``OTEL_TRACES_EXPORTER`` and
``OTEL_METRICS_EXPORTER`` (``otlp``, ``console`` or ``none``, the default),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``, the default, or ``http/protobuf``);
the OTLP exporters read ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers) themselves.
``--metrics-listen`` adds a Prometheus text endpoint.

Spans are made at the boundaries only (the RPC, the append, the function
attempt, the provider call), each module with its own tracer. No secret is
ever a span attribute: the attributes set are names, ids and outcomes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orchestrator.errors import InvalidArgument

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What to export where."""

    service_name: str = "orchestrator"
    service_version: str = ""
    traces_exporter: str = "none"
    metrics_exporter: str = "none"
    otlp_protocol: str = "grpc"
    metrics_listen: str = ""
    """``HOST:PORT`` of the Prometheus text endpoint (empty: none)."""

    def __post_init__(self) -> None:
        for name, value in (
            ("OTEL_TRACES_EXPORTER", self.traces_exporter),
            ("OTEL_METRICS_EXPORTER", self.metrics_exporter),
        ):
            if value not in EXPORTERS:
                raise InvalidArgument(f"{name}={value!r} is not supported: use one of {', '.join(EXPORTERS)}")
        if self.otlp_protocol not in PROTOCOLS:
            raise InvalidArgument(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={self.otlp_protocol!r} is not supported: use {' or '.join(PROTOCOLS)}"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, version: str, metrics_listen: str = "") -> TelemetryConfig:
        """From the standard ``OTEL_*`` variables (only the CLI calls this)."""
        first = environ.get("OTEL_TRACES_EXPORTER", "none").split(",")[0].strip() or "none"
        metrics_first = environ.get("OTEL_METRICS_EXPORTER", "none").split(",")[0].strip() or "none"
        return cls(
            service_name=environ.get("OTEL_SERVICE_NAME", "orchestrator"),
            service_version=version,
            traces_exporter=first,
            metrics_exporter=metrics_first,
            otlp_protocol=environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ),
            metrics_listen=metrics_listen,
        )


def _span_exporter(config: TelemetryConfig) -> SpanExporter | None:
    if config.traces_exporter == "console":
        return ConsoleSpanExporter()
    if config.traces_exporter == "otlp":
        if config.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    return None


def _metric_readers(config: TelemetryConfig) -> list[MetricReader]:
    readers: list[MetricReader] = []
    if config.metrics_exporter == "console":
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    elif config.metrics_exporter == "otlp":
        if config.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics

            readers.append(PeriodicExportingMetricReader(GrpcMetrics()))
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics

            readers.append(PeriodicExportingMetricReader(HttpMetrics()))
    if config.metrics_listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())
    return readers


@asynccontextmanager
async def telemetry(config: TelemetryConfig) -> AsyncIterator[None]:
    """Install the tracer and meter providers for the daemon's life; flush them at exit.

    With every exporter ``none`` nothing is installed and the API's no-op
    providers stay in place (no cost beyond a function call per span).
    """
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    exporter = _span_exporter(config)
    readers = _metric_readers(config)
    if exporter is not None or readers:
        # Resource detection runs detectors on a thread pool and joins it: not on the loop.
        attributes = {"service.name": config.service_name, "service.version": config.service_version}
        resource = await anyio.to_thread.run_sync(Resource.create, attributes)
    if exporter is not None:
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
    if readers:
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
    try:
        async with anyio.create_task_group() as tg:
            if config.metrics_listen:
                await tg.start(_serve_prometheus, config.metrics_listen)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if tracer_provider is not None:
                await anyio.to_thread.run_sync(tracer_provider.shutdown)
            if meter_provider is not None:
                await anyio.to_thread.run_sync(meter_provider.shutdown)


async def _serve_prometheus(listen: str, *, task_status: anyio.abc.TaskStatus[int]) -> None:
    """A minimal HTTP/1.0 endpoint: ``GET /metrics`` in the Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    from orchestrator.config import split_host_port

    host, port = split_host_port(listen)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, bound)
    task_status.started(bound)

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client:
            with anyio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await client.receive(4096)
                    if not chunk:
                        return
                    request += chunk
                line = request.split(b"\r\n", 1)[0].split()
                if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                    body = await anyio.to_thread.run_sync(generate_latest, REGISTRY)
                    head = f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                else:
                    body, head = b"not found: try /metrics\n", "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                await client.send(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    async with listener:
        await listener.serve(handle)


# -- W3C trace context --------------------------------------------------------------


def current_traceparent() -> str:
    """The ``traceparent`` of the current span (empty when there is none)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from(traceparent: str) -> otel_context.Context:
    """A context whose parent is the span ``traceparent`` names (the root context when empty)."""
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def inject(headers: dict[str, str]) -> None:
    """Add the current ``traceparent`` (and ``tracestate``) to outgoing ``headers``."""
    _PROPAGATOR.inject(headers)


def span_error(span: trace.Span, exc: BaseException, *, record: bool = True) -> None:
    """Mark ``span`` failed with ``exc``'s type and message (never its arguments' secrets: callers redact)."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    if record:
        span.record_exception(exc)
