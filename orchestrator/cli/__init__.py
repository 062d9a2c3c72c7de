"""The ``orchestrator`` command.

Every setting can be given as a flag, as the ``ORCHESTRATOR_*`` variable shown
in ``--help``, or in the TOML settings file named by ``--config FILE`` or
``ORCHESTRATOR_CONFIG`` (:mod:`orchestrator.cli._settings`: one file for the
daemon and the clients); flags win over the environment, which wins over the
file. Exit codes (:mod:`orchestrator.cli._exit`): 0 success, 1 failure (one
line on stderr), 2 usage error, 130 interrupted.

One module per command (group); each imports what only it needs (gRPC, the
daemon, the store) when it runs, so ``--help`` and the offline commands stay quick.
"""

from __future__ import annotations

from typing import Any

import click

from orchestrator.cli import _exit
from orchestrator.cli._connections import connections
from orchestrator.cli._credentials import credentials_group, keygen, rotate_key
from orchestrator.cli._emit import emit
from orchestrator.cli._events import events
from orchestrator.cli._functions import dryrun, functions
from orchestrator.cli._jobs import jobs
from orchestrator.cli._migrate import migrate
from orchestrator.cli._new import new
from orchestrator.cli._replay import replay
from orchestrator.cli._serve import serve

__all__ = [
    "connections",
    "credentials_group",
    "dryrun",
    "emit",
    "events",
    "functions",
    "jobs",
    "keygen",
    "main",
    "migrate",
    "new",
    "replay",
    "rotate_key",
    "serve",
]


class _Group(click.Group):
    """Turns the errors people can act on into one line on stderr and an exit code (see ``_exit``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BaseException as exc:
            handled = _exit.outcome(exc)
            if handled is None:
                raise
            _exit.leave(*handled)


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from orchestrator._version import VERSION

    click.echo(f"orchestrator, version {VERSION}", color=ctx.color)
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and exit.",
)
def main() -> None:
    """The lifecycle orchestrator: runs event functions when connections are validated, created or deleted.

    Settings come from flags, then ORCHESTRATOR_* variables, then the TOML file of
    --config FILE or ORCHESTRATOR_CONFIG (one file for the daemon and the clients).
    Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.
    """


for _command in (serve, emit, connections, jobs, events, functions, dryrun, new, replay, migrate, keygen, rotate_key):
    main.add_command(_command)
main.add_command(credentials_group, "credentials")
