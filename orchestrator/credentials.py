"""Each connection's credentials: sealed into the store with the record that brought them, opened per attempt.

Credentials come with an emit, with ``UpdateCredentials``, or from the
credentials resolver (an optional entry point of the group
``orchestrator.credentials``) after a provider's 401. They are sealed
(:mod:`orchestrator.sealing`) into the store in the same transaction as their
``credentials-updated`` record, and opened from it when an attempt runs, so a
job retried after any number of restarts, or a cleanup hours later, has them.
Nothing is kept in memory between attempts. The store deletes a row once its
connection has ended and no job of it remains (``credentials-destroyed``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio

from orchestrator import limits, records
from orchestrator.errors import FailedPrecondition, InvalidArgument, SealError
from orchestrator.model import ConnectionRef, SealedCredentials
from orchestrator.provider import Refresh, Secrets, redact
from orchestrator.records import NewEvent
from orchestrator.sealing import Keyring, open_sealed, seal
from orchestrator.store import EventStore

log = logging.getLogger(__name__)

Resolver = Callable[[ConnectionRef], Awaitable[Mapping[str, str] | None]]
"""The credentials resolver: fresh credentials for a connection (say, from the platform's token service), or None."""
RESOLVER_TIMEOUT = 30.0
"""Seconds the resolver may take to answer."""
HOW_TO_SUPPLY = "supply them with UpdateCredentials (`orchestrator credentials set`) or with the connection's next emit"


@dataclass(frozen=True, slots=True)
class Updated:
    """What sealing new credentials did: their fingerprint, key id and record version, and whether they changed."""

    fingerprint: str
    key_id: str
    version: int
    changed: bool


@dataclass(frozen=True, slots=True)
class Sealing:
    """New credentials to store: the ``credentials-updated`` body and the sealed row, for one append."""

    body: records.CredentialsUpdated
    sealed: SealedCredentials

    def record(self, *, causation_id: str = "", traceparent: str = "") -> NewEvent:
        """The ``credentials-updated`` record to append with the row."""
        return records.new(self.body, causation_id=causation_id, traceparent=traceparent)


class Vault:
    """Seals credentials into the store and opens them for attempts; asks the resolver after a 401."""

    def __init__(
        self,
        store: EventStore,
        keyring: Keyring | None = None,
        *,
        resolver: Resolver | None = None,
        resolver_timeout: float = RESOLVER_TIMEOUT,
    ) -> None:
        self._store = store
        self.keyring = keyring or Keyring.ephemeral()
        self._resolver = resolver
        self._resolver_timeout = resolver_timeout

    # -- opening ------------------------------------------------------------------------

    async def open(self, ref: ConnectionRef, incarnation: int, *, refresh: Refresh | None = None) -> Secrets:
        """``ref``'s credentials for its ``incarnation``, as an attempt uses them.

        None stored (or only an earlier incarnation's): empty, and an attempt that needs one is
        told how to supply them. Stored but not openable (their key is not configured, the row
        was altered): the attempt fails when it needs them, with the reason.
        """
        sealed = await self._store.sealed_credentials(ref)
        if sealed is None or sealed.incarnation != incarnation:
            return Secrets(refresh=refresh)
        try:
            return Secrets(open_sealed(self.keyring, sealed, ref, incarnation), refresh=refresh)
        except SealError as exc:
            return Secrets(unavailable=f"the credentials of {ref} cannot be opened: {exc}", refresh=refresh)

    async def for_job(
        self, ref: ConnectionRef, incarnation: int, *, causation_id: str = "", traceparent: str = ""
    ) -> Secrets:
        """``ref``'s credentials for a job's attempt: fresh ones from the resolver are sealed at once.

        Their ``credentials-updated`` record is caused by the job's lifecycle record (``causation_id``).
        """
        stale: list[Mapping[str, str]] = []

        async def refresh() -> Mapping[str, str] | None:
            fresh = await self.resolve(ref, stale[0] if stale else {})
            if fresh:
                await self.update(
                    ref, incarnation, fresh, source="resolver", causation_id=causation_id, traceparent=traceparent
                )
            return fresh

        opened = await self.open(ref, incarnation, refresh=refresh if self._resolver is not None else None)
        stale.append(opened.latest)
        return opened

    def refresher(
        self, ref: ConnectionRef, stale: Mapping[str, str]
    ) -> tuple[Refresh | None, Callable[[], Mapping[str, str] | None]]:
        """A refresh for a synchronous run whose fresh credentials join the run's own append; and what it got."""
        if self._resolver is None:
            return None, lambda: None
        got: list[Mapping[str, str]] = []

        async def refresh() -> Mapping[str, str] | None:
            fresh = await self.resolve(ref, stale)
            if fresh:
                got.append(fresh)
            return fresh

        return refresh, lambda: got[-1] if got else None

    async def resolve(self, ref: ConnectionRef, stale: Mapping[str, str]) -> Mapping[str, str] | None:
        """Ask the resolver for fresh credentials (None: no resolver, none given, or it failed; logged)."""
        if self._resolver is None:
            return None
        try:
            with anyio.fail_after(self._resolver_timeout):
                fresh = await self._resolver(ref)
            if fresh is None:
                return None
            if not isinstance(fresh, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in fresh.items()
            ):
                raise InvalidArgument(f"it returned {type(fresh).__name__}, not a mapping of names to strings")
            limits.check_credentials(fresh)
        except TimeoutError:
            log.warning("the credentials resolver did not answer for %s within %.0f s", ref, self._resolver_timeout)
            return None
        except Exception as exc:  # a plugin's error is reported, never the end of the attempt's own failure
            log.warning(
                "the credentials resolver failed for %s: %s: %s", ref, type(exc).__name__, redact(str(exc), stale)
            )
            return None
        log.info("the credentials resolver gave fresh credentials for %s", ref, extra={"connection": ref.stream})
        return dict(fresh) if fresh else None

    # -- sealing ----------------------------------------------------------------------

    async def sealing(
        self, ref: ConnectionRef, incarnation: int, credentials: Mapping[str, str], *, source: str
    ) -> Sealing | None:
        """What to append to store ``credentials`` for ``incarnation``; None when they are the stored ones already."""
        stored = await self._store.sealed_credentials(ref)
        if stored is not None and stored.incarnation == incarnation and stored.key_id == self.keyring.sealing.id:
            try:
                if open_sealed(self.keyring, stored, ref, incarnation) == dict(credentials):
                    return None
            except SealError:
                pass  # unreadable: replaced
        sealed = seal(self.keyring, ref, incarnation, credentials)
        body = records.CredentialsUpdated(sealed.fingerprint, sealed.key_id, tuple(sorted(credentials)), source)
        return Sealing(body, sealed)

    async def update(
        self,
        ref: ConnectionRef,
        incarnation: int,
        credentials: Mapping[str, str],
        *,
        source: str,
        causation_id: str = "",
        traceparent: str = "",
    ) -> Updated:
        """Seal ``credentials`` for ``ref`` now: one append of ``credentials-updated`` and the row."""
        plan = await self.sealing(ref, incarnation, credentials, source=source)
        if plan is None:
            stored = await self._store.sealed_credentials(ref)
            if stored is not None:
                return Updated(stored.fingerprint, stored.key_id, stored.version, changed=False)
            raise FailedPrecondition(f"the credentials of {ref} were destroyed meanwhile; {HOW_TO_SUPPLY}")
        record = plan.record(causation_id=causation_id, traceparent=traceparent)
        appended = await self._store.append(ref, None, [record], seal=plan.sealed)
        announced = next(r for r in appended.records if r.type == records.Fact.CREDENTIALS_UPDATED)
        return Updated(plan.sealed.fingerprint, plan.sealed.key_id, announced.version, changed=True)

    async def check_keys(self) -> list[str]:
        """Warnings about sealed rows whose key is not configured (logged at start)."""
        problems = []
        for key_id, count in sorted((await self._store.sealed_keys()).items()):
            if key_id not in self.keyring.ids:
                problems.append(
                    f"{count} connection(s) have credentials sealed under key id {key_id}, which is not configured"
                    f" (configured: {', '.join(self.keyring.ids)}): attempts that need them will fail until that"
                    " key is added after the sealing key, or the credentials are supplied again"
                )
        return problems
