"""Process isolation: attempts run in the daemon (``--isolation thread``) vs in worker processes (``process``).

Baseline: ``Dispatcher.attempt`` as ``orchestrator serve`` runs it by default,
the function called in the daemon's process. Subject: the same dispatcher
with a :class:`~orchestrator.isolation.ProcessPool` of :data:`POOL` worker
processes (``--isolation process --processes 4``): each attempt is sent to an
idle worker, and each ``ctx`` call comes back to the daemon and is answered.
Both run on uvloop when importable, as the daemon does, with no trace
exporter, and go through the whole attempt path (span, limiter, redaction).

Two functions, from a plugin written for the run and found through its entry
point (by the workers too): ``trivial`` (an ``async def`` that returns) and
``one-call`` (one ``await ctx.get("/ping")`` through the provider proxy to an
:class:`httpx.MockTransport` in the daemon's process, which answers at once:
the figure is what forwarding one ctx call costs, not a network). Each is
driven in a closed loop with 1 and :data:`POOL` attempts in flight, after one
untimed attempt per worker (so every worker has started).

Then a worker process's start, from spawn to its ``ready`` message
(interpreter, orchestrator and every installed plugin imported), against
``python -c`` of the same interpreter, and its memory (VmRSS once ready)
against that bare interpreter's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._harness import Settings, closed_loop, in_child, log, median, paired_ratio, run_loop, summarise

POOL = 4
IN_FLIGHT = (1, POOL)
MODES = ("thread", "process")
FUNCTIONS = {"trivial": "a trivial function", "one-call": "one provider call"}
_MODULE = "orchestrator_bench_functions"
_PLUGIN = """
from orchestrator import on_event


@on_event("post-connection-creation", integration="bench")
async def trivial(ctx):
    pass


@on_event("post-connection-creation", integration="bench")
async def one_call(ctx):
    await ctx.get("/ping")
"""
_KEYS = ("rate", "p50_ms", "p99_ms")
_BARE = "import os, sys; os.write(1, b'r'); sys.stdin.read()"
"""The baseline's process: an interpreter that says it is up, then waits for its stdin to close."""


def install(workdir: Path) -> str:
    """Write the bench plugin and its ``*.dist-info`` under ``workdir/site``; that folder."""
    site = workdir / "site"
    info = site / "orchestrator_bench_functions-1.0.dist-info"
    info.mkdir(parents=True)
    (site / f"{_MODULE}.py").write_text(_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orchestrator-bench-functions\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[orchestrator.functions]\ntrivial = {_MODULE}:trivial\none-call = {_MODULE}:one_call\n"
    )
    return str(site)


def attempts(
    site: str, isolation: str, function: str, in_flight: int, warmup_s: float, duration_s: float, max_ops: int
) -> dict[str, Any]:
    """``function``'s attempts in a closed loop with ``isolation``; runs in a child process."""
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = site  # for the worker processes
    import anyio
    import httpx

    from orchestrator.clock import SystemClock
    from orchestrator.config import DispatchConfig, Integration
    from orchestrator.context import Buffered, ConnectionInfo, EventInfo
    from orchestrator.dispatch import Dispatcher
    from orchestrator.isolation import ProcessPool
    from orchestrator.model import ConnectionRef, LifecycleEvent
    from orchestrator.plugins import discover

    [installed] = discover().named(function, "bench")
    info = ConnectionInfo(ConnectionRef("bench", "bench", "c1"), {})
    integrations = {"bench": Integration("bench", base_url="http://provider.bench")}

    def provider(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ok": True})

    async def main() -> dict[str, Any]:
        async with (
            httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http,
            anyio.create_task_group() as tg,
        ):
            config = DispatchConfig(isolation=isolation, processes=POOL)
            pool = ProcessPool(config.pool_size) if config.pool_size else None
            if pool is not None:
                tg.start_soon(pool.run)
            dispatcher = Dispatcher(SystemClock(), http=http, integrations=integrations, config=config, pool=pool)

            async def call(worker: int, n: int) -> None:
                event = EventInfo(LifecycleEvent.POST_CONNECTION_CREATION, {}, f"e{worker}-{n}")
                result = await dispatcher.attempt(installed, info, event, Buffered({}))
                if not result.ok:
                    raise RuntimeError(f"{result.error_type}: {result.error}")

            async with anyio.create_task_group() as warm:  # every worker started, before the clock runs
                for worker in range(POOL):
                    warm.start_soon(call, worker, -1)
            figures = await closed_loop(
                call, in_flight=in_flight, warmup_s=warmup_s, duration_s=duration_s, max_ops=max_ops
            )
            tg.cancel_scope.cancel()
            return figures

    return run_loop(main())


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(site: str, worker: bool) -> dict[str, float]:
    """Seconds from spawn to ready, and the RSS then: a worker process, or the bare interpreter."""
    command = [sys.executable, "-m", "orchestrator.isolation.child", str(os.getpid())]
    env = {**os.environ, "PYTHONPATH": site}
    began = time.perf_counter()
    process = subprocess.Popen(
        command if worker else [sys.executable, "-c", _BARE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        if worker:
            size = int.from_bytes(process.stdout.read(4), "big")
            ready = process.stdout.read(size)
            if b'"ready"' not in ready:
                raise RuntimeError(f"the worker said {ready[:200]!r} instead of ready")
        elif process.stdout.read(1) != b"r":
            raise RuntimeError("the bare interpreter did not start")
        seconds = time.perf_counter() - began
        rss = _rss_mib(process.pid)
    finally:
        process.stdin.close()  # a worker exits when its pipe closes, as the bare interpreter does
        process.wait(10)
        process.stdout.close()
    return {"seconds": seconds, "rss_mib": rss}


def measure(settings: Settings, workdir: Path) -> dict[str, Any]:
    """The isolation figures: each function at each concurrency in each mode, and the worker's start and memory."""
    site = install(workdir)
    timeout = settings.warmup_s + settings.duration_s + 120
    out: dict[str, Any] = {"pool": POOL}
    for function in FUNCTIONS:
        out[function] = {}
        for in_flight in IN_FLIGHT:
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for round_ in range(settings.rounds):
                for mode in MODES if round_ % 2 == 0 else reversed(MODES):
                    args = (site, mode, function, in_flight, settings.warmup_s, settings.duration_s, settings.max_ops)
                    result = in_child(attempts, *args, timeout=timeout)
                    log(
                        f"isolation {function} {in_flight} in flight, {mode:7} round {round_ + 1}:"
                        f" {result['rate']:,.0f} attempts/s, p50 {result['p50_ms']:.2f} ms, errors {result['errors']}"
                    )
                    runs[mode].append(result)
            out[function][str(in_flight)] = {
                "thread": summarise(runs["thread"]),
                "process": summarise(runs["process"]),
                "ratio": {key: paired_ratio(runs["process"], runs["thread"], key) for key in _KEYS},
            }
    starts: dict[str, list[dict[str, float]]] = {"bare": [], "worker": []}
    start(site, worker=True)  # untimed: warms the file cache
    for round_ in range(settings.startup_rounds):
        for name in ("bare", "worker") if round_ % 2 == 0 else ("worker", "bare"):
            starts[name].append(start(site, worker=name == "worker"))
            log(f"isolation start {name:6} round {round_ + 1}: {starts[name][-1]['seconds']:.3f}s")
    for key in ("seconds", "rss_mib"):
        out[key] = {
            "bare": median([s[key] for s in starts["bare"]]),
            "worker": median([s[key] for s in starts["worker"]]),
            "ratio": paired_ratio(starts["worker"], starts["bare"], key),
        }
    return out
