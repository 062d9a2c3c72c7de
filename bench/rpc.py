"""gRPC: a bare grpc.aio echo vs ``EmitLifecycleEvent`` on ``orchestrator serve``, 1 and 64 calls in flight.

Three processes, as in production: the echo server (``bench/echo_server.py``),
the daemon (``orchestrator serve --listen 127.0.0.1:0`` on an SQLite log in a
temporary directory) and, for each run, a fresh client process. Both clients
build and serialise the same ``EmitLifecycleEventRequest`` per call (a
``post-connection-creation``); the echo server sends the bytes back without
parsing them, the daemon appends the event durably and answers.

Calls go round-robin over 4096 connection ids per run (split between the
in-flight workers, so no two calls in flight share a connection): the first
call on an id creates the connection, later ones are reconnects.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench._harness import (
    Server,
    Settings,
    closed_loop,
    in_child,
    log,
    paired_ratio,
    run_loop,
    serve_command,
    summarise,
)

ECHO_SERVER = Path(__file__).with_name("echo_server.py")
CONCURRENCY = (1, 64)
CONNECTION_IDS = 4096
_CALL_TIMEOUT_S = 30.0


def emit_template(integration: str = "bench", event: str = "POST_CONNECTION_CREATION") -> Any:
    """The ``EmitLifecycleEventRequest`` every benchmark client sends (its connection id left empty).

    A config, a payload and a credential, as a real caller sends them; ``event``
    names a ``LIFECYCLE_EVENT_*`` value.
    """
    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

    template = pb.EmitLifecycleEventRequest(
        connection=pb.ConnectionRef(environment="bench", integration=integration),
        event=pb.LifecycleEvent.Value(f"LIFECYCLE_EVENT_{event}"),
        credentials={"access_token": "bench-token-0123456789abcdef"},
    )
    template.connection_config.update({"instance_url": "acme.my.salesforce.com"})
    template.payload.update({"source": "bench", "scopes": ["api", "refresh_token"]})
    return template


def client(
    target: str, address: str, in_flight: int, warmup_s: float, duration_s: float, max_ops: int, run: str
) -> dict[str, Any]:
    """One closed-loop run against ``target`` ("echo" or "emit") at ``address``; runs in a child process."""
    import grpc

    from bench.echo_server import METHOD
    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

    template = emit_template()
    per_worker = max(1, CONNECTION_IDS // in_flight)

    def request(worker: int, n: int) -> Any:
        message = pb.EmitLifecycleEventRequest()
        message.CopyFrom(template)
        message.connection.connection_id = f"{run}-{worker}-{n % per_worker}"
        return message

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(address) as channel:
            if target == "echo":
                serialize = pb.EmitLifecycleEventRequest.SerializeToString
                echo = channel.unary_unary(METHOD, request_serializer=serialize, response_deserializer=None)

                async def call(worker: int, n: int) -> None:
                    await echo(request(worker, n), timeout=_CALL_TIMEOUT_S)

            else:
                emit = channel.unary_unary(
                    "/orchestrator.v1.Orchestrator/EmitLifecycleEvent",
                    request_serializer=pb.EmitLifecycleEventRequest.SerializeToString,
                    response_deserializer=pb.EmitLifecycleEventResponse.FromString,
                )

                async def call(worker: int, n: int) -> None:
                    response = await emit(request(worker, n), timeout=_CALL_TIMEOUT_S)
                    if response.state != pb.CONNECTION_STATE_ACTIVE:
                        raise RuntimeError(f"unexpected state {pb.ConnectionState.Name(response.state)}")

            await channel.channel_ready()
            return await closed_loop(
                call, in_flight=in_flight, warmup_s=warmup_s, duration_s=duration_s, max_ops=max_ops
            )

    return run_loop(main())


def measure(settings: Settings, workdir: Path) -> dict[str, Any]:
    """The gRPC figures: per concurrency, echo and emit medians and their ratios."""
    database = f"sqlite://{workdir / 'grpc-events.db'}"
    daemon_argv = serve_command(database)
    out: dict[str, Any] = {"connection_ids_per_run": CONNECTION_IDS}
    with (
        Server([sys.executable, str(ECHO_SERVER), "--listen", "127.0.0.1:0"], name="echo server") as echo,
        Server(daemon_argv, name="orchestrator serve") as daemon,
    ):
        for in_flight in CONCURRENCY:
            runs: dict[str, list[dict[str, Any]]] = {"echo": [], "emit": []}
            for round_ in range(settings.rounds):
                # Alternate which goes first so that drift (heat, caches) is shared.
                for target in ("echo", "emit") if round_ % 2 == 0 else ("emit", "echo"):
                    address = echo.address if target == "echo" else daemon.address
                    result = in_child(
                        client,
                        target,
                        address,
                        in_flight,
                        settings.warmup_s,
                        settings.duration_s,
                        settings.max_ops,
                        f"c{in_flight}r{round_}",
                        timeout=settings.warmup_s + settings.duration_s + 120,
                    )
                    log(
                        f"grpc {target:4} x{in_flight:<2} round {round_ + 1}: {result['rate']:,.0f} calls/s,"
                        f" p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, errors {result['errors']}"
                    )
                    runs[target].append(result)
            echo_fig, emit_fig = summarise(runs["echo"]), summarise(runs["emit"])
            out[str(in_flight)] = {
                "echo": echo_fig,
                "emit": emit_fig,
                "ratio": {key: paired_ratio(runs["emit"], runs["echo"], key) for key in ("rate", "p50_ms", "p99_ms")},
            }
        out["daemon_exit_code"] = daemon.stop()
    return out
