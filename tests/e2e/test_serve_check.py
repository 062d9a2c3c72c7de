"""``serve --check`` makes the checks ``serve`` makes, changing nothing; a start that fails leaves nothing behind.

Every refusal is compared between the two: ``serve --check`` exits 1 with one
line, and ``serve`` ends its log with the same line. What a directory holds
is compared before and after, to the file and its bytes.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tests.support.grpc import Api
from tests.support.process import READY, STARTUP_TIMEOUT, Daemon, Process, Result, environment, run, sqlite_url


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a directory)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def but_locks(files: dict[str, bytes | None]) -> dict[str, bytes | None]:
    """``files`` without the lock files' content (the pid of the last process that opened the log)."""
    return {name: (b"" if name.endswith(".lock") else data) for name, data in files.items()}


def only_line(result: Result, code: int = 1) -> str:
    """The one line a failed check printed on stderr (nothing on stdout, no traceback)."""
    assert result.code == code, str(result)
    assert result.out == "", str(result)
    assert result.err.count("\n") == 1 and result.err.endswith("\n"), str(result)
    return result.err.rstrip("\n")


def last_line(result: Result) -> str:
    """The line a failed ``serve`` ended its log with (exit 1, no traceback)."""
    assert result.code == 1, str(result)
    assert "Traceback" not in result.err, str(result)
    return result.err.rstrip("\n").rpartition("\n")[2]


@contextmanager
def port_in_use() -> Iterator[str]:
    """An address a plain socket listens on (without SO_REUSEPORT), so that a daemon cannot bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def a_stopped_log(folder: Path) -> Path:
    """A log with one connection in it, written by a daemon that has exited."""
    database = folder / "events.db"
    daemon = Daemon(database)
    try:
        api = Api(daemon.address)
        try:
            api.emit("post-connection-creation", "acme-1", "salesforce")
        finally:
            api.close()
    finally:
        assert daemon.stop() == 0, str(daemon)
    return database


# -- the same checks as serve -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "sqlite://db.internal/events.db",
            "database URL 'sqlite://db.internal/events.db': use sqlite:///absolute/path",
        ),
        ("postgres://db.internal", "database URL 'postgres://db.internal' names no database"),
        ("mysql://db.internal/orchestrator", "database URL 'mysql://db.internal/orchestrator' is not supported"),
        ("{tmp}/typo/events.db", "the directory of the event log {tmp}/typo/events.db does not exist ({tmp}/typo)"),
        ("sqlite://{tmp}", "the event log {tmp} is a directory: --database names the log's file"),
    ],
    ids=["host", "postgres-without-database", "unsupported", "missing-directory", "directory"],
)
def test_check_refuses_the_database_serve_refuses_with_the_same_line(url: str, says: str, tmp_path: Path) -> None:
    """A URL or path that ``serve`` refuses is not "valid" to ``serve --check``: the same line, exit 1, nothing made."""
    url = url.format(tmp=tmp_path)
    before = tree(tmp_path)
    checked = run("serve", "--check", "--database", url, cwd=tmp_path)
    line = only_line(checked)
    assert line.startswith("orchestrator: error: " + says.format(tmp=tmp_path)), line
    served = run("serve", "--listen", "127.0.0.1:0", "--database", url, cwd=tmp_path)
    assert last_line(served) == line
    assert tree(tmp_path) == before


def test_the_exact_line_for_a_mistyped_database_directory(tmp_path: Path) -> None:
    """A path whose directory does not exist: refused word for word, and no directory, log or key file is made."""
    typo = tmp_path / "var" / "lib" / "orchestartor"
    result = run("serve", "--listen", "127.0.0.1:0", "--database", sqlite_url(typo / "events.db"), cwd=tmp_path)
    assert last_line(result) == (
        f"orchestrator: error: the directory of the event log {typo / 'events.db'} does not exist ({typo}): create"
        " it, or correct --database (a log is created only in an existing directory)"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "{path} is empty (0 bytes), where an event log was expected"),
        ("sqlite", "{path} is not an orchestrator event log (it holds notes, and no schema_migrations table)"),
    ],
    ids=["empty", "another-database"],
)
def test_check_reads_an_existing_file_as_the_daemon_does(content: bytes | str, says: str, tmp_path: Path) -> None:
    """An empty file or another application's database: refused by --check as by serve, and left as it was."""
    path = tmp_path / "events.db"
    if content == "sqlite":
        with closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE notes (body TEXT)")
    else:
        path.write_bytes(b"")
    before = tree(tmp_path)
    line = only_line(run("serve", "--check", "--database", sqlite_url(path), cwd=tmp_path))
    assert line.startswith("orchestrator: error: " + says.format(path=path)), line
    assert tree(tmp_path) == before
    served = run("serve", "--listen", "127.0.0.1:0", "--database", sqlite_url(path), cwd=tmp_path)
    assert last_line(served).startswith("orchestrator: error: " + says.format(path=path)), str(served)
    assert set(tree(tmp_path)) - set(before) <= {"events.db.lock"}  # serve's attempt to own it; --check makes none
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before


def test_check_changes_nothing_on_an_existing_log(tmp_path: Path) -> None:
    """On a stopped daemon's log: valid, and not a byte of the folder changes (no -wal, -shm or lock is made)."""
    database = a_stopped_log(tmp_path)
    before = tree(tmp_path)
    log_file = tmp_path / "orchestrator.log"
    checked = run("serve", "--check", "--database", sqlite_url(database), "--log-file", str(log_file), cwd=tmp_path)
    assert checked.code == 0 and checked.err == "", str(checked)
    assert f"log: {database} exists (" in checked.out
    assert tree(tmp_path) == before


def test_check_makes_nothing_for_a_new_log(tmp_path: Path) -> None:
    """With no --database: it says where the log and its key will be made, and makes neither (nor the folder)."""
    checked = run("serve", "--check", cwd=tmp_path)
    assert checked.code == 0, str(checked)
    data = tmp_path / ".orchestrator"
    assert (
        f"log: {data / 'events.db'} does not exist: a new log will be created, with the directory {data}"
        in checked.out.splitlines()
    )
    assert list(tmp_path.iterdir()) == []


def test_check_prints_every_effective_setting_and_where_it_came_from(tmp_path: Path) -> None:
    """Each setting with its value and its source: the flag, the variable, the file or the default."""
    path = tmp_path / "orchestrator.toml"
    path.write_text('grace_period = 15\nconcurrency = 8\nretry_backoff = 1.5\naddress = "127.0.0.1:1"\n')
    env = environment(ORCHESTRATOR_CONCURRENCY="16", ORCHESTRATOR_CONFIG=str(path))
    args = ("serve", "--check", "--database", sqlite_url(tmp_path / "events.db"), "--isolation", "process")
    checked = run(*args, env=env, cwd=tmp_path)
    assert checked.code == 0, str(checked)
    rows = {line.split()[0]: line.split()[1:] for line in checked.out.splitlines() if "  " in line}
    assert rows["grace_period"] == ["15.0", str(path)]
    assert rows["concurrency"] == ["16", "ORCHESTRATOR_CONCURRENCY"]
    assert rows["isolation"] == ["process", "--isolation"]
    assert rows["retry_backoff"] == ["1.5", str(path)]
    assert rows["listen"] == ["127.0.0.1:50051", "default"]
    assert rows["database"] == [sqlite_url(tmp_path / "events.db"), "--database"]
    as_json = run(*args, "--json", env=env, cwd=tmp_path)
    assert as_json.code == 0, str(as_json)
    report = as_json.json()
    dispatch = {
        "concurrency",
        "validate_deadline",
        "deletion_deadline",
        "attempt_timeout",
        "retry_max_attempts",
        "retry_initial_interval",
        "retry_backoff",
        "retry_max_interval",
        "isolation",
        "processes",
    }
    assert dispatch | {"listen", "database", "grace_period", "secret_key_file"} <= set(report["settings"])
    assert set(rows) - {"SETTING"} == set(report["settings"])
    assert report["settings"]["concurrency"] == {"value": 16, "from": "ORCHESTRATOR_CONCURRENCY"}
    assert report["isolation"] == {"mode": "process", "worker_processes": 4}
    assert report["config_file"] == str(path)
    assert list(tmp_path.iterdir()) == [path]


# -- integrations without a base_url ----------------------------------------------------------

WARNING = (
    "integration hubspot has no base_url: provider calls by path of its function(s) snapshot-properties have"
    " nowhere to go; set base_url in [integrations.hubspot] of the settings file"
)


def test_an_installed_functions_integration_without_base_url_is_a_warning_at_check_and_at_start(tmp_path: Path) -> None:
    """The settings file replaces hubspot's defaults without a base_url: --check and the start both warn, naming it."""
    path = tmp_path / "orchestrator.toml"
    path.write_text('[integrations.hubspot]\nauth = "bearer"\n')
    database = tmp_path / "events.db"
    checked = run("serve", "--check", "--config", str(path), "--database", sqlite_url(database), cwd=tmp_path)
    assert checked.code == 0, str(checked)
    assert checked.err == f"orchestrator: warning: {WARNING}\n"
    assert "integration hubspot: base_url (none), auth bearer" in checked.out.splitlines()
    assert json.loads(run("serve", "--check", "--json", "--config", str(path), cwd=tmp_path).out)["warnings"] == [
        WARNING
    ]
    daemon = Daemon(database, "--config", str(path), "--log-format", "json")
    try:
        logged = [json.loads(line) for line in daemon.stderr.lines if line.startswith("{")]
    finally:
        assert daemon.stop() == 0, str(daemon)
    assert {"level": "warning", "message": WARNING} in [{k: r[k] for k in ("level", "message")} for r in logged]


def test_no_warning_when_every_integration_has_a_base_url(tmp_path: Path) -> None:
    """The installed plugins' defaults name their base URLs: nothing to warn about."""
    checked = run("serve", "--check", "--database", sqlite_url(tmp_path / "events.db"), cwd=tmp_path)
    assert (checked.code, checked.err) == (0, ""), str(checked)


# -- a start that fails leaves nothing behind ---------------------------------------------------


def test_a_failed_bind_leaves_no_new_log_behind(tmp_path: Path) -> None:
    """Port in use: exit 1 naming it; the log, its lock, its key file and the folder made for them are gone again."""
    with port_in_use() as address:
        explicit = run("serve", "--listen", address, "--database", sqlite_url(tmp_path / "events.db"), cwd=tmp_path)
        assert last_line(explicit).startswith(f"orchestrator: error: cannot listen on {address}"), str(explicit)
        assert list(tmp_path.iterdir()) == []
        default = run("serve", "--listen", address, cwd=tmp_path)
        assert last_line(default).startswith(f"orchestrator: error: cannot listen on {address}"), str(default)
        assert list(tmp_path.iterdir()) == []


def test_a_failed_bind_leaves_an_existing_log_as_it_was(tmp_path: Path) -> None:
    """Port in use on a log that holds records: exit 1, and the log, its key file and their bytes are all kept."""
    database = a_stopped_log(tmp_path)
    before = tree(tmp_path)
    with port_in_use() as address:
        result = run("serve", "--listen", address, "--database", sqlite_url(database), cwd=tmp_path)
    assert last_line(result).startswith(f"orchestrator: error: cannot listen on {address}"), str(result)
    assert but_locks(tree(tmp_path)) == but_locks(before)
    replayed = run("replay", "--database", sqlite_url(database), "--json", cwd=tmp_path)
    assert [c["stream"] for c in replayed.json()["connections"]] == ["dev/salesforce/acme-1"]


def test_the_default_folder_is_still_made(tmp_path: Path) -> None:
    """Without --database the daemon makes ./.orchestrator/ and its log there (the one directory it makes)."""
    daemon = Process("serve", "--listen", "127.0.0.1:0", cwd=tmp_path, env=environment())
    try:
        match = daemon.stderr.wait_for(READY, STARTUP_TIMEOUT)
    finally:
        assert daemon.signal(signal.SIGTERM) == 0, str(daemon)
    assert match[2] == sqlite_url(tmp_path / ".orchestrator" / "events.db")
    assert sorted(p.name for p in (tmp_path / ".orchestrator").iterdir()) == [
        "events.db",
        "events.db.lock",
        "secret.key",
    ]


# -- dryrun --commit ----------------------------------------------------------------------------


def test_dryrun_commit_while_the_daemon_runs_says_to_stop_it_or_omit_commit(daemon: Daemon, tmp_path: Path) -> None:
    """Not "use PostgreSQL": the daemon owns the log; stop it, or drop --commit (a dry run reads while it runs)."""
    result = run(
        "dryrun", "delete-webhook", "acme-1", "--commit", "--database", daemon.url, "--credential", "a=b", cwd=tmp_path
    )
    assert only_line(result) == (
        f"orchestrator: error: the event log {daemon.database} is in use by pid {daemon.process.pid} (a running"
        " daemon): stop the daemon or omit --commit (without it, dryrun only reads the log, which works while the"
        " daemon runs)"
    )


def test_dryrun_commit_on_a_missing_log_makes_none(tmp_path: Path) -> None:
    """--commit writes into a log: one that does not exist is an error, and is not created."""
    database = tmp_path / "events.db"
    result = run("dryrun", "delete-webhook", "acme-1", "--commit", "--database", sqlite_url(database), cwd=tmp_path)
    assert only_line(result) == (
        f"orchestrator: error: no event log at {database}: --commit records into an existing log"
    )
    assert list(tmp_path.iterdir()) == []
