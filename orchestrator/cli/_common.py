"""What the commands share: the config file, common options and argument checks, and printing.

Imported by ``orchestrator --help``: only light modules at the top (rich is
imported when a table is printed).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from orchestrator import codec, config, records
from orchestrator.cli._exit import BadInput
from orchestrator.cli._files import read_bytes, read_json, read_text
from orchestrator.errors import InvalidArgument, NotFound
from orchestrator.model import Connection, ConnectionRef, Outcome, check_connection_id, check_name

if TYPE_CHECKING:
    from rich.table import Table

    from orchestrator.rpc.client import Client

# -- options and arguments ---------------------------------------------------------

POSITION = click.IntRange(min=0, max=2**63 - 1)
"""A position or a version: what the log's 64-bit integers hold."""


def checked_name(option: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A callback that refuses a malformed integration or environment name as a usage error."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or value == "":
            return value
        try:
            return check_name(option, value)
        except InvalidArgument as exc:
            raise click.BadParameter(str(exc)) from None

    return check


@dataclass(frozen=True, slots=True)
class Daemon:
    """Where the client commands find the daemon, and how they prove who they are."""

    address: str = config.DEFAULT_ADDRESS
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str = ""

    @property
    def tls(self) -> bool:
        """TLS is spoken when a CA or a client certificate is given."""
        return self.tls_ca is not None or self.tls_cert is not None

    def client(self) -> Client:
        """A gRPC client of the daemon (imports gRPC)."""
        quiet_grpc()
        from orchestrator.rpc.client import Client, ClientTls

        tls = ClientTls(self.tls_ca, self.tls_cert, self.tls_key) if self.tls else None
        return Client(self.address, tls=tls, token=self.token)


def quiet_grpc() -> None:
    """Keep gRPC's C core to its errors on stderr (call before gRPC is imported).

    Its default also prints an INFO line for every failed TLS handshake: noise
    under a command's one error line, and in the daemon a line any client could
    repeat at will. ``GRPC_VERBOSITY`` set in the environment still wins.
    """
    import os

    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _file_bytes(option: str, path: Path | None) -> bytes | None:
    return read_bytes(option, path) if path is not None else None


def _token_from_file(path: Path) -> str:
    token = read_text("--token-file", path).strip()
    if not token or any(c.isspace() for c in token):
        raise BadInput(f"--token-file: {path} must hold the token and nothing else")
    return token


def _no_token_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value and ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE:
        raise click.BadParameter(
            "a token on the command line is visible to every user of the machine (ps): set ORCHESTRATOR_TOKEN"
            " or use --token-file"
        )
    return value


_FILE = click.Path(path_type=Path)
_CLIENT_OPTIONS = [
    click.option(
        "--address",
        envvar="ORCHESTRATOR_ADDRESS",
        show_envvar=True,
        default=config.DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help="The daemon's gRPC address.",
    ),
    click.option(
        "--tls-ca",
        envvar="ORCHESTRATOR_TLS_CA",
        show_envvar=True,
        type=_FILE,
        metavar="FILE",
        help="Speak TLS, trusting the CA in this PEM file (the one that signed the daemon's certificate).",
    ),
    click.option(
        "--tls-cert",
        envvar="ORCHESTRATOR_TLS_CERT",
        show_envvar=True,
        type=_FILE,
        metavar="FILE",
        help="Mutual TLS: this client's certificate (PEM), with --tls-key.",
    ),
    click.option(
        "--tls-key",
        envvar="ORCHESTRATOR_TLS_KEY",
        show_envvar=True,
        type=_FILE,
        metavar="FILE",
        help="Mutual TLS: the key of --tls-cert (PEM, unencrypted).",
    ),
    click.option(
        "--token-file",
        envvar="ORCHESTRATOR_TOKEN_FILE",
        show_envvar=True,
        type=_FILE,
        metavar="FILE",
        help="A file holding the bearer token to send (ORCHESTRATOR_TOKEN holds the token itself).",
    ),
    # The token itself: from ORCHESTRATOR_TOKEN or the config file's `token`, never from the command line.
    click.option("--token", envvar="ORCHESTRATOR_TOKEN", hidden=True, callback=_no_token_flag),
]


def client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say where the daemon is and how to reach it, handed to ``command`` as ``daemon=Daemon(...)``."""

    @functools.wraps(command)
    def run(
        *args: Any,
        address: str,
        tls_ca: Path | None,
        tls_cert: Path | None,
        tls_key: Path | None,
        token_file: Path | None,
        token: str | None,
        **kwargs: Any,
    ) -> Any:
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together (a client certificate and its key)")
        daemon = Daemon(
            address=address,
            tls_ca=_file_bytes("--tls-ca", tls_ca),
            tls_cert=_file_bytes("--tls-cert", tls_cert),
            tls_key=_file_bytes("--tls-key", tls_key),
            # The file wins over ORCHESTRATOR_TOKEN: it is the more deliberate of the two.
            token=_token_from_file(token_file) if token_file is not None else (token or "").strip(),
        )
        return command(*args, daemon=daemon, **kwargs)

    for option in reversed(_CLIENT_OPTIONS):
        run = option(run)
    return run


json_flag = click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
json_lines_flag = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per line, a record each (JSON lines)."
)
environment = click.option(
    "-e",
    "--environment",
    envvar="ORCHESTRATOR_ENVIRONMENT",
    show_envvar=True,
    default="dev",
    metavar="ENV",
    callback=checked_name("--environment"),
    help="The connection's environment (like `nango ... -e dev`).",
)
environment_filter = click.option(
    "-e",
    "--environment",
    envvar="ORCHESTRATOR_ENVIRONMENT",
    show_envvar=True,
    default="",
    show_default=False,
    metavar="ENV",
    callback=checked_name("--environment"),
    help="Only this environment (default: any).",
)


def integration(*, required: bool, help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``-i/--integration``: required when a command names one connection, else a filter (default: any)."""
    settings: dict[str, Any] = {} if required else {"default": "", "show_default": False}
    return click.option(
        "-i",
        "--integration",
        required=required,
        metavar="INTEGRATION",
        callback=checked_name("--integration"),
        help=help,
        **settings,
    )


database = click.option(
    "--database",
    envvar="ORCHESTRATOR_DATABASE",
    show_envvar=True,
    default=None,
    metavar="URL",
    help="The event log: sqlite:///absolute/path.db, sqlite:relative/path.db or a path, in a directory that"
    " exists (default: ./.orchestrator/events.db, the one directory made when missing); or a PostgreSQL"
    " database, postgresql://user@host:port/database, which several daemons may share.",
)


def credential_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--credential NAME=VALUE`` (repeatable) and ``--credentials-file FILE``, handed over as they are."""
    command = click.option(
        "--credentials-file",
        type=click.Path(path_type=Path),
        metavar="FILE",
        help='Credentials as a JSON object of strings, e.g. {"access_token": "..."}.',
    )(command)
    return click.option(
        "--credential",
        "credential_pairs",
        multiple=True,
        metavar="NAME=VALUE",
        help="A credential for the provider; repeatable (wins over --credentials-file).",
    )(command)


def json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    """A callback reading a JSON object given inline or as ``@file``."""
    return parse_json_object(param.opts[0] if param.opts else f"--{param.name}", value)


def parse_json_object(option: str, value: str | None) -> dict[str, Any]:
    """A JSON object given inline (a bad one is a click usage error) or as ``@file`` (one line, exit 2)."""
    if not value:
        return {}
    if value.startswith("@"):
        data = read_json(option, value[1:])
        if not isinstance(data, dict):
            raise BadInput(f"{option}: {value[1:]} must hold a JSON object, not {_json_kind(data)}")
        return data
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None
    except RecursionError:
        raise click.BadParameter("nests too deeply to be read", param_hint=option) from None
    if not isinstance(data, dict):
        raise click.BadParameter(
            'must be a JSON object, e.g. \'{"instance_url": "acme.my.salesforce.com"}\'', param_hint=option
        )
    return data


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


connection_option = click.option(
    "--connection",
    "connection_id",
    metavar="ID",
    help="Only this connection: its ID, with -i and -e when several connections have it.",
)


def named_connection(
    ctx: click.Context, connection_id: str | None, integration: str, environment: str
) -> tuple[str, str, str] | None:
    """``--connection``, ``-i`` and ``-e`` of ``events`` and ``replay``, checked: None when no connection is named.

    ``-i`` or ``-e`` given on the command line without ``--connection`` is a usage error
    (``-e`` from ORCHESTRATOR_ENVIRONMENT or the settings file is not: it only narrows a lookup).
    """
    if not connection_id:
        for name, flag in (("integration", "-i/--integration"), ("environment", "-e/--environment")):
            if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{flag} goes with --connection ID")
        return None
    try:
        check_connection_id(connection_id, "--connection")
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="--connection") from None
    return connection_id, integration, environment


def one_connection(named: tuple[str, str, str], found: Iterable[ConnectionRef], where: str) -> ConnectionRef:
    """The one connection ``--connection`` names among ``found`` (those with its ID, of -i and in -e if given).

    None found is a failure (exit 1); several, a usage error listing them, to be told apart with -i and -e.
    """
    connection_id, integration, environment = named
    refs = sorted(set(found))
    if len(refs) == 1:
        return refs[0]
    narrowed = ", ".join(f"{flag} {value}" for flag, value in (("-i", integration), ("-e", environment)) if value)
    if not refs:
        raise NotFound(f"no connection {connection_id!r}" + (f" ({narrowed})" if narrowed else "") + f" {where}")
    raise BadInput(
        f"--connection {connection_id} names {len(refs)} connections ({', '.join(r.stream for r in refs)}):"
        " pass -i INTEGRATION and -e ENV to name one"
    )


def connection_ref(connection_id: str, integration: str, environment: str) -> ConnectionRef:
    """The connection named by the arguments; a malformed CONNECTION_ID is a usage error."""
    try:
        check_connection_id(connection_id, "CONNECTION_ID")
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="CONNECTION_ID") from None
    return ConnectionRef(environment, integration, connection_id)


_EXAMPLE = '{"access_token": "..."}'


def credentials(pairs: tuple[str, ...], file: str | Path | None) -> dict[str, str]:
    """``--credentials-file`` and then each ``--credential NAME=VALUE``, the later winning."""
    creds: dict[str, str] = {}
    if file:
        data = read_json("--credentials-file", file)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise BadInput(f"--credentials-file: {file} must hold a JSON object of strings, e.g. {_EXAMPLE}")
        creds.update(data)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{name or pair!r} is not NAME=VALUE", param_hint="--credential")
        creds[name] = value
    return creds


# -- output ------------------------------------------------------------------------


def when(moment: datetime) -> str:
    """A time as the tables print it: UTC, to the millisecond."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON with sorted keys."""
    click.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def table(*columns: str) -> Table:
    """A borderless table with these column headers."""
    from rich.table import Table

    out = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        out.add_column(column, no_wrap=True, overflow="fold")
    return out


def print_table(table: Table) -> None:
    """Print aligned columns; when piped, never wrapped or truncated, and without trailing blanks."""
    from rich.console import Console

    if sys.stdout.isatty():
        Console(highlight=False).print(table)
        return
    console = Console(width=10_000, highlight=False, no_color=True, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    click.echo("\n".join(line.rstrip() for line in capture.get().splitlines()))


def connections_table(connections: Iterable[Connection]) -> Table:
    """One row per connection."""
    out = table("ENVIRONMENT", "INTEGRATION", "CONNECTION", "STATE", "VERSION", "LAST EVENT", "UPDATED")
    for c in connections:
        out.add_row(
            c.ref.environment,
            c.ref.integration,
            c.ref.connection_id,
            c.state.value,
            str(c.version),
            c.last_event,
            when(c.updated_at),
        )
    return out


def connection_json(c: Connection) -> dict[str, Any]:
    """A connection as ``--json`` prints it (without the fold's internal bookkeeping)."""
    data = codec.connection_to_json(c)
    for internal in ("lifecycle", "deletion", "incarnation"):
        data.pop(internal, None)
    return data


def outcome_row(o: Outcome) -> tuple[str, str]:
    """A function's outcome as a FIELD/VALUE row."""
    attempts = f"{o.attempts} attempt{'' if o.attempts == 1 else 's'}"
    return f"function {o.name}", f"{o.status.value} ({attempts}) {o.error}".rstrip()


def detail(record: records.Record) -> str:
    """What a person wants to see of a record on its line: a failure's error, a rejection's reason, ..."""
    if record.idempotency_key:
        return f"key={record.idempotency_key}"
    body = records.parse(record.type, record.data)
    if isinstance(body, records.MetadataUpdated):
        merge = "merge " if body.merge else ""
        return f"{body.function}: {merge}{_line(codec.dumps(body.metadata))}"
    if isinstance(body, records.FunctionFailed):
        retry = f" (retry in {body.retry_in_ms / 1000:g}s)" if body.retry_in_ms is not None else ""
        return f"{body.function} attempt {body.attempt}: {body.error_type}: {_line(body.error)}{retry}"
    if isinstance(body, records.FunctionGaveUp | records.FunctionCancelled):
        said = f"{body.reason}: {body.error}" if isinstance(body, records.FunctionGaveUp) else body.reason
        by = f" (by {body.by})" if isinstance(body, records.FunctionCancelled) and body.by else ""
        return f"{body.function} after attempt {body.attempt}: {_line(said)}{by}"
    if isinstance(body, records.FunctionRetried):
        by = f" by {body.by}" if body.by else ""
        return f"{body.function} job {body.job_id} queued again{by} ({body.status_before} after {body.attempts_before})"
    if isinstance(body, records.FunctionSucceeded):
        return f"{body.function} attempt {body.attempt} ({body.duration_ms} ms)"
    if isinstance(body, records.CredentialsUpdated):
        return f"{body.source}: {', '.join(body.names)} fingerprint {body.fingerprint} (key id {body.key_id})"
    if isinstance(body, records.CredentialsDestroyed):
        return f"fingerprint {body.fingerprint}: {_line(body.reason)}"
    reason = getattr(body, "reason", "")
    return f"reason={_line(reason)}" if reason else ""


def _line(text: str, limit: int = 200) -> str:
    """``text`` on one line of at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"
