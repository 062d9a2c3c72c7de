"""``orchestrator serve``: the daemon, or with ``--check`` a check of its settings and plugins."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator import config
from orchestrator.cli import _exit
from orchestrator.cli._common import database, quiet_grpc
from orchestrator.cli._credentials import SECRET_KEY_ENV, secret_key_file
from orchestrator.cli._settings import config_option, configured_integrations

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


def _dispatch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kind, default, text in reversed(_DISPATCH_OPTIONS):
        envvar = "ORCHESTRATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        command = click.option(flag, envvar=envvar, show_envvar=True, type=kind, default=default, help=text)(command)
    return command


def _dispatch_config(values: dict[str, Any]) -> DispatchConfig:
    from orchestrator.config import DispatchConfig
    from orchestrator.retry import RetryPolicy

    return DispatchConfig(
        concurrency=values["concurrency"],
        validate_deadline=values["validate_deadline"],
        deletion_deadline=values["deletion_deadline"],
        attempt_timeout=values["attempt_timeout"],
        isolation=values["isolation"],
        processes=values["processes"],
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
    show_envvar=True,
    default=config.DEFAULT_LISTEN,
    help="HOST:PORT to serve gRPC on (port 0 picks a free one).",
)
@database
@click.option(
    "--grace-period",
    envvar="ORCHESTRATOR_GRACE_PERIOD",
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
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve TLS with this certificate (PEM, the chain after it); with --tls-key. SIGHUP rereads it.",
)
@click.option(
    "--tls-key",
    envvar="ORCHESTRATOR_TLS_KEY",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The private key of --tls-cert (PEM, unencrypted). SIGHUP rereads it.",
)
@click.option(
    "--tls-client-ca",
    envvar="ORCHESTRATOR_TLS_CLIENT_CA",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Mutual TLS: require a client certificate signed by the CA in this PEM file. SIGHUP rereads it.",
)
@click.option(
    "--auth-token-file",
    envvar="ORCHESTRATOR_AUTH_TOKEN_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Require a bearer token of this file: one per line, optionally followed by a space and the"
    " comma-separated environments it may touch; '#' comments. SIGHUP rereads it.",
)
@click.option(
    "--log-level",
    envvar="ORCHESTRATOR_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
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
    " tables); without it such a file is refused. A missing file is created without it.",
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
    type=click.Path(dir_okay=False, path_type=Path),
    help="Log to this file (JSON lines) instead of stderr; SIGHUP reopens it.",
)
@click.option(
    "--metrics-listen",
    envvar="ORCHESTRATOR_METRICS_LISTEN",
    show_envvar=True,
    default="",
    help="HOST:PORT for a Prometheus text endpoint at /metrics (default: none).",
)
@secret_key_file
@click.option("--check", is_flag=True, help="Validate the configuration and plugins, print a summary, and exit.")
@_dispatch_options
@click.pass_context
def serve(
    ctx: click.Context,
    /,
    listen: str,
    database: str | None,
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
    **dispatch: Any,
) -> None:
    """Run the daemon (SQLite under ./.orchestrator/ and 127.0.0.1:50051 by default).

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
    from orchestrator.store import sqlite_path

    try:
        file_handler = logs.setup(log_level, fmt=log_format, file=log_file)
    except OSError as exc:
        _exit.fail(f"cannot open the log file {log_file}: {exc.strerror or exc}")
    if metrics_listen:
        config.split_host_port(metrics_listen)
    integrations = configured_integrations(ctx)
    settings = config.ServeConfig(
        listen=listen,
        database=database or "",
        grace_period=grace_period,
        insecure=insecure,
        skip_broken_plugins=skip_broken_plugins,
        init=init,
        dispatch=_dispatch_config(dispatch),
        integrations=integrations,
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
        access = daemon.load_access(settings)  # refuses unreadable or bad TLS files and token files
        registry = daemon.load_plugins(skip_broken=skip_broken_plugins)
        url = settings.database or config.default_database()
        sqlite_path(url)  # refuses a malformed URL
        click.echo(f"configuration is valid: listen {settings.listen}, log {url}")
        click.echo(f"{len(registry.functions)} event function(s), {len(registry.broken)} broken plugin(s) skipped")
        if settings.dispatch.pool_size:
            click.echo(f"isolation: process, {settings.dispatch.pool_size} worker process(es)")
        for name, integration in sorted(integrations.items()):
            click.echo(f"integration {name}: base_url {integration.base_url or '(none)'}, auth {integration.auth}")
        click.echo(
            f"telemetry: traces {settings.telemetry.traces_exporter}, metrics {settings.telemetry.metrics_exporter}"
            + (f", Prometheus on {metrics_listen}" if metrics_listen else "")
        )
        click.echo(f"tls: {access.tls.material.summary() if access.tls is not None else 'off'}")
        tokens = access.tokens
        click.echo(f"bearer tokens: {len(tokens.tokens)} from {tokens.path}" if tokens else "bearer tokens: none asked")
        click.echo(_key_summary(settings, url))
        return
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401 - optional: 15-25% faster with grpc.aio

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(daemon.serve, settings, backend="asyncio", backend_options=backend_options)
    _leave_hung_threads()


def _key_summary(settings: config.ServeConfig, url: str) -> str:
    """Where the key ring comes from, checked (``--check`` creates no key file)."""
    from orchestrator import daemon

    key_file = daemon.key_file_for(settings, url)
    if not settings.secret_key and key_file is not None and not key_file.exists():
        return f"credentials: a new key file {key_file} (mode 0600) will be created at the first start"
    keyring = daemon.keyring_for(settings, url, create=False)
    source = SECRET_KEY_ENV if settings.secret_key else f"key file {key_file}" if key_file else "an ephemeral key"
    return f"credentials: sealed under key id {keyring.sealing.id} ({len(keyring.ids)} key(s) from {source})"


def _leave_hung_threads() -> None:
    """Exit now even if plain ``def`` functions still hang in their threads (Python cannot stop a thread).

    The drain is over and the log is closed; waiting for such threads (as the
    interpreter does at exit) would keep the process alive for ever.
    """
    import logging
    import sys
    import threading
    import time

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    deadline = time.monotonic() + 1.0  # idle worker threads are told to stop as the loop closes: let them
    for thread in others:
        thread.join(max(deadline - time.monotonic(), 0))
    hung = [t for t in others if t.is_alive()]
    if hung:
        logging.getLogger("orchestrator.daemon").warning(
            "exiting with %d function thread(s) still running past their timeout; they are abandoned", len(hung)
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
