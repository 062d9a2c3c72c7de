"""Settings, read once at the edge (the CLI) into frozen dataclasses.

Precedence, highest first: command-line flags, ``ORCHESTRATOR_*`` environment
variables, the TOML config file, the defaults here. Nothing below the CLI
reads the environment.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.dispatch import DispatchConfig
from orchestrator.errors import InvalidArgument
from orchestrator.provider import Integration
from orchestrator.telemetry import TelemetryConfig

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path(".orchestrator")
DEFAULT_GRACE_PERIOD = 10.0


def default_database() -> str:
    """``sqlite:///<cwd>/.orchestrator/events.db``, absolute so the daemon may chdir safely."""
    return f"sqlite://{(DEFAULT_DATA_DIR / 'events.db').resolve()}"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything ``orchestrator serve`` needs."""

    listen: str = DEFAULT_LISTEN
    database: str = ""
    grace_period: float = DEFAULT_GRACE_PERIOD
    insecure: bool = False
    uvloop: bool = True
    skip_broken_plugins: bool = False
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    integrations: Mapping[str, Integration] = field(default_factory=dict)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    on_sighup: Callable[[], None] | None = None
    """What SIGHUP does (reopen the log file)."""

    def __post_init__(self) -> None:
        host, _ = split_host_port(self.listen)
        if not self.insecure and not is_loopback(host):
            raise InvalidArgument(
                f"refusing to listen on {self.listen} without TLS or a token: anyone on the network could"
                " emit events; listen on 127.0.0.1, or pass --insecure if a proxy in front secures it"
            )
        if self.grace_period < 0:
            raise InvalidArgument(f"grace period must be 0 or more seconds, not {self.grace_period}")


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raise :class:`InvalidArgument` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"listen address {address!r} is not of the form HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_toml(path: Path) -> dict[str, Any]:
    """The settings table of a TOML config file, with a readable error."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InvalidArgument(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None


def integrations_from_toml(table: Any) -> dict[str, Integration]:
    """``[integrations.<name>]`` tables as :class:`Integration` settings."""
    if not isinstance(table, dict):
        raise InvalidArgument("integrations must be a table of [integrations.<name>] tables")
    out = {}
    for name, settings in table.items():
        if not isinstance(settings, dict):
            raise InvalidArgument(f"integrations.{name} must be a table")
        try:
            out[name] = Integration.from_settings(name, settings)
        except TypeError as exc:
            raise InvalidArgument(f"integrations.{name}: {exc}") from None
    return out
