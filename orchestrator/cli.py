"""The ``orchestrator`` command.

Every option can also be set with the ``ORCHESTRATOR_*`` variable shown in
``--help`` or in the TOML file named by ``ORCHESTRATOR_CONFIG`` (or by
``serve --config``); flags win over the environment, which wins over the file.
Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio
import click
from rich.console import Console
from rich.table import Table

from orchestrator import codec, config
from orchestrator import replay as replay_mod
from orchestrator.client import Client, ClientError
from orchestrator.dispatch import DispatchConfig
from orchestrator.errors import InvalidArgument, OrchestratorError
from orchestrator.model import (
    Connection,
    ConnectionRef,
    ConnectionState,
    EmitRequest,
    EmitResult,
    LifecycleEvent,
    Record,
    check_connection_id,
    check_name,
)
from orchestrator.provider import Integration
from orchestrator.retry import RetryPolicy

_VERSION = "0.1.0"
_TOML_TABLES = {"integrations"}  # tables read by later features, not command options


def _print_table(table: Table) -> None:
    """Print aligned columns; when piped, never wrapped or truncated, and without trailing blanks."""
    if sys.stdout.isatty():
        Console(highlight=False).print(table)
        return
    console = Console(width=10_000, highlight=False, no_color=True, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    click.echo("\n".join(line.rstrip() for line in capture.get().splitlines()))


def _fail(message: str) -> NoReturn:
    click.echo(f"orchestrator: error: {message}", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns the errors people can act on into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OrchestratorError, ClientError) as exc:
            _fail(str(exc))
        except BaseExceptionGroup as group:
            # Task groups wrap what their body raised; an error a person can act on is still that.
            leaves = _leaves(group)
            if leaves and all(isinstance(e, OrchestratorError | ClientError) for e in leaves):
                _fail(str(leaves[0]))
            raise
        except KeyboardInterrupt:
            sys.exit(130)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _apply_toml(ctx: click.Context, path: Path, command: click.Command | None = None) -> None:
    """Make the file's settings the defaults of every option they name."""
    settings = config.load_toml(path)
    options = _option_names(command or ctx.command)
    unknown = sorted(k for k in settings if k not in options and k not in _TOML_TABLES)
    if unknown:
        raise click.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)}", param_hint="config file")
    ctx.default_map = _defaults_for(command or ctx.command, settings)
    ctx.meta["orchestrator.integrations"] = config.integrations_from_toml(settings.get("integrations", {}))


def _option_names(command: click.Command) -> set[str]:
    names = {p.name for p in command.params if isinstance(p, click.Option) and p.name}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names |= _option_names(sub)
    return names


def _defaults_for(command: click.Command, settings: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        p.name: settings[p.name] for p in command.params if isinstance(p, click.Option) and p.name in settings
    }
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            out[name] = _defaults_for(sub, settings)
    return out


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(_VERSION, prog_name="orchestrator")
@click.pass_context
def main(ctx: click.Context) -> None:
    """The lifecycle orchestrator: runs event functions when connections are validated, created or deleted."""
    path = os.environ.get("ORCHESTRATOR_CONFIG", "")  # the edge: read once, here
    if path:
        _apply_toml(ctx, Path(path))


def _name(option: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or value == "":
            return value
        try:
            return check_name(option, value)
        except InvalidArgument as exc:
            raise click.BadParameter(str(exc)) from None

    return check


# -- shared options ----------------------------------------------------------------

_address = click.option(
    "--address",
    envvar="ORCHESTRATOR_ADDRESS",
    show_envvar=True,
    default=config.DEFAULT_ADDRESS,
    help="The daemon's gRPC address.",
)
_json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
_environment = click.option(
    "-e",
    "--environment",
    envvar="ORCHESTRATOR_ENVIRONMENT",
    show_envvar=True,
    default="dev",
    callback=_name("--environment"),
    help="The environment (like `nango ... -e dev`).",
)
_database = click.option(
    "--database",
    envvar="ORCHESTRATOR_DATABASE",
    show_envvar=True,
    default=None,
    help="The event log's URL: sqlite:///path/to/events.db (default: ./.orchestrator/events.db).",
)


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter('must be a JSON object, e.g. \'{"instance_url": "acme.my.salesforce.com"}\'')
    return data


def _ref(connection_id: str, integration: str, environment: str) -> ConnectionRef:
    try:
        check_connection_id(connection_id, "CONNECTION_ID")
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="CONNECTION_ID") from None
    return ConnectionRef(environment, integration, connection_id)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="fold")
    return table


def _connections_table(connections: Iterable[Connection]) -> Table:
    table = _table("ENVIRONMENT", "INTEGRATION", "CONNECTION", "STATE", "VERSION", "LAST EVENT", "UPDATED")
    for c in connections:
        table.add_row(
            c.ref.environment,
            c.ref.integration,
            c.ref.connection_id,
            c.state.value,
            str(c.version),
            c.last_event,
            _when(c.updated_at),
        )
    return table


def _connection_json(c: Connection) -> dict[str, Any]:
    data = codec.connection_to_json(c)
    for internal in ("lifecycle", "deletion", "incarnation"):
        data.pop(internal, None)
    return data


# -- serve -------------------------------------------------------------------------


_DISPATCH_OPTIONS: list[tuple[str, Any, float | int, str]] = [
    ("--concurrency", click.IntRange(min=1), 64, "Function attempts running at once, at most."),
    ("--validate-deadline", click.FloatRange(min=0.001), 30.0, "Seconds validate-connection functions get."),
    ("--deletion-deadline", click.FloatRange(min=0.001), 30.0, "Seconds cleanup functions get inside the RPC."),
    ("--attempt-timeout", click.FloatRange(min=0.001), 60.0, "Seconds one asynchronous attempt may take."),
    ("--retry-max-attempts", click.IntRange(min=1), 5, "Attempts of an asynchronous function, at most."),
    ("--retry-initial-interval", click.FloatRange(min=0), 1.0, "Seconds before the first retry (jittered)."),
    ("--retry-backoff", click.FloatRange(min=1), 2.0, "Factor by which each retry's delay grows."),
    ("--retry-max-interval", click.FloatRange(min=0), 60.0, "Longest delay between retries, in seconds."),
]


def _dispatch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kind, default, text in reversed(_DISPATCH_OPTIONS):
        envvar = "ORCHESTRATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        command = click.option(flag, envvar=envvar, show_envvar=True, type=kind, default=default, help=text)(command)
    return command


def _dispatch_config(values: dict[str, Any]) -> DispatchConfig:
    return DispatchConfig(
        concurrency=values["concurrency"],
        validate_deadline=values["validate_deadline"],
        deletion_deadline=values["deletion_deadline"],
        attempt_timeout=values["attempt_timeout"],
        retry=RetryPolicy(
            max_attempts=values["retry_max_attempts"],
            initial_interval=values["retry_initial_interval"],
            backoff=values["retry_backoff"],
            max_interval=values["retry_max_interval"],
        ),
    )


def _integrations(ctx: click.Context) -> dict[str, Integration]:
    found: dict[str, Integration] = ctx.meta.get("orchestrator.integrations", {})
    return found


def _load_serve_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value:
        _apply_toml(ctx, Path(value), ctx.command)
    return value


@main.command()
@click.option(
    "--config",
    "config_file",
    envvar="ORCHESTRATOR_CONFIG",
    show_envvar=True,
    is_eager=True,
    expose_value=False,
    callback=_load_serve_config,
    type=click.Path(dir_okay=False),
    help="A TOML file of settings (keys as these options, with '_' for '-').",
)
@click.option(
    "--listen",
    envvar="ORCHESTRATOR_LISTEN",
    show_envvar=True,
    default=config.DEFAULT_LISTEN,
    help="HOST:PORT to serve gRPC on (port 0 picks a free one).",
)
@_database
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
    log_level: str,
    skip_broken_plugins: bool,
    log_format: str,
    log_file: Path | None,
    metrics_listen: str,
    check: bool,
    **dispatch: Any,
) -> None:
    """Run the daemon (SQLite under ./.orchestrator/ and 127.0.0.1:50051 by default).

    Traces and metrics are exported as the standard OTEL_* variables say
    (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER: otlp, console or none;
    OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_SERVICE_NAME).
    """
    from orchestrator import daemon, logs
    from orchestrator.store import sqlite_path
    from orchestrator.telemetry import TelemetryConfig

    file_handler = logs.setup(log_level, fmt=log_format, file=log_file)
    if metrics_listen:
        config.split_host_port(metrics_listen)
    settings = config.ServeConfig(
        listen=listen,
        database=database or "",
        grace_period=grace_period,
        insecure=insecure,
        skip_broken_plugins=skip_broken_plugins,
        dispatch=_dispatch_config(dispatch),
        integrations=_integrations(ctx),
        telemetry=TelemetryConfig.from_environ(os.environ, version=_VERSION, metrics_listen=metrics_listen),
        on_sighup=file_handler.reopen if file_handler is not None else None,
    )
    if check:
        registry = daemon.load_plugins(skip_broken=skip_broken_plugins)
        url = settings.database or config.default_database()
        sqlite_path(url)  # refuses a malformed URL
        click.echo(f"configuration is valid: listen {settings.listen}, log {url}")
        click.echo(f"{len(registry.functions)} event function(s), {len(registry.broken)} broken plugin(s) skipped")
        for name, integration in sorted(_integrations(ctx).items()):
            click.echo(f"integration {name}: base_url {integration.base_url or '(none)'}, auth {integration.auth}")
        click.echo(
            f"telemetry: traces {settings.telemetry.traces_exporter}, metrics {settings.telemetry.metrics_exporter}"
            + (f", Prometheus on {metrics_listen}" if metrics_listen else "")
        )
        return
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401 - optional: 15-25% faster with grpc.aio

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(daemon.serve, settings, backend="asyncio", backend_options=backend_options)


# -- emit --------------------------------------------------------------------------


def _credentials(pairs: tuple[str, ...], file: str | None) -> dict[str, str]:
    creds: dict[str, str] = {}
    if file:
        data = json.loads(Path(file).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise click.BadParameter("must hold a JSON object of strings", param_hint="--credentials-file")
        creds.update(data)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{name or pair!r} is not NAME=VALUE", param_hint="--credential")
        creds[name] = value
    return creds


@main.command()
@click.argument("event", type=click.Choice([e.value for e in LifecycleEvent]))
@click.argument("connection_id")
@click.option("-i", "--integration", required=True, callback=_name("--integration"), help="The integration.")
@_environment
@click.option(
    "--config",
    "connection_config",
    callback=_json_object,
    help="The connection's non-secret settings as a JSON object (or @file.json).",
)
@click.option("--payload", callback=_json_object, help="Data for the event functions, a JSON object (or @file).")
@click.option("--credential", "credential_pairs", multiple=True, metavar="NAME=VALUE", help="A secret; repeatable.")
@click.option("--credentials-file", type=click.Path(exists=True, dir_okay=False), help="Secrets as a JSON object.")
@click.option("--idempotency-key", default="", help="Makes retrying this command safe.")
@click.option("--expected-version", type=click.IntRange(min=0), help="Refuse unless the connection is at it.")
@click.option("--wait", is_flag=True, help="Also wait for asynchronous functions.")
@_address
@_json_flag
def emit(
    event: str,
    connection_id: str,
    integration: str,
    environment: str,
    connection_config: dict[str, Any],
    payload: dict[str, Any],
    credential_pairs: tuple[str, ...],
    credentials_file: str | None,
    idempotency_key: str,
    expected_version: int | None,
    wait: bool,
    address: str,
    as_json: bool,
) -> None:
    """Emit a lifecycle EVENT for CONNECTION_ID (validate-connection, post-connection-creation, ...)."""
    request = EmitRequest(
        ref=_ref(connection_id, integration, environment),
        event=LifecycleEvent(event),
        config=connection_config,
        credentials=_credentials(credential_pairs, credentials_file),
        payload=payload,
        idempotency_key=idempotency_key,
        expected_version=expected_version,
        wait=wait,
    )
    with Client(address) as client:
        result = client.emit(request)
    if as_json:
        _print_json(_result_json(result))
        return
    _print_result(request, result)


def _result_json(result: EmitResult) -> dict[str, Any]:
    return {
        "event_id": result.event_id,
        "position": result.position,
        "version": result.version,
        "state": result.state.value,
        "rejection_reason": result.rejection_reason,
        "deduplicated": result.deduplicated,
        "outcomes": [
            {
                "name": o.name,
                "status": o.status.value,
                "attempts": o.attempts,
                "error": o.error,
                "duration_ms": o.duration_ms,
            }
            for o in result.outcomes
        ],
    }


def _print_result(request: EmitRequest, result: EmitResult) -> None:
    table = _table("FIELD", "VALUE")
    table.show_header = False
    table.add_row("connection", str(request.ref))
    table.add_row("event", request.event.value)
    table.add_row("state", result.state.value)
    table.add_row("position", str(result.position))
    table.add_row("version", str(result.version))
    table.add_row("event id", result.event_id)
    if result.rejection_reason:
        table.add_row("rejected", result.rejection_reason)
    if result.deduplicated:
        table.add_row("deduplicated", "yes: the original response of this idempotency key")
    for o in result.outcomes:
        table.add_row(
            f"function {o.name}",
            f"{o.status.value} ({o.attempts} attempt{'' if o.attempts == 1 else 's'}) {o.error}".rstrip(),
        )
    _print_table(table)


# -- connections --------------------------------------------------------------------


class _DefaultList(click.Group):
    """``connections [OPTIONS]`` means ``connections list [OPTIONS]``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_DefaultList)
def connections() -> None:
    """List connections (the default: ``connections [list] ...``), or show one (``connections get``)."""


@connections.command("list")
@click.option(
    "-e",
    "--environment",
    envvar="ORCHESTRATOR_ENVIRONMENT",
    default="",
    callback=_name("--environment"),
    help="Only this environment (default: all).",
)
@click.option("-i", "--integration", default="", callback=_name("--integration"), help="Only this integration.")
@click.option("--state", type=click.Choice([s.value for s in ConnectionState]), help="Only this state.")
@_address
@_json_flag
def list_connections(
    environment: str = "",
    integration: str = "",
    state: str | None = None,
    address: str = config.DEFAULT_ADDRESS,
    as_json: bool = False,
) -> None:
    """List connections with their state (every page)."""
    with Client(address) as client:
        rows = list(
            client.list_connections(
                environment=environment,
                integration=integration,
                state=ConnectionState(state) if state else None,
            )
        )
    if as_json:
        _print_json([_connection_json(c) for c in rows])
        return
    _print_table(_connections_table(rows))


@connections.command("get")
@click.argument("connection_id")
@click.option("-i", "--integration", required=True, callback=_name("--integration"), help="The integration.")
@_environment
@_address
@_json_flag
def get_connection(connection_id: str, integration: str, environment: str, address: str, as_json: bool) -> None:
    """Show one connection: state, version, metadata, config, outcomes."""
    with Client(address) as client:
        connection = client.get_connection(_ref(connection_id, integration, environment))
    data = _connection_json(connection)
    if as_json:
        _print_json(data)
        return
    table = _table("FIELD", "VALUE")
    table.show_header = False
    for key in (
        "stream",
        "state",
        "version",
        "last_event",
        "last_position",
        "created_at",
        "updated_at",
        "rejection_reason",
    ):
        if data[key] not in ("", None):
            table.add_row(key.replace("_", " "), str(data[key]))
    table.add_row("config", codec.dumps(data["config"]))
    table.add_row("metadata", codec.dumps(data["metadata"]))
    for o in connection.outcomes:
        table.add_row(
            f"function {o.name}",
            f"{o.status.value} ({o.attempts} attempt{'' if o.attempts == 1 else 's'}) {o.error}".rstrip(),
        )
    _print_table(table)


# -- events ------------------------------------------------------------------------


def _event_line(record: Record) -> str:
    return f"{record.position:>8}  {_when(record.recorded_at)}  {record.stream}  v{record.version}  {record.type}"


@main.command()
@click.option("--connection", "connection_id", help="Only this connection's stream (with -i and -e).")
@click.option("-i", "--integration", default="", callback=_name("--integration"))
@_environment
@click.option("--from", "from_position", type=click.IntRange(min=0), default=0, help="First position (inclusive).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing records as they are committed.")
@_address
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
def events(
    connection_id: str | None,
    integration: str,
    environment: str,
    from_position: int,
    follow: bool,
    address: str,
    as_json: bool,
) -> None:
    """Print the event log, from a position, for one connection or all."""
    ref = None
    if connection_id:
        if not integration:
            raise click.UsageError("--connection needs --integration")
        ref = _ref(connection_id, integration, environment)
    with Client(address) as client:
        for record in client.read_events(ref=ref, from_position=from_position, follow=follow):
            line = codec.dumps(codec.record_to_json(record)) if as_json else _event_line(record)
            click.echo(line)


# -- functions and dryrun ------------------------------------------------------------


@main.command()
@_json_flag
def functions(as_json: bool) -> None:
    """List the installed event functions, with their plugin distribution and version (exit 1 if any is broken)."""
    from orchestrator.plugins import discover

    registry = discover()
    if as_json:
        _print_json(
            {
                "functions": [
                    {
                        "name": f.name,
                        "integration": f.function.integration,
                        "event": f.function.event.value,
                        "description": f.function.description,
                        "distribution": f.distribution,
                        "version": f.version,
                        "entry_point": f.entry_point,
                        "sync": not f.function.is_async,
                    }
                    for f in registry.functions
                ],
                "broken": [
                    {
                        "distribution": b.distribution,
                        "version": b.version,
                        "name": b.name,
                        "entry_point": b.entry_point,
                        "reason": b.reason,
                    }
                    for b in registry.broken
                ],
            }
        )
    else:
        table = _table("INTEGRATION", "EVENT", "NAME", "DESCRIPTION", "DISTRIBUTION", "VERSION")
        for f in registry.functions:
            table.add_row(
                f.function.integration,
                f.function.event.value,
                f.name,
                f.function.description,
                f.distribution,
                f.version,
            )
        _print_table(table)
        for broken in registry.broken:
            click.echo(f"orchestrator: broken plugin: {broken}", err=True)
    if registry.broken:
        sys.exit(1)


@main.command()
@click.argument("function_name", metavar="FUNCTION")
@click.argument("connection_id")
@_environment
@click.option(
    "-i",
    "--integration",
    default="",
    callback=_name("--integration"),
    help="The integration, when several have a function of this name.",
)
@click.option("--payload", callback=_json_object, help="The event payload, a JSON object (or @file).")
@click.option(
    "--credential",
    "credential_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A credential for the provider; repeatable.",
)
@click.option("--credentials-file", type=click.Path(exists=True, dir_okay=False), help="Credentials as JSON.")
@click.option("--commit", is_flag=True, help="Record the outcome and metadata writes in the log (daemon stopped).")
@click.option("--timeout", "time_limit", type=click.FloatRange(min=0.001), default=60.0, help="Seconds it may take.")
@_database
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar="ORCHESTRATOR_CONFIG",
    help="The daemon's TOML config, for [integrations.*] settings.",
)
@_json_flag
@click.pass_context
def dryrun(
    ctx: click.Context,
    /,
    function_name: str,
    connection_id: str,
    environment: str,
    integration: str,
    payload: dict[str, Any],
    credential_pairs: tuple[str, ...],
    credentials_file: str | None,
    commit: bool,
    time_limit: float,
    database: str | None,
    config_file: str | None,
    as_json: bool,
) -> None:
    """Run FUNCTION once against CONNECTION_ID's recorded state; provider calls are real, nothing is written
    unless --commit."""
    from orchestrator import dryrun as dryrun_mod
    from orchestrator import plugins
    from orchestrator.plugins import discover

    configured = _integrations(ctx)
    if config_file:
        configured = config.integrations_from_toml(config.load_toml(Path(config_file)).get("integrations", {}))
    integrations, _ = plugins.integrations(configured)
    function = dryrun_mod.find_function(discover(), function_name, integration)
    run = anyio.run(
        lambda: dryrun_mod.dryrun(
            database or config.default_database(),
            function,
            connection_id,
            environment,
            payload=payload,
            credentials=_credentials(credential_pairs, credentials_file),
            integrations=integrations,
            commit=commit,
            time_limit=time_limit,
        )
    )
    result = run.result
    if as_json:
        _print_json(
            {
                "function": function.name,
                "connection": run.ref.stream,
                "ok": result.ok,
                "error": result.error,
                "calls": run.calls,
                "logs": result.logs,
                "metadata_before": run.before,
                "metadata_after": run.after,
                "committed": run.committed,
                "duration_ms": result.duration_ms,
            }
        )
    else:
        click.echo(f"{function.name} ({function.distribution} {function.version}) on {run.ref}")
        for call in run.calls:
            click.echo(f"  http  {call}")
        for line in result.logs:
            click.echo(f"  log   {line}")
        for line in _diff_lines(run.before, run.after):
            click.echo(f"  meta  {line}")
        verdict = "succeeded" if result.ok else f"failed: {result.error_type}: {result.error}"
        click.echo(
            f"{verdict} in {result.duration_ms} ms; "
            + ("recorded in the log" if run.committed else "nothing was written (pass --commit to record it)")
        )
    if not result.ok:
        sys.exit(1)


def _diff_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if key not in after:
            lines.append(f"- {key}: {codec.dumps(before[key])}")
        elif key not in before:
            lines.append(f"+ {key}: {codec.dumps(after[key])}")
        elif before[key] != after[key]:
            lines.append(f"~ {key}: {codec.dumps(before[key])} -> {codec.dumps(after[key])}")
    return lines or ["(metadata unchanged)"]


# -- replay ------------------------------------------------------------------------


def _parse_until(ctx: click.Context, param: click.Parameter, value: str | None) -> replay_mod.Until | None:
    if not value:
        return None
    if value.isdigit():
        return replay_mod.Until(position=int(value))
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a position nor an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return replay_mod.Until(time=moment)


@main.command()
@_database
@click.option("--connection", "connection_id", help="Print this connection's timeline.")
@click.option("-i", "--integration", default="", callback=_name("--integration"), help="With --connection.")
@click.option(
    "-e",
    "--environment",
    default="",
    callback=_name("--environment"),
    help="With --connection (default: any).",
)
@click.option(
    "--until",
    callback=_parse_until,
    metavar="POSITION|TIMESTAMP",
    help="Show the world as it was at that position or ISO-8601 time.",
)
@click.option("--verify", is_flag=True, help="Compare the fold with the read model; exit 1 on any difference.")
@_json_flag
def replay(
    database: str | None,
    connection_id: str | None,
    integration: str,
    environment: str,
    until: replay_mod.Until | None,
    verify: bool,
    as_json: bool,
) -> None:
    """Fold the event log offline (works while the daemon runs)."""
    if verify and (until or connection_id):
        raise click.UsageError("--verify checks the whole log: it takes no --until or --connection")
    url = database or config.default_database()
    anyio.run(_replay, url, connection_id, integration, environment, until, verify, as_json)


async def _replay(
    url: str,
    connection_id: str | None,
    integration: str,
    environment: str,
    until: replay_mod.Until | None,
    verify: bool,
    as_json: bool,
) -> None:
    from orchestrator.store import open_store

    async with open_store(url, readonly=True) as store:
        with _Progress(await store.head()) as progress:
            if verify:
                differences = await replay_mod.verify(store, progress=progress.update)
                progress.close()
                if as_json:
                    _print_json(
                        {
                            "ok": not differences,
                            "differences": [
                                {
                                    "stream": d.stream,
                                    "field": d.field,
                                    "read_model": d.read_model,
                                    "replayed": d.replayed,
                                }
                                for d in differences
                            ],
                        }
                    )
                else:
                    for d in differences:
                        click.echo(str(d))
                    click.echo(f"{len(differences)} difference(s)" if differences else "read model matches the log")
                if differences:
                    sys.exit(1)
                return
            result = await replay_mod.replay(store, until=until, progress=progress.update)
            progress.close()
        if connection_id:
            await _timeline(store, result, connection_id, integration, environment, until, as_json)
            return
    rows = sorted(result.connections.values(), key=lambda c: c.ref)
    if as_json:
        _print_json({"position": result.position, "connections": [_connection_json(c) for c in rows]})
        return
    _print_table(_connections_table(rows))
    click.echo(f"\n{len(rows)} connection(s), {result.records} record(s) folded, up to position {result.position}")


async def _timeline(
    store: Any,
    result: replay_mod.Replayed,
    connection_id: str,
    integration: str,
    environment: str,
    until: replay_mod.Until | None,
    as_json: bool,
) -> None:
    refs = result.named(connection_id, integration=integration, environment=environment)
    if not refs:
        _fail(f"no connection {connection_id!r} in the log" + (" up to --until" if until else ""))
    out: list[dict[str, Any]] = []
    table = _table("POSITION", "VERSION", "RECORDED", "TYPE", "STATE AFTER", "DETAIL")
    for ref in refs:
        connection: Connection | None = None
        async for record, connection in replay_mod.timeline(store, ref, until=until):
            if as_json:
                out.append({**codec.record_to_json(record), "state_after": connection.state.value})
                continue
            detail = _detail(record)
            table.add_row(
                str(record.position),
                str(record.version),
                _when(record.recorded_at),
                record.type,
                connection.state.value,
                detail,
            )
        if as_json:
            out.append({"connection": _connection_json(connection)} if connection else {})
    if as_json:
        _print_json(out)
        return
    _print_table(table)
    for ref in refs:
        c = result.connections[ref.stream]
        click.echo(f"\n{ref}: {c.state.value} at version {c.version}; metadata {codec.dumps(c.metadata)}")


def _detail(record: Record) -> str:
    data = record.data
    if record.idempotency_key:
        return f"key={record.idempotency_key}"
    if record.type == "metadata-updated":
        merge = "merge " if data.get("merge") else ""
        return f"{data.get('function', '')}: {merge}{codec.dumps(data.get('metadata', {}))}"
    for key in ("reason", "function", "error"):
        if data.get(key):
            return f"{key}={data[key]}"
    return ""


class _Progress:
    """A progress bar on stderr for large logs when it is a terminal; otherwise nothing."""

    THRESHOLD = 50_000

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if total >= self.THRESHOLD and sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("replaying", total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, position: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=position)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


if __name__ == "__main__":  # pragma: no cover
    main()
