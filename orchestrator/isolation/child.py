"""A worker process of the pool: ``python -m orchestrator.isolation.child DAEMON_PID``; one attempt at a time.

It talks to the daemon over the stdin and stdout it was started with
(:mod:`orchestrator.isolation._wire`); its own ``sys.stdout`` then writes to
its stderr (a plugin's ``print`` cannot garble the pipe) and ``sys.stdin``
reads nothing. It discovers the installed plugins as the daemon does, says it
is ready, and runs each attempt it is sent with a real
:class:`~orchestrator.context.Context` built over stand-ins: provider calls
and metadata writes are forwarded to the daemon and answered there (the
proxy injects the credentials there), and log lines are sent as they are
made. The credentials come here only when the function reads
``ctx.credentials`` (for an SDK that needs the raw token): each read asks the
daemon, and a log line is then redacted of them here too, before it is cut.
The function is called as in the daemon (:func:`orchestrator.runner.invoke`).

It exits as soon as its pipe from the daemon closes (a thread reads it, so a
function holding the event loop cannot delay that), and on Linux when the
daemon dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ctypes
import itertools
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

import anyio
import httpx

from orchestrator.context import (
    MAX_LOG_LINE,
    MAX_LOG_LINES,
    AttemptLog,
    ConnectionInfo,
    Context,
    EventInfo,
    IntegrationInfo,
)
from orchestrator.errors import PluginError
from orchestrator.isolation import _wire
from orchestrator.model import ConnectionRef, JSONObject, LifecycleEvent
from orchestrator.plugins import Installed, Registry, discover
from orchestrator.provider import ReadOnlyCredentials, redact_excerpt
from orchestrator.runner import Ended, Raised, invoke

_PR_SET_PDEATHSIG = 1


class _Channel:
    """The pipes to the daemon: frames written whole from any thread, read by one thread."""

    def __init__(self, incoming: int, outgoing: int) -> None:
        self._in = incoming
        self._out = outgoing
        self._lock = threading.Lock()

    def send(self, message: JSONObject) -> None:
        """Write one message (``ResourceExhausted`` when too large); exit if the daemon is gone."""
        data = memoryview(_wire.frame(message))
        with self._lock:
            try:
                while data:
                    data = data[os.write(self._out, data) :]
            except BrokenPipeError:
                os._exit(0)

    def _read(self, count: int) -> bytes | None:
        chunks = []
        while count:
            chunk = os.read(self._in, count)
            if not chunk:
                return None
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> JSONObject | None:
        """The next message from the daemon; ``None`` when the pipe has closed."""
        header = self._read(_wire.HEADER.size)
        body = self._read(_wire.size(header)) if header is not None else None
        return _wire.parse(body) if body is not None else None


class _Replies:
    """The replies the daemon owes this process's calls, whichever attempt made them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.numbers = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[JSONObject]] = {}
        self.blocked: dict[int, concurrent.futures.Future[JSONObject]] = {}
        """Callers that block their thread for the reply (which may be the loop's)."""
        self.lock = threading.Lock()

    def answer(self, message: JSONObject) -> None:
        """A reply came (on the loop's thread): hand it to its caller, if it still waits."""
        reply = self.waiting.get(message["id"])
        if reply is not None and not reply.done():
            reply.set_result(message)

    def settle(self, message: JSONObject) -> bool:
        """A reply came (on the reader's thread): hand it to a blocked caller at once; whether it was one's."""
        with self.lock:
            blocked = self.blocked.pop(message["id"], None)
        if blocked is not None:
            blocked.set_result(message)
        return blocked is not None


class _Link:
    """One attempt's messages to the daemon: each names the attempt, so that none is taken for a later one's.

    (A thread a function leaves behind may still use its context after the attempt: the daemon drops that.)
    """

    def __init__(self, channel: _Channel, replies: _Replies, attempt: int) -> None:
        self._channel = channel
        self._replies = replies
        self._attempt = attempt

    def send(self, message: JSONObject) -> None:
        """Send ``message`` as this attempt's."""
        self._channel.send({**message, "n": self._attempt})

    async def call(self, op: str, args: JSONObject) -> Any:
        """The daemon's answer to ``op(args)``; the exception its context raised, raised here."""
        number = next(self._replies.numbers)
        self.send({"t": "call", "id": number, "op": op, "args": args})
        # Its reply is handed over on this thread, so it cannot come before this line.
        reply = self._replies.waiting[number] = self._replies.loop.create_future()
        try:
            answer = await reply
        except BaseException:
            if not reply.done():
                self.send({"t": "cancel", "id": number})  # the function stopped waiting
            raise
        finally:
            self._replies.waiting.pop(number, None)
        if "error" in answer:
            raise _wire.error_from(answer["error"])
        return answer["value"]

    def call_blocking(self, op: str, args: JSONObject) -> Any:
        """:meth:`call` for a caller that cannot await, on any thread, the loop's included (its reply comes on
        the reader's thread)."""
        number = next(self._replies.numbers)
        reply: concurrent.futures.Future[JSONObject] = concurrent.futures.Future()
        with self._replies.lock:
            self._replies.blocked[number] = reply
        self.send({"t": "call", "id": number, "op": op, "args": args})
        answer = reply.result()
        if "error" in answer:
            raise _wire.error_from(answer["error"])
        return answer["value"]


class _Provider:
    """Provider calls, made by the daemon's proxy (which injects the credentials there); ``ctx.credentials``."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self.held: list[Mapping[str, str]] = []
        """Every set of credentials the daemon sent this attempt (for the log's redaction)."""
        self.credentials = ReadOnlyCredentials(self._credentials)
        """``ctx.credentials``: each read asks the daemon, so it sees fresh credentials after a 401."""

    def _credentials(self) -> Mapping[str, str]:
        current: dict[str, str] = dict(self._link.call_blocking(_wire.CREDENTIALS, {}))
        if current and current not in self.held:
            self.held.append(current)
        return current

    async def request(self, method: str, endpoint: str, **options: Any) -> httpx.Response:
        """See :meth:`orchestrator.provider.Provider.request` (``params``, ``json``, ``data``, ``headers``)."""
        args: JSONObject = {"method": method, "endpoint": endpoint}
        for name in ("params", "headers"):
            value = options.get(name)
            args[name] = dict(value) if value is not None else None
        args["json"] = options.get("json")
        data = options.get("data")
        if isinstance(data, bytes):
            args["data_b64"] = base64.b64encode(data).decode()
        else:
            args["data"] = data
        return _wire.response_from(await self._link.call(_wire.REQUEST, args))


class _Sink:
    """Metadata writes, made by the daemon's context; reads see what the daemon last answered."""

    def __init__(self, link: _Link, metadata: JSONObject) -> None:
        self._link = link
        self._metadata = dict(metadata)

    def current(self) -> JSONObject:
        return dict(self._metadata)

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        answer = await self._link.call(_wire.WRITE, {"metadata": metadata, "merge": merge})
        self._metadata = dict(answer["current"])


class _Log(AttemptLog):
    """Log lines, sent to the daemon as they are made (kept there even if this process is killed).

    The daemon redacts them of the attempt's credentials before it cuts them; a line is cut here
    first, to one character more than the daemon keeps, after redacting the credentials this
    process holds (``held``: those ``ctx.credentials`` brought), so that the cut halves none.
    """

    def __init__(self, link: _Link, held: list[Mapping[str, str]]) -> None:
        super().__init__()
        self._link = link
        self._held = held
        self._sent = 0

    def add(self, line: str) -> None:
        if self._sent >= MAX_LOG_LINES:
            self.dropped += 1
            return
        self._sent += 1
        self._link.send({"t": "log", "line": redact_excerpt(line, self._held, MAX_LOG_LINE + 1)})


def _find(registry: Registry, wanted: JSONObject) -> Installed:
    """The function the daemon means, as this process loaded it; :class:`PluginError` if it differs or is missing."""
    found = registry.named(wanted["name"], wanted["integration"])
    if not found:
        raise PluginError(f"the worker process did not load function {wanted['name']!r} (see the daemon's log)")
    ours = found[0]
    if (ours.distribution, ours.version, ours.entry_point) != (
        wanted["distribution"],
        wanted["version"],
        wanted["entry_point"],
    ):
        raise PluginError(
            f"the worker process loaded {ours.distribution} {ours.version} ({ours.entry_point}) where the daemon"
            f" runs {wanted['distribution']} {wanted['version']} ({wanted['entry_point']}): restart the daemon"
            " after changing plugins"
        )
    return ours


async def _attempt(message: JSONObject, registry: Registry, link: _Link) -> None:
    provider = _Provider(link)
    log = _Log(link, provider.held)
    try:
        function = _find(registry, message["function"])
    except PluginError as exc:
        ended = Ended(raised=Raised.of(exc))
    else:
        connection, event = message["connection"], message["event"]
        ref = ConnectionRef(connection["environment"], connection["integration"], connection["connection_id"])
        ctx = Context(
            connection=ConnectionInfo(ref, connection["config"]),
            event=EventInfo(LifecycleEvent(event["type"]), event["payload"], event["event_id"], event["attempt"]),
            provider=provider,
            metadata_model=function.function.metadata,
            sink=_Sink(link, message["metadata"]),
            log=log,
            integration=IntegrationInfo.from_json(message["integration"]),
            env=message["env"],
        )
        ended = await invoke(function, ctx)
    link.send(_wire.ended(ended, log.dropped))


async def _serve(channel: _Channel, registry: Registry) -> None:
    loop = asyncio.get_running_loop()
    replies = _Replies(loop)
    attempts_in, attempts = anyio.create_memory_object_stream[JSONObject](1)

    def deliver(message: JSONObject) -> None:  # on the loop's thread
        if message["t"] == "reply":
            replies.answer(message)
        else:
            attempts_in.send_nowait(message)

    def read() -> None:  # its own thread: the pipe's end is noticed even while a function holds the loop
        while (message := channel.receive()) is not None:
            if message["t"] == "reply" and replies.settle(message):
                continue  # its caller blocks a thread, maybe the loop's: handed over here
            loop.call_soon_threadsafe(deliver, message)
        os._exit(0)  # the daemon closed the pipe: it stopped, or it is gone

    threading.Thread(target=read, name="orchestrator worker pipe", daemon=True).start()
    async with attempts:
        async for message in attempts:
            await _attempt(message, registry, _Link(channel, replies, message["n"]))


def _exit_with_daemon(daemon: int) -> None:
    """On Linux, have the kernel kill this process when the daemon dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no libc to ask: the pipe's end still stops this process
            pass
    if os.getppid() != daemon:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """Serve the daemon whose pid is the first argument over this process's stdin and stdout."""
    args = sys.argv[1:] if argv is None else argv
    daemon = int(args[0]) if args else os.getppid()
    incoming, outgoing = os.dup(0), os.dup(1)
    quiet = os.open(os.devnull, os.O_RDONLY)
    os.dup2(quiet, 0)
    os.close(quiet)
    os.dup2(2, 1)  # print() goes to stderr, never into the pipe
    _exit_with_daemon(daemon)
    channel = _Channel(incoming, outgoing)
    registry = discover()
    broken = [str(problem)[:1000] for problem in registry.broken[:50]]
    channel.send({"t": "ready", "functions": len(registry.functions), "broken": broken})
    anyio.run(_serve, channel, registry)


if __name__ == "__main__":
    main()
