"""``orchestrator migrate``: copy an SQLite log into an empty PostgreSQL (or SQLite) log and verify it; no daemon."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli._common import json_flag, print_json, print_table, table
from orchestrator.cli._exit import FAILURE
from orchestrator.cli._settings import config_option

if TYPE_CHECKING:
    from orchestrator.migrate import Migrated


@click.command(short_help="Copy an SQLite log into an empty PostgreSQL log; verify it.")
@click.option(
    "--from",
    "source",
    required=True,
    metavar="URL",
    help="The log to copy: sqlite:///path/to/events.db (or a path). No daemon may be running on it.",
)
@click.option(
    "--to",
    "target",
    required=True,
    metavar="URL",
    help="The empty log to copy into: postgresql://user@host:port/database (?search_path=SCHEMA for a schema),"
    " or an SQLite file (made when missing).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=2000,
    metavar="ROWS",
    help="Rows read and written at a time (memory stays bounded by it).",
)
@config_option()
@json_flag
def migrate(source: str, target: str, batch_size: int, as_json: bool) -> None:
    """Copy the SQLite log at --from into the empty log at --to, verbatim, then verify the copy.

    Records keep their positions, versions, event ids, times, causation, traceparent and
    idempotency keys; the read model, the jobs of every status and the sealed credentials
    (copied as they are: no key needed) come along. The copy is one transaction: if it is
    interrupted, the target stays empty and the same command starts over. A target that
    holds any row is refused, and so is a source a daemon is running on (stop it first: the
    copy holds the daemon's lock on the file, so none starts on it meanwhile).

    Verified: every table's rows are the same bytes on both sides, and the target's read model
    is the fold of its log (as `replay --verify`). Exit 1 on any difference.
    """
    import anyio

    from orchestrator.migrate import migrate as run

    with _Progress() as progress:
        result = anyio.run(lambda: run(source, target, batch=batch_size, progress=progress.update))
    _report(result, as_json)
    if not result.ok:
        sys.exit(FAILURE)


def _report(result: Migrated, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "ok": result.ok,
                "from": result.source,
                "to": result.target,
                "head": result.head,
                "rows": result.counts,
                "copy_seconds": round(result.copy_seconds, 3),
                "verify_seconds": round(result.verify_seconds, 3),
                "problems": result.problems,
            }
        )
        return
    rows = table("TABLE", "ROWS")
    for name, count in result.counts.items():
        rows.add_row(name, str(count))
    print_table(rows)
    click.echo(
        f"\ncopied {sum(result.counts.values())} row(s) from {result.source} to {result.target} in"
        f" {result.copy_seconds:.1f} s, up to position {result.head}; verified in {result.verify_seconds:.1f} s"
    )
    for problem in result.problems:
        click.echo(problem)
    click.echo("the copy matches the source" if result.ok else f"{len(result.problems)} problem(s)")


class _Progress:
    """A progress bar on stderr when it is a terminal; otherwise a line at each tenth of the copy."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._tenth = 0

    def __enter__(self) -> _Progress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("copying", total=None)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def update(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        tenth = done * 10 // max(total, 1)
        if tenth > self._tenth:
            self._tenth = tenth
            click.echo(f"migrate: copied {done} of {total} rows", err=True)
