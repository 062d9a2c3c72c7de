"""``orchestrator credentials set`` (through the daemon), ``keygen`` and ``rotate-key`` (the key ring).

Nothing here prints a credential: ``credentials set`` shows the fingerprint
the daemon recorded, ``keygen`` prints a new key (a key is not a credential,
but it opens them all: keep it as a secret).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from orchestrator.cli._common import (
    Daemon,
    client_options,
    connection_ref,
    credential_options,
    credentials,
    database,
    environment,
    integration,
    json_flag,
    print_json,
    print_table,
    table,
)
from orchestrator.cli._settings import config_option

SECRET_KEY_ENV = "ORCHESTRATOR_SECRET_KEY"

secret_key_file = click.option(
    "--secret-key-file",
    envvar="ORCHESTRATOR_SECRET_KEY_FILE",
    show_envvar=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    default=None,
    help="The key file, when ORCHESTRATOR_SECRET_KEY is not set (default: secret.key beside the SQLite log,"
    " created 0600 on first start; refused when group or others may read it).",
)


@click.group(short_help="Replace a connection's credentials (credentials set).")
def credentials_group() -> None:
    """A connection's credentials: sealed at rest by the daemon, never printed."""


@credentials_group.command("set", short_help="Replace a connection's credentials, through the daemon.")
@click.argument("connection_id")
@integration(required=True, help="The connection's integration.")
@environment
@credential_options
@client_options
@config_option()
@json_flag
def set_credentials(
    connection_id: str,
    integration: str,
    environment: str,
    credential_pairs: tuple[str, ...],
    credentials_file: Path | None,
    daemon: Daemon,
    as_json: bool,
) -> None:
    """Replace CONNECTION_ID's credentials (UpdateCredentials); prints their fingerprint, never them."""
    ref = connection_ref(connection_id, integration, environment)
    secrets = credentials(credential_pairs, credentials_file)
    if not secrets:
        raise click.UsageError("give the credentials: --credential NAME=VALUE (repeatable) or --credentials-file")
    with daemon.client() as client:
        updated = client.update_credentials(ref, secrets)
    if as_json:
        print_json(
            {
                "connection": ref.stream,
                "fingerprint": updated.fingerprint,
                "key_id": updated.key_id,
                "version": updated.version,
                "changed": updated.changed,
            }
        )
        return
    out = table("FIELD", "VALUE")
    out.show_header = False
    out.add_row("connection", str(ref))
    out.add_row("credentials", ", ".join(sorted(secrets)))
    out.add_row("fingerprint", updated.fingerprint)
    out.add_row("key id", updated.key_id)
    out.add_row("version", str(updated.version))
    out.add_row("changed", "yes" if updated.changed else "no: these credentials were stored already")
    print_table(out)


@click.command(short_help="Print a new key for sealing credentials.")
@json_flag
def keygen(as_json: bool) -> None:
    """Print a new key (base64 of 32 random bytes) for ORCHESTRATOR_SECRET_KEY or the key file; its id on stderr.

    With --json, one document with both: {"key": ..., "key_id": ...}.
    """
    from orchestrator import sealing

    key = sealing.generate()
    key_id = sealing.Keyring.parse(key, "the new key").sealing.id
    if as_json:
        print_json({"key": key, "key_id": key_id})
        return
    click.echo(key)
    click.echo(f"key id {key_id}", err=True)


@click.command("rotate-key", short_help="Reseal every stored credential under the key ring's first key.")
@database
@secret_key_file
@config_option()
@json_flag
def rotate_key(database: str | None, secret_key_file: Path | None, as_json: bool) -> None:
    """Reseal every sealed credential under the first key of the key ring; safe while the daemon runs.

    Give the new key first and the old ones after it (ORCHESTRATOR_SECRET_KEY=new,old, or the key
    file's lines), as the daemon has them: restart the daemon with that ring first, so that what it
    seals meanwhile uses the new key. Exit 1 when a row could not be opened (its key is missing).
    """
    from orchestrator import config, daemon
    from orchestrator.clock import SystemClock
    from orchestrator.config import ServeConfig
    from orchestrator.errors import InvalidArgument
    from orchestrator.sealing import reseal
    from orchestrator.store import inspect, locate, sqlite_path
    from orchestrator.store.sqlite import reseal_sqlite

    url = database or config.default_database()
    location = locate(url, create_directory=True)  # a directory, or a file it may not write: said here, in one line
    path = sqlite_path(url)
    if path is None:
        raise InvalidArgument(f"rotate-key works on an SQLite log (--database sqlite:///...), not {url!r}")
    if not path.exists():
        raise InvalidArgument(f"no event log at {path}")
    inspect(location, init=False)  # an empty file or no log at all, before any key is looked for
    settings = ServeConfig(database=url, secret_key=os.environ.get(SECRET_KEY_ENV, ""), secret_key_file=secret_key_file)
    keyring = daemon.keyring_for(settings, url, create=False)
    resealed, skipped, problems = reseal_sqlite(path, lambda sealed: reseal(keyring, sealed), clock=SystemClock())
    if as_json:
        print_json(
            {
                "key_id": keyring.sealing.id,
                "resealed": resealed,
                "changed_meanwhile": skipped,
                "problems": problems,
            }
        )
    else:
        click.echo(
            f"resealed {resealed} connection(s) under key id {keyring.sealing.id}"
            + (f"; {skipped} changed meanwhile (the daemon sealed them anew)" if skipped else "")
        )
        for problem in problems:
            click.echo(f"orchestrator: error: {problem}", err=True)
    if problems:
        raise SystemExit(1)
