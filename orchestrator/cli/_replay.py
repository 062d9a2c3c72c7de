"""``orchestrator replay``: fold the event log offline, reading the file directly; no daemon, no gRPC."""

from __future__ import annotations

import gc
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from orchestrator import codec, config
from orchestrator.cli._common import (
    POSITION,
    connection_json,
    connection_option,
    connections_table,
    database,
    detail,
    environment_filter,
    integration,
    json_flag,
    named_connection,
    one_connection,
    print_json,
    print_table,
    table,
    when,
)
from orchestrator.cli._exit import FAILURE
from orchestrator.cli._settings import config_option

if TYPE_CHECKING:
    from orchestrator.model import Connection
    from orchestrator.replay import Difference, Replayed, Until
    from orchestrator.store import EventStore


MAX_JOBS = 64
"""The most processes --jobs takes (more would only compete for the same cores and the same file)."""


def _check_jobs(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and not 1 <= value <= MAX_JOBS:
        raise click.BadParameter(f"{value} is not a number of processes from 1 to {MAX_JOBS}")
    return value


def _parse_until(ctx: click.Context, param: click.Parameter, value: str | None) -> Until | None:
    from orchestrator.replay import Until

    if not value:
        return None
    if value.isdigit():
        if int(value) > POSITION.max:  # type: ignore[operator]
            raise click.BadParameter(f"{value} is larger than any position (at most {POSITION.max})")
        return Until(position=int(value))
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a position nor an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Until(time=moment)


@click.command(short_help="Fold the event log offline (works while the daemon runs).")
@database
@connection_option
@integration(required=False, help="With --connection: its integration (default: any).")
@environment_filter
@click.option(
    "--until",
    callback=_parse_until,
    metavar="POSITION|TIMESTAMP",
    help="Show the world as it was at that position or ISO-8601 time.",
)
@click.option("--verify", is_flag=True, help="Compare the fold with the read model; exit 1 on any difference.")
@click.option(
    "--jobs",
    type=int,
    callback=_check_jobs,
    metavar="N",
    help="Processes that fold an SQLite log, its connections split between them (default: the number of"
    " cores for a log of 50,000 records or more, else 1; 1: no other process).",
)
@config_option()
@json_flag
@click.pass_context
def replay(
    ctx: click.Context,
    /,
    database: str | None,
    connection_id: str | None,
    integration: str,
    environment: str,
    until: Until | None,
    verify: bool,
    jobs: int | None,
    as_json: bool,
) -> None:
    """Fold the event log offline, reading its file (works while the daemon runs): a table of connections,
    one connection's timeline (--connection), the world at a past position or time (--until), or --verify.

    --connection ID alone names the one connection with that ID; when several have it, -i and -e
    tell them apart. An SQLite log is read directly, its connections folded in --jobs processes.
    """
    import anyio

    from orchestrator.store import locate, sqlite_path

    if verify and (until or connection_id):
        raise click.UsageError("--verify checks the whole log: it takes no --until or --connection")
    named = named_connection(ctx, connection_id, integration, environment)
    url = database or config.default_database()
    locate(url, create_directory=True, write=False)  # a directory or an unreadable file: said here, in one line
    path = sqlite_path(url)
    if path is None:  # another backend: through the store, in this process
        anyio.run(_replay_store, url, named, until, verify, as_json)
        return
    from orchestrator import replay as replay_mod

    # Read directly, before any thread is started: the other processes are forked (cheap) rather than spawned.
    head = replay_mod.log_head(path)
    jobs = jobs or replay_mod.default_jobs(head)
    with _Progress(head) as progress:
        if verify:
            differences = replay_mod.verify_file(path, progress=progress.update, jobs=jobs)
            progress.close()
            _differences(differences, as_json)
            return
        result = replay_mod.replay_file(path, until=until, progress=progress.update, jobs=jobs)
    # Every connection replayed lives until the command ends: the collector need not walk them while it prints.
    gc.freeze()
    if named is not None:
        anyio.run(_timeline_of, url, result, named, until, as_json)
        return
    _connections(result, as_json)


async def _replay_store(
    url: str,
    named: tuple[str, str, str] | None,
    until: Until | None,
    verify: bool,
    as_json: bool,
) -> None:
    from orchestrator import replay as replay_mod
    from orchestrator.store import open_store

    async with open_store(url, readonly=True) as store:
        with _Progress(await store.head()) as progress:
            if verify:
                differences = await replay_mod.verify(store, progress=progress.update)
                progress.close()
                _differences(differences, as_json)
                return
            result = await replay_mod.replay(store, until=until, progress=progress.update)
            progress.close()
        if named is not None:
            await _timeline(store, result, named, until, as_json)
            return
    _connections(result, as_json)


def _differences(differences: list[Difference], as_json: bool) -> None:
    """Print what --verify found; exit 1 when it found anything."""
    if as_json:
        print_json(
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
        sys.exit(FAILURE)


def _connections(result: Replayed, as_json: bool) -> None:
    """Print every connection of ``result``: a table, or one JSON document."""
    rows = sorted(result.connections.values(), key=lambda c: c.ref)
    if as_json:
        _print_connections_json(rows, result.position)
        return
    print_table(connections_table(rows))
    click.echo(f"\n{len(rows)} connection(s), {result.records} record(s) folded, up to position {result.position}")


async def _timeline_of(
    url: str, result: Replayed, named: tuple[str, str, str], until: Until | None, as_json: bool
) -> None:
    from orchestrator.store import open_store

    async with open_store(url, readonly=True) as store:
        await _timeline(store, result, named, until, as_json)


async def _timeline(
    store: EventStore,
    result: Replayed,
    named: tuple[str, str, str],
    until: Until | None,
    as_json: bool,
) -> None:
    from orchestrator.replay import timeline

    connection_id, integration, environment = named
    found = result.named(connection_id, integration=integration, environment=environment)
    ref = one_connection(named, found, "in the log" + (" up to --until" if until else ""))
    out: list[dict[str, Any]] = []
    steps = table("POSITION", "VERSION", "RECORDED", "TYPE", "STATE AFTER", "DETAIL")
    last = None
    async for record, connection in timeline(store, ref, until=until):
        last = connection
        if as_json:
            out.append({**codec.record_to_json(record), "state_after": connection.state.value})
            continue
        steps.add_row(
            str(record.position),
            str(record.version),
            when(record.recorded_at),
            record.type,
            connection.state.value,
            detail(record),
        )
    if as_json:
        out.append({"connection": connection_json(last)} if last else {})
        print_json(out)
        return
    print_table(steps)
    c = result.connections[ref.stream]
    click.echo(f"\n{ref}: {c.state.value} at version {c.version}; metadata {codec.dumps(c.metadata)}")


class _Progress:
    """A progress bar on stderr for large logs when it is a terminal; otherwise nothing."""

    THRESHOLD = 50_000

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if total >= self.THRESHOLD and sys.stderr.isatty():
            from rich.console import Console
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


_PRINT_EVERY = 1000
"""Connections written at a time by :func:`_print_connections_json`."""


def _print_connections_json(rows: list[Connection], position: int) -> None:
    """``print_json({"position": position, "connections": [connection_json(c) for c in rows]})``, the same text,
    written a thousand connections at a time: a log of 100,000 connections is never one document in memory."""
    if not rows:
        click.echo(f'{{\n  "connections": [],\n  "position": {position}\n}}')
        return
    click.echo('{\n  "connections": [')
    last = len(rows) - 1
    for start in range(0, len(rows), _PRINT_EVERY):
        part = rows[start : start + _PRINT_EVERY]
        texts = [_indented(connection_json(c)) for c in part]
        click.echo(",\n".join(texts) + ("," if start + len(part) - 1 < last else ""))
    click.echo(f'  ],\n  "position": {position}\n}}')


def _indented(value: dict[str, Any]) -> str:
    """``value`` (a connection's ``--json`` form) as ``json.dumps(indent=2, sort_keys=True, ensure_ascii=False)``
    writes it, two levels down.

    orjson writes the same text about ten times faster for all it holds here but a float (its
    metadata's or config's: the other fields are strings and integers), which it writes otherwise;
    what it refuses (an integer beyond 64 bits, a lone surrogate) goes to :mod:`json` as well.
    """
    import orjson

    text = None
    if not _has_float(value["metadata"]) and not _has_float(value["config"]):
        try:
            text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
        except TypeError:  # orjson.JSONEncodeError
            text = None
    if text is None:
        text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return "    " + text.replace("\n", "\n    ")


def _has_float(value: object) -> bool:
    """Whether a float is anywhere in ``value`` (JSON as decoded: dicts, lists, scalars)."""
    if type(value) is dict:
        return any(type(v) is float or (type(v) in (dict, list) and _has_float(v)) for v in value.values())
    if type(value) is list:
        return any(type(v) is float or (type(v) in (dict, list) and _has_float(v)) for v in value)
    return type(value) is float
