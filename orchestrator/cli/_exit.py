"""Exit codes, and the one place an exception becomes a line on stderr and a code."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from orchestrator.errors import OrchestratorError

OK = 0
FAILURE = 1
"""Something a person can act on went wrong, said in one line on stderr."""
USAGE = 2
"""A bad option, argument or config key (click's own code for a usage error)."""
INTERRUPTED = 130
"""Ctrl-C: 128 + SIGINT."""

PREFIX = "orchestrator: error: "
WARNING = "orchestrator: warning: "


class BadInput(Exception):
    """A usage error in what the command line names rather than in the command line itself: one line, exit 2.

    A file an option names for input (``@file``, ``--credentials-file``, ``--config``, the
    client's ``--token-file`` and ``--tls-*``) that cannot be read or does not hold what it
    must, a setting of the config file, an ambiguous ``--connection``. The message names the
    option, the file or the key. Nothing has been done when it is raised.
    """


def outcome(exc: BaseException) -> tuple[str, int] | None:
    """The message (empty for none) and exit code for what a command raised; None when it is not ours to handle."""
    if isinstance(exc, BadInput):
        return str(exc), USAGE
    actionable = _actionable()
    if isinstance(exc, actionable):
        return str(exc), FAILURE
    if isinstance(exc, BaseExceptionGroup):
        # Task groups wrap what their body raised; an error a person can act on is still that.
        leaves = _leaves(exc)
        if leaves and all(isinstance(e, actionable) for e in leaves):
            return str(leaves[0]), FAILURE
        return None
    if isinstance(exc, KeyboardInterrupt):
        return "", INTERRUPTED
    return None


def leave(message: str, code: int) -> NoReturn:
    """Exit with ``code``, after ``message`` (if any) on stderr as an error line."""
    if message:
        click.echo(PREFIX + message, err=True)
    sys.exit(code)


def warn(message: str) -> None:
    """``orchestrator: warning: MESSAGE`` on stderr (the command goes on)."""
    click.echo(WARNING + message, err=True)


def fail(message: str) -> NoReturn:
    """Exit with :data:`FAILURE` after ``message`` on stderr."""
    leave(message, FAILURE)


def _actionable() -> tuple[type[BaseException], ...]:
    # The gRPC client's errors count too; looked up, not imported, so that commands which
    # never talk to the daemon never load gRPC (one that did not load it cannot have raised it).
    client = sys.modules.get("orchestrator.rpc.client")
    return (OrchestratorError,) if client is None else (OrchestratorError, client.ClientError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
