"""``orchestrator serve``: the daemon, or with ``--check`` a check of its settings and plugins."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator import config
from orchestrator.cli import _exit
from orchestrator.cli._common import database, print_json, print_table, quiet_grpc, table
from orchestrator.cli._credentials import SECRET_KEY_ENV, secret_key_file
from orchestrator.cli._settings import (
    config_file,
    config_option,
    configured_integrations,
    configured_variables,
    sources,
)
from orchestrator.errors import InvalidArgument

if TYPE_CHECKING:
    from orchestrator.config import DispatchConfig

_DISPATCH_OPTIONS: list[tuple[str, Any, float | int | str, str]] = [
    ("--concurrency", click.IntRange(min=1), 64, "Function attempts running at once, at most."),
    ("--validate-deadline", click.FloatRange(min=0.001), 30.0, "Seconds validate-connection functions get."),
    ("--deletion-deadline", click.FloatRange(min=0.001), 30.0, "Seconds cleanup functions get inside the RPC."),
    ("--attempt-timeout", click.FloatRange(min=0.001), 60.0, "Seconds one asynchronous attempt may take."),
    ("--retry-max-attempts", click.IntRange(min=1), 5, "Attempts of an asynchronous function, at most."),
    ("--retry-initial-interval", click.FloatRange(min=0), 1.0, "Seconds before the first retry (jittered)."),
    ("--retry-backoff", click.FloatRange(min=1), 2.0, "Factor by which each retry's delay grows."),
    ("--retry-max-interval", click.FloatRange(min=0), 60.0, "Longest delay between retries, in seconds."),
    (
        "--isolation",
        click.Choice(config.ISOLATION),
        "thread",
        "Where functions run: thread (in the daemon) or process (a supervised pool of worker processes).",
    ),
    (
        "--processes",
        click.IntRange(min=1),
        config.DEFAULT_PROCESSES,
        "Worker processes with --isolation process (at most --concurrency).",
    ),
]


_METAVARS = {"--retry-backoff": "FACTOR"}


def _dispatch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kind, default, text in reversed(_DISPATCH_OPTIONS):
        envvar = "ORCHESTRATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        metavar = (
            None
            if isinstance(kind, click.Choice)
            else _METAVARS.get(flag, "N" if isinstance(default, int) else "SECONDS")
        )
        command = click.option(
            flag, envvar=envvar, show_envvar=True, type=kind, default=default, metavar=metavar, help=text
        )(command)
    return command


def _dispatch_config(values: dict[str, Any], variables: dict[str, dict[str, str]]) -> DispatchConfig:
    from orchestrator.config import DispatchConfig
    from orchestrator.retry import RetryPolicy

    return DispatchConfig(
        concurrency=values["concurrency"],
        validate_deadline=values["validate_deadline"],
        deletion_deadline=values["deletion_deadline"],
        attempt_timeout=values["attempt_timeout"],
        isolation=values["isolation"],
        processes=values["processes"],
        variables=variables,
        retry=RetryPolicy(
            max_attempts=values["retry_max_attempts"],
            initial_interval=values["retry_initial_interval"],
            backoff=values["retry_backoff"],
            max_interval=values["retry_max_interval"],
        ),
    )


@click.command(short_help="Run the daemon, or check its settings with --check.")
@config_option()
@click.option(
    "--listen",
    envvar="ORCHESTRATOR_LISTEN",
    metavar="HOST:PORT",
    show_envvar=True,
    default=config.DEFAULT_LISTEN,
    help="HOST:PORT to serve gRPC on (port 0 picks a free one).",
)
@click.option(
    "--web-listen",
    envvar="ORCHESTRATOR_WEB_LISTEN",
    metavar="HOST:PORT",
    show_envvar=True,
    default=config.DEFAULT_WEB_LISTEN,
    help="HOST:PORT to serve the web console on (port 0 picks a free one; '' turns it off, as does"
    " ORCHESTRATOR_WEB_LISTEN=off). A non-loopback address needs TLS or a token file, or --insecure.",
)
@click.option(
    "--trace-url",
    envvar="ORCHESTRATOR_TRACE_URL",
    metavar="URL",
    show_envvar=True,
    default="",
    help="Link each record in the web console to its trace: a URL with {trace_id}, e.g."
    " http://localhost:16686/trace/{trace_id} (Jaeger).",
)
@database
@click.option(
    "--database-pool-size",
    envvar="ORCHESTRATOR_DATABASE_POOL_SIZE",
    metavar="N",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=config.DEFAULT_DATABASE_POOL_SIZE,
    help="Connections to a PostgreSQL log at most (one more listens for other daemons' commits); SQLite: unused.",
)
@click.option(
    "--database-lease",
    envvar="ORCHESTRATOR_DATABASE_LEASE",
    metavar="SECONDS",
    show_envvar=True,
    type=click.FloatRange(min=0.5),
    default=config.DEFAULT_DATABASE_LEASE,
    help="PostgreSQL: seconds a running job's claim holds before it is renewed (every third of it); a dead"
    " daemon's jobs are taken over by another after at most this long. SQLite: unused.",
)
@click.option(
    "--grace-period",
    envvar="ORCHESTRATOR_GRACE_PERIOD",
    metavar="SECONDS",
    show_envvar=True,
    type=click.FloatRange(min=0),
    default=config.DEFAULT_GRACE_PERIOD,
    help="Seconds in-flight calls get to finish after SIGTERM.",
)
@click.option(
    "--insecure",
    envvar="ORCHESTRATOR_INSECURE",
    show_envvar=True,
    is_flag=True,
    help="Allow a non-loopback listen address without TLS or a token.",
)
@click.option(
    "--tls-cert",
    envvar="ORCHESTRATOR_TLS_CERT",
    show_envvar=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Serve TLS with this certificate (PEM, the chain after it); with --tls-key. SIGHUP rereads it.",
)
@click.option(
    "--tls-key",
    envvar="ORCHESTRATOR_TLS_KEY",
    show_envvar=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="The private key of --tls-cert (PEM, unencrypted). SIGHUP rereads it.",
)
@click.option(
    "--tls-client-ca",
    envvar="ORCHESTRATOR_TLS_CLIENT_CA",
    show_envvar=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Mutual TLS: require a client certificate signed by the CA in this PEM file. SIGHUP rereads it.",
)
@click.option(
    "--auth-token-file",
    envvar="ORCHESTRATOR_AUTH_TOKEN_FILE",
    show_envvar=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Require a bearer token of this file: one per line, optionally followed by a space and the"
    " comma-separated environments it may touch; '#' comments. SIGHUP rereads it.",
)
@click.option(
    "--log-level",
    envvar="ORCHESTRATOR_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    help="The least important log lines written.",
)
@click.option(
    "--skip-broken-plugins",
    envvar="ORCHESTRATOR_SKIP_BROKEN_PLUGINS",
    show_envvar=True,
    is_flag=True,
    help="Start even when a plugin is broken (it is reported and left out).",
)
@click.option(
    "--init",
    envvar="ORCHESTRATOR_INIT",
    show_envvar=True,
    is_flag=True,
    help="Start a new event log in an existing file that holds none (0 bytes, or an SQLite database with no"
    " tables), or in a PostgreSQL schema that holds other tables; without it either is refused. A missing file is"
    " created without it.",
)
@click.option(
    "--log-format",
    envvar="ORCHESTRATOR_LOG_FORMAT",
    show_envvar=True,
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    help="auto: text on a terminal, JSON lines otherwise.",
)
@click.option(
    "--log-file",
    envvar="ORCHESTRATOR_LOG_FILE",
    show_envvar=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Log to this file (JSON lines) instead of stderr; SIGHUP reopens it.",
)
@click.option(
    "--metrics-listen",
    envvar="ORCHESTRATOR_METRICS_LISTEN",
    metavar="HOST:PORT",
    show_envvar=True,
    default="",
    help="HOST:PORT for a Prometheus text endpoint at /metrics (default: none).",
)
@secret_key_file
@click.option(
    "--check",
    is_flag=True,
    help="Make every check serve makes before it starts (creating and changing nothing), print the effective"
    " settings and what was found, and exit.",
)
@_dispatch_options
@click.option("--json", "as_json", is_flag=True, help="With --check: print one JSON document for scripts.")
@click.pass_context
def serve(
    ctx: click.Context,
    /,
    listen: str,
    web_listen: str,
    trace_url: str,
    database: str | None,
    database_pool_size: int,
    database_lease: float,
    grace_period: float,
    insecure: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    auth_token_file: Path | None,
    log_level: str,
    skip_broken_plugins: bool,
    init: bool,
    log_format: str,
    log_file: Path | None,
    metrics_listen: str,
    secret_key_file: Path | None,
    check: bool,
    as_json: bool,
    **dispatch: Any,
) -> None:
    """Run the daemon (SQLite under ./.orchestrator/ and 127.0.0.1:50051 by default), or with --check make
    every check it makes at start, print the effective settings, and exit.

    Traces and metrics are exported as the standard OTEL_* variables say
    (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER: otlp, console or none;
    OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_SERVICE_NAME).
    Credentials are sealed under ORCHESTRATOR_SECRET_KEY (base64 of 32 bytes; a
    comma-separated list rotates: the first seals, all open), else the key file.
    """
    quiet_grpc()
    import anyio

    from orchestrator import daemon, logs
    from orchestrator._version import VERSION
    from orchestrator.config import TelemetryConfig

    if as_json and not check:
        raise click.UsageError("--json goes with --check (the daemon logs, it prints no data)")
    file_handler = None
    if check:
        _check_log_file(log_file)
        _log_warnings_only()
    else:
        try:
            file_handler = logs.setup(log_level, fmt=log_format, file=log_file)
        except OSError as exc:
            _exit.fail(f"cannot open the log file {log_file}: {exc.strerror or exc}")
    if metrics_listen:
        config.split_host_port(metrics_listen)
    if web_listen.strip().lower() == "off":  # an environment variable cannot be empty (click reads it as unset)
        web_listen = ""
    settings = config.ServeConfig(
        listen=listen,
        web_listen=web_listen.strip(),
        trace_url=trace_url.strip(),
        database=database or "",
        database_pool_size=database_pool_size,
        database_lease=database_lease,
        grace_period=grace_period,
        insecure=insecure,
        skip_broken_plugins=skip_broken_plugins,
        init=init,
        dispatch=_dispatch_config(dispatch, configured_variables(ctx)),
        integrations=configured_integrations(ctx),
        telemetry=TelemetryConfig.from_environ(os.environ, version=VERSION, metrics_listen=metrics_listen),
        on_sighup=file_handler.reopen if file_handler is not None else None,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_token_file=auth_token_file,
        secret_key=os.environ.get(SECRET_KEY_ENV, ""),  # the edge: read once, here, never a flag (ps shows flags)
        secret_key_file=secret_key_file,
    )
    if check:
        report = _check(ctx, settings)
        if as_json:
            print_json(report)
        else:
            _print_check(report)
        return
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401 - optional: 15-25% faster with grpc.aio

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    serve = partial(daemon.serve, settings, on_ready=daemon.freeze_start_up)
    anyio.run(serve, backend="asyncio", backend_options=backend_options)
    _leave_hung_threads()


def _check(ctx: click.Context, settings: config.ServeConfig) -> dict[str, Any]:
    """``--check``: every check ``serve`` makes before it starts, making and changing nothing; what it found."""
    from orchestrator import daemon, store

    ready = daemon.prepare(settings, check=True)
    values = dict(ctx.params)
    values["database"] = store.shown(ready.database)  # a password in the URL is not printed
    key_file = daemon.key_file_for(settings, ready.database)
    values["secret_key_file"] = str(key_file) if key_file is not None and not settings.secret_key else None
    found = sources(ctx)
    dispatch = settings.dispatch
    tokens = ready.access.tokens
    path = config_file(ctx)
    return {
        "valid": True,
        "config_file": str(path) if path is not None else None,
        "settings": {key: {"value": _plain(values.get(key)), "from": source} for key, source in found.items()},
        "log": {
            "url": store.shown(ready.database),
            "path": str(ready.location.path) if ready.location.path is not None else None,
            "exists": ready.location.exists,
            "in_use_by": ready.location.holder or None,
            "summary": ready.location.describe(),
        },
        "isolation": {"mode": dispatch.isolation, "worker_processes": dispatch.pool_size},
        "functions": [
            {"name": f.name, "integration": f.function.integration, "event": f.function.event.value}
            for f in ready.registry.functions
        ],
        "broken_plugins": [str(b) for b in ready.registry.broken],
        "integrations": {
            name: {
                "base_url": i.base_url,
                "auth": i.auth,
                "timeout": i.timeout,
                "retries": i.retries,
                "settings": dict(i.settings),
                "environments": {
                    environment: {"base_url": own.base_url, "auth": own.auth, "settings": dict(own.settings)}
                    for environment in sorted(i.environments)
                    for own in [i.for_environment(environment)]
                },
            }
            for name, i in sorted(ready.integrations.items())
        },
        "variables": {environment: sorted(names) for environment, names in sorted(dispatch.variables.items())},
        "telemetry": {
            "traces": settings.telemetry.traces_exporter,
            "metrics": settings.telemetry.metrics_exporter,
            "prometheus": settings.telemetry.metrics_listen or None,
        },
        "tls": ready.access.tls.material.summary() if ready.access.tls is not None else None,
        "web_console": _console_url(settings, ready.access.tls is not None),
        "bearer_tokens": {"count": len(tokens.tokens), "file": str(tokens.path)} if tokens else None,
        "credentials": _key_summary(settings, ready.database),
        "warnings": ready.warnings,
    }


def _print_check(report: dict[str, Any]) -> None:
    rows = report["settings"]
    click.echo(f"configuration is valid: listen {rows['listen']['value']}, log {report['log']['url']}")
    out = table("SETTING", "VALUE", "FROM")
    for key, row in rows.items():
        value = row["value"]
        shown = "-" if value in (None, "") else str(value).lower() if isinstance(value, bool) else str(value)
        out.add_row(key, shown, row["from"])
    click.echo(f"settings file: {report['config_file'] or 'none'}")
    print_table(out)
    click.echo(f"log: {report['log']['summary']}")
    functions, broken = report["functions"], report["broken_plugins"]
    click.echo(f"{len(functions)} event function(s), {len(broken)} broken plugin(s) skipped")
    isolation = report["isolation"]
    if isolation["worker_processes"]:
        click.echo(f"isolation: process, {isolation['worker_processes']} worker process(es)")
    else:
        click.echo("isolation: thread (functions run in the daemon)")
    for name, integration in report["integrations"].items():
        click.echo(f"integration {name}: base_url {integration['base_url'] or '(none)'}, auth {integration['auth']}")
        for environment, own in integration["environments"].items():
            click.echo(
                f"integration {name} in {environment}: base_url {own['base_url'] or '(none)'}, auth {own['auth']}"
            )
    for environment, names in report["variables"].items():
        click.echo(f"environment {environment}: variables {', '.join(names) or '(none)'}")
    telemetry = report["telemetry"]
    click.echo(
        f"telemetry: traces {telemetry['traces']}, metrics {telemetry['metrics']}"
        + (f", Prometheus on {telemetry['prometheus']}" if telemetry["prometheus"] else "")
    )
    click.echo(f"tls: {report['tls'] or 'off'}")
    click.echo(f"web console: {report['web_console'] or 'off'}")
    tokens = report["bearer_tokens"]
    click.echo(f"bearer tokens: {tokens['count']} from {tokens['file']}" if tokens else "bearer tokens: none asked")
    click.echo(f"credentials: {report['credentials']}")


def _console_url(settings: config.ServeConfig, tls: bool) -> str | None:
    """Where the web console will be (None when it is turned off)."""
    if not settings.web_listen:
        return None
    host, port = config.split_host_port(settings.web_listen)
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}/"


def _plain(value: Any) -> Any:
    """A setting's value as JSON has it (paths as strings)."""
    return str(value) if isinstance(value, Path) else value


def _check_log_file(path: Path | None) -> None:
    """``--check``: the log file could be opened for appending (it is not opened, nor made)."""
    if path is None:
        return
    if path.exists():
        if path.is_dir():
            raise InvalidArgument(f"cannot open the log file {path}: it is a directory")
        if not os.access(path, os.W_OK):
            raise InvalidArgument(f"cannot open the log file {path}: permission denied")
        return
    folder = path.parent
    if not folder.is_dir():
        raise InvalidArgument(f"cannot open the log file {path}: its directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot create the log file {path}: permission denied (in {folder})")


def _log_warnings_only() -> None:
    """``--check`` prints what it found: of the daemon's log lines, only its warnings, as ``orchestrator: warning:``."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_exit.WARNING + "%(message)s"))
    handler.addFilter(lambda record: record.levelno == logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _key_summary(settings: config.ServeConfig, url: str) -> str:
    """Where the key ring comes from, checked (``--check`` creates no key file)."""
    from orchestrator import daemon

    key_file = daemon.key_file_for(settings, url)
    if not settings.secret_key and key_file is not None and not key_file.exists():
        return f"a new key file {key_file} (mode 0600) will be created at the first start"
    keyring = daemon.keyring_for(settings, url, create=False)
    source = SECRET_KEY_ENV if settings.secret_key else f"key file {key_file}" if key_file else "an ephemeral key"
    return f"sealed under key id {keyring.sealing.id} ({len(keyring.ids)} key(s) from {source})"


def _leave_hung_threads() -> None:
    """Exit now even if plain ``def`` functions still hang in their threads (Python cannot stop a thread).

    The drain is over and the log is closed; waiting for such threads (as the
    interpreter does at exit) would keep the process alive for ever.
    """
    import logging
    import sys
    import threading
    import time

    from orchestrator.runner import running_threads

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    deadline = time.monotonic() + 1.0  # idle worker threads are told to stop as the loop closes: let them
    for thread in others:
        thread.join(max(deadline - time.monotonic(), 0))
    # Function threads are daemon threads (see orchestrator.runner.ThreadSlots): counted, never joined.
    hung = len([t for t in others if t.is_alive()]) + running_threads()
    if hung:
        logging.getLogger("orchestrator.daemon").warning(
            "exiting with %d function thread(s) still running past their timeout; they are abandoned", hung
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
