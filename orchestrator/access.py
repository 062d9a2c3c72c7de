"""Who may call the daemon, and which environments each caller may touch: the bearer tokens.

The token file (``serve --auth-token-file``) holds one token per line,
optionally followed by a space and a comma-separated list of environments
that token may touch (none: every environment); ``#`` starts a comment::

    # platform service: everything
    3q2+7w-Vx0sPzL9c4QkRb1MfN8gYhT
    # the dev tooling: dev and staging only
    Zp6yW2nC0aLrE5vJ9tKdH3uQ7sXbG1 dev,staging

Tokens are kept only as SHA-256 digests, and a presented token is compared
with every one of them by :func:`hmac.compare_digest`, without stopping at a
match, so neither the comparison's time nor the log reveals which token (or
which prefix) matched. A caller is named by its token's *fingerprint*, the
first 8 hex digits of its digest (``token:1a2b3c4d``): that, never the token,
is what a span or a log line may carry. This module is pure apart from
:func:`read_token_file`; the gRPC edge (:mod:`orchestrator.rpc.auth`) applies it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import InvalidArgument, PermissionDenied
from orchestrator.model import check_name

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
"""Characters a token has at least: a short token could be guessed, and its fingerprint inverted."""
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
"""RFC 6750's b64token: what may follow ``Bearer `` in an ``authorization`` header."""


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller the daemon knows: its name in spans and logs, and the environments it may touch (None: all)."""

    name: str
    environments: frozenset[str] | None = None

    def allows(self, environment: str) -> bool:
        """Whether this caller may see or change connections of ``environment``."""
        return self.environments is None or environment in self.environments

    def require(self, environment: str) -> None:
        """Raise :class:`PermissionDenied` unless this caller may touch ``environment``."""
        if not self.allows(environment):
            raise PermissionDenied(f"this token may not touch environment {environment!r}")


ANYONE = Principal("anonymous")
"""The caller when the daemon has no token file: every call is allowed, in every environment."""


def digest(token: str) -> bytes:
    """A token's SHA-256 digest: how tokens are kept (never the token itself)."""
    return hashlib.sha256(token.encode()).digest()


def fingerprint(token: str) -> str:
    """A token's name in spans and logs: ``token:`` and the first 8 hex digits of its SHA-256."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


class Tokens:
    """The tokens of one token file, as digests; :meth:`authenticate` finds a token's caller in constant time."""

    def __init__(self, entries: Iterable[tuple[bytes, Principal]]) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The caller ``token`` belongs to, or None; every digest is compared, whatever matched before."""
        return self.authenticate_digest(digest(token))

    def authenticate_digest(self, hashed: bytes) -> Principal | None:
        """The caller whose token has the SHA-256 digest ``hashed`` (what a console session keeps), or None."""
        found: Principal | None = None
        for known, principal in self._entries:
            if hmac.compare_digest(hashed, known):
                found = principal
        return found


def parse_tokens(text: str, source: str) -> Tokens:
    """The tokens of a token file's ``text``; a bad line is :class:`InvalidArgument` naming ``source`` and its number.

    Error messages never quote a token: only line numbers and environment names.
    """
    entries: list[tuple[bytes, Principal]] = []
    seen: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}, line {number}"
        token, _, scope = line.partition(" ")
        scope = scope.strip()
        if not _TOKEN.fullmatch(token):
            raise InvalidArgument(
                f"{where}: the token has characters a bearer token cannot have (use letters, digits and -._~+/)"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise InvalidArgument(
                f"{where}: the token is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH}"
                " (e.g. `openssl rand -base64 32`)"
            )
        environments: frozenset[str] | None = None
        if scope:
            if " " in scope or "\t" in scope:
                raise InvalidArgument(f"{where}: expected TOKEN [ENV,ENV,...]: environments are separated by commas")
            names = scope.split(",")
            for name in names:
                try:
                    check_name("environment", name)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"{where}: {exc}") from None
            environments = frozenset(names)
        digest = hashlib.sha256(token.encode()).digest()
        if digest in seen:
            raise InvalidArgument(f"{where}: the same token is on line {seen[digest]}; give each token one line")
        seen[digest] = number
        entries.append((digest, Principal(fingerprint(token), environments)))
    if not entries:
        raise InvalidArgument(f"{source} holds no token (one per line, optionally followed by environments)")
    return Tokens(entries)


def read_token_file(path: Path) -> tuple[Tokens, str]:
    """The tokens of the file at ``path``, and a warning (empty for none) when others may read or change it.

    Raises :class:`InvalidArgument` when it cannot be read, holds no token, or a line is malformed.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"the token file {path} is not UTF-8 text") from None
    tokens = parse_tokens(text, f"the token file {path}")
    warning = ""
    # Group read is allowed (a Kubernetes Secret volume with fsGroup is 0440 root:<the daemon's group>).
    if mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
        warning = (
            f"the token file {path} can be read or changed by others than its owner and group"
            f" (mode {stat.S_IMODE(mode):04o}): `chmod 600 {path}` (or 640)"
        )
    return tokens, warning


class TokenFile:
    """The daemon's token file: read at start (a bad file refuses the start), reread by :meth:`reload` on SIGHUP."""

    def __init__(self, path: Path) -> None:
        self.path = path
        tokens, warning = read_token_file(path)
        if warning:
            log.warning("%s", warning)
        self._tokens = tokens

    @property
    def tokens(self) -> Tokens:
        """The tokens in force."""
        return self._tokens

    def reload(self) -> bool:
        """Read the file again; if it is bad, keep the tokens in force and log why (never locks everyone out)."""
        try:
            tokens, warning = read_token_file(self.path)
        except InvalidArgument as exc:
            log.error("%s; the %d token(s) read before stay in force", exc, len(self._tokens))
            return False
        if warning:
            log.warning("%s", warning)
        self._tokens = tokens
        log.info("reread the token file %s: %d token(s)", self.path, len(tokens))
        return True
