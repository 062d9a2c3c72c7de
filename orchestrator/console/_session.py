"""Who is looking at the console: the session cookie, the bearer token behind it, and the CSRF token of its forms.

Every browser gets a session id in an ``HttpOnly``, ``SameSite=Strict`` cookie
(``Secure`` under TLS) on its first request. Its forms carry a CSRF token
derived from that id (HMAC-SHA256 under a key made at start), so a page of
another site can neither read it nor post a form the console accepts.

Without a token file every visitor is :data:`~orchestrator.access.ANYONE`.
With one, the console asks for a token once (``/login``): a token the daemon
knows starts a session under a new id (the old one is dropped, so an id set
before the login is worth nothing after it), kept in memory with the token's
SHA-256 digest, never the token. Each request finds the caller again from
that digest and the tokens in force, so a token removed from the file (and
SIGHUP) ends its sessions at once, and a changed scope applies at once.
Sessions end after :data:`IDLE` seconds without a request, at logout, and
when the daemon stops; at most :data:`LIMIT` are kept (the least recently
used go first).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from orchestrator.access import ANYONE, Principal, Tokens, digest

COOKIE = "orchestrator_session"
SID = web.RequestKey("sid", str)
"""A request's session id (from its cookie, or new)."""
CALLER = web.RequestKey[Principal | None]("caller")
"""Who a request comes from (None: nobody logged in, with a token file)."""
IDLE = 8 * 3600.0
"""Seconds a session lasts without a request."""
LIMIT = 10_000
"""Sessions kept at most."""


@dataclass(slots=True)
class _Session:
    digest: bytes
    seen: float


class Sessions:
    """The console's sessions: ids, the caller of each, and the CSRF token of each id."""

    def __init__(
        self,
        tokens: Callable[[], Tokens | None],
        *,
        idle: float = IDLE,
        limit: int = LIMIT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = tokens
        self._idle = idle
        self._limit = limit
        self._monotonic = monotonic
        self._key = secrets.token_bytes(32)
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    @property
    def required(self) -> bool:
        """Whether a visitor must log in (the daemon has a token file)."""
        return self._tokens() is not None

    def __len__(self) -> int:
        return len(self._sessions)

    @staticmethod
    def new_id() -> str:
        """A fresh session id (256 random bits)."""
        return secrets.token_urlsafe(32)

    def csrf(self, sid: str) -> str:
        """The CSRF token of the forms shown to session ``sid``."""
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str, sent: str) -> bool:
        """Whether ``sent`` is the CSRF token of ``sid`` (compared in constant time)."""
        return bool(sid) and hmac.compare_digest(self.csrf(sid).encode(), sent.encode())

    def caller(self, sid: str) -> Principal | None:
        """Who session ``sid`` is: :data:`ANYONE` without a token file, else its token's caller or None."""
        tokens = self._tokens()
        if tokens is None:
            return ANYONE
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = self._monotonic()
        principal = tokens.authenticate_digest(session.digest) if now - session.seen <= self._idle else None
        if principal is None:  # idle too long, or its token is no longer in the file
            del self._sessions[sid]
            return None
        session.seen = now
        self._sessions.move_to_end(sid)
        return principal

    def login(self, token: str) -> tuple[str, Principal] | None:
        """A new session for ``token`` (its id and caller), or None when the daemon does not know the token."""
        tokens = self._tokens()
        if tokens is None:
            return None
        hashed = digest(token)
        principal = tokens.authenticate_digest(hashed)
        if principal is None:
            return None
        sid = self.new_id()
        self._sessions[sid] = _Session(hashed, self._monotonic())
        while len(self._sessions) > self._limit:
            self._sessions.popitem(last=False)
        return sid, principal

    def logout(self, sid: str) -> None:
        """End session ``sid`` (nothing happens for an unknown one)."""
        self._sessions.pop(sid, None)

    def bearer(self, token: str) -> Principal | None:
        """The caller of an ``Authorization: Bearer`` token (scripts' reads): as gRPC calls are authenticated."""
        tokens = self._tokens()
        if tokens is None:
            return ANYONE
        return tokens.authenticate(token)
