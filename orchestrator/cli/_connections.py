"""``orchestrator connections [list]`` and ``connections get``: the daemon's read model."""

from __future__ import annotations

import click

from orchestrator import codec
from orchestrator.cli._common import (
    Daemon,
    checked_name,
    client_options,
    connection_json,
    connection_ref,
    connections_table,
    environment,
    json_flag,
    outcome_row,
    print_json,
    print_table,
    table,
)
from orchestrator.model import ConnectionState


class _DefaultList(click.Group):
    """``connections [OPTIONS]`` means ``connections list [OPTIONS]``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultList)
def connections() -> None:
    """List connections (the default: ``connections [list] ...``), or show one (``connections get``)."""


@connections.command("list")
@click.option(
    "-e",
    "--environment",
    envvar="ORCHESTRATOR_ENVIRONMENT",
    default="",
    callback=checked_name("--environment"),
    help="Only this environment (default: all).",
)
@click.option("-i", "--integration", default="", callback=checked_name("--integration"), help="Only this integration.")
@click.option("--state", type=click.Choice([s.value for s in ConnectionState]), help="Only this state.")
@client_options
@json_flag
def list_connections(environment: str, integration: str, state: str | None, daemon: Daemon, as_json: bool) -> None:
    """List connections with their state (every page)."""
    with daemon.client() as client:
        rows = list(
            client.list_connections(
                environment=environment,
                integration=integration,
                state=ConnectionState(state) if state else None,
            )
        )
    if as_json:
        print_json([connection_json(c) for c in rows])
        return
    print_table(connections_table(rows))


@connections.command("get")
@click.argument("connection_id")
@click.option("-i", "--integration", required=True, callback=checked_name("--integration"), help="The integration.")
@environment
@client_options
@json_flag
def get_connection(connection_id: str, integration: str, environment: str, daemon: Daemon, as_json: bool) -> None:
    """Show one connection: state, version, metadata, config, outcomes."""
    with daemon.client() as client:
        connection = client.get_connection(connection_ref(connection_id, integration, environment))
    data = connection_json(connection)
    if as_json:
        print_json(data)
        return
    out = table("FIELD", "VALUE")
    out.show_header = False
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
            out.add_row(key.replace("_", " "), str(data[key]))
    out.add_row("config", codec.dumps(data["config"]))
    out.add_row("metadata", codec.dumps(data["metadata"]))
    for o in connection.outcomes:
        out.add_row(*outcome_row(o))
    print_table(out)
