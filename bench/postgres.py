"""PostgreSQL: ``EmitLifecycleEvent`` at 64 in flight against 1, 2 and 3 daemons sharing one PostgreSQL log.

Beside them, in the same run: the bare grpc.aio echo server (``bench/echo_server.py``,
the baseline of every ratio) and one daemon on an SQLite log (the embedded default).
The client sends the request of ``bench/rpc.py`` (a ``post-connection-creation``),
spreading its calls round-robin over the daemons of the figure, one channel to each.

The server is ``ORCHESTRATOR_BENCH_POSTGRES`` (default: the local one that
``scripts/test`` starts, ``postgresql://postgres@127.0.0.1:5432/test``). The section
makes a database of its own there, one schema per figure (a fresh, empty log for
each daemon count), and drops the database at its end.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench._harness import (
    BenchError,
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
from bench.rpc import CONNECTION_IDS, ECHO_SERVER, emit_template

SERVER_ENV = "ORCHESTRATOR_BENCH_POSTGRES"
SERVER = "postgresql://postgres@127.0.0.1:5432/test"
IN_FLIGHT = 64
DAEMONS = (1, 2, 3)
_CALL_TIMEOUT_S = 30.0


def client(
    target: str, addresses: list[str], in_flight: int, warmup_s: float, duration_s: float, max_ops: int, run: str
) -> dict[str, Any]:
    """One closed-loop run of emits (or echoes) spread round-robin over ``addresses``; runs in a child process."""
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
        channels = [grpc.aio.insecure_channel(address) for address in addresses]
        try:
            if target == "echo":
                serialize = pb.EmitLifecycleEventRequest.SerializeToString
                stubs = [
                    c.unary_unary(METHOD, request_serializer=serialize, response_deserializer=None) for c in channels
                ]
            else:
                stubs = [
                    c.unary_unary(
                        "/orchestrator.v1.Orchestrator/EmitLifecycleEvent",
                        request_serializer=pb.EmitLifecycleEventRequest.SerializeToString,
                        response_deserializer=pb.EmitLifecycleEventResponse.FromString,
                    )
                    for c in channels
                ]

            async def call(worker: int, n: int) -> None:
                await stubs[(worker + n) % len(stubs)](request(worker, n), timeout=_CALL_TIMEOUT_S)

            for channel in channels:
                await channel.channel_ready()
            return await closed_loop(
                call, in_flight=in_flight, warmup_s=warmup_s, duration_s=duration_s, max_ops=max_ops
            )
        finally:
            for channel in channels:
                await channel.close()

    return run_loop(main())


async def _admin(url: str, *statements: str) -> None:
    import asyncpg

    con = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


@contextmanager
def _database() -> Any:
    """A database of the section's own on the server (its URL), dropped at the end."""
    server = os.environ.get(SERVER_ENV, SERVER)
    name = f"orch_bench_{secrets.token_hex(4)}"
    try:
        asyncio.run(_admin(server, f"CREATE DATABASE {name}"))
    except Exception as exc:  # no server: the section fails with the reason, the others run
        raise BenchError(f"PostgreSQL is not reachable at {server} ({exc}); set {SERVER_ENV}") from exc
    url = urlunsplit(urlsplit(server)._replace(path=f"/{name}", query=""))
    try:
        yield url
    finally:
        asyncio.run(_admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _daemon(database: str, name: str, key: str) -> Server:
    return Server(serve_command(database), name=name, env={"ORCHESTRATOR_SECRET_KEY": key})


def measure(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Emit calls/s and p50/p99 at 64 in flight: echo, one SQLite daemon, and 1, 2, 3 daemons on PostgreSQL."""
    key = base64.b64encode(os.urandom(32)).decode()
    out: dict[str, Any] = {"in_flight": IN_FLIGHT, "daemons": list(DAEMONS)}
    with _database() as database, ExitStack() as stack:
        schemas = {n: f"bench_{n}" for n in DAEMONS}
        asyncio.run(_admin(database, *(f"CREATE SCHEMA {schema}" for schema in schemas.values())))
        echo = stack.enter_context(
            Server([sys.executable, str(ECHO_SERVER), "--listen", "127.0.0.1:0"], name="echo server")
        )
        sqlite = stack.enter_context(_daemon(f"sqlite://{workdir / 'postgres-section.db'}", "sqlite daemon", key))
        targets: dict[str, list[Server]] = {"echo": [echo], "sqlite": [sqlite]}
        for n, schema in schemas.items():
            url = f"{database}?search_path={schema}"
            # One after the other: the first migrates the schema, the next find it done.
            targets[f"postgres_{n}"] = [
                stack.enter_context(_daemon(url, f"postgres daemon {i + 1}/{n}", key)) for i in range(n)
            ]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        order = list(targets)
        for round_ in range(settings.rounds):
            # Alternate the order so that drift (heat, the database's growth) is shared.
            for name in order if round_ % 2 == 0 else order[::-1]:
                kind = "echo" if name == "echo" else "emit"
                result = in_child(
                    client,
                    kind,
                    [server.address for server in targets[name]],
                    IN_FLIGHT,
                    settings.warmup_s,
                    settings.duration_s,
                    settings.max_ops,
                    f"{name}r{round_}",
                    timeout=settings.warmup_s + settings.duration_s + 120,
                )
                log(
                    f"postgres {name:10} x{IN_FLIGHT} round {round_ + 1}: {result['rate']:,.0f} calls/s,"
                    f" p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, errors {result['errors']}"
                )
                runs[name].append(result)
        out["echo"] = summarise(runs["echo"])
        for name in order[1:]:
            out[name] = summarise(runs[name])
            out[name]["ratio"] = {k: paired_ratio(runs[name], runs["echo"], k) for k in ("rate", "p50_ms", "p99_ms")}
            out[name]["ratio_to_sqlite"] = {
                k: paired_ratio(runs[name], runs["sqlite"], k) for k in ("rate", "p50_ms", "p99_ms")
            }
        out["exit_codes"] = [server.stop() for servers in targets.values() for server in servers]
    return out
