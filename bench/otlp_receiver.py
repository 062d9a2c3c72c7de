"""A small OTLP/gRPC receiver for the benchmark: it accepts trace and metric exports and counts them.

``python bench/otlp_receiver.py --listen 127.0.0.1:0`` serves the OTLP
``TraceService/Export`` and ``MetricsService/Export`` methods (no collector can
be installed here) and prints the same kind of ``serving ... on HOST:PORT``
line on stderr as the daemon. Each trace export is parsed and its spans
counted; a metrics export is counted as a request. ``/bench.OtlpReceiver/Count``
answers the counts so far as JSON (``{"spans", "trace_requests",
"metric_requests", "cpu_s"}``), so that the benchmark can check that the
daemon's spans arrived. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb

COUNT = "/bench.OtlpReceiver/Count"

_counts = {"spans": 0, "trace_requests": 0, "metric_requests": 0}


async def _export_traces(
    request: trace_pb.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[object, object]
) -> trace_pb.ExportTraceServiceResponse:
    _counts["trace_requests"] += 1
    _counts["spans"] += sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans)
    return trace_pb.ExportTraceServiceResponse()


async def _export_metrics(
    request: metrics_pb.ExportMetricsServiceRequest, context: grpc.aio.ServicerContext[object, object]
) -> metrics_pb.ExportMetricsServiceResponse:
    _counts["metric_requests"] += 1
    return metrics_pb.ExportMetricsServiceResponse()


async def _count(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return json.dumps({**_counts, "cpu_s": usage.ru_utime + usage.ru_stime}).encode()


async def serve(listen: str) -> None:
    """Serve the two OTLP export methods and the count on ``listen`` until killed."""
    server = grpc.aio.server()
    traces = grpc.unary_unary_rpc_method_handler(
        _export_traces,
        request_deserializer=trace_pb.ExportTraceServiceRequest.FromString,
        response_serializer=trace_pb.ExportTraceServiceResponse.SerializeToString,
    )
    metrics = grpc.unary_unary_rpc_method_handler(
        _export_metrics,
        request_deserializer=metrics_pb.ExportMetricsServiceRequest.FromString,
        response_serializer=metrics_pb.ExportMetricsServiceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": traces}
            ),
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.metrics.v1.MetricsService", {"Export": metrics}
            ),
            grpc.method_handlers_generic_handler(
                "bench.OtlpReceiver", {"Count": grpc.unary_unary_rpc_method_handler(_count)}
            ),
        )
    )
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"serving opentelemetry.proto.collector.trace.v1.TraceService on {host}:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


async def counts(address: str) -> dict[str, float]:
    """The receiver's counts so far (a client of :data:`COUNT`)."""
    async with grpc.aio.insecure_channel(address) as channel:
        raw = await channel.unary_unary(COUNT, None, None)(b"", timeout=10)
    answer: dict[str, float] = json.loads(raw)
    return answer


def main() -> None:
    """Parse ``--listen`` and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
