"""The acceptance tests' tools: the ``orchestrator`` command as a user runs it, and a fresh virtualenv to
pip-install into (the provider is :class:`tests.support.provider.WebhookProvider`).

Nothing here sleeps to wait. A daemon is ready when it logs its ``serving``
line and a follower has seen a record when its line arrives; lines are read as
the test waits for them, each wait bounded with ``fail_after``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

_SCRIPT = Path(sys.executable).with_name("orchestrator")
COMMAND: tuple[str, ...] = (str(_SCRIPT),) if _SCRIPT.exists() else (sys.executable, "-m", "orchestrator")
"""The development venv's ``orchestrator`` (the console script next to this interpreter)."""

READY = re.compile(r"serving orchestrator\.v1\.Orchestrator on 127\.0\.0\.1:(\d+), log ([^\s\"]+)")
STARTUP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
INSTALL_TIMEOUT = 300.0
"""pip installs from PyPI: minutes on a slow network."""
MAX_LINE = 1 << 20


def environment(**settings: str) -> dict[str, str]:
    """This process's environment without the developer's ``ORCHESTRATOR_*`` settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(settings)
    return env


def sqlite_url(path: Path) -> str:
    """``sqlite:///absolute/path``, the daemon's own spelling."""
    return f"sqlite://{path.resolve()}"


def table(text: str) -> list[list[str]]:
    """The cells of a printed table (columns are separated by two spaces or more), header first."""
    return [re.split(r" {2,}", line.strip()) for line in text.splitlines() if line.strip()]


# -- one-shot commands -------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """How one command exited and what it printed."""

    args: tuple[str, ...]
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


async def run(
    *args: str,
    command: Sequence[str] = COMMAND,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    within: float = COMMAND_TIMEOUT,
) -> Result:
    """Run ``orchestrator ARGS`` to its end (stdin closed), killing it after ``within`` seconds."""
    with anyio.fail_after(within):
        done = await anyio.run_process(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            check=False,
            env=dict(env) if env is not None else environment(),
            cwd=cwd,
        )
    return Result((*command, *args), done.returncode, done.stdout.decode(), done.stderr.decode())


# -- long-running commands ----------------------------------------------------------------


class Running:
    """A long-running command whose stdout or stderr (one of them) is read line by line as the test waits."""

    def __init__(self, process: anyio.abc.Process, args: Sequence[str], stream: str) -> None:
        self.process = process
        self.args = tuple(args)
        self.lines: list[str] = []
        """Every line read so far (for failure messages)."""
        source = process.stderr if stream == "stderr" else process.stdout
        assert source is not None
        self._reader = BufferedByteReceiveStream(source)
        self._eof = False

    async def _next_line(self) -> str | None:
        if self._eof:
            return None
        try:
            line = (await self._reader.receive_until(b"\n", MAX_LINE)).decode(errors="replace")
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._eof = True
            return None
        self.lines.append(line)
        return line

    async def wait_for(self, pattern: str | re.Pattern[str], within: float = STARTUP_TIMEOUT) -> re.Match[str]:
        """Read lines until one matches ``pattern``; fail if the stream ends or ``within`` seconds pass first."""
        with anyio.fail_after(within):
            while (line := await self._next_line()) is not None:
                if match := re.search(pattern, line):
                    return match
        raise AssertionError(f"the output ended before a line matched {pattern!r}:\n{self}")

    async def stop(self, signum: signal.Signals = signal.SIGTERM, within: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` (unless it has exited), read the rest of the output, wait for the exit; the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        with anyio.fail_after(within):
            while await self._next_line() is not None:
                pass
            return await self.process.wait()

    @property
    def text(self) -> str:
        """Everything read so far."""
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"$ {' '.join(self.args)}\nexit code {self.process.returncode}\n--- output read\n{self.text}"


@asynccontextmanager
async def start(
    *args: str,
    command: Sequence[str] = COMMAND,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stream: str = "stderr",
    kind: type[Running] = Running,
) -> AsyncIterator[Running]:
    """Run ``orchestrator ARGS`` for the block, reading ``stream``; killed at the end if still running.

    The other stream goes to ``/dev/null``; the pipes are closed at the end.
    """
    argv = [*command, *args]
    process = await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
        env=dict(env) if env is not None else environment(),
        cwd=cwd,
    )
    async with process:  # closes the pipes and reaps the process, killing it if cancelled
        try:
            yield kind(process, argv, stream)
        finally:
            if process.returncode is None:
                process.kill()


class Daemon(Running):
    """``orchestrator serve`` on 127.0.0.1 and a port the kernel picks."""

    port: int
    address: str


@asynccontextmanager
async def serve(
    database: Path,
    *args: str,
    command: Sequence[str] = COMMAND,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Daemon]:
    """``orchestrator serve`` on ``database`` for the block, entered once it serves (killed at the end if running)."""
    argv = ("serve", "--listen", "127.0.0.1:0", "--database", sqlite_url(database), "--grace-period", "5", *args)
    async with start(*argv, command=command, env=env, cwd=database.parent, kind=Daemon) as running:
        assert isinstance(running, Daemon)
        match = await running.wait_for(READY)
        assert match[2] == sqlite_url(database), match[0]
        running.port = int(match[1])
        running.address = f"127.0.0.1:{running.port}"
        yield running


def snapshot(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the log's tables, read through a read-only SQLite connection."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return {
            name: db.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()
            for name in ("events", "connections", "jobs")
        }


# -- a fresh virtualenv ----------------------------------------------------------------------


@dataclass(frozen=True)
class FreshVenv:
    """A plain virtualenv with the orchestrator and the salesforce and github plugins pip-installed."""

    path: Path

    @property
    def bin(self) -> Path:
        """Its scripts directory."""
        return self.path / "bin"

    @property
    def orchestrator(self) -> tuple[str, ...]:
        """Its ``orchestrator`` command."""
        return (str(self.bin / "orchestrator"),)

    def environment(self) -> dict[str, str]:
        """A shell of this venv: its bin first on PATH, nothing of the development venv or ``ORCHESTRATOR_*``."""
        drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ORCHESTRATOR_")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        return env

    def pip(self, *args: str) -> None:
        """Run its pip quietly; fail the test with pip's output if it fails."""
        completed = subprocess.run(
            [str(self.bin / "python"), "-m", "pip", "--disable-pip-version-check", "-q", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.environment(),
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        assert completed.returncode == 0, f"pip {' '.join(args)}\n{completed.stdout}{completed.stderr}"

    def has(self, module: str) -> bool:
        """Whether ``module`` is importable in the venv."""
        probe = [str(self.bin / "python"), "-c", f"import {module}"]
        found = subprocess.run(
            probe, stdin=subprocess.DEVNULL, capture_output=True, env=self.environment(), timeout=60, check=False
        )
        return found.returncode == 0
