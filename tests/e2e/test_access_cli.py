"""Transport and access as a user meets them: ``serve``'s refusals, SIGHUP rereading tokens and certificates,
and the client commands' ``--tls-*`` and token options, their variables and config keys.

Each test makes its own CA and certificates (:mod:`tests.support.tls`) and
runs ``orchestrator serve`` as a subprocess. A reload is awaited by the log
line the daemon writes once it has reread its files; nothing sleeps.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import last_error_line, one_error_line
from tests.support.process import STARTUP_TIMEOUT, Daemon, Process, Result, environment, run, sqlite_url
from tests.support.tls import Authority, Pair

pytestmark = pytest.mark.slow

ADMIN = "admin-token-0123456789abcdef"
DEV = "dev-token-0123456789abcdefgh"
LATER = "later-token-0123456789abcdef"
REREAD_TOKENS = re.compile(r"reread the token file .*: (\d+) token")
REREAD_TLS = "reread the TLS files"


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    """This test's CA, its certificate written to ``tls/ca.crt``."""
    authority = Authority()
    authority.write(tmp_path / "tls" / "ca.crt")
    return authority


@pytest.fixture
def server(ca: Authority, tmp_path: Path) -> Pair:
    """A loopback server certificate of ``ca``, at ``tls/server.crt`` and ``tls/server.key``."""
    return ca.server().write(tmp_path / "tls", "server")


def tokens(path: Path, *lines: str) -> Path:
    """Write a token file of ``lines`` (mode 0600)."""
    path.touch(mode=0o600)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def serve_args(server: Pair, *more: str) -> tuple[str, ...]:
    """``--tls-cert`` and ``--tls-key`` of ``server``, then ``more``."""
    cert, key = server.paths
    return ("--tls-cert", str(cert), "--tls-key", str(key), *more)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts (append them); each still running at the end must drain to exit 0 without a traceback."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        code = daemon.stop()
        assert code == 0, str(daemon)
        assert "Traceback" not in daemon.stderr.text, str(daemon)


def client(daemon: Daemon, *args: str, cwd: Path, **settings: str) -> Result:
    """Run a client command against ``daemon``; ``settings`` are environment variables."""
    return run(*args, env=environment(ORCHESTRATOR_ADDRESS=daemon.address, **settings), cwd=cwd)


# -- serve refuses at start ----------------------------------------------------------------


def test_a_non_loopback_address_needs_tls_a_token_or_insecure(tmp_path: Path, server: Pair) -> None:
    """0.0.0.0 without TLS or tokens exits 1 with one line; with --insecure, TLS or tokens it starts."""
    database = tmp_path / "events.db"
    refused = run("serve", "--listen", "0.0.0.0:0", "--database", sqlite_url(database), cwd=tmp_path)
    assert "without TLS or a token" in last_error_line(refused, "refusing to listen on 0.0.0.0:0")
    assert not database.exists(), "a refused start created the log"

    token_file = tokens(tmp_path / "tokens", ADMIN)
    for extra in (("--insecure",), serve_args(server), ("--auth-token-file", str(token_file))):
        process = Process("serve", "--listen", "0.0.0.0:0", "--database", sqlite_url(database), *extra, cwd=tmp_path)
        try:
            process.stderr.wait_for(r"serving orchestrator\.v1\.Orchestrator on 0\.0\.0\.0:\d+", STARTUP_TIMEOUT)
        finally:
            assert process.signal(signal.SIGTERM) == 0, str(process)


def test_bad_tls_files_refuse_the_start_with_one_line(tmp_path: Path, ca: Authority, server: Pair) -> None:
    """A missing file, a key of another certificate, an expired certificate, a CA that is not PEM: exit 1, one line."""
    other = ca.server().write(tmp_path / "tls", "other")
    expired = ca.server(days=-1).write(tmp_path / "tls", "expired")
    garbage = tmp_path / "tls" / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key = server.paths
    cases = {
        "cannot read the TLS certificate": ("--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(key)),
        "does not belong to the certificate": ("--tls-cert", str(cert), "--tls-key", str(other.paths[1])),
        "expired on": ("--tls-cert", str(expired.paths[0]), "--tls-key", str(expired.paths[1])),
        "is not a PEM certificate": (*serve_args(server), "--tls-client-ca", str(garbage)),
        "--tls-cert needs --tls-key": ("--tls-cert", str(cert)),
        "--tls-client-ca needs --tls-cert": ("--tls-client-ca", str(tmp_path / "tls" / "ca.crt")),
    }
    database = tmp_path / "events.db"
    for expected, args in cases.items():
        result = run("serve", "--listen", "127.0.0.1:0", "--database", sqlite_url(database), *args, cwd=tmp_path)
        assert expected in last_error_line(result, ""), f"{expected!r}:\n{result}"
    assert not database.exists(), "a refused start created the log"


def test_a_bad_token_file_refuses_the_start_naming_the_line_not_the_token(tmp_path: Path) -> None:
    """A malformed line is named by its number; the token on it is never printed."""
    secret = "a-secret-token-nobody-may-see"
    cases = {
        "line 3: environment 'Prod' is invalid": ("# tokens", ADMIN, f"{secret} Prod"),
        "line 2: the same token is on line 1": (secret, secret),
        "line 1: the token is 5 characters long": ("short",),
        "holds no token": ("# nothing yet",),
        "line 1: expected TOKEN [ENV,ENV,...]": (f"{secret} dev, prod",),
    }
    for expected, lines in cases.items():
        path = tokens(tmp_path / "tokens", *lines)
        result = run("serve", "--auth-token-file", str(path), "--database", sqlite_url(tmp_path / "e.db"))
        line = last_error_line(result, f"the token file {path}, " if "line" in expected else "")
        assert expected in line, f"{expected!r}:\n{result}"
        assert secret not in result.err
    missing = run("serve", "--auth-token-file", str(tmp_path / "nope"), "--database", sqlite_url(tmp_path / "e.db"))
    assert "cannot read the token file" in last_error_line(missing, "")


def test_a_token_file_others_can_read_is_a_warning(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A group- or world-readable token file is served, with a WARNING saying how to fix it."""
    path = tokens(tmp_path / "tokens", ADMIN)
    path.chmod(0o644)
    daemons.append(Daemon(tmp_path / "events.db", "--auth-token-file", str(path)))
    assert f"chmod 600 {path}" in daemons[0].stderr.text


# -- SIGHUP ----------------------------------------------------------------------------


def test_sighup_rereads_the_token_file(tmp_path: Path, server: Pair, daemons: list[Daemon]) -> None:
    """A token added works after SIGHUP, one removed fails; a bad new file keeps the tokens in force."""
    path = tokens(tmp_path / "tokens", ADMIN, f"{DEV} dev")
    daemon = Daemon(tmp_path / "events.db", *serve_args(server, "--auth-token-file", str(path)))
    daemons.append(daemon)
    tls = {"ORCHESTRATOR_TLS_CA": str(tmp_path / "tls" / "ca.crt")}

    def listing(token: str) -> Result:
        return client(daemon, "connections", "--json", cwd=tmp_path, ORCHESTRATOR_TOKEN=token, **tls)

    assert listing(ADMIN).code == 0
    assert one_error_line(listing(LATER), "UNAUTHENTICATED: missing or invalid bearer token")

    tokens(path, LATER, f"{DEV} dev")
    daemon.send_signal(signal.SIGHUP)
    assert daemon.stderr.wait_for(REREAD_TOKENS, STARTUP_TIMEOUT)[1] == "2"
    assert listing(LATER).code == 0
    assert one_error_line(listing(ADMIN), "UNAUTHENTICATED: missing or invalid bearer token")

    tokens(path, f"{LATER} Not-An-Environment")
    daemon.send_signal(signal.SIGHUP)
    error = daemon.stderr.wait_for(r"the token file .* line 1: .*the 2 token\(s\) read before stay in force", 30)
    assert LATER not in error.string
    assert listing(LATER).code == 0, "a bad file locked the token in force out"


def test_sighup_rereads_the_certificate(tmp_path: Path, ca: Authority, server: Pair, daemons: list[Daemon]) -> None:
    """After SIGHUP new connections get the new certificate (another CA's); a key that does not fit is refused."""
    daemon = Daemon(tmp_path / "events.db", *serve_args(server))
    daemons.append(daemon)
    successor = Authority("the next CA")
    successor_ca = successor.write(tmp_path / "next-ca.crt")

    def listing(ca_file: Path) -> Result:
        return client(daemon, "connections", "--json", "--tls-ca", str(ca_file), cwd=tmp_path)

    assert listing(tmp_path / "tls" / "ca.crt").code == 0
    successor.server().write(tmp_path / "tls", "server")  # the same files, rewritten: as cert-manager does
    daemon.send_signal(signal.SIGHUP)
    daemon.stderr.wait_for(REREAD_TLS, STARTUP_TIMEOUT)
    assert listing(successor_ca).code == 0
    assert "the TLS handshake with" in one_error_line(listing(tmp_path / "tls" / "ca.crt"), "UNAVAILABLE: ")

    server.paths[1].write_bytes(ca.server().key)  # a key of another certificate
    daemon.send_signal(signal.SIGHUP)
    daemon.stderr.wait_for(r"does not belong to the certificate .*stay in force", STARTUP_TIMEOUT)
    assert listing(successor_ca).code == 0


# -- the client commands --------------------------------------------------------------


def test_client_commands_take_tls_and_token_by_flag_variable_and_config(
    tmp_path: Path, ca: Authority, server: Pair, daemons: list[Daemon]
) -> None:
    """--tls-ca/--tls-cert/--tls-key/--token-file, their ORCHESTRATOR_* variables and the config file's keys
    (``credentials set`` among the client commands)."""
    path = tokens(tmp_path / "tokens", ADMIN, f"{DEV} dev")
    ca_file = tmp_path / "tls" / "ca.crt"
    daemon = Daemon(
        tmp_path / "events.db", *serve_args(server, "--auth-token-file", str(path), "--tls-client-ca", str(ca_file))
    )
    daemons.append(daemon)
    mine = ca.client().write(tmp_path / "tls", "client")
    cert, key = mine.paths
    token_file = tmp_path / "my-token"
    token_file.write_text(f"{ADMIN}\n")

    flags = ("--tls-ca", str(ca_file), "--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(token_file))
    emitted = client(
        daemon, "emit", "validate-connection", "c-1", "-i", "acme", "-e", "prod", "--json", *flags, cwd=tmp_path
    )
    assert emitted.code == 0, str(emitted)
    assert emitted.json()["state"] == "pending"
    secret = ("--credential", "access_token=prod-t0k3n-0123456789")
    stored = client(
        daemon, "credentials", "set", "c-1", "-i", "acme", "-e", "prod", *secret, "--json", *flags, cwd=tmp_path
    )
    assert stored.code == 0, str(stored)
    assert stored.json()["changed"] is True

    variables = {
        "ORCHESTRATOR_TLS_CA": str(ca_file),
        "ORCHESTRATOR_TLS_CERT": str(cert),
        "ORCHESTRATOR_TLS_KEY": str(key),
        "ORCHESTRATOR_TOKEN": DEV,
    }
    got = client(daemon, "connections", "get", "c-1", "-i", "acme", "-e", "prod", cwd=tmp_path, **variables)
    assert "this token may not touch environment 'prod'" in one_error_line(got, "PERMISSION_DENIED: ")
    replaced = client(
        daemon, "credentials", "set", "c-1", "-i", "acme", "-e", "prod", *secret, cwd=tmp_path, **variables
    )
    assert "this token may not touch environment 'prod'" in one_error_line(replaced, "PERMISSION_DENIED: ")
    listed = client(daemon, "connections", "--json", cwd=tmp_path, **variables)
    assert listed.code == 0 and listed.json() == [], str(listed)

    config = tmp_path / "client.toml"
    config.write_text(
        f'address = "{daemon.address}"\ntls_ca = "{ca_file}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        f'token = "{ADMIN}"\n'
    )
    from_file = run("events", "--json", env=environment(ORCHESTRATOR_CONFIG=str(config)), cwd=tmp_path)
    assert from_file.code == 0, str(from_file)
    assert {line["stream"] for line in from_file.json_lines()} == {"prod/acme/c-1"}

    without_cert = client(
        daemon, "connections", cwd=tmp_path, ORCHESTRATOR_TLS_CA=str(ca_file), ORCHESTRATOR_TOKEN=ADMIN
    )
    assert "--tls-cert and --tls-key" in one_error_line(without_cert, "UNAVAILABLE: ")
    without_token = client(daemon, "connections", *flags[:6], cwd=tmp_path)
    assert "--token-file" in one_error_line(without_token, "UNAUTHENTICATED: missing or invalid bearer token")


def test_a_token_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    """The token is never taken from argv, where every user of the machine could read it."""
    result = run("connections", "--token", ADMIN, cwd=tmp_path)
    assert result.code == 2, str(result)
    assert "ORCHESTRATOR_TOKEN" in result.err
