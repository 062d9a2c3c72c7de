"""``orchestrator emit``: one lifecycle event, through the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from orchestrator import codec
from orchestrator.cli._common import (
    POSITION,
    Daemon,
    client_options,
    connection_ref,
    credential_options,
    credentials,
    environment,
    integration,
    json_flag,
    json_object,
    outcome_row,
    parse_json_object,
    print_json,
    print_table,
    table,
)
from orchestrator.cli._exit import BadInput, fail
from orchestrator.cli._settings import config_option, legacy_json
from orchestrator.model import ConnectionState, EmitRequest, EmitResult, FunctionStatus, LifecycleEvent


@click.command(short_help="Emit a lifecycle event for a connection, through the daemon.")
@click.argument("event", metavar="EVENT", type=click.Choice([e.value for e in LifecycleEvent]))
@click.argument("connection_id")
@integration(required=True, help="The connection's integration.")
@environment
@click.option(
    "--connection-config",
    metavar="JSON",
    callback=json_object,
    help="The connection's non-secret settings: a JSON object, or @file.json.",
)
@click.option(
    "--payload", metavar="JSON", callback=json_object, help="Data for the functions: a JSON object, or @file.json."
)
@credential_options
@click.option(
    "--idempotency-key", metavar="KEY", default="", show_default=False, help="Makes retrying this command safe."
)
@click.option(
    "--expected-version",
    metavar="N",
    type=POSITION,
    help="Refuse unless the connection is at this version.",
)
@click.option("--wait", is_flag=True, help="Also wait for the asynchronous functions.")
@client_options
@config_option(legacy_json="--connection-config")
@json_flag
@click.pass_context
def emit(
    ctx: click.Context,
    /,
    event: str,
    connection_id: str,
    integration: str,
    environment: str,
    connection_config: dict[str, Any],
    payload: dict[str, Any],
    credential_pairs: tuple[str, ...],
    credentials_file: Path | None,
    idempotency_key: str,
    expected_version: int | None,
    wait: bool,
    daemon: Daemon,
    as_json: bool,
) -> None:
    """Emit a lifecycle EVENT for CONNECTION_ID (validate-connection, post-connection-creation, ...).

    Exits 1 (after printing the answer) when the connection was rejected, or, with --wait, when a
    function did not succeed. --config JSON, the former name of --connection-config, still works,
    with a warning on stderr.
    """
    legacy = legacy_json(ctx)
    if legacy is not None:
        if ctx.get_parameter_source("connection_config") is ParameterSource.COMMANDLINE:
            raise BadInput("give the connection's settings once: --connection-config (not also --config JSON)")
        connection_config = parse_json_object("--config", legacy)
    request = EmitRequest(
        ref=connection_ref(connection_id, integration, environment),
        event=LifecycleEvent(event),
        config=connection_config,
        credentials=credentials(credential_pairs, credentials_file),
        payload=payload,
        idempotency_key=idempotency_key,
        expected_version=expected_version,
        wait=wait,
    )
    with daemon.client() as client:
        result = client.emit(request)
    if as_json:
        print_json(_result_json(result))
    else:
        _print_result(request, result)
    failure = _failure(request, result)
    if failure:
        fail(failure)


def _failure(request: EmitRequest, result: EmitResult) -> str:
    """Why the command fails although the daemon answered (empty when it does not)."""
    if result.state is ConnectionState.REJECTED:
        return f"{request.ref} was rejected: {result.rejection_reason}"
    if request.wait:
        failed = [o for o in result.outcomes if o.status is not FunctionStatus.SUCCEEDED]
        if failed:
            said = "; ".join(f"{o.name} {o.status.value}" + (f" ({o.error})" if o.error else "") for o in failed)
            return f"{len(failed)} of {len(result.outcomes)} function(s) did not succeed: {said}"
    return ""


def _result_json(result: EmitResult) -> dict[str, Any]:
    return {
        "event_id": result.event_id,
        "position": result.position,
        "version": result.version,
        "state": result.state.value,
        "rejection_reason": result.rejection_reason,
        "deduplicated": result.deduplicated,
        "outcomes": [codec.outcome_to_json(o) for o in result.outcomes],
    }


def _print_result(request: EmitRequest, result: EmitResult) -> None:
    out = table("FIELD", "VALUE")
    out.show_header = False
    out.add_row("connection", str(request.ref))
    out.add_row("event", request.event.value)
    out.add_row("state", result.state.value)
    out.add_row("position", str(result.position))
    out.add_row("version", str(result.version))
    out.add_row("event id", result.event_id)
    if result.rejection_reason:
        out.add_row("rejected", result.rejection_reason)
    if result.deduplicated:
        out.add_row("deduplicated", "yes: the original response of this idempotency key")
    for o in result.outcomes:
        out.add_row(*outcome_row(o))
    print_table(out)
