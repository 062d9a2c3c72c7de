"""``orchestrator events``: the event log as the daemon serves it, optionally followed."""

from __future__ import annotations

import click

from orchestrator import codec
from orchestrator.cli._common import Daemon, checked_name, client_options, connection_ref, detail, environment, when
from orchestrator.records import Record


def _event_line(record: Record) -> str:
    line = f"{record.position:>8}  {when(record.recorded_at)}  {record.stream}  v{record.version}  {record.type}"
    said = detail(record)
    return f"{line}  {said}" if said else line


@click.command()
@click.option("--connection", "connection_id", help="Only this connection's stream (with -i and -e).")
@click.option("-i", "--integration", default="", callback=checked_name("--integration"))
@environment
@click.option("--from", "from_position", type=click.IntRange(min=0), default=0, help="First position (inclusive).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing records as they are committed.")
@client_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
def events(
    connection_id: str | None,
    integration: str,
    environment: str,
    from_position: int,
    follow: bool,
    daemon: Daemon,
    as_json: bool,
) -> None:
    """Print the event log, from a position, for one connection or all."""
    ref = None
    if connection_id:
        if not integration:
            raise click.UsageError("--connection needs --integration")
        ref = connection_ref(connection_id, integration, environment)
    with daemon.client() as client:
        for record in client.read_events(ref=ref, from_position=from_position, follow=follow):
            line = codec.dumps(codec.record_to_json(record)) if as_json else _event_line(record)
            click.echo(line)
