"""``orchestrator functions`` (the installed event functions) and ``orchestrator dryrun`` (run one once)."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

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
from orchestrator.cli._exit import FAILURE, warn
from orchestrator.cli._settings import config_option, configured_integrations, configured_variables


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


@click.command(short_help="Run one function once against a recorded or a given connection.")
@click.argument("function_name", metavar="FUNCTION")
@click.argument("connection_id")
@environment
@integration(required=False, help="The function's integration, when several have a function of this name.")
@click.option(
    "--payload", metavar="JSON", callback=json_object, help="The event payload: a JSON object, or @file.json."
)
@click.option(
    "--connection-config",
    metavar="JSON",
    callback=json_object,
    help="Run against a connection that is not in the log, with this connection config (a JSON object, or @file).",
)
@click.option(
    "--metadata",
    metavar="JSON",
    callback=json_object,
    help="Run against a connection that is not in the log, with this metadata (a JSON object, or @file).",
)
@credential_options
@click.option("--commit", is_flag=True, help="Record the outcome and metadata writes in the log (the daemon stopped).")
@click.option(
    "--save-responses",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save every provider exchange (credentials redacted) to DIR/FUNCTION.json, for orchestrator.testing.",
)
@click.option(
    "-y",
    "--yes",
    is_flag=True,
    help="Send requests that change the provider (not GET or HEAD) without a warning, or a question on a terminal.",
)
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
    connection_config: dict[str, Any],
    metadata: dict[str, Any],
    credential_pairs: tuple[str, ...],
    credentials_file: Path | None,
    commit: bool,
    save_responses: Path | None,
    yes: bool,
    time_limit: float,
    database: str | None,
    as_json: bool,
) -> None:
    """Run FUNCTION once against CONNECTION_ID's recorded state (or, with --connection-config or --metadata, a
    connection that is not in the log); provider calls are real, nothing is written to the log unless --commit.

    The provider settings are the plugins' defaults and the [integrations.*] tables of the settings
    file (--config), as the daemon has them, and ctx.env its [environments.*.variables]. Without
    --commit the log is only read, also while the daemon runs; --commit appends to it, so the daemon
    must be stopped. Before the first request that changes the provider (not GET or HEAD) it warns on
    stderr, or on a terminal asks whether to send it (--yes: neither).
    """
    import anyio

    from orchestrator import dryrun as dryrun_mod
    from orchestrator import plugins

    secrets = credentials(credential_pairs, credentials_file)  # the command line's input first: a usage error
    connection_ref(connection_id, integration or "any", environment)
    integrations, _ = plugins.integrations(configured_integrations(ctx))
    function = dryrun_mod.find_function(plugins.discover(), function_name, integration)
    given = None
    if any(ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE for name in ("connection_config", "metadata")):
        given = dryrun_mod.Given(connection_config, metadata)
    settings = dryrun_mod.Settings(
        payload=payload,
        credentials=secrets,
        integrations=integrations,
        variables=configured_variables(ctx),
        time_limit=time_limit,
        before_change=None if yes else _before_change(function.name),
        save_to=save_responses,
    )
    run = anyio.run(
        lambda: dryrun_mod.dryrun(
            database or config.default_database(), function, connection_id, environment, settings, commit=commit,
            given=given,
        )
    )  # fmt: skip
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
                "in_log": run.in_log,
                "changing_requests": run.changing,
                "saved": str(run.saved) if run.saved is not None else None,
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
        if run.saved is not None:
            click.echo(f"  saved {run.exchanges} exchange(s) to {run.saved}")
        verdict = "succeeded" if result.ok else f"failed: {result.error_type}: {result.error}"
        if run.committed:
            written = "recorded in the log"
        elif run.in_log:
            written = "nothing was written to the log (pass --commit to record it)"
        else:
            written = "nothing was written to the log (the connection is not in it)"
        changed = "1 changing request was" if run.changing == 1 else f"{run.changing} changing requests were"
        click.echo(f"{verdict} in {result.duration_ms} ms; {written}; at the provider: {changed} sent")
    if not result.ok:
        sys.exit(FAILURE)


def _before_change(function: str) -> Callable[[str], Awaitable[bool]]:
    """What dryrun does before the first request that changes the provider: on a terminal (stdin and stderr), ask
    whether to send it; otherwise warn on stderr, one line, and send it."""

    async def before_change(request: str) -> bool:
        import anyio.to_thread

        if sys.stdin.isatty() and sys.stderr.isatty():
            question = (
                f"orchestrator: {function} is about to send {request}: this changes the provider for real. Send it?"
            )
            return await anyio.to_thread.run_sync(lambda: click.confirm(question, default=False, err=True))
        warn(f"{function} sends {request}: this changes the provider for real (--yes: no warning)")
        return True

    return before_change


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
