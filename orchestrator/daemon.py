"""The daemon's life: the key, open the log, serve, drain on SIGTERM/SIGINT, close the log.

Startup does not replay the log (the read model is kept up to date by every
append); its one pass over the file is SQLite's ``quick_check``, which is
quick and bounded in time (see :mod:`orchestrator.store._sqlite_file`). The
key ring that seals credentials comes from ``ORCHESTRATOR_SECRET_KEY`` or the
key file (``secret.key`` beside the SQLite log, created 0600 on first start).
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import httpx
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from orchestrator import plugins, sealing, telemetry
from orchestrator.access import TokenFile
from orchestrator.clock import Clock, SystemClock
from orchestrator.config import Integration, ServeConfig, default_database, is_loopback, split_host_port
from orchestrator.console import Console, tls_context
from orchestrator.credentials import Resolver
from orchestrator.errors import InvalidArgument, OrchestratorError, PluginError
from orchestrator.isolation import ProcessPool
from orchestrator.plugins import Registry, discover
from orchestrator.rpc import tls as rpc_tls
from orchestrator.rpc.server import SERVICE_NAME, GrpcServer
from orchestrator.service import Service, assemble
from orchestrator.store import EventStore, Location, Stats, inspect, is_postgres, locate, open_store, shown, sqlite_path
from orchestrator.watchdog import LoopWatchdog

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 10_000
"""Net allocations between two collections of the youngest generation once the daemon serves (Python's: 700)."""
STOP_GRACE = 1.0
"""Seconds the gRPC server gives calls still open once the drain is over (reads, mostly)."""


async def serve(
    config: ServeConfig,
    *,
    on_ready: Callable[[int], None] | None = None,
    stop: anyio.Event | None = None,
    registry: Registry | None = None,
    clock: Clock | None = None,
    resolver: Resolver | None = None,
    on_console: Callable[[str], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain within the grace period.

    ``on_ready`` is called with the bound port once the server is SERVING, ``on_console`` before it
    with the web console's URL (when there is a console).
    Tests may pass the function ``registry`` and the credentials
    ``resolver`` (instead of entry-point discovery) and a ``clock``.
    A start that fails before it serves (a port in use) removes what it made: a
    new log it never wrote to, its new key file, the directories made for them.
    """
    # Every check that needs no file made or changed comes first (``serve --check`` makes the same ones);
    # importing plugins reads files: done on a worker thread, off the event loop.
    ready = await anyio.to_thread.run_sync(partial(prepare, config, registry=registry, resolver=resolver))
    key_file = key_file_for(config, ready.database) if not config.secret_key else None
    made = await anyio.to_thread.run_sync(_Made.before, ready.location, key_file)
    try:
        keyring = await anyio.to_thread.run_sync(keyring_for, config, ready.database)
        # Signal handlers go in first: a SIGTERM during start-up is queued and drains, never kills.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            engine = _Engine(ready.registry, ready.integrations, keyring, ready.resolver)
            await _serve(config, ready.access, ready.database, engine, signals, on_ready, stop, clock, made, on_console)
    except BaseException:
        if not made.served:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(made.remove)
        raise
    log.info("stopped; the event log is closed")


def freeze_start_up(port: int = 0) -> None:
    """Once the daemon serves: keep what start-up made out of every later garbage collection (``gc.freeze()``).

    The modules, the plugins, the engine and the server live as long as the
    process; frozen, the collector never scans them again, so a collection
    costs what the calls in flight made, not the daemon's size. ``orchestrator
    serve`` calls it (its ``on_ready``); a daemon run in-process (tests) does not.

    The youngest generation is collected every :data:`GC_YOUNG_THRESHOLD` net allocations
    instead of 700: with 64 emits in flight each young collection found their objects alive
    and promoted them, so that every tenth one ran an older collection, and every hundredth a
    full one (measured over 14,000 emits and validations: 86 µs of collection per call at 700,
    19 µs at 10,000; a young collection then takes about 10 ms, still short of a call's p99).
    """
    gc.collect()  # start-up's own garbage first: frozen, it would never be freed
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    log.debug(
        "froze %d objects of start-up out of the garbage collector's sight; young collections every %d allocations",
        gc.get_freeze_count(),
        GC_YOUNG_THRESHOLD,
    )


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``serve`` checked and loaded before it makes or opens anything; ``serve --check`` reports it."""

    database: str
    location: Location
    access: Access
    registry: Registry
    resolver: Resolver | None
    integrations: dict[str, Integration]
    warnings: list[str]


def prepare(
    config: ServeConfig, *, registry: Registry | None = None, resolver: Resolver | None = None, check: bool = False
) -> Prepared:
    """Every check ``serve`` makes before it creates anything, in its order; blocks (run it off the event loop).

    The log's path (a missing directory is made only for the default ``./.orchestrator/``), the
    listen addresses, the key file's directory, the token and TLS files, the plugins, the
    integrations. Problems a start survives are logged as warnings (and returned). ``check``
    (``serve --check``) also reads an existing log's file as the daemon checks it once it owns it.
    """
    database = config.database or default_database()
    location = locate(database, create_directory=not config.database)
    if check:
        inspect(location, init=config.init)
    check_listen(config.listen, "listen on")
    if config.web_listen:
        check_listen(config.web_listen, "serve the web console on")
    if config.telemetry.metrics_listen:
        check_listen(config.telemetry.metrics_listen, "serve metrics on")
    if not config.secret_key and config.secret_key_file is not None:
        key_file = config.secret_key_file
        if not key_file.exists() and not key_file.parent.is_dir():
            raise InvalidArgument(
                f"the directory of the key file {key_file} does not exist: create it, or correct --secret-key-file"
            )
    # Who may call, and over what: a bad file refuses the start before anything is opened.
    access = load_access(config)
    if registry is None:
        registry = load_plugins(skip_broken=config.skip_broken_plugins)
        resolver = load_resolver(skip_broken=config.skip_broken_plugins)
    integrations, broken = plugins.integrations(config.integrations)
    warnings = [f"broken integration defaults, ignored: {problem}" for problem in broken]
    warnings += missing_base_urls(registry, integrations)
    for warning in warnings:
        log.warning("%s", warning)
    return Prepared(database, location, access, registry, resolver, integrations, warnings)


def missing_base_urls(registry: Registry, integrations: Mapping[str, Integration]) -> list[str]:
    """A warning for each integration that installed functions use but that has no ``base_url``."""
    users: dict[str, list[str]] = {}
    for item in registry.functions:
        name = item.function.integration
        configured = integrations.get(name)
        if configured is None or not configured.base_url:
            users.setdefault(name, []).append(item.name)
    return [
        f"integration {name} has no base_url: provider calls by path of its function(s) {', '.join(sorted(names))}"
        f" have nowhere to go; set base_url in [integrations.{name}] of the settings file"
        for name, names in sorted(users.items())
    ]


def check_listen(address: str, what: str) -> None:
    """``HOST:PORT`` whose host is an address of this machine (bound on a free port for a moment, not on PORT)."""
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgument(f"cannot {what} {address}: {host!r} does not resolve ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.bind((sockaddr[0], 0, *sockaddr[2:]))
    except OSError as exc:
        raise InvalidArgument(
            f"cannot {what} {address}: {host} is not an address of this machine ({exc.strerror or exc})"
        ) from None


@dataclass(slots=True)
class _Made:
    """What a start makes that was not there before it; removed when the start fails before it serves."""

    log: Path | None
    """The log's file, if it did not exist (removed only if this start created it and wrote nothing)."""
    directories: tuple[Path, ...]
    key_file: Path | None
    fresh_log: bool = False
    """Set once the log is open: this start created it, and it holds no record."""
    served: bool = False

    @classmethod
    def before(cls, location: Location, key_file: Path | None) -> _Made:
        new_log = location.path if location.path is not None and not location.exists else None
        new_key = key_file if key_file is not None and not key_file.exists() else None
        return cls(new_log, location.directories, new_key)

    def remove(self) -> None:
        """Remove the new log (with its -wal, -shm and .lock), the new key file, then the new directories if empty."""
        files: list[Path] = []
        if self.log is not None and self.fresh_log:
            files += [self.log.with_name(self.log.name + end) for end in ("", "-wal", "-shm", "-journal", ".lock")]
        if self.key_file is not None:
            files.append(self.key_file)
        for path in files:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s, made by the failed start: %s", path, exc.strerror or exc)
        for folder in reversed(self.directories):
            try:
                folder.rmdir()
            except OSError:  # not empty (someone else's now), or gone
                break


def key_file_for(config: ServeConfig, database: str) -> Path | None:
    """The key file: ``--secret-key-file``, else ``secret.key`` beside the SQLite log (None for other backends)."""
    if config.secret_key_file is not None:
        return config.secret_key_file
    path = sqlite_path(database)
    return path.parent / sealing.KEY_FILE_NAME if path is not None else None


def keyring_for(config: ServeConfig, database: str, *, create: bool = True) -> sealing.Keyring:
    """The key ring: ``ORCHESTRATOR_SECRET_KEY``, else the key file (made on first start), else an ephemeral key."""
    if config.secret_key:
        keyring = sealing.Keyring.parse(config.secret_key, "ORCHESTRATOR_SECRET_KEY")
        source = "ORCHESTRATOR_SECRET_KEY"
    else:
        path = key_file_for(config, database)
        if path is None and is_postgres(database):
            raise InvalidArgument(
                "a PostgreSQL log needs a key that outlives the daemon and is the same in every daemon that"
                " shares it: set ORCHESTRATOR_SECRET_KEY (orchestrator keygen makes one), or --secret-key-file"
            )
        if path is None:
            log.warning("no secret key configured and no SQLite log: credentials are sealed under an ephemeral key")
            return sealing.Keyring.ephemeral()
        keyring = sealing.load_key_file(path, create=create)
        source = f"the key file {path}"
    log.info("credentials are sealed under key id %s (%d key(s) from %s)", keyring.sealing.id, len(keyring.ids), source)
    return keyring


@dataclass(frozen=True, slots=True)
class _Engine:
    """What the daemon serves with, loaded before the log is opened."""

    registry: Registry
    integrations: dict[str, Integration]
    keyring: sealing.Keyring
    resolver: Resolver | None


async def _serve(
    config: ServeConfig,
    access: Access,
    database: str,
    loaded: _Engine,
    signals: AsyncIterator[int],
    on_ready: Callable[[int], None] | None,
    stop: anyio.Event | None,
    clock: Clock | None,
    made: _Made,
    on_console: Callable[[str], None] | None = None,
) -> None:
    clock = clock or SystemClock()
    new_log = made.log is not None and not await anyio.Path(made.log).exists()
    async with (
        telemetry.telemetry(config.telemetry),
        open_store(
            database,
            clock=clock,
            init=config.init,
            pool_size=config.database_pool_size,
            lease=config.database_lease,
        ) as store,
        httpx.AsyncClient(follow_redirects=False) as http,
        anyio.create_task_group() as tg,
    ):
        made.fresh_log = new_log and await store.head() == 0
        watchdog = LoopWatchdog()
        tg.start_soon(watchdog.run)
        pool = ProcessPool(config.dispatch.pool_size) if config.dispatch.pool_size else None
        if pool is not None:
            # Serving waits until each worker is ready or has failed to start: a pool that cannot start any
            # fails attempts (and keeps trying), never the daemon.
            await tg.start(pool.run)
            log.info("event functions run in %d worker process(es)", pool.size)
        engine = assemble(
            store,
            loaded.registry,
            clock,
            http=http,
            integrations=loaded.integrations,
            config=config.dispatch,
            keyring=loaded.keyring,
            resolver=loaded.resolver,
            watchdog=watchdog,
            pool=pool,
        )
        for problem in await engine.vault.check_keys():
            log.warning("%s", problem)
        # Shredding happens in the transaction that ends a connection's last job; this catches any
        # connection a log written before sealed credentials existed, or tampered with, left behind.
        shredded = await store.sweep_credentials()
        if shredded:
            log.info("destroyed the sealed credentials of %d connection(s) that had ended", shredded)
        tokens = access.tokens
        server = GrpcServer(
            engine.service, tokens=(lambda: tokens.tokens) if tokens is not None else lambda: None, tls=access.tls
        )
        port = await server.start(config.listen)
        console = await _start_console(tg, config, access, engine.service, loaded.registry)
        if console is not None and on_console is not None:
            on_console(console.url)
        gauges = _Gauges(store, clock)
        await gauges.refresh()
        tg.start_soon(gauges.run)
        tg.start_soon(engine.worker.run)
        await server.serving()
        made.served = True
        host = config.listen.rpartition(":")[0]
        log.info("serving %s on %s:%d, log %s", SERVICE_NAME, host, port, shown(database))
        if on_ready is not None:
            on_ready(port)

        stopping = stop or anyio.Event()

        async def watch_signals() -> None:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if config.on_sighup is not None:
                        config.on_sighup()
                        log.info("received SIGHUP: log file reopened")
                    if await anyio.to_thread.run_sync(access.reload) and console is not None and access.tls is not None:
                        files = access.tls.files
                        await anyio.to_thread.run_sync(console.reload_tls, files.cert, files.key)
                    continue
                name = signal.Signals(signum).name
                log.info("received %s: draining (grace period %.1fs)", name, config.grace_period)
                stopping.set()
                return

        tg.start_soon(watch_signals)
        await stopping.wait()
        with anyio.CancelScope(shield=True):
            await server.draining()
            engine.service.drain()
            if console is not None:
                console.stop()  # its live tails have just ended (the service's followers did)
            engine.worker.stop_claiming()
            # New calls are refused with UNAVAILABLE (clients retry elsewhere) while
            # in-flight emits and running function attempts share the grace period;
            # what is left then is cancelled, and unfinished jobs resume at the next start.
            with anyio.move_on_after(config.grace_period):
                await engine.service.idle()
                await engine.worker.idle()
            engine.service.abort()
            await server.stop(STOP_GRACE)
        tg.cancel_scope.cancel()


async def _start_console(
    tg: anyio.abc.TaskGroup, config: ServeConfig, access: Access, service: Service, registry: Registry
) -> Console | None:
    """The web console, serving on ``--web-listen`` in this loop (None when it is turned off); logs its URL."""
    if not config.web_listen:
        return None
    tls = None
    if access.tls is not None:
        files = access.tls.files
        tls = await anyio.to_thread.run_sync(tls_context, files.cert, files.key, files.client_ca)
    tokens = access.tokens
    console = Console(
        service,
        registry,
        tokens=(lambda: tokens.tokens) if tokens is not None else lambda: None,
        tls=tls,
        trace_url=config.trace_url,
    )
    await tg.start(partial(console.run, config.web_listen))
    log.info(
        "web console on %s%s",
        console.url,
        " (log in with a token of the token file)" if tokens is not None else "",
        extra={"url": console.url},
    )
    return console


class Access:
    """The token file and the TLS material the daemon serves with (each None when not configured)."""

    def __init__(self, tokens: TokenFile | None, tls: rpc_tls.ServerTls | None) -> None:
        self.tokens = tokens
        self.tls = tls

    def reload(self) -> bool:
        """SIGHUP: reread the token file and the TLS files; a bad one keeps what is in force and logs why.

        True when new TLS material is in force (the console then rereads it too).
        """
        if self.tokens is not None:
            self.tokens.reload()
        if self.tls is None:
            return False
        try:
            material = self.tls.reload()
        except InvalidArgument as exc:
            log.error("%s; the TLS certificate and key read before stay in force", exc)
            return False
        log.info("reread the TLS files: %s", material.summary())
        rpc_tls.warn_if_expiring(material)
        return True


def load_access(config: ServeConfig) -> Access:
    """Read the token file and the TLS files (refusing bad ones with :class:`InvalidArgument`), and say what is on."""
    tokens = TokenFile(config.auth_token_file) if config.auth_token_file is not None else None
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        files = rpc_tls.TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
        material = rpc_tls.load(files)
        tls = rpc_tls.ServerTls(files, material)
        log.info("TLS: %s", material.summary())
        rpc_tls.warn_if_expiring(material)
    if tokens is not None:
        log.info("bearer tokens: %d, from %s", len(tokens.tokens), tokens.path)
        if tls is None and not is_loopback(split_host_port(config.listen)[0]):
            log.warning(
                "bearer tokens without TLS on %s: the tokens cross the network in clear text;"
                " pass --tls-cert and --tls-key unless a proxy in front terminates TLS",
                config.listen,
            )
    return Access(tokens, tls)


class _Gauges:
    """Job queue depth, oldest waiting job and connections by state, refreshed every few seconds."""

    INTERVAL = 10.0

    def __init__(self, store: EventStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._stats = Stats(0, None, {})
        meter = metrics.get_meter(__name__)
        meter.create_observable_gauge(
            "orchestrator.jobs.queued", callbacks=[self._queued], description="Jobs scheduled or running"
        )
        meter.create_observable_gauge(
            "orchestrator.jobs.oldest_age",
            unit="s",
            callbacks=[self._oldest],
            description="How long the oldest due job has been waiting",
        )
        meter.create_observable_gauge(
            "orchestrator.connections", callbacks=[self._connections], description="Connections by state"
        )

    async def refresh(self) -> None:
        self._stats = await self._store.stats()

    async def run(self) -> None:
        while True:
            await self._clock.sleep(self.INTERVAL)
            try:
                await self.refresh()
            except OrchestratorError as exc:
                log.warning("could not refresh the gauges: %s", exc)

    def _queued(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._stats.jobs)]

    def _oldest(self, options: CallbackOptions) -> Iterable[Observation]:
        oldest = self._stats.oldest_job_at
        age = max((self._clock.now() - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
        return [Observation(age)]

    def _connections(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"state": state}) for state, n in sorted(self._stats.connections.items())]


def load_resolver(*, skip_broken: bool) -> Resolver | None:
    """The credentials resolver a plugin ships (group ``orchestrator.credentials``), if any."""
    resolver, broken = plugins.discover_resolver()
    for problem in broken:
        log.log(logging.WARNING if skip_broken else logging.ERROR, "broken credentials resolver: %s", problem)
    if broken and not skip_broken:
        raise PluginError(
            "broken credentials resolver: "
            + "; ".join(str(b) for b in broken)
            + " (fix or uninstall it, or pass --skip-broken-plugins)"
        )
    if resolver is not None:
        log.info("credentials resolver: %s", getattr(resolver, "__qualname__", repr(resolver)))
    return resolver


def load_plugins(*, skip_broken: bool) -> Registry:
    """Discover the installed event functions; refuse broken plugins unless told to skip them."""
    registry = discover()
    for broken in registry.broken:
        log.log(logging.WARNING if skip_broken else logging.ERROR, "broken plugin: %s", broken)
    if registry.broken and not skip_broken:
        raise PluginError(
            f"{len(registry.broken)} broken plugin(s): "
            + "; ".join(str(b) for b in registry.broken)
            + " (fix or uninstall them, or pass --skip-broken-plugins)"
        )
    for item in registry.functions:
        log.info(
            "function %s: %s %s (%s %s)",
            item.name,
            item.function.integration,
            item.function.event,
            item.distribution,
            item.version,
        )
    return registry
