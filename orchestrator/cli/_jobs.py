"""``orchestrator jobs [list]``, ``jobs retry`` and ``jobs cancel``: the function runs of the outbox, steered."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from click.core import ParameterSource

from orchestrator.cli._common import (
    Daemon,
    checked_name,
    client_options,
    connection_ref,
    environment,
    json_flag,
    print_json,
    print_table,
    table,
    when,
)
from orchestrator.cli._connections import _DefaultList
from orchestrator.cli._settings import config_option
from orchestrator.errors import InvalidArgument
from orchestrator.model import Job, JobStatus, check_job_id

ERROR_WIDTH = 120
"""Characters of a last error a table row shows (``--json`` has it whole)."""


@click.group(cls=_DefaultList, short_help="List jobs, or retry or cancel one (jobs retry|cancel).")
def jobs() -> None:
    """List jobs (the default: ``jobs [list] ...``), retry one that gave up or was cancelled, or cancel a queued one."""


@jobs.command("list", short_help="List the jobs of one connection or all.")
@click.option("--connection", "connection_id", help="Only this connection's jobs (with -i and -e).")
@click.option("-i", "--integration", default="", callback=checked_name("--integration"), help="With --connection.")
@environment
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in JobStatus]),
    help="Only jobs in this status; repeatable (default: any).",
)
@client_options
@config_option()
@json_flag
def list_jobs(
    connection_id: str | None,
    integration: str,
    environment: str,
    statuses: tuple[str, ...],
    daemon: Daemon,
    as_json: bool,
) -> None:
    """List jobs: what is queued or running, what gave up and why (every page)."""
    ref = None
    if connection_id is not None:
        if not integration:
            raise click.UsageError("--connection needs --integration (-i)")
        ref = connection_ref(connection_id, integration, environment)
    else:
        given = click.get_current_context().get_parameter_source
        if integration:
            raise click.UsageError("-i/--integration names a connection's integration: use it with --connection")
        if given("environment") is ParameterSource.COMMANDLINE:
            raise click.UsageError("-e/--environment names a connection's environment: use it with --connection")
    with daemon.client() as client:
        rows = list(client.list_jobs(ref=ref, statuses=[JobStatus(s) for s in statuses]))
    if as_json:
        print_json([job_json(j) for j in rows])
        return
    now = datetime.now(UTC)
    out = table("JOB", "CONNECTION", "FUNCTION", "EVENT", "STATUS", "ATTEMPTS", "NEXT ATTEMPT IN", "LAST ERROR")
    for j in rows:
        out.add_row(
            j.job_id,
            j.stream,
            j.function,
            j.event.value,
            j.status.value,
            _attempts(j),
            _next_attempt_in(j, now),
            _one_line(j.last_error),
        )
    print_table(out)


@jobs.command("retry", short_help="Queue a job that gave up or was cancelled again.")
@click.argument("job_id")
@client_options
@config_option()
@json_flag
def retry_job(job_id: str, daemon: Daemon, as_json: bool) -> None:
    """Queue JOB_ID (gave up or cancelled) again, due now, with a fresh attempt budget (RetryJob)."""
    with daemon.client() as client:
        job = client.retry_job(_job_id(job_id))
    _print_job(job, as_json)


@jobs.command("cancel", short_help="Cancel a queued job.")
@click.argument("job_id")
@click.option("--reason", default="", help="Why, recorded in function-cancelled (default: 'cancelled by request').")
@client_options
@config_option()
@json_flag
def cancel_job(job_id: str, reason: str, daemon: Daemon, as_json: bool) -> None:
    """Cancel JOB_ID, a queued job (CancelJob); a running one is refused: wait for its attempt to end."""
    with daemon.client() as client:
        job = client.cancel_job(_job_id(job_id), reason)
    _print_job(job, as_json)


def _job_id(value: str) -> str:
    try:
        return check_job_id(value, "JOB_ID")
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="JOB_ID") from None


def job_json(j: Job) -> dict[str, Any]:
    """A job as ``--json`` prints it."""
    ref = j.ref
    return {
        "id": j.job_id,
        "ref": {"environment": ref.environment, "integration": ref.integration, "connection_id": ref.connection_id},
        "stream": j.stream,
        "function": j.function,
        "event": j.event.value,
        "event_id": j.causation_id,
        "status": j.status.value,
        "attempts": j.attempt,
        "max_attempts": j.max_attempts,
        "next_attempt_at": j.run_at.isoformat() if j.status is JobStatus.QUEUED else None,
        "last_error": j.last_error,
        "created_at": j.created_at.isoformat() if j.created_at else None,
        "updated_at": j.updated_at.isoformat() if j.updated_at else None,
    }


def _print_job(j: Job, as_json: bool) -> None:
    if as_json:
        print_json(job_json(j))
        return
    out = table("FIELD", "VALUE")
    out.show_header = False
    out.add_row("job", j.job_id)
    out.add_row("connection", j.stream)
    out.add_row("function", j.function)
    out.add_row("event", f"{j.event.value} ({j.causation_id})")
    out.add_row("status", j.status.value)
    out.add_row("attempts", _attempts(j))
    if j.status is JobStatus.QUEUED:
        out.add_row("next attempt", when(j.run_at))
    if j.last_error:
        out.add_row("last error", _one_line(j.last_error, 1000))
    print_table(out)


def _attempts(j: Job) -> str:
    return f"{j.attempt}/{j.max_attempts}" if j.max_attempts else str(j.attempt)


def _next_attempt_in(j: Job, now: datetime) -> str:
    """How long until a queued job's next attempt: ``now``, ``45s``, ``3m 20s``, ``2h 5m``, ``3d 4h``; ``-`` else."""
    if j.status is not JobStatus.QUEUED:
        return "-"
    seconds = int((j.run_at - now).total_seconds())
    if seconds <= 0:
        return "now"
    for unit, size, smaller, small in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size}{unit} {seconds % size // small}{smaller}"
    return f"{seconds}s"


def _one_line(text: str, limit: int = ERROR_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"
