"""What every benchmark shares: settings, a closed-loop load, child processes and daemons.

Each measurement runs in a child process of its own (``spawn``: a fresh
interpreter and event loop, nothing inherited from the parent), bounded both
in time and in count, and returns a plain dict. Daemons are started as a user
starts them and stopped by their own process handle.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
import multiprocessing
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

READY = re.compile(r"\bserving \S+ on 127\.0\.0\.1:(\d+)")
"""The line a server prints on stderr once it answers calls (the daemon's own log line)."""


_SETTLE_S = 0.3


class BenchError(Exception):
    """A benchmark could not produce its figure (a child died, timed out or refused a call)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how often each figure is measured."""

    rounds: int
    """Baseline/subject pairs per figure, back to back in alternating order; medians are reported."""
    warmup_s: float
    """Untimed load before each timed window (connections up, caches warm)."""
    duration_s: float
    """The timed window of one load run (it ends sooner when ``max_ops`` is reached)."""
    max_ops: int
    """Operations timed in one load run at most (bounds memory and time on fast machines)."""
    log_records: int
    """Records in the log folded by the replay figure and opened by the startup figure."""
    startup_rounds: int
    """Daemon starts per log (empty, large) for the startup figure."""
    rss_step: int
    """New connections between two readings of the daemon's RSS (ten readings)."""


QUICK = Settings(
    rounds=1, warmup_s=0.3, duration_s=1.5, max_ops=100_000, log_records=30_000, startup_rounds=3, rss_step=500
)
FULL = Settings(
    rounds=4, warmup_s=0.5, duration_s=3.0, max_ops=400_000, log_records=100_000, startup_rounds=5, rss_step=10_000
)


# -- load ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class Exhausted(Exception):
    """Raised by a closed loop's call when it has nothing left to do: the window closes there (a shorter one)."""


async def closed_loop(
    call: Callable[[int, int], Awaitable[None]],
    *,
    in_flight: int,
    warmup_s: float,
    duration_s: float,
    max_ops: int,
    meter: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Keep ``in_flight`` calls going; time the ones that complete inside the window.

    ``call(worker, n)`` is one operation: ``worker`` is the caller's index
    (0..in_flight-1, for state owned by one worker), ``n`` the worker's own
    count. The window opens after ``warmup_s`` and closes after ``duration_s``,
    once ``max_ops`` calls completed in it, or once a call raised
    :class:`Exhausted`. Any other exception is counted as an error, not as an
    operation. ``meter`` (a server's CPU seconds, say) is read as the window
    opens and as it closes; the difference is returned as ``metered``.
    """
    latencies: list[float] = []
    errors: list[str] = []
    window = {"open": False, "closed": False}
    full = asyncio.Event()
    completed = [0]

    async def worker(index: int) -> None:
        n = 0
        while not window["closed"]:
            start = time.perf_counter()
            try:
                await call(index, n)
            except Exhausted:
                if not window["open"]:
                    raise BenchError("the load ran out of work before its timed window opened") from None
                full.set()
                return
            except Exception as exc:
                if window["open"] and not window["closed"]:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    if len(errors) >= 100:
                        full.set()  # something is wrong; stop early and report it
                    continue
                if not window["open"]:
                    raise  # a failure before the window is a broken setup: report it at once
                continue
            finally:
                n += 1
            completed[0] += 1
            if window["open"] and not window["closed"]:
                latencies.append(time.perf_counter() - start)
                if len(latencies) >= max_ops:
                    full.set()
            # A call that never suspends (an in-process attempt of a function that awaits nothing)
            # would otherwise keep the loop from ever running the window's timer.
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(worker(i)) for i in range(in_flight)]
    try:
        done, _ = await asyncio.wait(tasks, timeout=warmup_s, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a warm-up failure: raise it
        window["open"] = True
        opened = time.perf_counter()
        metered = meter() if meter is not None else math.nan
        # Calls already in flight when the window opens are counted if they end
        # inside it: in a closed loop that is the steady state, not a bias.
        try:
            await asyncio.wait_for(full.wait(), timeout=duration_s)
        except TimeoutError:
            pass
        window["closed"] = True
        elapsed = time.perf_counter() - opened
        count = len(latencies)
        if meter is not None:
            metered = meter() - metered
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        window["closed"] = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    measured = sorted(latencies[:count])
    return {
        "ops": count,
        "seconds": elapsed,
        "rate": count / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(measured, 0.50) * 1000,
        "p99_ms": percentile(measured, 0.99) * 1000,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "in_flight": in_flight,
        "completed": completed[0],
        "metered": metered,
    }


def uvloop_version() -> str | None:
    """uvloop's version if it is importable (then every event loop here uses it), else None."""
    try:
        import uvloop  # noqa: F401 - only whether it imports matters here
    except ImportError:
        return None
    return importlib.metadata.version("uvloop")


def run_loop(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` on a fresh event loop (uvloop's when asked for and importable)."""
    if use_uvloop and uvloop_version() is not None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    with asyncio.Runner() as runner:
        return runner.run(main)


# -- child processes ---------------------------------------------------------------


def _child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = fn(*args)
    except BaseException:
        conn.send((False, traceback.format_exc()))
    else:
        conn.send((True, result))
    finally:
        conn.close()


def in_child(fn: Callable[..., T], *args: Any, timeout: float) -> T:
    """``fn(*args)`` in a fresh (spawned) process; its result, or :class:`BenchError`.

    The child is killed (by its own handle) if it takes more than ``timeout`` seconds.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, fn, args), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise BenchError(f"{fn.__name__} did not finish within {timeout:.0f}s")
        ok, value = receive.recv()
    except EOFError:
        process.join(5)
        raise BenchError(f"{fn.__name__} died (exit code {process.exitcode})") from None
    finally:
        receive.close()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
    if not ok:
        raise BenchError(f"{fn.__name__} failed in its child process:\n{value}")
    return value  # type: ignore[no-any-return]  # what fn returned, through a pipe


# -- servers -------------------------------------------------------------------------


def orchestrator_command() -> list[str]:
    """How a user runs ``orchestrator``: the venv's console script, else ``python -m orchestrator``."""
    script = Path(sys.executable).with_name("orchestrator")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "orchestrator"]


def serve_command(database: str, *, grace_period: float = 1, web_listen: str = "") -> list[str]:
    """``orchestrator serve`` on 127.0.0.1:0 with the log at ``database`` (a URL), its web console off unless
    ``web_listen``, logging at INFO (the harness waits for the INFO "serving" line)."""
    return [
        *orchestrator_command(),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        web_listen,
        "--database",
        database,
        "--grace-period",
        f"{grace_period:g}",
        "--log-level",
        "info",
    ]


def clean_env() -> dict[str, str]:
    """This environment without ``ORCHESTRATOR_*`` and ``OTEL_*`` settings, so a user's config cannot skew a figure."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``); NaN elsewhere or once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """The resident set size (``VmRSS``) of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


class Server:
    """A server process on 127.0.0.1, ready once it prints a :data:`READY` line on stderr.

    ``ready_after`` is the time from just before the process was started to
    the moment that line was read (the startup figure).
    """

    def __init__(
        self, argv: Sequence[str], *, name: str, timeout: float = 60.0, env: Mapping[str, str] | None = None
    ) -> None:
        self._argv = list(argv)
        self._env = {**clean_env(), **(env or {})}
        self.name = name
        self._timeout = timeout
        self._lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self._tail: list[str] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.port = 0
        self.ready_after = math.nan
        self._ready_at = 0.0

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server process's id (0 before it is started)."""
        return self._process.pid if self._process is not None else 0

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        # Drains stderr until the process ends so that it never blocks on a full pipe.
        for line in process.stderr:
            self._lines.put((time.perf_counter(), line))
        self._lines.put((time.perf_counter(), None))

    def __enter__(self) -> Server:
        started = time.perf_counter()
        self._process = subprocess.Popen(
            self._argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env,
        )
        self._reader = threading.Thread(target=self._read, args=(self._process,), daemon=True)
        self._reader.start()
        deadline = started + self._timeout
        try:
            while True:
                try:
                    at, line = self._lines.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    raise BenchError(f"{self.name} did not report serving within {self._timeout:.0f}s") from None
                if line is None:
                    tail = "".join(self._tail[-20:])
                    raise BenchError(f"{self.name} exited before serving ({self._process.wait()}):\n{tail}")
                self._tail.append(line)
                match = READY.search(line)
                if match:
                    self.port = int(match.group(1))
                    self.ready_after = at - started
                    self._ready_at = at
                    return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s; the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            # The daemon logs "serving" a moment before its SIGTERM handler is
            # installed; a signal in between kills it undrained (exit -15).
            time.sleep(max(0.0, self._ready_at + _SETTLE_S - time.perf_counter()))
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(5)
        return process.returncode

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- figures -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, NaN when there is nothing to take it of."""
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def ratio(subject: float, baseline: float) -> float:
    """``subject / baseline``; NaN when the baseline is zero or unknown."""
    if not baseline or math.isnan(baseline) or math.isnan(subject):
        return math.nan
    return subject / baseline


def paired_ratio(subject: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]], key: str) -> float:
    """The median over rounds of ``subject[i][key] / baseline[i][key]``.

    Round ``i`` of the subject ran right next to round ``i`` of the baseline,
    so each quotient sees the same machine weather; the median of quotients
    resists a noisy neighbour better than the quotient of medians.
    """
    return median([ratio(s[key], b[key]) for s, b in zip(subject, baseline, strict=True)])


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of a closed-loop figure, with the rounds kept."""
    return {
        "rate": median([r["rate"] for r in runs]),
        "p50_ms": median([r["p50_ms"] for r in runs]),
        "p99_ms": median([r["p99_ms"] for r in runs]),
        "errors": sum(r.get("errors", 0) for r in runs),
        "first_error": next((r["first_error"] for r in runs if r.get("first_error")), ""),
        "rounds": list(runs),
    }


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
