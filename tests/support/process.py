"""The ``orchestrator`` command as a user runs it, in subprocesses: one-shot commands, daemons, followers.

One-shot commands (:func:`run`) run to their end with stdin closed and their
output captured. Long-running ones (:class:`Process`, :class:`Daemon`) have
stdout and stderr read line by line on threads, so a test waits for a line
with a timeout and a full pipe never blocks the child. Nothing here sleeps to
wait: a daemon is ready when it logs its ``serving ...`` line, and a follower
has printed a record when its line arrives.

Sync tests use these directly. Async tests use the same processes through
:func:`arun`, :func:`start` and :func:`serve`, whose waits run on worker
threads (:class:`Running`), so the test's event loop (its gRPC clients, its
in-process provider) keeps going meanwhile.

``environment()`` drops the developer's ``ORCHESTRATOR_*`` settings and
``PYTHONUNBUFFERED``: a user's pipe is block-buffered, and the CLI must flush
what it prints (``events --follow``) by itself.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio.to_thread

_SCRIPT = Path(sys.executable).with_name("orchestrator")
COMMAND: tuple[str, ...] = (str(_SCRIPT),) if _SCRIPT.exists() else (sys.executable, "-m", "orchestrator")
"""The development venv's ``orchestrator`` (the console script next to this interpreter), or ``python -m``."""

READY = re.compile(r"serving orchestrator\.v1\.Orchestrator on 127\.0\.0\.1:(\d+), log ([^\s\"]+)")
"""The line a daemon logs once it serves: its port and its log's URL."""
STARTUP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def environment(**settings: str) -> dict[str, str]:
    """This process's environment without ``ORCHESTRATOR_*`` or ``PYTHONUNBUFFERED``, plus ``settings``.

    A daemon started with it serves no web console (``ORCHESTRATOR_WEB_LISTEN=off``) unless the
    test says ``--web-listen``: the console's default port is one for the whole machine.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_") and k != "PYTHONUNBUFFERED"}
    env["ORCHESTRATOR_WEB_LISTEN"] = "off"
    env.update(settings)
    return env


def sqlite_url(path: Path) -> str:
    """``sqlite://`` and the absolute path: three slashes in all, the daemon's own default form."""
    return f"sqlite://{path.resolve()}"


def closed_port() -> int:
    """A loopback port nothing listens on (bound for a moment by us, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def snapshot(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the log's tables, read through a read-only SQLite connection; ``jobs`` is the outbox: the jobs
    still to run (queued or running), not those that ended (kept beside them)."""
    outbox = "jobs WHERE status IN ('queued', 'running')"
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return {
            name: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for name, table in (("events", "events"), ("connections", "connections"), ("jobs", outbox))
        }


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` now (read from ``/proc``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        state_and_parent = text[text.rindex(")") + 2 :].split()
        if int(state_and_parent[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def ends(pid: int, within: float) -> bool:
    """Whether process ``pid`` has ended or ends within ``within`` seconds (woken by its end through a pidfd)."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([handle], [], [], within)
        return bool(readable)
    finally:
        os.close(handle)


# -- one-shot commands -------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """How one command exited and what it printed."""

    args: tuple[str, ...]
    """The whole command line, the program first."""
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"$ {' '.join(self.args)}\nexit code {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"

    def json(self) -> Any:
        """stdout as one JSON document."""
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        """stdout as one JSON document per line."""
        return [json.loads(line) for line in self.out.splitlines()]


def run(
    *args: str,
    command: Sequence[str] = COMMAND,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> Result:
    """Run ``orchestrator ARGS`` (or ``command ARGS``) to its end, stdin closed; killed after ``timeout`` seconds."""
    argv = (*command, *args)
    completed = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        env=dict(env) if env is not None else environment(),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Result(argv, completed.returncode, completed.stdout, completed.stderr)


async def arun(
    *args: str,
    command: Sequence[str] = COMMAND,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    within: float = COMMAND_TIMEOUT,
) -> Result:
    """:func:`run` on a worker thread, for async tests (the event loop keeps running); killed after ``within`` s."""
    return await anyio.to_thread.run_sync(partial(run, *args, command=command, env=env, cwd=cwd, timeout=within))


def table(text: str) -> list[list[str]]:
    """The cells of a printed table (columns are separated by two spaces or more), header first."""
    return [re.split(r" {2,}", line.strip()) for line in text.splitlines() if line.strip()]


def fields(text: str) -> dict[str, str]:
    """A two-column ``FIELD  VALUE`` table (``emit``, ``connections get``) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            key, *value = re.split(r" {2,}", line.strip(), maxsplit=1)
            out[key] = value[0] if value else ""
    return out


def rows(text: str) -> list[dict[str, str]]:
    """A table with a header line as dicts, cut at the header's column starts; stops at the first blank line."""
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return []
    header = lines[0]
    starts = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    out = []
    for line in lines[1:]:
        if not line.strip():
            break
        cells = {}
        for i, (start, name) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else None
            cells[name] = line[start:end].strip()
        out.append(cells)
    return out


# -- long-running commands ----------------------------------------------------------------


class Lines:
    """Reads a text pipe line by line on a thread, so a test can wait for a line with a timeout."""

    _EOF = object()

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self._queue: queue.Queue[object] = queue.Queue()
        self.lines: list[str] = []
        """Every line read so far (for assertions and failure messages)."""
        self._thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        """Read the stream to its end, keeping and queueing each line."""
        for line in self._stream:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(self._EOF)

    def next_line(self, timeout: float) -> str:
        """The next line; :class:`TimeoutError` if none comes in time, :class:`EOFError` at the end."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout:.0f}s; so far: {self.lines}") from None
        if item is self._EOF:
            self._queue.put(item)  # stay at the end for later callers
            raise EOFError(f"the stream ended; it said: {self.lines}")
        assert isinstance(item, str)
        return item

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Skip lines until one matches ``pattern``; fail after ``timeout`` seconds or at the end of the stream."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line matching {pattern!r} within {timeout:.0f}s; so far: {self.lines}")
            match = re.search(pattern, self.next_line(remaining))
            if match:
                return match

    def close(self) -> None:
        """Wait for the end of the stream (the writer has exited) and close the pipe."""
        self._thread.join(timeout=STOP_TIMEOUT)
        assert not self._thread.is_alive(), "the pipe's writer did not exit"
        self._stream.close()

    @property
    def text(self) -> str:
        """Everything read so far."""
        return "\n".join(self.lines)


class Process:
    """A long-running ``orchestrator ARGS`` (or ``command ARGS``) whose stdout and stderr are read line by line."""

    def __init__(
        self,
        *args: str,
        command: Sequence[str] = COMMAND,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = (*command, *args)
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else environment(),
            cwd=cwd,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        name = args[0] if args else command[-1]
        self.stdout = Lines(self.process.stdout, f"{name} stdout")
        self.stderr = Lines(self.process.stderr, f"{name} stderr")
        self.returncode: int | None = None

    def send_signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` unless it has exited; return at once."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def signal(self, signum: signal.Signals, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` (unless it has exited), wait for the exit, close the pipes; the exit code."""
        self.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the exit (SIGKILL after ``timeout`` seconds), read the rest, close the pipes; the exit code."""
        if self.returncode is not None:
            return self.returncode
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stdout.close()
        self.stderr.close()
        self.returncode = self.process.returncode
        return self.returncode

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nexit code {self.returncode}\n"
            f"--- stdout\n{self.stdout.text}\n--- stderr\n{self.stderr.text}"
        )


class Daemon(Process):
    """``orchestrator serve`` on 127.0.0.1 and a port the kernel picks, started once it logs where it serves."""

    def __init__(
        self,
        database: Path,
        *args: str,
        url: str | None = None,
        command: Sequence[str] = COMMAND,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.database = database
        self.url = url or sqlite_url(database)
        # No web console unless asked for (``--web-listen 127.0.0.1:0`` in ``args``): its default port is one.
        argv = ("serve", "--listen", "127.0.0.1:0", "--web-listen", "", "--database", self.url, "--grace-period", "5")
        argv += args
        super().__init__(*argv, command=command, env=env, cwd=database.parent)
        try:
            match = self.stderr.wait_for(READY, STARTUP_TIMEOUT)
        except BaseException:
            self.signal(signal.SIGKILL)
            raise
        self.port = int(match[1])
        self.address = f"127.0.0.1:{self.port}"
        assert match[2] == self.url, match[0]

    def stop(self) -> int:
        """SIGTERM: drain, close the log and exit; the exit code."""
        return self.signal(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL: no drain, no close; the exit code (``-9``)."""
        return self.signal(signal.SIGKILL)


@contextmanager
def drained(database: Path, *args: str, env: Mapping[str, str] | None = None) -> Iterator[Daemon]:
    """A :class:`Daemon` on ``database`` for the block; at its end SIGTERM must drain it to exit code 0."""
    daemon = Daemon(database, *args, env=env)
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, f"the daemon exited with {code} after SIGTERM:\n{daemon}"


class Cli:
    """``orchestrator`` as a user's shell runs it, pointed at one daemon by ``ORCHESTRATOR_ADDRESS``."""

    def __init__(self, daemon: Daemon, cwd: Path) -> None:
        self.daemon = daemon
        self.cwd = cwd

    def __call__(self, *args: str, **settings: str) -> Result:
        """Run one command; ``settings`` are extra environment variables."""
        env = environment(ORCHESTRATOR_ADDRESS=self.daemon.address, **settings)
        return run(*args, env=env, cwd=self.cwd)

    def ok(self, *args: str, **settings: str) -> Result:
        """Run one command that must succeed with nothing on stderr."""
        result = self(*args, **settings)
        assert result.code == 0, str(result)
        assert result.err == "", str(result)
        return result


# -- the same, for async tests ---------------------------------------------------------------


class Running:
    """A :class:`Process` seen from an async test, one of its streams (stderr unless said) read as it waits."""

    def __init__(self, process: Process, stream: str = "stderr") -> None:
        self.process = process
        self._lines = process.stdout if stream == "stdout" else process.stderr

    @property
    def lines(self) -> list[str]:
        """Every line of the stream so far."""
        return self._lines.lines

    @property
    def text(self) -> str:
        """Everything the stream said so far."""
        return self._lines.text

    async def wait_for(self, pattern: str | re.Pattern[str], within: float = STARTUP_TIMEOUT) -> re.Match[str]:
        """Read lines until one matches ``pattern``; fail if the stream ends or ``within`` seconds pass first."""
        return await anyio.to_thread.run_sync(self._lines.wait_for, pattern, within, abandon_on_cancel=True)

    async def stop(self, signum: signal.Signals = signal.SIGTERM, within: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` (unless it has exited), read the rest of the output, wait for the exit; the exit code."""
        return await anyio.to_thread.run_sync(self.process.signal, signum, within)

    async def wait(self, within: float = STOP_TIMEOUT) -> int:
        """Wait for the exit (SIGKILL after ``within`` seconds), having sent nothing; the exit code."""
        return await anyio.to_thread.run_sync(self.process.wait, within)

    def __str__(self) -> str:
        return str(self.process)


class Serving(Running):
    """A :class:`Daemon` seen from an async test, its stderr read as it waits."""

    process: Daemon

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.process.port

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return self.process.address


@asynccontextmanager
async def start(
    *args: str,
    command: Sequence[str] = COMMAND,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stream: str = "stderr",
) -> AsyncIterator[Running]:
    """Run ``orchestrator ARGS`` for the block, ``stream`` read as the test waits; killed at the end if running."""
    process = await anyio.to_thread.run_sync(partial(Process, *args, command=command, env=env, cwd=cwd))
    try:
        yield Running(process, stream)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(process.signal, signal.SIGKILL)


@asynccontextmanager
async def serve(
    database: Path,
    *args: str,
    command: Sequence[str] = COMMAND,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Serving]:
    """``orchestrator serve`` on ``database`` for the block, entered once it serves (killed at the end if running)."""
    daemon = await anyio.to_thread.run_sync(partial(Daemon, database, *args, command=command, env=env))
    try:
        yield Serving(daemon)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(daemon.signal, signal.SIGKILL)
