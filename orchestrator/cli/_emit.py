"""``orchestrator emit``: one lifecycle event, through the daemon."""

from __future__ import annotations

from typing import Any

import click

from orchestrator import codec
from orchestrator.cli._common import (
    Daemon,
    checked_name,
    client_options,
    connection_ref,
    credentials,
    environment,
    json_flag,
    json_object,
    outcome_row,
    print_json,
    print_table,
    table,
)
from orchestrator.cli._exit import fail
from orchestrator.model import ConnectionState, EmitRequest, EmitResult, FunctionStatus, LifecycleEvent


@click.command()
@click.argument("event", type=click.Choice([e.value for e in LifecycleEvent]))
@click.argument("connection_id")
@click.option("-i", "--integration", required=True, callback=checked_name("--integration"), help="The integration.")
@environment
@click.option(
    "--config",
    "connection_config",
    callback=json_object,
    help="The connection's non-secret settings as a JSON object (or @file.json).",
)
@click.option("--payload", callback=json_object, help="Data for the event functions, a JSON object (or @file).")
@click.option("--credential", "credential_pairs", multiple=True, metavar="NAME=VALUE", help="A secret; repeatable.")
@click.option("--credentials-file", type=click.Path(exists=True, dir_okay=False), help="Secrets as a JSON object.")
@click.option("--idempotency-key", default="", help="Makes retrying this command safe.")
@click.option("--expected-version", type=click.IntRange(min=0), help="Refuse unless the connection is at it.")
@click.option("--wait", is_flag=True, help="Also wait for asynchronous functions.")
@client_options
@json_flag
def emit(
    event: str,
    connection_id: str,
    integration: str,
    environment: str,
    connection_config: dict[str, Any],
    payload: dict[str, Any],
    credential_pairs: tuple[str, ...],
    credentials_file: str | None,
    idempotency_key: str,
    expected_version: int | None,
    wait: bool,
    daemon: Daemon,
    as_json: bool,
) -> None:
    """Emit a lifecycle EVENT for CONNECTION_ID (validate-connection, post-connection-creation, ...).

    Exits 1 (after printing the answer) when the connection was rejected, or, with --wait, when a
    function did not succeed.
    """
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
