"""``orchestrator functions`` (the installed event functions) and ``orchestrator dryrun`` (run one once)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from orchestrator import codec, config
from orchestrator.cli._common import (
    connection_ref,
    credential_options,
    credentials,
    database,
    environment,
    integration,
    json_flag,
    json_object,
    print_json,
    print_table,
    table,
)
from orchestrator.cli._exit import FAILURE
from orchestrator.cli._settings import config_option, configured_integrations


@click.command(short_help="List the installed event functions.")
@json_flag
def functions(as_json: bool) -> None:
    """List the installed event functions, with their plugin distribution and version (exit 1 if any is broken)."""
    from orchestrator.plugins import discover

    registry = discover()
    if as_json:
        print_json(
            {
                "functions": [
                    {
                        "name": f.name,
                        "integration": f.function.integration,
                        "event": f.function.event.value,
                        "description": f.function.description,
                        "distribution": f.distribution,
                        "version": f.version,
                        "entry_point": f.entry_point,
                        "sync": not f.function.is_async,
                    }
                    for f in registry.functions
                ],
                "broken": [
                    {
                        "distribution": b.distribution,
                        "version": b.version,
                        "name": b.name,
                        "entry_point": b.entry_point,
                        "reason": b.reason,
                    }
                    for b in registry.broken
                ],
            }
        )
    else:
        out = table("INTEGRATION", "EVENT", "NAME", "DESCRIPTION", "DISTRIBUTION", "VERSION")
        for f in registry.functions:
            out.add_row(
                f.function.integration,
                f.function.event.value,
                f.name,
                f.function.description,
                f.distribution,
                f.version,
            )
        print_table(out)
        for broken in registry.broken:
            click.echo(f"orchestrator: broken plugin: {broken}", err=True)
    if registry.broken:
        sys.exit(FAILURE)


@click.command(short_help="Run one function once against a connection's recorded state.")
@click.argument("function_name", metavar="FUNCTION")
@click.argument("connection_id")
@environment
@integration(required=False, help="The function's integration, when several have a function of this name.")
@click.option(
    "--payload", metavar="JSON", callback=json_object, help="The event payload: a JSON object, or @file.json."
)
@credential_options
@click.option("--commit", is_flag=True, help="Record the outcome and metadata writes in the log (the daemon stopped).")
@click.option(
    "--timeout",
    "time_limit",
    metavar="SECONDS",
    type=click.FloatRange(min=0.001),
    default=60.0,
    help="Seconds it may take.",
)
@database
@config_option()
@json_flag
@click.pass_context
def dryrun(
    ctx: click.Context,
    /,
    function_name: str,
    connection_id: str,
    environment: str,
    integration: str,
    payload: dict[str, Any],
    credential_pairs: tuple[str, ...],
    credentials_file: Path | None,
    commit: bool,
    time_limit: float,
    database: str | None,
    as_json: bool,
) -> None:
    """Run FUNCTION once against CONNECTION_ID's recorded state; provider calls are real, nothing is written
    unless --commit.

    The provider settings are the plugins' defaults and the [integrations.*] tables of the settings
    file (--config), as the daemon has them. Without --commit the log is only read, also while the
    daemon runs; --commit appends to it, so the daemon must be stopped.
    """
    import anyio

    from orchestrator import dryrun as dryrun_mod
    from orchestrator import plugins

    secrets = credentials(credential_pairs, credentials_file)  # the command line's input first: a usage error
    connection_ref(connection_id, integration or "any", environment)
    integrations, _ = plugins.integrations(configured_integrations(ctx))
    function = dryrun_mod.find_function(plugins.discover(), function_name, integration)
    run = anyio.run(
        lambda: dryrun_mod.dryrun(
            database or config.default_database(),
            function,
            connection_id,
            environment,
            payload=payload,
            credentials=secrets,
            integrations=integrations,
            commit=commit,
            time_limit=time_limit,
        )
    )
    result = run.result
    if as_json:
        print_json(
            {
                "function": function.name,
                "connection": run.ref.stream,
                "ok": result.ok,
                "error": result.error,
                "calls": run.calls,
                "logs": result.logs,
                "metadata_before": run.before,
                "metadata_after": run.after,
                "committed": run.committed,
                "duration_ms": result.duration_ms,
            }
        )
    else:
        click.echo(f"{function.name} ({function.distribution} {function.version}) on {run.ref}")
        for call in run.calls:
            click.echo(f"  http  {call}")
        for line in result.logs:
            click.echo(f"  log   {line}")
        for line in _diff_lines(run.before, run.after):
            click.echo(f"  meta  {line}")
        verdict = "succeeded" if result.ok else f"failed: {result.error_type}: {result.error}"
        click.echo(
            f"{verdict} in {result.duration_ms} ms; "
            + ("recorded in the log" if run.committed else "nothing was written (pass --commit to record it)")
        )
    if not result.ok:
        sys.exit(FAILURE)


def _diff_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if key not in after:
            lines.append(f"- {key}: {codec.dumps(before[key])}")
        elif key not in before:
            lines.append(f"+ {key}: {codec.dumps(after[key])}")
        elif before[key] != after[key]:
            lines.append(f"~ {key}: {codec.dumps(before[key])} -> {codec.dumps(after[key])}")
    return lines or ["(metadata unchanged)"]
