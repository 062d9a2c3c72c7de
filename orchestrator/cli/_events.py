"""``orchestrator events``: the event log as the daemon serves it, optionally followed."""

from __future__ import annotations

import click

from orchestrator import codec
from orchestrator.cli._common import (
    POSITION,
    Daemon,
    client_options,
    connection_option,
    connection_ref,
    detail,
    environment_filter,
    integration,
    json_lines_flag,
    named_connection,
    one_connection,
    when,
)
from orchestrator.cli._settings import config_option
from orchestrator.model import ConnectionRef
from orchestrator.records import Record


def _event_line(record: Record) -> str:
    line = f"{record.position:>8}  {when(record.recorded_at)}  {record.stream}  v{record.version}  {record.type}"
    said = detail(record)
    return f"{line}  {said}" if said else line


@click.command(short_help="Print the event log or one connection's; -f follows it.")
@connection_option
@integration(required=False, help="With --connection: its integration (default: any).")
@environment_filter
@click.option(
    "--from",
    "from_position",
    metavar="POSITION",
    type=POSITION,
    default=0,
    help="First position (inclusive).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing records as they are committed.")
@client_options
@config_option()
@json_lines_flag
@click.pass_context
def events(
    ctx: click.Context,
    /,
    connection_id: str | None,
    integration: str,
    environment: str,
    from_position: int,
    follow: bool,
    daemon: Daemon,
    as_json: bool,
) -> None:
    """Print the event log, from a position, for one connection or all; --follow keeps printing new records.

    --connection ID alone names the one connection with that ID; when several have it, -i and -e
    tell them apart. With both -i and -e the stream is read as named, even before it has a record
    (--follow then waits for its first).
    """
    named = named_connection(ctx, connection_id, integration, environment)
    with daemon.client() as client:
        ref: ConnectionRef | None = None
        if named is not None:
            if integration and environment:
                ref = connection_ref(*named)
            else:
                found = (
                    c.ref
                    for c in client.list_connections(environment=environment, integration=integration)
                    if c.ref.connection_id == connection_id
                )
                ref = one_connection(
                    named, found, "at the daemon (to read a stream that has no record yet, name it whole: -i and -e)"
                )
        for record in client.read_events(ref=ref, from_position=from_position, follow=follow):
            line = codec.dumps(codec.record_to_json(record)) if as_json else _event_line(record)
            click.echo(line)
