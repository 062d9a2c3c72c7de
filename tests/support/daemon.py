"""A real daemon in the test's process, the event functions it runs, and a way to seed its log before it starts.

The daemon runs in-process (:func:`orchestrator.daemon.serve`) in a task group
of the test's event loop, on an ephemeral loopback port and an SQLite file;
the tests talk to it over TCP with grpc.aio clients (:mod:`tests.support.grpc`).
Its functions are the test's own (:func:`function`), given as the registry
instead of plugin discovery.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import grpc

from orchestrator import RetryPolicy, on_event
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.clock import Clock
from orchestrator.config import DispatchConfig, Integration, ServeConfig
from orchestrator.credentials import Resolver
from orchestrator.daemon import serve
from orchestrator.model import ConnectionRef
from orchestrator.plugins import Installed, Registry
from orchestrator.records import NewEvent, Record
from orchestrator.store import open_store

STARTUP_TIMEOUT = 30
"""Seconds the daemon may take to report ready (it takes milliseconds)."""
FAST_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, backoff=2, max_interval=0.05)
"""The retries of :func:`serving`'s daemons: three attempts, milliseconds apart."""


@dataclass(frozen=True)
class Daemon:
    """A running daemon and a client channel to it."""

    port: int
    database: str
    channel: grpc.aio.Channel
    stub: pb_grpc.OrchestratorStub
    stop: anyio.Event
    """Set it to make the daemon drain and stop; leaving the block sets it anyway."""
    web: str = ""
    """The web console's URL (``http://127.0.0.1:PORT/``), when it was asked for (``web_listen=``)."""


@asynccontextmanager
async def run_daemon(
    database: str,
    *,
    registry: Registry | None = None,
    integrations: Mapping[str, Integration] | None = None,
    dispatch: DispatchConfig | None = None,
    clock: Clock | None = None,
    resolver: Resolver | None = None,
    secret_key: str = "",
    credentials: grpc.ChannelCredentials | None = None,
    **settings: Any,
) -> AsyncIterator[Daemon]:
    """Serve ``database`` on ``127.0.0.1:0`` until the block ends, then stop the daemon and wait for it.

    ``registry`` replaces plugin discovery (the event functions to run) and ``resolver`` the
    credentials resolver's; ``integrations``, ``dispatch`` and ``secret_key`` (else the key file
    beside the log) are the daemon's settings, ``clock`` its clock; ``settings`` are more
    :class:`~orchestrator.config.ServeConfig` fields (``tls_cert=``, ``auth_token_file=``, ...).
    The daemon's channel uses ``credentials`` (TLS) when given, else plaintext. The web console is
    off unless ``web_listen=`` says where (``"127.0.0.1:0"``): then ``Daemon.web`` is its URL.
    """
    ready = anyio.Event()
    consoles: list[str] = []
    stop = anyio.Event()
    ports: list[int] = []
    failure: Exception | None = None

    def on_ready(port: int) -> None:
        """Note the port the daemon serves on."""
        ports.append(port)
        ready.set()

    config = ServeConfig(
        listen="127.0.0.1:0",
        database=database,
        grace_period=1,
        dispatch=dispatch or DispatchConfig(),
        integrations=dict(integrations or {}),
        secret_key=secret_key,
        **{"web_listen": "", **settings},
    )
    async with anyio.create_task_group() as tg:
        # If serve() fails before it is ready, the task group cancels this wait and re-raises.
        tg.start_soon(
            partial(
                serve,
                config,
                on_ready=on_ready,
                stop=stop,
                registry=registry,
                clock=clock,
                resolver=resolver,
                on_console=consoles.append,
            )
        )
        with anyio.fail_after(STARTUP_TIMEOUT):
            await ready.wait()
        try:
            address = f"127.0.0.1:{ports[0]}"
            channel_of = (
                grpc.aio.insecure_channel(address)
                if credentials is None
                else grpc.aio.secure_channel(address, credentials)
            )
            async with channel_of as channel:
                stub = pb_grpc.OrchestratorStub(channel)
                yield Daemon(ports[0], database, channel, stub, stop, consoles[0] if consoles else "")
        except Exception as exc:
            # Let the daemon drain and close its log before the test's failure propagates: cancelling
            # serve() instead would leave the log open and bury the failure under a ResourceWarning.
            failure = exc
        finally:
            stop.set()
    if failure is not None:
        raise failure


def function(
    name: str, event: str, handler: Callable[..., Any], integration: str = "acme", **options: Any
) -> Installed:
    """``handler`` as an installed event function of ``integration``, from plugin test-plugin 1.0."""
    decorated = on_event(event, integration=integration, **options)(handler)
    return Installed(name, decorated, "test-plugin", "1.0", f"tests:{name}")


@asynccontextmanager
async def serving(
    tmp_path: Path,
    *functions: Installed,
    integrations: Mapping[str, Integration] | None = None,
    resolver: Resolver | None = None,
    secret_key: str = "",
    **dispatch: Any,
) -> AsyncIterator[Daemon]:
    """A daemon on ``tmp_path/events.db`` running ``functions``, with fast retries and 5 s deadlines.

    ``dispatch`` overrides :class:`~orchestrator.config.DispatchConfig` fields.
    """
    settings: dict[str, Any] = {"validate_deadline": 5.0, "deletion_deadline": 5.0, "retry": FAST_RETRY, **dispatch}
    async with run_daemon(
        f"sqlite://{tmp_path}/events.db",
        registry=Registry.of(functions),
        integrations=integrations,
        dispatch=DispatchConfig(**settings),
        resolver=resolver,
        secret_key=secret_key,
    ) as daemon:
        yield daemon


async def seed(database: str, ref: ConnectionRef, *appends: Sequence[NewEvent]) -> list[Record]:
    """Append records to ``ref``'s stream with the store itself (the daemon must not be running).

    This reaches states the daemon only enters once event functions run
    (``rejected``, a ``deleting`` that has not finished, updated metadata),
    exactly as the daemon would have written them.
    """
    written: list[Record] = []
    async with open_store(database) as store:
        for events in appends:
            current = await store.get_connection(ref)
            appended = await store.append(ref, current.version if current else 0, events)
            written.extend(appended.records)
    return written
