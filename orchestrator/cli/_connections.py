"""``orchestrator connections [list]`` and ``connections get``: the daemon's read model."""

from __future__ import annotations

import click

from orchestrator import codec, state
from orchestrator.cli._common import (
    Daemon,
    client_options,
    connection_json,
    connection_ref,
    connections_table,
    environment,
    environment_filter,
    integration,
    json_flag,
    outcome_row,
    print_json,
    print_table,
    table,
)
from orchestrator.cli._settings import config_option
from orchestrator.model import ConnectionState


class _DefaultList(click.Group):
    """``connections [OPTIONS]`` means ``connections list [OPTIONS]``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultList, short_help="List connections, or show one (connections get).")
def connections() -> None:
    """List connections (the default: `connections [list] ...`), or show one (`connections get`), through the
    daemon."""


@connections.command("list", short_help="List connections with their state.")
@environment_filter
@integration(required=False, help="Only this integration (default: any).")
@click.option("--state", type=click.Choice([s.value for s in ConnectionState]), help="Only this state.")
@client_options
@config_option()
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


@connections.command("get", short_help="Show one connection and the outcome of each of its functions.")
@click.argument("connection_id")
@integration(required=True, help="The connection's integration.")
@environment
@client_options
@config_option()
@json_flag
def get_connection(connection_id: str, integration: str, environment: str, daemon: Daemon, as_json: bool) -> None:
    """Show one connection: state, version, metadata, config, and the last outcome of every function of its
    current incarnation."""
    ref = connection_ref(connection_id, integration, environment)
    with daemon.client() as client:
        connection = client.get_connection(ref)
        # Every function of this incarnation, not only the latest event's: read from the connection's stream.
        functions = state.incarnation_outcomes(
            r for r in client.read_events(ref=ref) if r.position <= connection.last_position
        )
    data = {**connection_json(connection), "functions": [codec.outcome_to_json(o) for o in functions]}
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
    for o in functions:
        out.add_row(*outcome_row(o))
    print_table(out)
