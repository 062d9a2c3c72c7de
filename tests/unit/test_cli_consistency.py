"""The rules every command follows (docs/cli.md), checked on the command tree itself, so a new command follows them.

- every command prints data, so every one has ``--json``: one JSON document, except the streams (``events``),
  which print JSON lines and say so;
- a setting is an option with an ``ORCHESTRATOR_<NAME>`` variable; its key in the settings file is ``<name>``,
  and a key means the same type of value to every command that has it;
- every command with settings takes ``--config FILE``, the TOML settings file, and nothing else by that name;
- every option says what it does, and ``orchestrator --help`` shows each command's summary whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.cli._settings import CONFIG_ENV, known_settings, setting_options

STREAMS = {"events"}
"""Commands whose --json prints one object per line."""


def commands(group: click.Group = main, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    """Every command that runs (not the groups), with its name as typed."""
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}".strip()
        if isinstance(command, click.Group):
            yield from commands(command, path)
        else:
            yield path, command


def options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


@pytest.mark.parametrize(("name", "command"), list(commands()), ids=[n for n, _ in commands()])
def test_every_command_has_json_one_document_or_lines_for_a_stream(name: str, command: click.Command) -> None:
    """``--json``, whose help says which of the two it prints."""
    flags = [o for o in options(command) if "--json" in o.opts]
    assert len(flags) == 1, f"{name} has no --json"
    kind = "JSON lines" if name in STREAMS else "one JSON document"
    assert kind in (flags[0].help or ""), f"{name} --json: {flags[0].help!r}"


@pytest.mark.parametrize(("name", "command"), list(commands()), ids=[n for n, _ in commands()])
def test_every_setting_is_named_after_its_variable_and_read_from_the_file(name: str, command: click.Command) -> None:
    """ORCHESTRATOR_<NAME> for the key <name>; a command with settings takes --config FILE (ORCHESTRATOR_CONFIG)."""
    settings = setting_options(command)
    for key, option in settings.items():
        assert option.envvar == f"ORCHESTRATOR_{key.upper()}", f"{name} {option.opts}: {option.envvar}"
        assert option.show_envvar or option.hidden, f"{name} {option.opts} hides its variable"
    config = [o for o in options(command) if "--config" in o.opts]
    if settings:
        assert len(config) == 1 and config[0].envvar == CONFIG_ENV, f"{name} has settings but no --config FILE"
        assert config[0].metavar == "FILE" and config[0].is_eager


def test_a_key_means_one_type_of_value_to_every_command() -> None:
    """Two commands that read one key convert its value the same way (the file is one for all)."""
    kinds: dict[str, set[str]] = {}
    for _, command in commands():
        for key, option in setting_options(command).items():
            choices = tuple(getattr(option.type, "choices", ()))
            kinds.setdefault(key, set()).add(f"{option.type.name} {choices} flag={option.is_flag}")
    assert {key: kind for key, kind in kinds.items() if len(kind) > 1} == {}
    assert set(kinds) == known_settings(main)
    assert {"listen", "address", "database", "concurrency", "tls_ca", "token", "environment"} <= set(kinds)


@pytest.mark.parametrize(("name", "command"), list(commands()), ids=[n for n, _ in commands()])
def test_every_option_says_what_it_does(name: str, command: click.Command) -> None:
    """No option without help (the hidden ORCHESTRATOR_TOKEN aside)."""
    assert command.help, name
    silent = [o.opts[-1] for o in options(command) if not o.help and not o.hidden]
    assert silent == [], f"{name}: {silent}"


def test_the_command_list_shows_every_summary_whole() -> None:
    """``orchestrator --help``: one line per command, none cut short with '...'."""
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    listed = result.output.partition("\nCommands:\n")[2].splitlines()
    assert len(listed) == len(main.commands), result.output
    assert not [line for line in listed if line.endswith("...")], result.output
