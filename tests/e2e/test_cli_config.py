"""One settings file for the daemon and the clients, and what the command line names for input, as a user runs them.

Each bad input is one line on stderr, ``orchestrator: error: ...``, with exit
code 2 (a usage error), before anything is done: the commands here point at
an address where nothing listens and a log that does not exist, so that any
attempt to reach either would fail differently (exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.grpc import Api
from tests.support.process import Cli, Daemon, Result, closed_port, environment, run, sqlite_url

CLI_MD = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def usage_line(result: Result) -> str:
    """The single ``orchestrator: error: ...`` line of a usage error: exit 2, nothing on stdout, no traceback."""
    assert result.code == 2, str(result)
    assert result.out == "", str(result)
    assert result.err.count("\n") == 1 and result.err.endswith("\n"), str(result)
    return result.err.rstrip("\n")


def nowhere(tmp_path: Path, **settings: str) -> dict[str, str]:
    """An environment whose daemon and log do not exist (reaching either exits 1, not 2)."""
    return environment(
        ORCHESTRATOR_ADDRESS=f"127.0.0.1:{closed_port()}",
        ORCHESTRATOR_DATABASE=sqlite_url(tmp_path / "absent.db"),
        **settings,
    )


# -- one file for serve and the clients ------------------------------------------------


def test_serve_and_a_client_read_one_file_each_taking_its_own_keys(
    cli: Cli, api: Api, name: str, tmp_path: Path
) -> None:
    """A file with the daemon's and the clients' keys: serve --check accepts it, connections reads its address."""
    api.emit("post-connection-creation", "acme-1", name)
    path = tmp_path / "orchestrator.toml"
    path.write_text(
        f'listen = "127.0.0.1:0"\ndatabase = "{sqlite_url(tmp_path / "events.db")}"\nconcurrency = 8\n'
        f'address = "{cli.daemon.address}"\nenvironment = "dev"\n'
    )
    checked = run("serve", "--check", "--config", str(path), env=environment(), cwd=tmp_path)
    assert checked.code == 0, str(checked)
    listed = run("connections", "list", "--config", str(path), "--json", env=environment(), cwd=tmp_path)
    assert listed.code == 0, str(listed)
    assert f"dev/{name}/acme-1" in {c["stream"] for c in listed.json()}
    # ORCHESTRATOR_CONFIG names the same file for every command.
    by_env = run("connections", "list", "--json", env=environment(ORCHESTRATOR_CONFIG=str(path)), cwd=tmp_path)
    assert by_env.code == 0 and by_env.json() == listed.json(), str(by_env)


def documented_settings_file() -> str:
    """The example settings file of docs/cli.md, as it is printed there."""
    section = CLI_MD.read_text().partition("### One settings file for the daemon and the clients\n")[2]
    text = section.partition("```toml\n")[2].partition("```")[0]
    assert "listen = " in text and "address = " in text, section
    return text


def test_the_settings_file_of_docs_cli_md_serves_the_daemon_and_the_clients(tmp_path: Path) -> None:
    """That exact file: serve --check and serve accept it, and emit, connections and replay run with it.

    Its log is under /var/lib/orchestrator and its port may be taken here: --database and --listen win.
    """
    path = tmp_path / "orchestrator.toml"
    path.write_text(documented_settings_file())
    database = tmp_path / "events.db"
    checked = run("serve", "--check", "--config", str(path), "--database", sqlite_url(database), cwd=tmp_path)
    assert (checked.code, checked.err) == (0, ""), str(checked)
    rows = {line.split()[0]: line.split()[1:] for line in checked.out.splitlines() if "  " in line}
    assert rows["listen"] == ["127.0.0.1:50051", str(path)]
    assert rows["grace_period"] == ["15.0", str(path)]
    assert rows["concurrency"] == ["64", str(path)]
    assert "integration salesforce: base_url https://{instance_url}/services/data/v60.0, auth bearer" in checked.out

    daemon = Daemon(database, "--config", str(path))
    try:
        client = ("--config", str(path), "--address", daemon.address)
        emitted = run("emit", "post-connection-creation", "doc-1", "-i", "github", *client, "--json", cwd=tmp_path)
        assert (emitted.code, emitted.err) == (0, ""), str(emitted)
        listed = run("connections", "list", *client, "--json", cwd=tmp_path)
        assert [c["stream"] for c in listed.json()] == ["dev/github/doc-1"], str(listed)
        replayed = run("replay", "--config", str(path), "--database", sqlite_url(database), "--json", cwd=tmp_path)
        assert [c["stream"] for c in replayed.json()["connections"]] == ["dev/github/doc-1"], str(replayed)
        # Without --address the file's is used.
        own = run("connections", "list", "--config", str(path), cwd=tmp_path)
        assert own.code == 0 or "127.0.0.1:50051" in own.err, str(own)
    finally:
        assert daemon.stop() == 0, str(daemon)
    assert "Traceback" not in daemon.stderr.text


@pytest.mark.parametrize(
    "args", [["serve", "--check"], ["connections", "list"], ["replay"], ["emit", "validate-connection", "a", "-i", "x"]]
)
def test_a_key_no_command_knows_is_refused_naming_it_and_the_file(args: list[str], tmp_path: Path) -> None:
    """A typo is not silently ignored: every command refuses it, naming the key, a close known one, and the file."""
    path = tmp_path / "orchestrator.toml"
    path.write_text('adress = "127.0.0.1:1"\nlisten = "127.0.0.1:0"\nconcurrency = 4\n')
    result = run(*args, "--config", str(path), env=nowhere(tmp_path), cwd=tmp_path)
    assert usage_line(result) == f"orchestrator: error: {path}: unknown setting(s) adress (did you mean address?)"


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('concurrency = "lots"', "concurrency: 'lots' is not a valid integer"),
        ("grace_period = true", "grace_period: true is not a valid number"),
        ("listen = 50051", "listen: 50051 is not a string"),
        ('insecure = "yes"', "insecure: 'yes' is not true or false"),
        ("concurrency = 0", "concurrency: 0 is not in the range x>=1"),
        ('isolation = "fork"', "isolation: 'fork' is not one of 'thread', 'process'"),
        ('log_level = "loud"', "log_level: 'loud' is not one of 'debug', 'info', 'warning', 'error'"),
        ('secret_key = "x"', "secret_key: the key ring is read from ORCHESTRATOR_SECRET_KEY only, never from a file"),
        ('[integrations.acme]\nauth = "magic"', "integrations.acme.auth = 'magic': use one of none, bearer"),
        ('database = "events\\u0000.db"', "database: 'events\\x00.db' holds a NUL character"),
    ],
    ids=["int", "float", "string", "flag", "range", "choice", "level", "secret-key", "integration", "nul"],
)
def test_a_bad_value_in_the_file_names_the_key_and_the_file(toml: str, says: str, tmp_path: Path) -> None:
    """Blamed on the file and its key, not a variable: one line, exit 2, whether --config or the variable names it."""
    path = tmp_path / "orchestrator.toml"
    path.write_text(toml + "\n")
    database = tmp_path / "events.db"
    for how in (["--config", str(path)], []):
        env = environment(ORCHESTRATOR_CONFIG=str(path)) if not how else environment()
        result = run("serve", "--check", "--database", sqlite_url(database), *how, env=env, cwd=tmp_path)
        assert usage_line(result).startswith(f"orchestrator: error: {path}: {says}"), str(result)
    assert list(tmp_path.iterdir()) == [path]


def test_the_exact_line_of_a_type_error(tmp_path: Path) -> None:
    """The line docs/cli.md shows, word for word, and the same when the environment sets the key too."""
    path = tmp_path / "orchestrator.toml"
    path.write_text('concurrency = "lots"\n')
    result = run("serve", "--check", "--config", str(path), env=environment(ORCHESTRATOR_CONCURRENCY="8"))
    assert usage_line(result) == f"orchestrator: error: {path}: concurrency: 'lots' is not a valid integer"


def test_a_client_accepts_a_daemon_key_it_does_not_read_even_with_a_bad_value(cli: Cli, tmp_path: Path) -> None:
    """Each command checks the values of the keys it reads; the others' keys are accepted as they are."""
    path = tmp_path / "orchestrator.toml"
    path.write_text(f'address = "{cli.daemon.address}"\nconcurrency = "lots"\n')
    assert run("connections", "list", "--config", str(path), env=environment(), cwd=tmp_path).code == 0
    assert run("serve", "--check", "--config", str(path), env=environment(), cwd=tmp_path).code == 2


def test_a_flag_beats_the_environment_which_beats_the_file(cli: Cli, tmp_path: Path) -> None:
    """--address, then ORCHESTRATOR_ADDRESS, then the file's address: the first given wins."""
    wrong = f"127.0.0.1:{closed_port()}"
    path = tmp_path / "orchestrator.toml"
    path.write_text(f'address = "{wrong}"\n')
    from_file = run("connections", "--config", str(path), env=environment(), cwd=tmp_path)
    assert wrong in from_file.err and from_file.code == 1, str(from_file)
    env = environment(ORCHESTRATOR_ADDRESS=cli.daemon.address)
    assert run("connections", "--config", str(path), env=env, cwd=tmp_path).code == 0
    flag = run("connections", "--config", str(path), "--address", wrong, env=env, cwd=tmp_path)
    assert wrong in flag.err and flag.code == 1, str(flag)


# -- files the command line names ---------------------------------------------------


def bad_files(tmp_path: Path) -> dict[str, Path]:
    """One file of each kind that cannot serve as input."""
    files = {
        "not-json": tmp_path / "not.json",
        "not-utf8": tmp_path / "latin1.json",
        "array": tmp_path / "array.json",
        "unreadable": tmp_path / "secret.json",
        "bad-toml": tmp_path / "bad.toml",
    }
    files["not-json"].write_text("access_token=abc\n")
    files["not-utf8"].write_bytes(b'{"name": "caf\xe9"}\n')
    files["array"].write_text("[1, 2]\n")
    files["unreadable"].write_text("{}\n")
    files["unreadable"].chmod(0)
    files["bad-toml"].write_text("listen = \n")
    return files


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["emit", "validate-connection", "a", "-i", "x", "--connection-config", "@{missing}"],
            "--connection-config: {missing} does not exist",
        ),
        (["emit", "validate-connection", "a", "-i", "x", "--payload", "@{dir}"], "--payload: {dir} is a directory"),
        (
            ["emit", "validate-connection", "a", "-i", "x", "--credentials-file", "{not-json}"],
            "--credentials-file: {not-json} is not valid JSON: Expecting value: line 1 column 1 (char 0)",
        ),
        (
            ["credentials", "set", "a", "-i", "x", "--credentials-file", "{array}"],
            '--credentials-file: {array} must hold a JSON object of strings, e.g. {{"access_token": "..."}}',
        ),
        (
            ["emit", "validate-connection", "a", "-i", "x", "--payload", "@{not-utf8}"],
            "--payload: {not-utf8} is not UTF-8 text (byte 0xe9 at offset 13)",
        ),
        (
            ["emit", "validate-connection", "a", "-i", "x", "--payload", "@/dev/zero"],
            "--payload: /dev/zero is larger than 16 MiB",
        ),
        (
            ["emit", "validate-connection", "a", "-i", "x", "--payload", "@{array}"],
            "--payload: {array} must hold a JSON object, not an array",
        ),
        (["connections", "list", "--token-file", "{dir}"], "--token-file: {dir} is a directory"),
        (["events", "--tls-ca", "{missing}"], "--tls-ca: {missing} does not exist"),
        (["connections", "get", "a", "-i", "x", "--config", "{dir}"], "--config: {dir} is a directory, not a file"),
        (["replay", "--config", "{missing}"], "--config: {missing} does not exist"),
        (["serve", "--check", "--config", "{bad-toml}"], "{bad-toml} is not valid TOML: Invalid value (at line 1"),
        (["dryrun", "f", "a", "--credentials-file", "{not-json}"], "--credentials-file: {not-json} is not valid JSON"),
        (
            ["dryrun", "f", "a", "--payload", "@{unreadable}"],
            "--payload: {unreadable} cannot be read: permission denied",
        ),
    ],
    ids=[
        "missing",
        "directory",
        "not-json",
        "not-an-object-of-strings",
        "not-utf8",
        "endless",
        "not-an-object",
        "token-directory",
        "tls-missing",
        "config-directory",
        "config-missing",
        "config-not-toml",
        "dryrun-not-json",
        "unreadable",
    ],
)
def test_a_file_that_cannot_serve_as_input_is_one_line_and_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    """Whatever the command and the file's problem: one line naming the option and the path; nothing is done."""
    paths = {"missing": str(tmp_path / "missing.json"), "dir": str(tmp_path)}
    paths |= {kind: str(path) for kind, path in bad_files(tmp_path).items()}
    if "unreadable" in says and Path("/proc/self/status").read_text().count("Uid:\t0\t") == 1:
        pytest.skip("root reads every file")
    result = run(*(a.format(**paths) for a in args), env=nowhere(tmp_path), cwd=tmp_path)
    assert usage_line(result).startswith("orchestrator: error: " + says.format(**paths)), str(result)
    assert "Traceback" not in result.err


# -- emit --config JSON: the deprecated name of --connection-config ---------------------------------------

DEPRECATED = (
    "orchestrator: warning: orchestrator emit --config JSON is deprecated: give the connection's settings with"
    " --connection-config; --config names the TOML settings file, as for every command"
)


def test_emit_config_json_still_works_with_a_warning(cli: Cli, name: str, tmp_path: Path) -> None:
    """``emit --config '{...}'`` and ``--config @file.json`` set the connection's config, saying once to rename them."""
    inline = cli("emit", "validate-connection", "acme-1", "-i", name, "--config", '{"region": "eu"}', "--json")
    assert inline.code == 0, str(inline)
    assert inline.err == DEPRECATED + "\n"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"region": "us"}))
    from_file = cli("emit", "validate-connection", "acme-2", "-i", name, "--config", f"@{settings}")
    assert (from_file.code, from_file.err) == (0, DEPRECATED + "\n"), str(from_file)
    configs = {
        c["ref"]["connection_id"]: c["config"] for c in cli.ok("connections", "list", "-i", name, "--json").json()
    }
    assert configs == {"acme-1": {"region": "eu"}, "acme-2": {"region": "us"}}


def test_emit_config_json_and_connection_config_together_are_refused(tmp_path: Path) -> None:
    """The connection's settings are given once."""
    result = run(
        "emit", "validate-connection", "a", "-i", "x", "--config", "{}", "--connection-config", "{}",
        env=nowhere(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 2, str(result)
    assert result.err == (
        DEPRECATED
        + "\norchestrator: error: give the connection's settings once: --connection-config (not also --config JSON)\n"
    )


def test_emit_config_names_the_settings_file_otherwise(cli: Cli, name: str, tmp_path: Path) -> None:
    """``emit --config FILE`` reads the TOML settings file, as every command does."""
    path = tmp_path / "orchestrator.toml"
    path.write_text(f'address = "{cli.daemon.address}"\nenvironment = "staging"\n')
    result = run("emit", "validate-connection", "acme-1", "-i", name, "--config", str(path), "--json", cwd=tmp_path)
    assert (result.code, result.err) == (0, ""), str(result)
    assert cli.ok("connections", "get", "acme-1", "-i", name, "-e", "staging", "--json").json()["state"] == "pending"
