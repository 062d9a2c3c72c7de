"""Server CPU per call: what the daemon spends answering each RPC, against a bare grpc.aio echo server.

Three servers run side by side, each its own process, as in production:

- the echo server (``bench/echo_server.py``), the baseline of every ratio here;
- ``orchestrator serve`` with the OpenTelemetry exporters ``none`` and a bench
  plugin on its ``PYTHONPATH``: one trivial validate function (an
  ``async def`` that returns) for the integration ``benchv``, nothing for
  ``bench``;
- ``orchestrator serve`` exporting every span (and its metrics) over OTLP/gRPC
  to ``bench/otlp_receiver.py``, which counts what it receives; the span
  processor's queue is raised (``OTEL_BSP_MAX_QUEUE_SIZE``) so that no span
  is dropped, and the spans received per call are reported.

Each run is a fresh client process with one channel and :data:`IN_FLIGHT`
workers in a closed loop. The server's CPU (utime + stime of
``/proc/PID/stat``) is read as the timed window opens and as it closes; the
figure is that CPU over the calls answered in the window, with the calls/s
and the p50/p99 latency of the same window. The rows:

- ``echo``: the emit request of ``create`` sent to the echo server, which
  returns its bytes unparsed;
- ``create``: ``EmitLifecycleEvent`` ``post-connection-creation`` on a new
  connection each call (durable: one group-committed append, credentials
  sealed), exporters ``none``; ``create_otlp``: the same on the OTLP daemon;
- ``validate``: ``validate-connection`` on a new connection each call of
  ``benchv``, whose one validate function runs inside the call;
- ``delete``: ``pre-connection-deletion`` of connections the run's client
  created before its window (a deletion with no cleanup function: two records);
- ``reconnect``: ``post-connection-creation`` on connections created when the
  section started; ``get``: ``GetConnection`` of those.

Rounds alternate the order of the rows; an echo run opens the section and
closes each round, and a row's ratio in a round is to the mean of the two
echo runs around it (both within a few seconds of it), so that every quotient
sees the same machine weather. The ratio reported is the median over rounds.
"""

from __future__ import annotations

import asyncio
import math
import resource
import sys
from pathlib import Path
from typing import Any

from bench import otlp_receiver, rpc
from bench._harness import (
    BenchError,
    Exhausted,
    Server,
    Settings,
    closed_loop,
    in_child,
    log,
    median,
    paired_ratio,
    process_cpu_seconds,
    run_loop,
    serve_command,
)

IN_FLIGHT = 64
ROWS = {
    "create": "EmitLifecycleEvent post-connection-creation, new connection, exporters none",
    "create_otlp": "EmitLifecycleEvent post-connection-creation, new connection, every span exported over OTLP",
    "validate": "EmitLifecycleEvent validate-connection, one trivial validate function",
    "delete": "EmitLifecycleEvent pre-connection-deletion, no cleanup function",
    "reconnect": "EmitLifecycleEvent post-connection-creation, existing connection",
    "get": "GetConnection",
}
"""The rows measured against echo, in the order of an even round."""
KEYS = ("cpu_us", "rate", "p50_ms", "p99_ms")
WINDOW_S = 2.0
"""The timed window of a run at most (``--quick``'s is shorter): seven rows, four rounds, in about 2.5 minutes."""
VALIDATE_INTEGRATION = "benchv"
_MODULE = "orchestrator_bench_validate"
_PLUGIN = f'''
from orchestrator import on_event


@on_event("validate-connection", integration="{VALIDATE_INTEGRATION}")
async def trivial(ctx):
    return None
'''
_CALL_TIMEOUT_S = 30.0
_EMIT = "/orchestrator.v1.Orchestrator/EmitLifecycleEvent"
_GET = "/orchestrator.v1.Orchestrator/GetConnection"


def install(workdir: Path) -> Path:
    """Write the bench validate plugin and its ``*.dist-info`` under ``workdir/cpu-site``; that folder."""
    site = workdir / "cpu-site"
    info = site / "orchestrator_bench_validate-1.0.dist-info"
    info.mkdir(parents=True)
    (site / f"{_MODULE}.py").write_text(_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orchestrator-bench-validate\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[orchestrator.functions]\ntrivial = {_MODULE}:trivial\n")
    return site


def victim_ids(run: str, count: int) -> list[str]:
    """The connections a ``delete`` run named ``run`` deletes."""
    return [f"{run}-{i}" for i in range(count)]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _create_all(emit: Any, template: Any, ids: list[str]) -> None:
    """Create the connections ``ids`` (``post-connection-creation``), :data:`IN_FLIGHT` at a time."""
    pending = iter(ids)

    async def worker() -> None:
        for connection_id in pending:
            request = type(template)()
            request.CopyFrom(template)
            request.connection.connection_id = connection_id
            await emit(request, timeout=_CALL_TIMEOUT_S)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


def prepare(address: str, ids: list[str]) -> float:
    """Create the connections ``ids`` on the daemon at ``address``; seconds taken. Runs in a child process."""
    import time

    import grpc

    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

    async def main() -> float:
        async with grpc.aio.insecure_channel(address) as channel:
            emit = channel.unary_unary(
                _EMIT,
                request_serializer=pb.EmitLifecycleEventRequest.SerializeToString,
                response_deserializer=pb.EmitLifecycleEventResponse.FromString,
            )
            started = time.perf_counter()
            await _create_all(emit, rpc.emit_template(), ids)
            return time.perf_counter() - started

    return run_loop(main())


def client(
    row: str,
    address: str,
    server_pid: int,
    warmup_s: float,
    duration_s: float,
    max_ops: int,
    run: str,
    pool: int,
    spare: int,
    make_victims: bool = True,
) -> dict[str, Any]:
    """One closed-loop run of ``row`` ("echo" or a key of :data:`ROWS`) at ``address``; runs in a child process.

    ``pool`` is the number of connections ``pool-0``... created beforehand (for
    ``reconnect`` and ``get``); ``spare`` how many connections a ``delete`` run
    deletes at most: ``RUN-0``, ``RUN-1``..., which it creates before its window
    unless ``make_victims`` is false (they were created beforehand).
    """
    import grpc

    from bench.echo_server import METHOD
    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

    create = rpc.emit_template()
    validate = rpc.emit_template(VALIDATE_INTEGRATION, "VALIDATE_CONNECTION")
    delete = rpc.emit_template(event="PRE_CONNECTION_DELETION")
    per_worker = max(1, pool // IN_FLIGHT)

    def emit_request(template: Any, connection_id: str) -> Any:
        message = pb.EmitLifecycleEventRequest()
        message.CopyFrom(template)
        message.connection.connection_id = connection_id
        return message

    def pooled(worker: int, n: int) -> str:
        """A connection of the pool owned by ``worker`` (no two calls in flight share one)."""
        return f"pool-{worker + IN_FLIGHT * (n % per_worker)}"

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(address) as channel:
            emit = channel.unary_unary(
                _EMIT,
                request_serializer=pb.EmitLifecycleEventRequest.SerializeToString,
                response_deserializer=pb.EmitLifecycleEventResponse.FromString,
            )

            def expect(response: Any, state: int) -> None:
                if response.state != state:
                    raise RuntimeError(f"unexpected state {pb.ConnectionState.Name(response.state)}")

            if row == "echo":
                echo = channel.unary_unary(
                    METHOD,
                    request_serializer=pb.EmitLifecycleEventRequest.SerializeToString,
                    response_deserializer=None,
                )

                async def call(worker: int, n: int) -> None:
                    await echo(emit_request(create, f"{run}-{worker}-{n}"), timeout=_CALL_TIMEOUT_S)

            elif row in ("create", "create_otlp"):

                async def call(worker: int, n: int) -> None:
                    response = await emit(emit_request(create, f"{run}-{worker}-{n}"), timeout=_CALL_TIMEOUT_S)
                    expect(response, pb.CONNECTION_STATE_ACTIVE)

            elif row == "validate":

                async def call(worker: int, n: int) -> None:
                    response = await emit(emit_request(validate, f"{run}-{worker}-{n}"), timeout=_CALL_TIMEOUT_S)
                    expect(response, pb.CONNECTION_STATE_PENDING)

            elif row == "delete":
                victims = victim_ids(run, spare)
                if make_victims:
                    await _create_all(emit, create, victims)
                left = iter(victims)

                async def call(worker: int, n: int) -> None:
                    victim = next(left, None)
                    if victim is None:
                        raise Exhausted
                    response = await emit(emit_request(delete, victim), timeout=_CALL_TIMEOUT_S)
                    expect(response, pb.CONNECTION_STATE_DELETED)

            elif row == "reconnect":

                async def call(worker: int, n: int) -> None:
                    response = await emit(emit_request(create, pooled(worker, n)), timeout=_CALL_TIMEOUT_S)
                    expect(response, pb.CONNECTION_STATE_ACTIVE)

            elif row == "get":
                get = channel.unary_unary(
                    _GET,
                    request_serializer=pb.GetConnectionRequest.SerializeToString,
                    response_deserializer=pb.GetConnectionResponse.FromString,
                )

                async def call(worker: int, n: int) -> None:
                    ref = pb.ConnectionRef(environment="bench", integration="bench", connection_id=pooled(worker, n))
                    response = await get(pb.GetConnectionRequest(connection=ref), timeout=_CALL_TIMEOUT_S)
                    expect(response.connection, pb.CONNECTION_STATE_ACTIVE)

            else:
                raise ValueError(f"no row {row!r}")

            await channel.channel_ready()
            client_cpu = _cpu_seconds()
            figures = await closed_loop(
                call,
                in_flight=IN_FLIGHT,
                warmup_s=warmup_s,
                duration_s=duration_s,
                max_ops=max_ops,
                meter=lambda: process_cpu_seconds(server_pid),
            )
            client_cpu = _cpu_seconds() - client_cpu
        ops = figures["ops"]
        figures["cpu_us"] = figures["metered"] / ops * 1e6 if ops else math.nan
        figures["server_cpu_share"] = figures["metered"] / figures["seconds"] if figures["seconds"] else math.nan
        figures["client_cpu_s"] = client_cpu  # the whole run, warm-up (and a delete run's creations) included
        return figures

    return run_loop(main())


def daemon_argv(database: Path) -> list[str]:
    """``orchestrator serve`` on ``database`` at its defaults (INFO logs), on a free port of 127.0.0.1."""
    return serve_command(f"sqlite://{database}", grace_period=5)


def plain_env(site: Path) -> dict[str, str]:
    """The daemon's environment with every exporter off and the bench plugin at ``site`` importable."""
    return {"PYTHONPATH": str(site), "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}


def otlp_env(receiver: str) -> dict[str, str]:
    """The daemon's environment exporting every span and its metrics over OTLP/gRPC to ``receiver``."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_MAX_QUEUE_SIZE": "262144",  # no span dropped: the figure is the cost of exporting them all
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",  # metrics exported during the runs too, not only at exit
    }


RECEIVER_ARGV = [sys.executable, str(Path(__file__).with_name("otlp_receiver.py")), "--listen", "127.0.0.1:0"]
ECHO_ARGV = [sys.executable, str(rpc.ECHO_SERVER), "--listen", "127.0.0.1:0"]


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **{key: median([r[key] for r in runs]) for key in (*KEYS, "server_cpu_share")},
        "errors": sum(r.get("errors", 0) for r in runs),
        "first_error": next((r["first_error"] for r in runs if r.get("first_error")), ""),
        "rounds": runs,
    }


def _bracketing(echo: list[dict[str, Any]], round_: int) -> dict[str, float]:
    """The mean of the echo runs that opened and closed round ``round_``: that round's baseline."""
    before, after = echo[round_], echo[round_ + 1]
    return {key: (before[key] + after[key]) / 2 for key in KEYS}


def measure(settings: Settings, workdir: Path) -> dict[str, Any]:
    """The CPU figures: per row, CPU per call, calls/s and latency, and their ratios to echo's."""
    site = install(workdir)
    pool = 4096 if settings.rounds > 1 else 1024
    duration = min(settings.duration_s, WINDOW_S)
    timeout = settings.warmup_s + duration + 180
    runs: dict[str, list[dict[str, Any]]] = {"echo": [], **{row: [] for row in ROWS}}
    out: dict[str, Any] = {"in_flight": IN_FLIGHT, "pool": pool, "window_s": duration, "labels": ROWS}
    with (
        Server(ECHO_ARGV, name="echo server") as echo,
        Server(RECEIVER_ARGV, name="OTLP receiver") as receiver,
        Server(daemon_argv(workdir / "cpu-events.db"), name="orchestrator serve", env=plain_env(site)) as daemon,
        Server(
            daemon_argv(workdir / "cpu-otlp-events.db"),
            name="orchestrator serve (OTLP)",
            env=otlp_env(receiver.address),
        ) as otlp,
    ):
        seconds = in_child(prepare, daemon.address, [f"pool-{i}" for i in range(pool)], timeout=600)
        log(f"cpu: {pool:,} connections created for reconnect and get in {seconds:.1f}s")
        servers = {"echo": echo, "create_otlp": otlp}

        def one(row: str, round_: int) -> None:
            server = servers.get(row, daemon)
            # A delete run deletes connections it creates first: enough for its window at the fastest
            # deletion rate seen so far (the creation rate before the first), with room to spare.
            rate = max((r["rate"] for r in runs["delete"] or runs["create"]), default=2000.0)
            spare = min(settings.max_ops, math.ceil(1.5 * rate * (settings.warmup_s + settings.duration_s)) + 256)
            result = in_child(
                client,
                row,
                server.address,
                server.pid,
                settings.warmup_s,
                settings.duration_s,
                settings.max_ops,
                f"{row}-r{round_}-{len(runs[row])}",
                pool,
                spare if row == "delete" else 0,
                timeout=timeout,
            )
            log(
                f"cpu {row:11} round {round_ + 1}: {result['cpu_us']:,.0f} µs CPU per call,"
                f" {result['rate']:,.0f} calls/s, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms,"
                f" errors {result['errors']}"
            )
            runs[row].append(result)

        one("echo", 0)
        for round_ in range(settings.rounds):
            for row in ROWS if round_ % 2 == 0 else reversed(ROWS):
                one(row, round_)
            one("echo", round_)
        otlp_calls = sum(r["completed"] for r in runs["create_otlp"])
        out["otlp_daemon_exit_code"] = otlp.stop()  # its exporter flushes what it still holds
        received = run_loop(otlp_receiver.counts(receiver.address))
        out["daemon_exit_code"] = daemon.stop()
    if not received["spans"]:
        raise BenchError("the OTLP receiver got no span from the daemon: the OTLP row measured no export")
    out["otlp"] = {
        **received,
        "calls": otlp_calls,
        "spans_per_call": received["spans"] / otlp_calls if otlp_calls else math.nan,
        "receiver_cpu_us_per_span": received["cpu_s"] / received["spans"] * 1e6,
    }
    log(
        f"cpu: the OTLP receiver got {received['spans']:,} spans in {received['trace_requests']:,} exports"
        f" ({out['otlp']['spans_per_call']:.2f} per call) and {received['metric_requests']} metric exports"
    )
    echo_runs = runs["echo"]
    out["echo"] = _summary(echo_runs)
    for row in ROWS:
        baselines = [_bracketing(echo_runs, i) for i in range(len(runs[row]))]
        out[row] = {**_summary(runs[row]), "ratio": {key: paired_ratio(runs[row], baselines, key) for key in KEYS}}
    return out
