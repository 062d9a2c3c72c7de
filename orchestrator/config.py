"""Settings, read once at the edge (the CLI) into frozen dataclasses.

Precedence, highest first: command-line flags, ``ORCHESTRATOR_*`` environment
variables, the TOML config file, the defaults here. Nothing below the CLI
reads the environment.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import InvalidArgument

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
