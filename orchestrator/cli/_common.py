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
from orchestrator.errors import InvalidArgument
from orchestrator.model import Connection, ConnectionRef, Outcome, check_connection_id, check_name

if TYPE_CHECKING:
    from rich.table import Table

    from orchestrator.config import Integration
    from orchestrator.rpc.client import Client

TOML_TABLES = {"integrations"}  # tables read by later features, not command options
_INTEGRATIONS = "orchestrator.integrations"

# -- the config file ---------------------------------------------------------------


def apply_toml(ctx: click.Context, path: Path, command: click.Command | None = None) -> None:
    """Make the file's settings the defaults of every option they name."""
    settings = config.load_toml(path)
    options = _option_names(command or ctx.command)
    unknown = sorted(k for k in settings if k not in options and k not in TOML_TABLES)
    if unknown:
        raise click.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)}", param_hint="config file")
    ctx.default_map = _defaults_for(command or ctx.command, settings)
    ctx.meta[_INTEGRATIONS] = config.integrations_from_toml(settings.get("integrations", {}))


def configured_integrations(ctx: click.Context) -> dict[str, Integration]:
    """The ``[integrations.*]`` tables of the config file, if one was read."""
    found: dict[str, Integration] = ctx.meta.get(_INTEGRATIONS, {})
    return found


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


# -- options and arguments ---------------------------------------------------------


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
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint=option) from None


def _token_from_file(path: Path) -> str:
    data = _file_bytes("--token-file", path) or b""
    try:
        token = data.decode().strip()
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint="--token-file") from None
    if not token or any(c.isspace() for c in token):
        raise click.BadParameter(f"{path} must hold the token and nothing else", param_hint="--token-file")
    return token


def _no_token_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value and ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE:
        raise click.BadParameter(
            "a token on the command line is visible to every user of the machine (ps): set ORCHESTRATOR_TOKEN"
            " or use --token-file"
        )
    return value


_FILE = click.Path(dir_okay=False, path_type=Path)
_CLIENT_OPTIONS = [
    click.option(
        "--address",
        envvar="ORCHESTRATOR_ADDRESS",
        show_envvar=True,
        default=config.DEFAULT_ADDRESS,
        help="The daemon's gRPC address.",
    ),
    click.option(
        "--tls-ca",
        envvar="ORCHESTRATOR_TLS_CA",
        show_envvar=True,
        type=_FILE,
        help="Speak TLS, trusting the CA in this PEM file (the one that signed the daemon's certificate).",
    ),
    click.option(
        "--tls-cert",
        envvar="ORCHESTRATOR_TLS_CERT",
        show_envvar=True,
        type=_FILE,
        help="Mutual TLS: this client's certificate (PEM), with --tls-key.",
    ),
    click.option(
        "--tls-key",
        envvar="ORCHESTRATOR_TLS_KEY",
        show_envvar=True,
        type=_FILE,
        help="Mutual TLS: the key of --tls-cert (PEM, unencrypted).",
    ),
    click.option(
        "--token-file",
        envvar="ORCHESTRATOR_TOKEN_FILE",
        show_envvar=True,
        type=_FILE,
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


json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
environment = click.option(
    "-e",
    "--environment",
    envvar="ORCHESTRATOR_ENVIRONMENT",
    show_envvar=True,
    default="dev",
    callback=checked_name("--environment"),
    help="The environment (like `nango ... -e dev`).",
)
database = click.option(
    "--database",
    envvar="ORCHESTRATOR_DATABASE",
    show_envvar=True,
    default=None,
    help="The event log's URL: sqlite:///path/to/events.db (default: ./.orchestrator/events.db).",
)


def json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    """A callback reading a JSON object given inline or as ``@file``."""
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


def connection_ref(connection_id: str, integration: str, environment: str) -> ConnectionRef:
    """The connection named by the arguments; a malformed CONNECTION_ID is a usage error."""
    try:
        check_connection_id(connection_id, "CONNECTION_ID")
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="CONNECTION_ID") from None
    return ConnectionRef(environment, integration, connection_id)


def credentials(pairs: tuple[str, ...], file: str | None) -> dict[str, str]:
    """``--credentials-file`` and then each ``--credential NAME=VALUE``, the later winning."""
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
