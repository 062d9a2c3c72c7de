"""Memory: the daemon's RSS curve over 100,000 new connections with credentials, read every 10,000.

Credentials are sealed into the log's database and opened per attempt; the
daemon keeps none in memory (before sealing it kept every connection's in a
dict that grew for ever, about 0.45 KB each), and its caches are bounded.
The figure: ``orchestrator serve`` (the real CLI, an SQLite log in a
temporary directory, no event-function plugins for the ``bench``
integration) takes ``post-connection-creation`` emits, each a new connection
with its own credentials, 64 in flight from a client process; its RSS
(``VmRSS`` of ``/proc/PID/status``) is read after every ``--small``
connections (default 10,000: every bounded cache is full by then) up to
``--large`` (default 100,000). The ratio last / first reading is the figure:
near 1.0 when memory does not grow with connections. The baseline is the
same daemon, measured in the same run.

    .venv/bin/python bench/credentials_rss.py                     # every 10k up to 100k: about 2 minutes
    .venv/bin/python bench/credentials_rss.py --small 2000 --large 20000   # quick

``bench/run.py --only rss`` runs the same curve as a section of the benchmark
(every 10,000 up to 100,000; with ``--quick`` every 1,000 up to 10,000).

Prints a Markdown table on stdout, progress on stderr, and writes the figures
to ``--output`` (default ``bench/credentials_rss.json``). Exit code 1 when an
emit failed or the daemon did not serve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if not __package__:
    sys.path[0] = str(ROOT)  # run as `python bench/credentials_rss.py`: import `bench` from the root

from bench._harness import (  # noqa: E402 - needs the path set just above
    Server,
    Settings,
    in_child,
    log,
    rss_kib,
    run_loop,
    serve_command,
)

IN_FLIGHT = 64
CALL_TIMEOUT_S = 30.0
EMIT_TIMEOUT_S = 1800.0
STEPS = 10
"""Readings in the curve of ``bench/run.py``'s ``rss`` section, one every ``Settings.rss_step`` connections."""


def emit_curve(address: str, pid: int, step: int, large: int) -> dict[str, Any]:
    """New connections (``c0``, ``c1``...), each with its own credentials, 64 in flight, up to ``large``.

    Runs in a child process; reads the RSS of process ``pid`` (the daemon)
    after every ``step`` connections, between two steps (nothing in flight).
    """
    import grpc

    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

    async def main() -> dict[str, Any]:
        errors: list[str] = []
        readings: list[dict[str, Any]] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.OrchestratorStub(channel)

            async def worker(ids: Iterator[int]) -> None:
                for n in ids:
                    if len(errors) >= 10:
                        return
                    request = pb.EmitLifecycleEventRequest(
                        connection=pb.ConnectionRef(environment="bench", integration="bench", connection_id=f"c{n}"),
                        event=pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION,
                        credentials={"access_token": f"bench-token-{n:08d}-{os.urandom(12).hex()}"},
                    )
                    try:
                        await stub.EmitLifecycleEvent(request, timeout=CALL_TIMEOUT_S)
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code().name}: {exc.details()}")

            seconds = 0.0
            for done in range(step, large + 1, step):
                ids = iter(range(done - step, done))
                started = time.perf_counter()
                await asyncio.gather(*(worker(ids) for _ in range(IN_FLIGHT)))
                took = time.perf_counter() - started
                seconds += took
                readings.append({"connections": done, "rss_kib": rss_kib(pid), "rate": step / took})
                log(f"rss: {done:,} connections ({step / took:,.0f}/s): {readings[-1]['rss_kib'] / 1024:.1f} MiB")
        return {"readings": readings, "seconds": seconds, "errors": errors}

    return run_loop(main())


def curve(step: int, large: int, database: Path) -> dict[str, Any]:
    """RSS after every ``step`` new connections with credentials up to ``large``; ratio last / first reading."""
    argv = serve_command(f"sqlite://{database}", grace_period=5)
    with Server(argv, name="orchestrator serve", timeout=60) as daemon:
        at_start = rss_kib(daemon.pid)
        log(f"rss: daemon pid {daemon.pid}: {at_start / 1024:.1f} MiB at start")
        emitted = in_child(emit_curve, daemon.address, daemon.pid, step, large, timeout=EMIT_TIMEOUT_S)
        code = daemon.stop()
    readings, errors = emitted["readings"], emitted["errors"]
    first, last = readings[0], readings[-1]
    beyond = last["connections"] - first["connections"]
    return {
        "step": step,
        "readings": readings,
        "small": first,
        "large": last,
        "at_start_rss_kib": at_start,
        "ratio": last["rss_kib"] / first["rss_kib"],
        "emits_per_s": last["connections"] / emitted["seconds"],
        "bytes_per_connection_beyond_small": (last["rss_kib"] - first["rss_kib"]) * 1024 / beyond,
        "database_bytes": database.stat().st_size,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "exit_code": code,
    }


def measure(settings: Settings, workdir: Path) -> dict[str, Any]:
    """``bench/run.py``'s ``rss`` section: :data:`STEPS` readings, one every ``settings.rss_step`` connections."""
    return curve(settings.rss_step, settings.rss_step * STEPS, workdir / "rss-events.db")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000, help="connections at the first reading, and between two")
    parser.add_argument("--large", type=int, default=100_000, help="connections at the last reading")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "credentials_rss.json")
    ns = parser.parse_args()
    if not 0 < ns.small < ns.large or ns.large % ns.small:
        parser.error("--small must be more than 0, less than --large, and divide it")
    with tempfile.TemporaryDirectory(prefix="orchestrator-bench-rss-") as scratch:
        figures = curve(ns.small, ns.large, Path(scratch) / "events.db")
    figures["load_average_at_end"] = list(os.getloadavg())
    ns.output.write_text(json.dumps(figures, indent=2) + "\n")
    print("| Figure | Baseline | Orchestrator | Ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| Daemon RSS, MiB, new connections with credentials | {figures['small']['rss_kib'] / 1024:.1f}"
        f" ({ns.small:,} connections) | {figures['large']['rss_kib'] / 1024:.1f} ({ns.large:,} connections)"
        f" | {figures['ratio']:.3f} |"
    )
    if figures["errors"]:
        print(f"{figures['errors']} emit(s) failed, first: {figures['first_error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
