"""Running the ``orchestrator`` command as a subprocess: one-shot commands, the daemon, long-running readers.

Nothing here sleeps to wait: a daemon is ready when it logs its ``serving ...``
line, and a follower has printed a record when its line arrives on stdout;
both are read line by line on a thread and waited for with a timeout.

:class:`Api` is the daemon's gRPC API as a platform service calls it; tests use
it to arrange state quickly (a command costs a Python start-up) when the
command under test is another one.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

_SCRIPT = Path(sys.executable).with_name("orchestrator")
COMMAND: tuple[str, ...] = (str(_SCRIPT),) if _SCRIPT.exists() else (sys.executable, "-m", "orchestrator")
"""The installed console script next to this interpreter, or ``python -m orchestrator``."""

READY = re.compile(r"serving orchestrator\.v1\.Orchestrator on 127\.0\.0\.1:(\d+), log ([^\s\"]+)")
STARTUP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def environment(**settings: str) -> dict[str, str]:
    """This process's environment without any ``ORCHESTRATOR_*`` setting of the developer's shell, plus ``settings``.

    ``PYTHONUNBUFFERED`` is dropped too: a user's pipe is block-buffered, and
    the CLI must flush what it prints (``events --follow``) by itself.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_") and k != "PYTHONUNBUFFERED"}
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


@dataclass(frozen=True)
class Result:
    """What one command printed and how it exited."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        command = " ".join(self.args)
        return f"$ orchestrator {command}\nexit code {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"

    def json(self) -> Any:
        """stdout as one JSON document."""
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        """stdout as one JSON document per line."""
        return [json.loads(line) for line in self.out.splitlines()]


def run(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> Result:
    """Run ``orchestrator ARGS`` to completion (stdin closed, output captured)."""
    completed = subprocess.run(
        [*COMMAND, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else environment(),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Result(args, completed.returncode, completed.stdout, completed.stderr)


def fields(table: str) -> dict[str, str]:
    """A two-column ``FIELD  VALUE`` table (``emit``, ``connections get``) as a dict."""
    out: dict[str, str] = {}
    for line in table.splitlines():
        if line.strip():
            key, *value = re.split(r" {2,}", line.strip(), maxsplit=1)
            out[key] = value[0] if value else ""
    return out


def rows(table: str) -> list[dict[str, str]]:
    """A table with a header line as dicts, cut at the header's column starts; stops at the first blank line."""
    lines = table.splitlines()
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


class LineReader:
    """Reads a text pipe line by line on a thread, so a test can wait for a line with a timeout."""

    _EOF = object()

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self._queue: queue.Queue[object] = queue.Queue()
        self.lines: list[str] = []
        """Every line read so far (for failure messages)."""
        self._thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
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
        """Skip lines until one matches ``pattern``; fail after ``timeout`` seconds."""
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
    """A long-running ``orchestrator`` subprocess whose stdout and stderr are read line by line."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [*COMMAND, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else environment(),
            cwd=cwd,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout = LineReader(self.process.stdout, f"{args[0]} stdout")
        self.stderr = LineReader(self.process.stderr, f"{args[0]} stderr")
        self.returncode: int | None = None

    def signal(self, signum: signal.Signals) -> int:
        """Send ``signum`` (unless it has exited), wait for the exit, close the pipes; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.wait()

    def wait(self) -> int:
        """Wait for the exit (SIGKILL after :data:`STOP_TIMEOUT`), close the pipes; the exit code."""
        if self.returncode is not None:
            return self.returncode
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stdout.close()
        self.stderr.close()
        self.returncode = self.process.returncode
        return self.returncode

    def __str__(self) -> str:
        return (
            f"$ orchestrator {' '.join(self.args)}\nexit code {self.returncode}\n"
            f"--- stdout\n{self.stdout.text}\n--- stderr\n{self.stderr.text}"
        )


class Daemon(Process):
    """``orchestrator serve`` on 127.0.0.1 and a port the kernel picks, ready once it logs where it serves."""

    def __init__(self, database: Path, *args: str, url: str | None = None) -> None:
        self.database = database
        self.url = url or sqlite_url(database)
        super().__init__(
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            self.url,
            "--grace-period",
            "5",
            *args,
            cwd=database.parent,
        )
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


class Api:
    """The daemon's gRPC API over one channel, answering like ``emit --json``."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.OrchestratorStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def emit(
        self,
        event: str,
        connection: str,
        integration: str,
        *,
        environment: str = "dev",
        config: Mapping[str, Any] | None = None,
        idempotency_key: str = "",
    ) -> dict[str, Any]:
        """Emit one lifecycle event; the response's event_id, position, version, state and deduplicated."""
        request = pb.EmitLifecycleEventRequest(
            connection=pb.ConnectionRef(environment=environment, integration=integration, connection_id=connection),
            event=pb.LifecycleEvent.Value("LIFECYCLE_EVENT_" + event.upper().replace("-", "_")),
            idempotency_key=idempotency_key,
        )
        if config:
            request.connection_config.update(config)
        response = self.stub.EmitLifecycleEvent(request, timeout=COMMAND_TIMEOUT)
        return {
            "event_id": response.event_id,
            "position": response.position,
            "version": response.version,
            "state": pb.ConnectionState.Name(response.state).removeprefix("CONNECTION_STATE_").lower(),
            "deduplicated": response.deduplicated,
        }

    def lifecycle(self, connection: str, integration: str) -> list[dict[str, Any]]:
        """Validate, create and delete one connection; the three responses."""
        return [
            self.emit(event, connection, integration)
            for event in ("validate-connection", "post-connection-creation", "pre-connection-deletion")
        ]
