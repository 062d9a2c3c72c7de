"""The daemon's OpenTelemetry SDK: tracer and meter providers, exporters, the Prometheus endpoint.

Exporters are chosen with the standard variables, read once by the CLI into
:class:`TelemetryConfig`: ``OTEL_TRACES_EXPORTER`` and
``OTEL_METRICS_EXPORTER`` (``otlp``, ``console`` or ``none``, the default),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``, the default, or ``http/protobuf``);
the OTLP exporters read ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers) themselves.
``--metrics-listen`` adds a Prometheus text endpoint.

Only the daemon imports this module (the SDK is heavy); the engine's modules
use the API and :mod:`orchestrator.tracing`. Spans are made at the boundaries
only (the RPC, the append, the function attempt, the provider call), each
module with its own tracer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from orchestrator import tracing
from orchestrator.config import TelemetryConfig, split_host_port
from orchestrator.errors import InvalidArgument

log = logging.getLogger(__name__)


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
    providers stay in place; the engine then makes no span and calls no
    instrument at all (:func:`orchestrator.tracing.pinned`, decided once here).
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
                with tracing.pinned():
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

    host, port = split_host_port(listen)
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise InvalidArgument(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
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
