"""The settings file: one TOML file for the daemon and the client commands alike.

Its keys are the settings: every option shown with an ``ORCHESTRATOR_*``
variable in ``--help``, named like the variable without the prefix, in lower
case (``grace_period = 15`` for ``--grace-period`` and
``ORCHESTRATOR_GRACE_PERIOD``), and the ``[integrations.<name>]`` and ``[environments.<env>.variables]`` tables.
Every command that has settings takes ``--config FILE`` (or
``ORCHESTRATOR_CONFIG``); it reads the keys it knows and accepts the keys of
the other commands, so that one file serves ``serve`` and the clients. A key
no command knows is refused, naming it and the file (a typo must not pass
silently); so is a value of the wrong type, naming the key and the file, before
the command does anything (:class:`~orchestrator.cli._exit.BadInput`, exit 2).

Precedence, highest first: the flag, the environment variable, the file, the
default (the file's values are click's ``default_map``).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from orchestrator import config
from orchestrator.cli._exit import BadInput, warn
from orchestrator.cli._files import read_text
from orchestrator.errors import InvalidArgument

if TYPE_CHECKING:
    from orchestrator.config import Integration

CONFIG_ENV = "ORCHESTRATOR_CONFIG"
PREFIX = "ORCHESTRATOR_"
TABLES = {"integrations", "environments"}
"""Tables of the file that are not options: the provider proxy's settings and each environment's function variables
(serve, dryrun)."""
NOT_IN_THE_FILE = {
    "secret_key": "the key ring is read from ORCHESTRATOR_SECRET_KEY only, never from a file of settings",
    "config": "a settings file cannot name another one",
}
_INTEGRATIONS = "orchestrator.integrations"
_VARIABLES = "orchestrator.variables"
_SOURCE = "orchestrator.config_file"
_LEGACY = "orchestrator.legacy_json"


def setting_options(command: click.Command) -> dict[str, click.Option]:
    """The options of ``command`` that are settings (they have an ``ORCHESTRATOR_<KEY>`` variable), by key."""
    out = {}
    for param in command.params:
        if not isinstance(param, click.Option) or not param.name or not param.envvar:
            continue
        key = param.name
        if key not in NOT_IN_THE_FILE and key != "config_file":
            out[key] = param
    return out


def known_settings(command: click.Command) -> set[str]:
    """Every key some command under ``command`` (the ``orchestrator`` group) reads."""
    keys = set(setting_options(command))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            keys |= known_settings(sub)
    return keys


def config_option(*, legacy_json: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--config FILE``: the TOML settings file, also ``ORCHESTRATOR_CONFIG``, read before every other option.

    ``legacy_json`` names the option that ``--config`` used to be on this command (``emit``'s
    ``--connection-config``): a value that is JSON (``{...}`` or ``@file``) is taken as that
    option, with a deprecation warning, and the settings file comes from ``ORCHESTRATOR_CONFIG``.
    """

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if ctx.resilient_parsing:
            return None
        from_flag = ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE
        named_by = "--config" if from_flag else CONFIG_ENV
        if legacy_json and from_flag and value is not None and value.lstrip().startswith(("{", "@")):
            ctx.meta[_LEGACY] = value
            warn(
                f"{ctx.command_path} --config JSON is deprecated: give the connection's settings with {legacy_json};"
                " --config names the TOML settings file, as for every command"
            )
            value, named_by = os.environ.get(CONFIG_ENV) or None, CONFIG_ENV
        if value:
            apply_file(ctx, Path(value), named_by)
        return value

    return click.option(
        "--config",
        "config_file",
        envvar=CONFIG_ENV,
        show_envvar=True,
        is_eager=True,
        expose_value=False,
        callback=load,
        metavar="FILE",
        help="The TOML settings file (keys: this command's ORCHESTRATOR_* variables without the prefix, in lower"
        " case; the other commands' keys are accepted).",
    )


def legacy_json(ctx: click.Context) -> str | None:
    """The JSON that ``--config`` was given in its deprecated meaning, if it was."""
    value: str | None = ctx.meta.get(_LEGACY)
    return value


def config_file(ctx: click.Context) -> Path | None:
    """The settings file that was read, if any."""
    path: Path | None = ctx.meta.get(_SOURCE)
    return path


def configured_integrations(ctx: click.Context) -> dict[str, Integration]:
    """The ``[integrations.*]`` tables of the settings file, if one was read."""
    found: dict[str, Integration] = ctx.meta.get(_INTEGRATIONS, {})
    return found


def configured_variables(ctx: click.Context) -> dict[str, dict[str, str]]:
    """The ``[environments.<env>.variables]`` tables of the settings file, if one was read."""
    found: dict[str, dict[str, str]] = ctx.meta.get(_VARIABLES, {})
    return found


def apply_file(ctx: click.Context, path: Path, named_by: str) -> None:
    """Check the file's every key and make its values the defaults of this command's options."""
    try:
        settings = tomllib.loads(read_text(named_by, path))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path} is not valid TOML: {exc}") from None
    for key, why in NOT_IN_THE_FILE.items():
        if key in settings:
            raise BadInput(f"{path}: {key}: {why}")
    known = known_settings(ctx.find_root().command)
    unknown = sorted(k for k in settings if k not in known and k not in TABLES)
    if unknown:
        raise BadInput(f"{path}: unknown setting(s) {', '.join(_suggest(k, known) for k in unknown)}")
    mine = setting_options(ctx.command)
    defaults = {key: _checked(ctx, path, key, mine[key], value) for key, value in settings.items() if key in mine}
    try:
        integrations = config.integrations_from_toml(settings.get("integrations", {}))
        variables = config.variables_from_toml(settings.get("environments", {}))
    except InvalidArgument as exc:
        raise BadInput(f"{path}: {exc}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_SOURCE] = path
    ctx.meta[_INTEGRATIONS] = integrations
    ctx.meta[_VARIABLES] = variables


def sources(ctx: click.Context) -> dict[str, str]:
    """Where each setting of the running command came from: the flag, its variable, the file, or the default."""
    path = config_file(ctx)
    out = {}
    for key, option in setting_options(ctx.command).items():
        source = ctx.get_parameter_source(key)
        if source is ParameterSource.COMMANDLINE:
            out[key] = option.opts[-1]
        elif source is ParameterSource.ENVIRONMENT:
            out[key] = str(option.envvar)
        elif source is ParameterSource.DEFAULT_MAP:
            out[key] = str(path) if path is not None else "the settings file"
        else:
            out[key] = "default"
    return out


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


def _checked(ctx: click.Context, path: Path, key: str, option: click.Option, value: Any) -> Any:
    """``value`` if it is one ``option`` takes (TOML's own types, then the option's range or choices)."""
    problem = _type_problem(option.type, value)
    if problem:
        raise BadInput(f"{path}: {key}: {problem}")
    try:
        converted = option.type_cast_value(ctx, value)
        if option.callback is not None:
            option.callback(ctx, option, converted)
    except click.BadParameter as exc:
        raise BadInput(f"{path}: {key}: {exc.message.rstrip('.')}") from None
    return value


def _type_problem(kind: click.ParamType[Any, Any], value: Any) -> str:
    shown = _toml(value)
    if isinstance(value, str) and "\x00" in value:
        return f"{shown} holds a NUL character"
    if isinstance(kind, click.types.BoolParamType):
        return "" if isinstance(value, bool) else f"{shown} is not true or false"
    if isinstance(kind, click.types.IntParamType):
        return "" if isinstance(value, int) and not isinstance(value, bool) else f"{shown} is not a valid integer"
    if isinstance(kind, click.types.FloatParamType):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return "" if number else f"{shown} is not a valid number"
    return "" if isinstance(value, str) else f"{shown} is not a string"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)
