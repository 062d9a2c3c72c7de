"""The crash loop's provider: a webhook API that notes every call in arrival order, slow enough to have calls in flight.

``POST /{connection}/webhooks`` (body ``{"creation": event_id, "attempt": n}``)
creates a webhook and answers 201 ``{"id": ...}`` after a short delay;
``DELETE /{connection}/webhooks/{id}?deletion=event_id`` deletes it (204) or
answers 404 (``none``, or already gone). Each call is a :class:`Call` with a
sequence number taken when it arrives, which is when the provider acts on it:
"arrived after the cleanup call" is a comparison of sequence numbers.

Delays and faults (503) are drawn from a hash of the seed and the call's
identity (record, attempt), not from arrival order, so a seed gives the same
provider whatever the threads' timing. :attr:`CrashLoopProvider.faults` off
makes it healthy (the final run).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from tests.support.provider import ProviderServer, Reply, Request

REGISTER, CLEANUP = "register", "cleanup"
REGISTER_DELAY = (0.02, 0.15)
"""Seconds a registration takes at the provider (after it acted), drawn in this range: attempts are in flight."""
CLEANUP_DELAY = (0.0, 0.02)
REGISTER_FAULTS = 0.10
"""Share of registrations answered 503 (retried by the worker) while :attr:`CrashLoopProvider.faults` is on."""
CLEANUP_FAULTS = 0.05
"""Share of cleanup calls answered 503 (the cleanup goes on as a background job)."""


@dataclass(frozen=True)
class Call:
    """One call the provider received, numbered in arrival order."""

    seq: int
    kind: str
    """:data:`REGISTER` or :data:`CLEANUP`."""
    connection: str
    record: str
    """The lifecycle record the function ran for: the creation's event id, or the deletion's."""
    attempt: int
    status: int
    webhook: str
    """The webhook created or deleted ("" when none was)."""
    target: str
    """The webhook a cleanup asked to delete (``none`` when it knew of none); "" for a registration."""
    run: int
    """:attr:`CrashLoopProvider.run` when the call arrived: which daemon made it."""


class CrashLoopProvider(ProviderServer):
    """A :class:`ProviderServer` with the crash loop's webhook API."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.faults = True
        """Answer some calls 503 (see :data:`REGISTER_FAULTS`, :data:`CLEANUP_FAULTS`)."""
        self.run = 0
        """The daemon now running (the test counts them): noted on each call."""
        self.calls: list[Call] = []
        """Every call, in arrival order."""
        self.webhooks: dict[str, Call] = {}
        """The webhooks that exist, by id, with the registration that created each."""
        self._state = threading.Lock()
        self.torn = 0
        """Registrations whose body was cut short (the daemon died while sending it): answered 400, not acted on."""
        self._created = 0
        self._cleanups: dict[str, int] = {}
        self.route("POST", "/*/webhooks", self._register)
        self.route("DELETE", "/*/webhooks/*", self._cleanup)

    def _draw(self, *identity: object) -> float:
        """A number in [0, 1) fixed by the seed and ``identity``."""
        digest = hashlib.sha256(repr((self.seed, *identity)).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _between(self, bounds: tuple[float, float], *identity: object) -> float:
        low, high = bounds
        return low + (high - low) * self._draw("delay", *identity)

    def _register(self, request: Request) -> Reply:
        connection = request.path.strip("/").split("/")[0]
        try:
            body = request.json()
        except ValueError:  # the daemon died while it sent the body: nothing to act on
            with self._state:
                self.torn += 1
            return Reply(400, {"error": "torn request"})
        creation, attempt = str(body["creation"]), int(body["attempt"])
        with self._state:
            webhook = ""
            if self.faults and self._draw(REGISTER, creation, attempt) < REGISTER_FAULTS:
                status = 503
            else:
                self._created += 1
                webhook, status = f"wh{self._created}", 201
            call = Call(len(self.calls), REGISTER, connection, creation, attempt, status, webhook, "", self.run)
            self.calls.append(call)
            if webhook:
                self.webhooks[webhook] = call
        delay = self._between(REGISTER_DELAY, creation, attempt)
        if status != 201:
            return Reply(status, {"error": "unavailable (injected)"}, delay=delay)
        return Reply(201, {"id": webhook}, delay=delay)

    def _cleanup(self, request: Request) -> Reply:
        connection, _, target = request.path.strip("/").split("/")
        deletion = request.param("deletion") or ""
        with self._state:
            attempt = self._cleanups[deletion] = self._cleanups.get(deletion, 0) + 1
            webhook = ""
            if self.faults and self._draw(CLEANUP, deletion, attempt) < CLEANUP_FAULTS:
                status = 503
            elif target in self.webhooks and self.webhooks[target].connection == connection:
                del self.webhooks[target]
                webhook, status = target, 204
            else:
                status = 404
            call = Call(len(self.calls), CLEANUP, connection, deletion, attempt, status, webhook, target, self.run)
            self.calls.append(call)
        delay = self._between(CLEANUP_DELAY, deletion, attempt)
        if status == 503:
            return Reply(status, {"error": "unavailable (injected)"}, delay=delay)
        return Reply(status, {"error": "not found"} if status == 404 else b"", delay=delay)

    def snapshot(self) -> tuple[list[Call], dict[str, Call]]:
        """The calls so far and the webhooks that exist, copied."""
        with self._state:
            return list(self.calls), dict(self.webhooks)
