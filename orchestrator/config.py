"""Settings, read once at the edge (the CLI) into frozen dataclasses: every settings type lives here.

Precedence, highest first: command-line flags, ``ORCHESTRATOR_*`` environment
variables, the TOML config file, the defaults here. Nothing below the CLI
reads the environment. This module is a leaf: it imports only the error
tree, the model's JSON type and the retry policy, so any layer may use it.
"""

from __future__ import annotations

import ipaddress
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import InvalidArgument, ProviderError
from orchestrator.model import JSONObject
from orchestrator.retry import DEFAULT_RETRY, RetryPolicy

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_WEB_LISTEN = "127.0.0.1:50080"
"""Where ``serve`` serves the web console unless told otherwise (an empty address turns it off)."""
TRACE_ID = "{trace_id}"
"""The placeholder of ``--trace-url``: a record's trace id (32 hex digits)."""
DEFAULT_DATA_DIR = Path(".orchestrator")
DEFAULT_GRACE_PERIOD = 10.0
DEFAULT_DATABASE_POOL_SIZE = 10
DEFAULT_DATABASE_LEASE = 30.0
"""Seconds a job's claim holds in a PostgreSQL log before it is renewed, or taken over by another daemon."""
"""Connections a daemon keeps to a PostgreSQL log at most (and one more that listens for the others' commits)."""
DEFAULT_ATTEMPT_TIMEOUT = 60.0
"""Seconds one attempt of an asynchronous function may take (a function may declare its own)."""
AUTH_SCHEMES = ("none", "bearer", "basic", "header:<Name>", "query:<name>")
EXPORTERS = ("otlp", "console", "none")
ISOLATION = ("thread", "process")
"""Where event functions run: in the daemon (plain ``def`` s in its threads), or in a pool of worker processes."""
DEFAULT_PROCESSES = 4
"""Worker processes with ``--isolation process`` (never more than ``--concurrency``)."""
PROTOCOLS = ("grpc", "http/protobuf")


def default_database() -> str:
    """``sqlite:///<cwd>/.orchestrator/events.db``, absolute so the daemon may chdir safely."""
    return f"sqlite://{(DEFAULT_DATA_DIR / 'events.db').resolve()}"


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """Delivery settings: concurrency, deadlines, timeouts and the default retry policy."""

    concurrency: int = 64
    validate_deadline: float = 30.0
    deletion_deadline: float = 30.0
    running_wait: float = 10.0
    """How long a deletion waits for running creation attempts of its connection."""
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    retry: RetryPolicy = DEFAULT_RETRY
    lease_margin: float = 30.0
    isolation: str = "thread"
    """``thread``: attempts run in the daemon; ``process``: in a supervised pool of worker processes."""
    processes: int = DEFAULT_PROCESSES
    """The pool's size with ``isolation="process"``; attempts then run at most this many at once."""
    variables: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """``[environments.<env>.variables]``: each environment's function variables, as ``ctx.env`` shows them."""

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION:
            raise InvalidArgument(f"isolation {self.isolation!r} is not one of {', '.join(ISOLATION)}")
        if self.processes < 1:
            raise InvalidArgument(f"processes must be 1 or more, not {self.processes}")

    @property
    def pool_size(self) -> int:
        """The worker processes to run: none with thread isolation, else ``processes`` (at most ``concurrency``)."""
        return min(self.processes, self.concurrency) if self.isolation == "process" else 0


def _plain(value: Any) -> bool:
    """Whether ``value`` is JSON: what a function may be shown (and a worker process sent) as a setting."""
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


_INTEGRATION_SETTINGS = frozenset({"base_url", "auth", "timeout", "retries", "settings"})


@dataclass(frozen=True, slots=True)
class Integration:
    """How to reach one integration's provider: ``[integrations.<name>]`` settings.

    ``settings`` are the integration's own non-secret settings (``[integrations.<name>.settings]``), which
    functions read as ``ctx.integration.settings``; ``environments`` overrides any of these for one
    environment (``[integrations.<name>.environments.<env>]``): see :meth:`for_environment`.
    """

    name: str
    base_url: str = ""
    auth: str = "none"
    timeout: float = 30.0
    retries: int = 3
    settings: Mapping[str, Any] = field(default_factory=dict)
    environments: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scheme, _, arg = self.auth.partition(":")
        if scheme not in {"none", "bearer", "basic", "header", "query"} or (scheme in {"header", "query"}) != bool(arg):
            raise InvalidArgument(
                f"integrations.{self.name}.auth = {self.auth!r}: use one of {', '.join(AUTH_SCHEMES)}"
            )
        if not isinstance(self.settings, Mapping):
            raise InvalidArgument(f"integrations.{self.name}.settings must be a table")
        for key, value in self.settings.items():
            if not _plain(value):
                raise InvalidArgument(
                    f"integrations.{self.name}.settings.{key}: use strings, numbers, booleans, arrays and tables"
                    f" (not {type(value).__name__})"
                )
        for environment, overrides in self.environments.items():
            where = f"integrations.{self.name}.environments.{environment}"
            if not isinstance(overrides, Mapping):
                raise InvalidArgument(f"{where} must be a table")
            unknown = set(overrides) - _INTEGRATION_SETTINGS
            if unknown:
                raise InvalidArgument(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
            self._overridden(where, overrides)  # each environment's settings are checked now, not at an attempt

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> Integration:
        """From a ``[integrations.<name>]`` TOML table."""
        unknown = set(settings) - _INTEGRATION_SETTINGS - {"environments"}
        if unknown:
            raise InvalidArgument(f"integrations.{name}: unknown setting(s) {', '.join(sorted(unknown))}")
        values = dict(settings)
        environments = values.pop("environments", {})
        if not isinstance(environments, Mapping):
            raise InvalidArgument(
                f"integrations.{name}.environments must be a table of [integrations.{name}.environments.<env>] tables"
            )
        try:
            return cls(name, **values, environments=dict(environments))
        except TypeError as exc:
            raise InvalidArgument(f"integrations.{name}: {exc}") from None

    def _overridden(self, where: str, overrides: Mapping[str, Any]) -> Integration:
        values = {key: overrides.get(key, getattr(self, key)) for key in _INTEGRATION_SETTINGS}
        if isinstance(overrides.get("settings"), Mapping):  # the settings table is merged key by key
            values["settings"] = {**self.settings, **overrides["settings"]}
        try:
            return Integration(self.name, **values)
        except TypeError as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None

    def for_environment(self, environment: str) -> Integration:
        """These settings as environment ``environment`` sees them: its overrides over the defaults."""
        overrides = self.environments.get(environment)
        if not overrides:
            return self
        return self._overridden(f"integrations.{self.name}.environments.{environment}", overrides)

    def url_for(self, config: JSONObject) -> str:
        """The base URL with ``{placeholders}`` filled from ``config``."""
        names = [field for _, field, _, _ in string.Formatter().parse(self.base_url) if field]
        missing = [n for n in names if n not in config]
        if missing:
            raise ProviderError(
                f"integration {self.name}: base_url {self.base_url!r} needs connection_config "
                + ", ".join(repr(m) for m in missing)
            )
        return self.base_url.format(**{n: config[n] for n in names})


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What to export where (the standard ``OTEL_*`` variables, read by the CLI)."""

    service_name: str = "orchestrator"
    service_version: str = ""
    traces_exporter: str = "none"
    metrics_exporter: str = "none"
    otlp_protocol: str = "grpc"
    metrics_listen: str = ""
    """``HOST:PORT`` of the Prometheus text endpoint (empty: none)."""

    def __post_init__(self) -> None:
        for name, value in (
            ("OTEL_TRACES_EXPORTER", self.traces_exporter),
            ("OTEL_METRICS_EXPORTER", self.metrics_exporter),
        ):
            if value not in EXPORTERS:
                raise InvalidArgument(f"{name}={value!r} is not supported: use one of {', '.join(EXPORTERS)}")
        if self.otlp_protocol not in PROTOCOLS:
            raise InvalidArgument(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={self.otlp_protocol!r} is not supported: use {' or '.join(PROTOCOLS)}"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, version: str, metrics_listen: str = "") -> TelemetryConfig:
        """From the standard ``OTEL_*`` variables (only the CLI calls this)."""
        first = environ.get("OTEL_TRACES_EXPORTER", "none").split(",")[0].strip() or "none"
        metrics_first = environ.get("OTEL_METRICS_EXPORTER", "none").split(",")[0].strip() or "none"
        return cls(
            service_name=environ.get("OTEL_SERVICE_NAME", "orchestrator"),
            service_version=version,
            traces_exporter=first,
            metrics_exporter=metrics_first,
            otlp_protocol=environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ),
            metrics_listen=metrics_listen,
        )


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything ``orchestrator serve`` needs."""

    listen: str = DEFAULT_LISTEN
    database: str = ""
    grace_period: float = DEFAULT_GRACE_PERIOD
    insecure: bool = False
    uvloop: bool = True
    skip_broken_plugins: bool = False
    init: bool = False
    """Start a new log in an existing file that holds none (0 bytes, or an SQLite database with no tables), or in a
    PostgreSQL schema that holds other tables."""
    database_pool_size: int = DEFAULT_DATABASE_POOL_SIZE
    """Connections to a PostgreSQL log at most (SQLite: unused)."""
    database_lease: float = DEFAULT_DATABASE_LEASE
    """Seconds a claimed job's lease runs in a PostgreSQL log before it is renewed (a third of it between renewals):
    how soon another daemon takes over the jobs of one that died (SQLite: unused)."""
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    integrations: Mapping[str, Integration] = field(default_factory=dict)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    on_sighup: Callable[[], None] | None = None
    """What SIGHUP does besides rereading the token file and the TLS files (reopen the log file)."""
    tls_cert: Path | None = None
    """The daemon's TLS certificate (chain), PEM; with ``tls_key``, gRPC is served over TLS."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """Mutual TLS: clients must present a certificate signed by this CA (PEM)."""
    auth_token_file: Path | None = None
    """Bearer tokens, one per line (see :mod:`orchestrator.access`); without it no token is asked for."""
    secret_key: str = field(default="", repr=False)
    """``ORCHESTRATOR_SECRET_KEY``: base64 keys, comma-separated, the first sealing (empty: the key file)."""
    secret_key_file: Path | None = None
    """The key file when ``secret_key`` is empty (None: ``secret.key`` beside the SQLite log)."""
    web_listen: str = DEFAULT_WEB_LISTEN
    """``HOST:PORT`` of the web console (port 0 picks a free one; empty: no console)."""
    trace_url: str = ""
    """A URL with ``{trace_id}``: the console links each record to its trace there (empty: no links)."""

    def __post_init__(self) -> None:
        host, _ = split_host_port(self.listen)
        if self.web_listen:
            web_host, _ = split_host_port(self.web_listen)
            secured = self.tls_cert is not None or self.auth_token_file is not None
            if not self.insecure and not is_loopback(web_host) and not secured:
                raise InvalidArgument(
                    f"refusing to serve the web console on {self.web_listen} without TLS or a token: anyone on the"
                    " network could retry and cancel jobs; pass --tls-cert and --tls-key, or --auth-token-file, or"
                    " --web-listen 127.0.0.1:PORT, or --insecure if a proxy in front secures it"
                )
        if self.trace_url:
            check_trace_url(self.trace_url)
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_cert is not None else ("--tls-key", "--tls-cert")
            raise InvalidArgument(f"{given} needs {missing}: TLS takes a certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        if not self.insecure and not is_loopback(host) and self.tls_cert is None and self.auth_token_file is None:
            raise InvalidArgument(
                f"refusing to listen on {self.listen} without TLS or a token: anyone on the network could"
                " emit events; pass --tls-cert and --tls-key, or --auth-token-file, or listen on 127.0.0.1,"
                " or pass --insecure if a proxy in front secures it"
            )
        if self.grace_period < 0:
            raise InvalidArgument(f"grace period must be 0 or more seconds, not {self.grace_period}")


def check_trace_url(template: str) -> str:
    """``template`` if it is an http(s) URL holding ``{trace_id}`` (``--trace-url``), else :class:`InvalidArgument`."""
    if not template.startswith(("http://", "https://")):
        raise InvalidArgument(f"--trace-url {template!r} is not an http:// or https:// URL")
    if TRACE_ID not in template:
        raise InvalidArgument(
            f"--trace-url {template!r} has no {TRACE_ID} to put the trace id in"
            " (e.g. http://jaeger:16686/trace/{trace_id})"
        )
    if any(c.isspace() or not c.isprintable() for c in template):
        raise InvalidArgument("--trace-url holds a space or a control character")
    return template


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
        out[name] = Integration.from_settings(name, settings)
    return out


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def variables_from_toml(table: Any) -> dict[str, dict[str, str]]:
    """``[environments.<env>.variables]`` tables: each environment's function variables (``ctx.env``)."""
    if not isinstance(table, dict):
        raise InvalidArgument("environments must be a table of [environments.<env>] tables")
    out: dict[str, dict[str, str]] = {}
    for environment, settings in table.items():
        where = f"environments.{environment}"
        if not isinstance(settings, dict):
            raise InvalidArgument(f"{where} must be a table")
        unknown = set(settings) - {"variables"}
        if unknown:
            raise InvalidArgument(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} (only variables)")
        variables = settings.get("variables", {})
        if not isinstance(variables, dict):
            raise InvalidArgument(f'{where}.variables must be a table of NAME = "value"')
        for key, value in variables.items():
            if not _VARIABLE.fullmatch(key):
                raise InvalidArgument(f"{where}.variables: {key!r} is not a variable name (letters, digits and _)")
            if not isinstance(value, str):
                raise InvalidArgument(f"{where}.variables.{key} = {value!r} is not a string: quote it")
        out[environment] = dict(variables)
    return out
