"""The web console's cost: emit throughput with 10 browsers' worth of pollers and one live tail open, against none.

One daemon (``orchestrator serve`` with its console on a loopback port) and,
for each round, the emit client of :mod:`bench.rpc` (64 calls in flight,
``post-connection-creation``) in a fresh process, run twice back to back in
alternating order: once with nothing at the console ("idle"), once with a
second process loading the console ("open"):

- 10 pollers, each fetching one page a second, in turn the overview, the
  connections, the jobs, the functions and a connection's timeline: what 10
  open browsers cost at most (the overview refreshes every 5 s, the jobs page
  every 2 s, a timeline at most once a second while its connection changes);
- 1 live tail (``/events/stream``) reading every record the emits commit.

The figure is the median over rounds of open/idle emit calls per second
(goal: at least 0.95), beside what the console served meanwhile.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench._harness import (
    Server,
    Settings,
    in_child,
    log,
    median,
    paired_ratio,
    run_loop,
    serve_command,
    summarise,
)
from bench.rpc import client as emit_client

IN_FLIGHT = 64
POLLERS = 10
POLL_INTERVAL_S = 1.0
PAGES = ("/", "/connections", "/jobs", "/functions", "/connections/bench/bench/{id}")
GOAL = 0.95


def free_port() -> int:
    """A loopback port nothing listens on (bound for a moment, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def browsers(base: str, seconds: float, connection_id: str) -> dict[str, Any]:
    """10 pollers and one live tail on the console at ``base`` for ``seconds``; runs in a child process."""
    import asyncio

    import aiohttp

    async def main() -> dict[str, Any]:
        stop = time.perf_counter() + seconds
        pages = [p.format(id=connection_id) for p in PAGES]
        fetched = {"pages": 0, "errors": 0, "records": 0, "bytes": 0}
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(base, timeout=timeout) as session:

            async def poller(index: int) -> None:
                n = index
                while time.perf_counter() < stop:
                    started = time.perf_counter()
                    try:
                        async with session.get(pages[n % len(pages)]) as response:
                            body = await response.read()
                            fetched["bytes"] += len(body)
                            fetched["pages" if response.status == 200 else "errors"] += 1
                    except aiohttp.ClientError:
                        fetched["errors"] += 1
                    n += 1
                    await asyncio.sleep(max(0.0, POLL_INTERVAL_S - (time.perf_counter() - started)))

            async def tail() -> None:
                async with session.get("/events/stream", timeout=aiohttp.ClientTimeout(total=None)) as response:
                    async for line in response.content:
                        if line.startswith(b"id: "):
                            fetched["records"] += 1
                        if time.perf_counter() >= stop:
                            return

            tasks = [asyncio.create_task(poller(i)) for i in range(POLLERS)]
            tasks.append(asyncio.create_task(tail()))
            await asyncio.wait(tasks, timeout=seconds + 5)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return fetched

    return run_loop(main())


def measure(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Emit calls/s at 64 in flight with the console idle and with 10 pollers and a live tail; their ratio."""
    import multiprocessing

    database = f"sqlite://{workdir / 'console-events.db'}"
    web_port = free_port()
    base = f"http://127.0.0.1:{web_port}"
    daemon_argv = serve_command(database, web_listen=f"127.0.0.1:{web_port}")
    runs: dict[str, list[dict[str, Any]]] = {"idle": [], "open": []}
    served: list[dict[str, Any]] = []
    window = settings.warmup_s + settings.duration_s
    with Server(daemon_argv, name="orchestrator serve (console)") as daemon:
        for round_ in range(settings.rounds):
            for mode in ("idle", "open") if round_ % 2 == 0 else ("open", "idle"):
                load = None
                results: Any = None
                if mode == "open":
                    # The pollers' timeline is of a connection the previous round created.
                    context = multiprocessing.get_context("spawn")
                    results = context.Queue()
                    load = context.Process(
                        target=_load, args=(results, base, window + 1.0, f"c{IN_FLIGHT}r0idle-0-0"), daemon=True
                    )
                    load.start()
                result = in_child(
                    emit_client,
                    "emit",
                    daemon.address,
                    IN_FLIGHT,
                    settings.warmup_s,
                    settings.duration_s,
                    settings.max_ops,
                    f"c{IN_FLIGHT}r{round_}{mode}",
                    timeout=window + 120,
                )
                if load is not None:
                    load.join(window + 30)
                    fetched = results.get(timeout=5) if load.exitcode == 0 else {"error": load.exitcode}
                    served.append(fetched)
                    log(f"console load round {round_ + 1}: {fetched}")
                log(
                    f"console {mode:4} round {round_ + 1}: {result['rate']:,.0f} emits/s,"
                    f" p99 {result['p99_ms']:.2f} ms, errors {result['errors']}"
                )
                runs[mode].append(result)
        exit_code = daemon.stop()
    ratio = paired_ratio(runs["open"], runs["idle"], "rate")
    return {
        "in_flight": IN_FLIGHT,
        "pollers": POLLERS,
        "poll_interval_s": POLL_INTERVAL_S,
        "idle": summarise(runs["idle"]),
        "open": summarise(runs["open"]),
        "ratio": {key: paired_ratio(runs["open"], runs["idle"], key) for key in ("rate", "p50_ms", "p99_ms")},
        "goal": GOAL,
        "met": ratio >= GOAL,
        "console_served": {
            "pages_per_round": median([s.get("pages", 0) for s in served]),
            "records_streamed_per_round": median([s.get("records", 0) for s in served]),
            "errors": sum(s.get("errors", 0) for s in served),
        },
        "daemon_exit_code": exit_code,
    }


def _load(results: Any, base: str, seconds: float, connection_id: str) -> None:
    results.put(browsers(base, seconds, connection_id))


if __name__ == "__main__":
    # `python -m bench.console [--full]`: this section alone, its figures as JSON on stdout.
    import json
    import tempfile

    from bench._harness import FULL, QUICK

    chosen = FULL if "--full" in sys.argv else QUICK
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure(chosen, Path(folder)), indent=2, default=str))
