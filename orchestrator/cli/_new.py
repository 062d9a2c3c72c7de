"""``orchestrator new NAME --integration I``: scaffold a plugin distribution (see :mod:`orchestrator.scaffold`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from orchestrator.cli._common import json_flag, print_json


@click.command(short_help="Create a plugin distribution whose tests pass.")
@click.argument("name")
@click.option(
    "-i",
    "--integration",
    required=True,
    metavar="INTEGRATION",
    help="The integration its functions are for (like salesforce): the name of [integrations.<name>].",
)
@json_flag
def new(name: str, integration: str, as_json: bool) -> None:
    """Create NAME/: a plugin distribution with one event function per lifecycle event, their tests (which pass
    as generated) and a README. NAME must not exist."""
    from orchestrator import scaffold
    from orchestrator._version import VERSION

    written = scaffold.create(Path(name), integration, VERSION)
    if as_json:
        print_json(
            {
                "directory": name,
                "integration": integration,
                "files": [str(path) for path in written],
                "functions": list(scaffold.FUNCTIONS),
            }
        )
        return
    click.echo(f"created {name}/, a plugin for integration {integration}:")
    for path in written:
        click.echo(f"  {path}")
    quoted = shlex.quote(name)
    click.echo("next:")
    click.echo(f"  pip install -e {shlex.quote(name + '[test]')}   # into the orchestrator's environment")
    click.echo(f"  pytest {quoted}")
    click.echo(f"  orchestrator functions                # lists {', '.join(scaffold.FUNCTIONS)}")
