"""The ``orchestrator`` command end to end: each command run as a subprocess against a real daemon and SQLite log.

State the command under test only reads is arranged through the gRPC API (as
a platform service would); ``emit`` itself is exercised through the command.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.grpc import Api
from tests.support.process import Cli, Daemon, Process, Result, closed_port, environment, fields, rows, run, sqlite_url

LIFECYCLE = ("validate-connection", "post-connection-creation", "pre-connection-deletion")
FOLLOW_TIMEOUT = 20.0
RECORD_FIELDS = {
    "position",
    "stream",
    "version",
    "event_id",
    "type",
    "data",
    "recorded_at",
    "causation_id",
    "traceparent",
    "idempotency_key",
    "schema_version",
}
TIMELINE = [
    ("validate-connection", "pending"),
    ("connection-validated", "pending"),
    ("post-connection-creation", "active"),
    ("pre-connection-deletion", "deleting"),
    ("connection-deleted", "deleted"),
]


def emit(cli: Cli, event: str, connection: str, integration: str, *args: str) -> dict[str, Any]:
    """``emit ... --json``, which must succeed; the parsed response."""
    response: dict[str, Any] = cli.ok("emit", event, connection, "-i", integration, "--json", *args).json()
    return response


def one_error_line(result: Result, prefix: str) -> str:
    """The single ``orchestrator: error: ...`` line of a failed command (exit 1, no traceback, nothing on stdout)."""
    assert result.code == 1, str(result)
    assert result.out == "", str(result)
    assert "Traceback" not in result.err, str(result)
    assert result.err.endswith("\n") and result.err.count("\n") == 1, str(result)
    assert result.err.startswith(f"orchestrator: error: {prefix}"), str(result)
    return result.err.rstrip("\n")


def last_error_line(result: Result, prefix: str) -> str:
    """The ``orchestrator: error: ...`` line that ends what a failed ``serve`` logged (exit 1, no traceback)."""
    assert result.code == 1, str(result)
    assert "Traceback" not in result.err, str(result)
    line = result.err.rstrip("\n").rpartition("\n")[2]
    assert line.startswith(f"orchestrator: error: {prefix}"), str(result)
    return line


def replayed(cli: Cli, *args: str) -> dict[str, dict[str, Any]]:
    """``replay --json ARGS`` of the shared daemon's log: the connections by stream."""
    result = cli.ok("replay", "--database", cli.daemon.url, "--json", *args).json()
    return {c["stream"]: c for c in result["connections"]}


# -- emit ----------------------------------------------------------------------------


def test_emit_prints_the_state_after_each_event(cli: Cli, name: str) -> None:
    """Emitting the three events walks a connection through pending, active and deleted, shown in emit's table."""
    config = '{"instance_url": "acme.my.salesforce.com"}'
    seen = []
    for event, state in zip(LIFECYCLE, ("pending", "active", "deleted"), strict=True):
        table = fields(cli.ok("emit", event, "acme-1", "-i", name, "--connection-config", config).out)
        assert table["connection"] == f"dev/{name}/acme-1"
        assert table["event"] == event
        assert table["state"] == state
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", table["event id"])
        assert "deduplicated" not in table
        seen.append((int(table["position"]), int(table["version"])))
    # Validation and deletion each append their verdict right after the lifecycle record: the version is after it.
    assert [version for _, version in seen] == [2, 3, 5]
    positions = [position for position, _ in seen]
    assert positions == sorted(set(positions)), seen


def test_emit_json_has_position_version_and_state(cli: Cli, name: str) -> None:
    """``emit --json`` prints one JSON object with the lifecycle record's event_id, position, version and state."""
    responses = [emit(cli, event, "acme-1", name) for event in LIFECYCLE]
    assert [r["state"] for r in responses] == ["pending", "active", "deleted"]
    assert [r["version"] for r in responses] == [2, 3, 5]
    positions = [r["position"] for r in responses]
    assert positions == sorted(set(positions)) and positions[0] >= 1
    assert len({r["event_id"] for r in responses}) == 3
    for response in responses:
        assert (response["deduplicated"], response["rejection_reason"], response["outcomes"]) == (False, "", [])
    log = cli.ok("events", "--connection", "acme-1", "-i", name, "--json").json_lines()
    by_id = {r["event_id"]: (r["type"], r["position"]) for r in log}
    assert [by_id[r["event_id"]] for r in responses] == [
        (event, r["position"]) for event, r in zip(LIFECYCLE, responses, strict=True)
    ]


def test_emit_repeated_with_an_idempotency_key_answers_the_original(cli: Cli, name: str) -> None:
    """Emit repeated with its --idempotency-key gets the original record, deduplicated; another event is refused."""
    key = ("--idempotency-key", "create-1")
    first = emit(cli, "post-connection-creation", "acme-1", name, *key)
    again = fields(cli.ok("emit", "post-connection-creation", "acme-1", "-i", name, *key).out)
    assert again["event id"] == first["event_id"]
    assert (int(again["position"]), int(again["version"])) == (first["position"], first["version"])
    assert again["deduplicated"].startswith("yes")

    other = cli("emit", "validate-connection", "acme-1", "-i", name, *key)
    assert "create-1" in one_error_line(other, "ALREADY_EXISTS: ")
    log = cli.ok("events", "--connection", "acme-1", "-i", name, "--json").json_lines()
    assert [(r["type"], r["idempotency_key"]) for r in log] == [("post-connection-creation", "create-1")]


def test_credentials_never_reach_the_log_or_the_output(cli: Cli, name: str) -> None:
    """A --credential given to emit appears in no command's output and not in the log's files."""
    secret = f"tok-{name}-do-not-print"
    outputs = [
        cli.ok("emit", "post-connection-creation", "acme-1", "-i", name, "--credential", f"access_token={secret}").out,
        cli.ok("connections", "get", "acme-1", "-i", name, "--json").out,
        cli.ok("events", "--json").out,
        cli.ok("replay", "--connection", "acme-1", "-i", name, "--json", "--database", cli.daemon.url).out,
    ]
    for output in outputs:
        assert secret not in output
    for path in cli.daemon.database.parent.glob(f"{cli.daemon.database.name}*"):
        assert secret.encode() not in path.read_bytes(), path


# -- connections ---------------------------------------------------------------------


def test_connections_list_prints_every_connection_with_its_state(api: Api, cli: Cli, name: str) -> None:
    """``connections list`` prints a table of connections with state, version and last event."""
    api.lifecycle("gone", name)
    api.emit("post-connection-creation", "live", name)
    table = {row["CONNECTION"]: row for row in rows(cli.ok("connections", "list").out) if row["INTEGRATION"] == name}
    assert set(table) == {"gone", "live"}
    assert {k: table["gone"][k] for k in ("ENVIRONMENT", "STATE", "VERSION", "LAST EVENT")} == {
        "ENVIRONMENT": "dev",
        "STATE": "deleted",
        "VERSION": "5",
        "LAST EVENT": "connection-deleted",
    }
    assert (table["live"]["STATE"], table["live"]["VERSION"]) == ("active", "1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z", table["live"]["UPDATED"])


def test_connections_list_filters_by_state_as_json(api: Api, cli: Cli, name: str) -> None:
    """``connections list --state active --json`` prints only active connections; -i and -e narrow it further."""
    api.lifecycle("gone", name)
    api.emit("post-connection-creation", "live", name)
    api.emit("post-connection-creation", "live", name, environment="prod")

    active = cli.ok("connections", "list", "--state", "active", "--json").json()
    assert {c["state"] for c in active} == {"active"}
    mine = sorted(c["stream"] for c in active if c["ref"]["integration"] == name)
    assert mine == [f"dev/{name}/live", f"prod/{name}/live"]

    deleted = cli.ok("connections", "list", "--state", "deleted", "-i", name, "-e", "dev", "--json").json()
    assert [(c["stream"], c["state"], c["version"]) for c in deleted] == [(f"dev/{name}/gone", "deleted", 5)]


def test_connections_get_shows_the_config(api: Api, cli: Cli, name: str) -> None:
    """``connections get ID -i I -e dev --json`` shows state, version and the config the connection was emitted with."""
    config = {"instance_url": "acme.my.salesforce.com", "region": "eu"}
    api.emit("validate-connection", "acme-1", name, config=config)
    api.emit("post-connection-creation", "acme-1", name)

    got = cli.ok("connections", "get", "acme-1", "-i", name, "-e", "dev", "--json").json()
    assert got["config"] == config
    assert got["ref"] == {"environment": "dev", "integration": name, "connection_id": "acme-1"}
    assert (got["stream"], got["state"], got["version"]) == (f"dev/{name}/acme-1", "active", 3)
    assert (got["last_event"], got["metadata"]) == ("post-connection-creation", {})

    table = fields(cli.ok("connections", "get", "acme-1", "-i", name).out)
    assert json.loads(table["config"]) == config
    assert (table["stream"], table["state"], table["version"]) == (f"dev/{name}/acme-1", "active", "3")

    other_environment = cli("connections", "get", "acme-1", "-i", name, "-e", "prod", "--json")
    assert f"prod/{name}/acme-1" in one_error_line(other_environment, "NOT_FOUND: ")


# -- events --------------------------------------------------------------------------


def test_events_json_prints_one_record_per_line_in_log_order(api: Api, cli: Cli, name: str) -> None:
    """``events --json`` lines parse, positions strictly increase, and each stream counts versions from 1."""
    api.lifecycle("acme-1", name)
    records = cli.ok("events", "--json").json_lines()
    positions = [record["position"] for record in records]
    assert positions[0] >= 1 and positions == sorted(set(positions))
    for record in records:
        assert RECORD_FIELDS <= record.keys(), record
        datetime.fromisoformat(record["recorded_at"])

    stream = f"dev/{name}/acme-1"
    mine = [record for record in records if record["stream"] == stream]
    assert [r["type"] for r in mine] == [record_type for record_type, _ in TIMELINE]
    assert [r["version"] for r in mine] == [1, 2, 3, 4, 5]
    assert (mine[1]["causation_id"], mine[4]["causation_id"]) == (mine[0]["event_id"], mine[3]["event_id"])

    assert cli.ok("events", "--connection", "acme-1", "-i", name, "--json", "--from", "0").json_lines() == mine
    text = cli.ok("events", "--from", str(mine[3]["position"])).out.splitlines()
    assert [line.split()[3:] for line in text[:2]] == [[stream, f"v{r['version']}", r["type"]] for r in mine[3:]]


def test_events_follow_prints_records_committed_after_it_started(api: Api, cli: Cli, name: str) -> None:
    """``events --follow`` prints the log so far, then each record as it is committed, until Ctrl-C (exit 130)."""
    api.emit("validate-connection", "acme-1", name)
    follow = ("events", "--follow", "--json", "--connection", "acme-1", "-i", name)
    follower = Process(*follow, env=environment(ORCHESTRATOR_ADDRESS=cli.daemon.address), cwd=cli.cwd)
    try:
        caught_up = [json.loads(follower.stdout.next_line(FOLLOW_TIMEOUT)) for _ in range(2)]
        assert [r["type"] for r in caught_up] == ["validate-connection", "connection-validated"]
        # The follower has printed the whole stream so far: what comes next is committed after it started.
        created = emit(cli, "post-connection-creation", "acme-1", name)
        live = json.loads(follower.stdout.next_line(FOLLOW_TIMEOUT))
        assert (live["event_id"], live["position"], live["type"]) == (
            created["event_id"],
            created["position"],
            "post-connection-creation",
        )
    finally:
        code = follower.signal(signal.SIGINT)
    assert code == 130, str(follower)
    assert follower.stderr.text == "", str(follower)


def test_events_follow_ends_with_exit_1_when_the_daemon_stops(
    start_daemon: Callable[..., Daemon], tmp_path: Path, name: str
) -> None:
    """A follower whose daemon drains exits 1 with one line saying where to resume; the daemon exits 0."""
    own = start_daemon(tmp_path / "events.db")
    api = Api(own.address)
    try:
        position = api.emit("validate-connection", "acme-1", name)["position"]
    finally:
        api.close()
    follower = Process("events", "--follow", "--json", "--address", own.address, cwd=tmp_path)
    try:
        assert json.loads(follower.stdout.next_line(FOLLOW_TIMEOUT))["position"] == position
        assert json.loads(follower.stdout.next_line(FOLLOW_TIMEOUT))["type"] == "connection-validated"
        assert own.stop() == 0, str(own)
        code = follower.wait()
    finally:
        follower.signal(signal.SIGKILL)
    assert code == 1, str(follower)
    assert re.fullmatch(
        rf"orchestrator: error: UNAVAILABLE: .*shutting down.*resume reading from position {position + 2}",
        follower.stderr.text,
    ), str(follower)


# -- errors --------------------------------------------------------------------------


def test_refused_emit_prints_one_error_line_and_exits_1(cli: Cli, name: str) -> None:
    """A refused emit (unknown connection, stale version) prints one line ``orchestrator: error: CODE: ...``, exit 1."""
    line = one_error_line(cli("emit", "pre-connection-deletion", "ghost", "-i", name), "NOT_FOUND: ")
    assert f"dev/{name}/ghost" in line
    stale = cli("emit", "post-connection-creation", "ghost", "-i", name, "--expected-version", "3")
    assert "current version is 0" in one_error_line(stale, f"ABORTED: dev/{name}/ghost: expected version 3")
    assert cli.ok("events", "--connection", "ghost", "-i", name, "-e", "dev").out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["emit", "connection-created", "acme-1", "-i", "salesforce"], "'connection-created' is not one of"),
        (["emit", "validate-connection", "acme-1"], "Missing option '-i' / '--integration'"),
        (
            ["emit", "validate-connection", "acme-1", "-i", "salesforce", "--connection-config", "{oops"],
            "not valid JSON",
        ),
        (["emit", "validate-connection", "acme-1", "-i", "Sales Force"], "--integration 'Sales Force' is invalid"),
        (["replay", "--until", "yesterday"], "neither a position nor an ISO-8601 timestamp"),
        (["replay", "--until", "9" * 20], "larger than any position"),
        (["emit", "validate-connection", "a", "-i", "x", "--expected-version", "9" * 20], "0<=x<=9223372036854775807"),
        (["events", "--from", "9" * 20], "0<=x<=9223372036854775807"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
    ids=[
        "unknown-event",
        "missing-integration",
        "bad-json-config",
        "bad-integration",
        "bad-until",
        "huge-until",
        "huge-version",
        "huge-from",
        "unknown-command",
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    """A usage error prints the usage and what is wrong on stderr and exits 2 before contacting any daemon."""
    # Nothing listens at this address and the log does not exist: touching either would exit 1, not 2.
    env = environment(
        ORCHESTRATOR_ADDRESS=f"127.0.0.1:{closed_port()}",
        ORCHESTRATOR_DATABASE=sqlite_url(tmp_path / "absent.db"),
    )
    result = run(*args, env=env, cwd=tmp_path)
    assert result.code == 2, str(result)
    assert result.out == ""
    assert "Usage: orchestrator" in result.err and message in result.err, str(result)
    assert "Traceback" not in result.err


def test_unreachable_daemon_exits_1_naming_the_address(tmp_path: Path) -> None:
    """With nothing listening at --address, emit and events exit 1 with one line naming that address."""
    address = f"127.0.0.1:{closed_port()}"
    for args in (["emit", "validate-connection", "acme-1", "-i", "salesforce"], ["events", "--follow"]):
        result = run(*args, "--address", address, cwd=tmp_path)
        assert address in one_error_line(result, "UNAVAILABLE: "), str(result)


# -- replay --------------------------------------------------------------------------


def test_replay_prints_a_table_of_connections_while_the_daemon_runs(api: Api, cli: Cli, name: str) -> None:
    """``replay`` folds the live log, opened read-only, into a table of connections; the daemon keeps serving."""
    api.lifecycle("gone", name)
    head = api.emit("post-connection-creation", "live", name)["position"]

    result = cli.ok("replay", ORCHESTRATOR_DATABASE=cli.daemon.url)
    table = {row["CONNECTION"]: row for row in rows(result.out) if row["INTEGRATION"] == name}
    assert (table["gone"]["STATE"], table["gone"]["VERSION"]) == ("deleted", "5")
    assert (table["live"]["STATE"], table["live"]["VERSION"]) == ("active", "1")
    summary = re.fullmatch(
        r"(\d+) connection\(s\), (\d+) record\(s\) folded, up to position (\d+)", result.out.splitlines()[-1]
    )
    assert summary, str(result)
    assert int(summary[2]) == int(summary[3]) == head  # SQLite positions have no gaps
    assert int(summary[1]) == len(rows(result.out))
    # The daemon still owns the log and appends to it.
    assert api.emit("post-connection-creation", "after", name)["position"] > head


def test_replay_until_position_shows_the_world_at_that_position(api: Api, cli: Cli, name: str) -> None:
    """``replay --until N`` shows a connection as of position N: absent, active, deleting, then deleted."""
    stream = f"dev/{name}/acme-1"
    created = api.emit("post-connection-creation", "acme-1", name)["position"]
    deleted = api.emit("pre-connection-deletion", "acme-1", name)["position"]
    assert stream not in replayed(cli, "--until", str(created - 1))
    assert replayed(cli, "--until", str(deleted))[stream]["state"] == "deleting"
    assert replayed(cli, "--until", str(deleted + 1))[stream]["state"] == "deleted"

    result = cli.ok("replay", "--database", cli.daemon.url, "--until", str(deleted - 1))
    row = next(row for row in rows(result.out) if row["INTEGRATION"] == name)
    assert (row["STATE"], row["VERSION"], row["LAST EVENT"]) == ("active", "1", "post-connection-creation")
    assert result.out.splitlines()[-1].endswith(f"up to position {deleted - 1}")


def test_replay_until_timestamp_shows_the_earlier_world(api: Api, cli: Cli, name: str) -> None:
    """``replay --until ISO-TIME`` between two emits shows the connection as the first emit left it."""
    stream = f"dev/{name}/acme-1"
    api.emit("validate-connection", "acme-1", name)
    api.emit("post-connection-creation", "acme-1", name)
    log = cli.ok("events", "--connection", "acme-1", "-i", name, "--json").json_lines()
    validated, created = (datetime.fromisoformat(log[i]["recorded_at"]) for i in (1, 2))
    assert validated < created, log
    between = validated + (created - validated) / 2

    earlier = replayed(cli, "--until", between.isoformat())[stream]
    assert (earlier["state"], earlier["version"], earlier["last_position"]) == ("pending", 2, log[1]["position"])
    # A UTC time written with Z, as people paste it, is the same instant.
    zulu = f"{between:%Y-%m-%dT%H:%M:%S.%f}Z"
    timeline = cli.ok("replay", "--database", cli.daemon.url, "--connection", "acme-1", "-i", name, "--until", zulu)
    assert [r["TYPE"] for r in rows(timeline.out)] == ["validate-connection", "connection-validated"]


def test_replay_connection_prints_its_timeline(api: Api, cli: Cli, name: str) -> None:
    """``replay --connection ID`` prints every record of its stream with the state after it, then where it ended."""
    api.emit("validate-connection", "acme-1", name)
    api.emit("post-connection-creation", "acme-1", name, idempotency_key="create-1")
    api.emit("pre-connection-deletion", "acme-1", name)

    result = cli.ok("replay", "--database", cli.daemon.url, "--connection", "acme-1", "-i", name)
    timeline = rows(result.out)
    assert [(r["TYPE"], r["STATE AFTER"]) for r in timeline] == TIMELINE
    assert [r["VERSION"] for r in timeline] == ["1", "2", "3", "4", "5"]
    assert timeline[2]["DETAIL"] == "key=create-1"
    assert result.out.endswith(f"\ndev/{name}/acme-1: deleted at version 5; metadata {{}}\n")

    as_json = cli.ok("replay", "--database", cli.daemon.url, "--connection", "acme-1", "-i", name, "--json").json()
    *records, end = as_json
    assert [(r["type"], r["state_after"]) for r in records] == TIMELINE
    assert [r["position"] for r in records] == sorted(int(r["POSITION"]) for r in timeline)
    assert (end["connection"]["state"], end["connection"]["version"]) == ("deleted", 5)

    unknown = cli("replay", "--database", cli.daemon.url, "--connection", "nobody", "-i", name)
    assert "'nobody'" in one_error_line(unknown, "no connection")


def test_replay_json_agrees_with_the_daemons_read_model(api: Api, cli: Cli, name: str) -> None:
    """``replay --json`` prints every connection exactly as ``connections list --json`` has it."""
    api.lifecycle("gone", name)
    api.emit("post-connection-creation", "live", name, config={"instance_url": "x.example.com"})
    served = {c["stream"]: c for c in cli.ok("connections", "list", "--json").json()}
    result = cli.ok("replay", "--database", cli.daemon.url, "--json").json()
    assert result["position"] == max(c["last_position"] for c in served.values())
    assert {c["stream"]: c for c in result["connections"]} == served
    assert served[f"dev/{name}/live"]["config"] == {"instance_url": "x.example.com"}


def test_replay_of_a_missing_log_exits_1_and_creates_nothing(tmp_path: Path) -> None:
    """``replay`` of a file that does not exist exits 1 naming it, and does not create it (it only reads)."""
    database = tmp_path / "absent.db"
    result = run("replay", "--database", sqlite_url(database), cwd=tmp_path)
    assert str(database) in one_error_line(result, "no event log at")
    assert list(tmp_path.iterdir()) == []


def online_copy(source: Path, target: Path) -> None:
    """Copy a live SQLite log with SQLite's backup API (the daemon keeps writing the original)."""
    with (
        contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def test_replay_verify_passes_on_the_live_log(api: Api, cli: Cli, name: str) -> None:
    """``replay --verify`` of the live log exits 0: the read model matches the fold of the log."""
    api.lifecycle("acme-1", name)
    assert cli.ok("replay", "--verify", "--database", cli.daemon.url).out == "read model matches the log\n"
    verdict = cli.ok("replay", "--verify", "--json", "--database", cli.daemon.url).json()
    assert verdict == {"ok": True, "differences": []}


def test_replay_verify_names_a_tampered_stream(api: Api, cli: Cli, name: str, tmp_path: Path) -> None:
    """After a deleted connection's read-model row is edited to say active, ``replay --verify`` exits 1 naming it."""
    stream = f"dev/{name}/acme-1"
    api.lifecycle("acme-1", name)
    copy = tmp_path / "copy.db"
    online_copy(cli.daemon.database, copy)
    with contextlib.closing(sqlite3.connect(copy)) as db, db:
        changed = db.execute(
            "UPDATE connections SET body = json_set(body, '$.state', 'active'), state = 'active' WHERE stream = ?",
            (stream,),
        ).rowcount
    assert changed == 1

    result = run("replay", "--verify", "--database", sqlite_url(copy), cwd=tmp_path)
    assert result.code == 1, str(result)
    assert result.out == f"{stream}: state: read model has 'active', the log says 'deleted'\n1 difference(s)\n"
    assert "Traceback" not in result.err
    verdict = run("replay", "--verify", "--json", "--database", sqlite_url(copy), cwd=tmp_path)
    assert verdict.code == 1, str(verdict)
    assert verdict.json() == {
        "ok": False,
        "differences": [{"stream": stream, "field": "state", "read_model": "active", "replayed": "deleted"}],
    }


# -- one connection: events and replay alike ----------------------------------------


@pytest.mark.parametrize("command", ["events", "replay"])
def test_connection_alone_names_the_one_connection_with_that_id(api: Api, cli: Cli, name: str, command: str) -> None:
    """``--connection ID`` without -i or -e: the one connection with that ID, in either command."""
    connection = f"{name}-only"
    position = api.emit("post-connection-creation", connection, name, environment="prod")["position"]
    result = cli.ok(command, "--connection", connection, "--json", ORCHESTRATOR_DATABASE=cli.daemon.url)
    records = result.json_lines() if command == "events" else result.json()[:-1]
    assert [(r["stream"], r["position"]) for r in records] == [(f"prod/{name}/{connection}", position)]


@pytest.mark.parametrize("command", ["events", "replay"])
def test_connection_that_several_have_needs_i_and_e_and_lists_them(api: Api, cli: Cli, name: str, command: str) -> None:
    """Several connections with that ID: one usage line listing them, in either command; -i and -e pick one."""
    connection = f"{name}-twice"
    api.emit("post-connection-creation", connection, name, environment="dev")
    api.emit("validate-connection", connection, name, environment="prod")
    result = cli(command, "--connection", connection, ORCHESTRATOR_DATABASE=cli.daemon.url)
    assert (result.code, result.out) == (2, ""), str(result)
    assert result.err == (
        f"orchestrator: error: --connection {connection} names 2 connections (dev/{name}/{connection},"
        f" prod/{name}/{connection}): pass -i INTEGRATION and -e ENV to name one\n"
    )
    picked = cli.ok(command, "--connection", connection, "-e", "prod", "--json", ORCHESTRATOR_DATABASE=cli.daemon.url)
    records = picked.json_lines() if command == "events" else picked.json()[:-1]
    assert {r["stream"] for r in records} == {f"prod/{name}/{connection}"}


@pytest.mark.parametrize(("command", "where"), [("events", "at the daemon"), ("replay", "in the log")])
def test_a_connection_nobody_has_is_one_error_line(cli: Cli, name: str, command: str, where: str) -> None:
    """No connection with that ID (of -i): exit 1, one line; ``-i`` without ``--connection`` is a usage error."""
    result = cli(command, "--connection", "nobody", "-i", name, ORCHESTRATOR_DATABASE=cli.daemon.url)
    assert one_error_line(result, f"no connection 'nobody' (-i {name}) {where}")
    refused = cli(command, "-i", name, ORCHESTRATOR_DATABASE=cli.daemon.url)
    assert refused.code == 2 and "-i/--integration goes with --connection ID" in refused.err, str(refused)


# -- configuration -------------------------------------------------------------------


def test_address_comes_from_flag_then_environment_then_config_file(daemon: Daemon, tmp_path: Path) -> None:
    """The daemon's address is --address if given, else ORCHESTRATOR_ADDRESS, else the ORCHESTRATOR_CONFIG file's."""
    right = daemon.address
    wrong_file, wrong_env, wrong_flag = (f"127.0.0.1:{closed_port()}" for _ in range(3))
    files = {}
    for label, address in (("right", right), ("wrong", wrong_file)):
        files[label] = tmp_path / f"{label}.toml"
        files[label].write_text(f'# orchestrator settings\naddress = "{address}"\n')

    def connections(file: str, env_address: str | None = None, flag: str | None = None) -> Result:
        env = environment(ORCHESTRATOR_CONFIG=str(files[file]))
        if env_address:
            env["ORCHESTRATOR_ADDRESS"] = env_address
        return run("connections", "list", *(["--address", flag] if flag else []), env=env, cwd=tmp_path)

    # Each setting is used, and beats the one below it whichever of the two is right.
    assert wrong_file in one_error_line(connections("wrong"), "UNAVAILABLE: ")
    assert connections("wrong", env_address=right).code == 0
    assert wrong_env in one_error_line(connections("right", env_address=wrong_env), "UNAVAILABLE: ")
    assert connections("wrong", env_address=wrong_env, flag=right).code == 0
    assert wrong_flag in one_error_line(connections("right", env_address=right, flag=wrong_flag), "UNAVAILABLE: ")


def test_config_file_with_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    """A setting no command knows in the ORCHESTRATOR_CONFIG file is a usage error naming it."""
    path = tmp_path / "orchestrator.toml"
    path.write_text('adress = "127.0.0.1:1"\n')
    result = run("connections", "list", env=environment(ORCHESTRATOR_CONFIG=str(path)), cwd=tmp_path)
    assert result.code == 2, str(result)
    assert "adress" in result.err and str(path) in result.err


# -- serve ---------------------------------------------------------------------------


def test_serve_refuses_a_non_loopback_address_without_insecure(tmp_path: Path) -> None:
    """``serve --listen 0.0.0.0:0`` without --insecure exits 1 with one line saying why, and creates no log."""
    database = tmp_path / "events.db"
    result = run("serve", "--listen", "0.0.0.0:0", "--database", sqlite_url(database), cwd=tmp_path)
    assert "--insecure" in last_error_line(result, "refusing to listen on 0.0.0.0:0")
    assert not database.exists()


def test_second_serve_on_the_same_log_exits_1_saying_it_is_in_use(cli: Cli, tmp_path: Path) -> None:
    """A second daemon on a log another daemon owns exits 1 saying the log is in use; the first keeps serving."""
    daemon = cli.daemon
    result = run("serve", "--listen", "127.0.0.1:0", "--database", daemon.url, cwd=tmp_path)
    assert f"pid {daemon.process.pid}" in last_error_line(result, f"the event log {daemon.database} is in use")
    cli.ok("connections", "list")


def test_serve_on_a_port_in_use_exits_1_naming_it(daemon: Daemon, tmp_path: Path) -> None:
    """``serve --listen`` on the port another daemon listens on exits 1 saying it cannot listen there."""
    result = run("serve", "--listen", daemon.address, "--database", sqlite_url(tmp_path / "events.db"), cwd=tmp_path)
    assert daemon.address in last_error_line(result, f"cannot listen on {daemon.address}")


def test_serve_on_a_log_whose_directory_has_a_hash(
    start_daemon: Callable[..., Daemon], tmp_path: Path, name: str
) -> None:
    """A daemon serves a log given as a plain path under a directory ``team#1?``; ``replay --verify`` reads it."""
    # Regression: the read-only connection's file: URI once left '#' and '?' unescaped and opened another file.
    folder = tmp_path / "team#1?"
    folder.mkdir()
    own = start_daemon(folder / "events.db", url=str(folder / "events.db"))
    api = Api(own.address)
    try:
        api.emit("post-connection-creation", "acme-1", name)
    finally:
        api.close()
    result = run("replay", "--verify", "--database", str(own.database), cwd=tmp_path)
    assert (result.code, result.out) == (0, "read model matches the log\n"), str(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


# -- help ----------------------------------------------------------------------------

DOCUMENTED = {"serve", "replay", "dryrun", "functions", "emit", "connections", "events", "keygen", "rotate-key", "new"}
"""The commands docs/cli.md names."""
ENV_SHOWN = {
    "serve": ["ORCHESTRATOR_LISTEN", "ORCHESTRATOR_DATABASE", "ORCHESTRATOR_CONFIG"],
    "emit": ["ORCHESTRATOR_ADDRESS", "ORCHESTRATOR_ENVIRONMENT", "ORCHESTRATOR_CONFIG"],
    "connections list": ["ORCHESTRATOR_ADDRESS", "ORCHESTRATOR_CONFIG"],
    "connections get": ["ORCHESTRATOR_ADDRESS", "ORCHESTRATOR_CONFIG"],
    "credentials set": ["ORCHESTRATOR_ADDRESS", "ORCHESTRATOR_CONFIG"],
    "events": ["ORCHESTRATOR_ADDRESS", "ORCHESTRATOR_ENVIRONMENT", "ORCHESTRATOR_CONFIG"],
    "replay": ["ORCHESTRATOR_DATABASE", "ORCHESTRATOR_ENVIRONMENT", "ORCHESTRATOR_CONFIG"],
    "dryrun": ["ORCHESTRATOR_DATABASE", "ORCHESTRATOR_CONFIG"],
    "rotate-key": ["ORCHESTRATOR_DATABASE", "ORCHESTRATOR_SECRET_KEY_FILE", "ORCHESTRATOR_CONFIG"],
}
"""Environment variables that a command's --help must show."""


def subcommands(help_text: str) -> list[str]:
    """The command names under ``Commands:`` in a --help text."""
    return re.findall(r"^  ([a-z][a-z-]*)  ", help_text.partition("\nCommands:\n")[2], re.MULTILINE)


def test_every_command_has_help(tmp_path: Path) -> None:
    """``--help`` of every command and subcommand prints its usage and its options' variables, and exits 0."""
    results = {"": run("--help", cwd=tmp_path)}
    pending = [""]
    with ThreadPoolExecutor(max_workers=4) as pool:
        while pending:
            found = [f"{group} {name}".strip() for group in pending for name in subcommands(results[group].out)]
            results.update(zip(found, pool.map(lambda c: run(*c.split(), "--help", cwd=tmp_path), found), strict=True))
            pending = found
    assert DOCUMENTED <= set(results), sorted(results)
    assert {"connections list", "connections get"} <= set(results), sorted(results)
    for command, result in results.items():
        assert (result.code, result.err) == (0, ""), str(result)
        assert result.out.startswith(f"Usage: orchestrator {command}".rstrip() + " "), str(result)
        for variable in ENV_SHOWN.get(command, []):
            assert variable in result.out, str(result)


# -- known bugs ----------------------------------------------------------------------


def test_connections_without_subcommand_reads_the_address_from_the_environment(api: Api, cli: Cli, name: str) -> None:
    """``connections`` with ORCHESTRATOR_ADDRESS set lists that daemon's connections, as ``connections list`` does."""
    api.emit("post-connection-creation", "acme-1", name)
    result = cli("connections")
    assert result.code == 0, str(result)
    assert (name, "acme-1") in {(r["INTEGRATION"], r["CONNECTION"]) for r in rows(result.out)}, str(result)


def test_connections_without_subcommand_takes_the_list_options(api: Api, cli: Cli, name: str) -> None:
    """``connections --json --address A`` prints the connections of the daemon at A as JSON."""
    api.emit("post-connection-creation", "acme-1", name)
    result = run("connections", "--json", "--address", cli.daemon.address, cwd=cli.cwd)
    assert result.code == 0, str(result)
    assert f"dev/{name}/acme-1" in {c["stream"] for c in result.json()}
