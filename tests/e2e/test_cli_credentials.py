"""``orchestrator keygen``, ``rotate-key``, ``credentials set`` and the key's settings, as a user runs them."""

from __future__ import annotations

import base64
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.process import Cli, Daemon, environment, fields, run, sqlite_url

TOKEN = "s3aled-T0KEN-of-acme"


def key_ids(database: Path) -> list[str]:
    """The key id of every sealed row."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT key_id FROM credentials ORDER BY stream")]


def keygen() -> tuple[str, str]:
    """A new key from ``orchestrator keygen`` and its id."""
    made = run("keygen")
    assert made.code == 0, str(made)
    key = made.out.strip()
    assert made.err.startswith("key id ")
    return key, made.err.split()[-1]


def test_keygen_json_is_one_document_with_the_key_and_its_id() -> None:
    """``keygen --json``: the key and its id together on stdout, nothing on stderr."""
    made = run("keygen", "--json")
    assert (made.code, made.err) == (0, ""), str(made)
    document = made.json()
    assert set(document) == {"key", "key_id"}
    assert len(base64.b64decode(document["key"], validate=True)) == 32 and len(document["key_id"]) == 8


def test_keygen_prints_a_new_32_byte_key_and_its_id() -> None:
    """base64 of 32 random bytes on stdout, alone; its 8-hex-digit id on stderr; never the same twice."""
    first, first_id = keygen()
    second, _ = keygen()
    assert len(base64.b64decode(first, validate=True)) == 32
    assert len(first_id) == 8 and int(first_id, 16) >= 0
    assert first != second


@pytest.mark.slow
def test_rotate_key_reseals_every_row_under_the_first_key_while_the_daemon_runs(tmp_path: Path) -> None:
    """Old key, then new,old while running: rotate-key reseals; the daemon then runs with the new key alone."""
    database = tmp_path / "events.db"
    old, old_id = keygen()
    new, new_id = keygen()
    daemon = Daemon(database, env=environment(ORCHESTRATOR_SECRET_KEY=old))
    try:
        cli = Cli(daemon, tmp_path)
        for connection in ("acme", "globex"):
            cli.ok(
                "emit", "post-connection-creation", connection, "-i", "bench", "--credential", f"access_token={TOKEN}"
            )
    finally:
        assert daemon.stop() == 0, str(daemon)
    assert key_ids(database) == [old_id, old_id]

    rotated = environment(ORCHESTRATOR_SECRET_KEY=f"{new},{old}")
    daemon = Daemon(database, env=rotated)
    try:
        cli = Cli(daemon, tmp_path)
        done = run("rotate-key", "--database", sqlite_url(database), env=rotated)
        assert done.code == 0, str(done)
        assert done.out == f"resealed 2 connection(s) under key id {new_id}\n"
        assert key_ids(database) == [new_id, new_id]
        again = run("rotate-key", "--database", sqlite_url(database), "--json", env=rotated)
        assert '"resealed": 0' in again.out, str(again)
    finally:
        assert daemon.stop() == 0, str(daemon)

    daemon = Daemon(database, env=environment(ORCHESTRATOR_SECRET_KEY=new))
    try:
        cli = Cli(daemon, tmp_path)
        same = cli.ok("credentials", "set", "acme", "-i", "bench", "--credential", f"access_token={TOKEN}")
        shown = fields(same.out)
        assert shown["key id"] == new_id
        assert shown["changed"].startswith("no"), "the resealed row opens under the new key alone"
        assert TOKEN not in same.out
    finally:
        assert daemon.stop() == 0, str(daemon)
    assert "not configured" not in daemon.stderr.text

    lost = run("rotate-key", "--database", sqlite_url(database), env=environment(ORCHESTRATOR_SECRET_KEY=old))
    assert lost.code == 1, str(lost)
    assert f"key id {new_id}, which is not configured" in lost.err


@pytest.mark.slow
def test_credentials_set_refuses_what_it_cannot_do_in_one_line(tmp_path: Path) -> None:
    """No credentials: a usage error (2); an unknown connection: NOT_FOUND (1); the secret is never printed."""
    daemon = Daemon(tmp_path / "events.db")
    try:
        cli = Cli(daemon, tmp_path)
        empty = cli("credentials", "set", "acme", "-i", "bench")
        assert empty.code == 2 and "--credential NAME=VALUE" in empty.err, str(empty)
        ghost = cli("credentials", "set", "ghost", "-i", "bench", "--credential", f"access_token={TOKEN}")
        assert ghost.code == 1, str(ghost)
        assert ghost.err.startswith("orchestrator: error: NOT_FOUND: connection dev/bench/ghost not found")
        assert TOKEN not in ghost.out + ghost.err
    finally:
        assert daemon.stop() == 0, str(daemon)
    key_file = tmp_path / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, "made on the first start, private"


def test_the_key_file_is_checked_and_made_only_by_a_real_start(tmp_path: Path) -> None:
    """serve --check says a key file will be made and makes none; a key file others may read stops the start."""
    url = sqlite_url(tmp_path / "events.db")
    checked = run("serve", "--check", "--database", url, cwd=tmp_path)
    assert checked.code == 0, str(checked)
    assert f"a new key file {tmp_path / 'secret.key'} (mode 0600) will be created" in checked.out
    assert not (tmp_path / "secret.key").exists()
    key, key_id = keygen()
    shared = tmp_path / "shared.key"
    shared.write_text(key + "\n")
    shared.chmod(0o644)
    refused = run("serve", "--database", url, "--secret-key-file", str(shared), "--listen", "127.0.0.1:0")
    assert refused.code == 1, str(refused)
    assert "readable by group or others (mode 0644)" in refused.err and key not in refused.err
    shared.chmod(0o600)
    checked = run("serve", "--check", "--database", url, "--secret-key-file", str(shared))
    assert f"credentials: sealed under key id {key_id} (1 key(s) from key file {shared})" in checked.out
    from_env = run("serve", "--check", "--database", url, env=environment(ORCHESTRATOR_SECRET_KEY=f"{key},{key}"))
    assert "(2 key(s) from ORCHESTRATOR_SECRET_KEY)" in from_env.out, str(from_env)
    bad = run("serve", "--check", "--database", url, env=environment(ORCHESTRATOR_SECRET_KEY="c2hvcnQ="))
    assert bad.code == 1 and "ORCHESTRATOR_SECRET_KEY: key 1 is 5 bytes" in bad.err, str(bad)
