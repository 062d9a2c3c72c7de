"""Jobs across daemons: claims that skip what another daemon is claiming, and leases renewed while they are held.

**Claims.** :func:`claim` picks due jobs ``FOR UPDATE SKIP LOCKED``: daemons
claiming at once never wait for each other and never claim one job twice. A
claim counts an attempt, bumps the job's fencing token and makes it running
(:func:`~orchestrator.store._append.claimed`, as every backend); an outcome
under an older token is refused (:class:`~orchestrator.errors.LeaseLost`), so a
worker whose lease was taken over cannot record anything.

**Leases.** A worker claims for as long as an attempt may take (its timeout
and a margin: minutes). In the database a claim holds a short lease, at most
:data:`LEASE` seconds, which :class:`Leases` renews every :data:`RENEW`
seconds while the claim is held, up to the time the worker asked for. A
daemon that dies, or loses the database, stops renewing: its jobs are claimed
by another daemon within :data:`LEASE` seconds instead of minutes. A claim is
held until its outcome is recorded, refused or fails; a renewal that finds the
job claimed again or ended (another daemon took it over) drops it and says so
at WARNING. Expired leases wake no one by notification: the workers'
``next_job_at`` includes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import asyncpg

from orchestrator import codec
from orchestrator.clock import Clock
from orchestrator.errors import OrchestratorError
from orchestrator.model import Job
from orchestrator.store._append import claimed
from orchestrator.store._postgres_write import fetch, wrap
from orchestrator.store._sqlite_rows import JOB_COLUMNS, LIVE, job_from_row

if TYPE_CHECKING:
    from orchestrator.store._postgres_write import Db

log = logging.getLogger(__name__)

LEASE = 30.0
"""Seconds a claim's lease runs in the database at most before it is renewed (or taken over)."""
RENEW = LEASE / 3
"""Seconds between two renewals of the leases held."""

_DUE = (
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE {LIVE} AND run_at <= $1 AND (lease_until IS NULL OR lease_until < $1)"
    " AND NOT (stream = ANY($2::text[])) ORDER BY run_at LIMIT $3 FOR UPDATE SKIP LOCKED"
)
_CLAIM = (
    "UPDATE jobs SET attempt = c.attempt, lease_token = c.lease_token, lease_until = $1, status = 'running',"
    " updated_at = $2 FROM unnest($3::text[], $4::int[], $5::bigint[]) AS c(job_id, attempt, lease_token)"
    " WHERE jobs.job_id = c.job_id"
)
_RENEW = (
    "UPDATE jobs SET lease_until = LEAST(r.until, $1) FROM unnest($2::text[], $3::bigint[], $4::bigint[])"
    " AS r(job_id, lease_token, until) WHERE jobs.job_id = r.job_id AND jobs.lease_token = r.lease_token"
    " AND jobs.status = 'running' RETURNING jobs.job_id"
)


async def claim(con: Db, *, now: int, limit: int, lease_until: int, exclude: frozenset[str]) -> list[Job]:
    """Claim up to ``limit`` jobs due at ``now`` (micros) not of ``exclude``, leased until ``lease_until``, in one
    transaction."""
    async with con.transaction():
        rows = await fetch(con, _DUE, now, sorted(exclude), limit)
        jobs = [claimed(job_from_row(row), codec.from_micros(now)) for row in rows]
        if jobs:
            await con.execute(
                _CLAIM,
                lease_until,
                now,
                [job.job_id for job in jobs],
                [job.attempt for job in jobs],
                [job.lease_token for job in jobs],
            )
    return jobs


@dataclass(slots=True)
class _Held:
    job: Job
    until: int
    """When the worker's lease ends (micros): renewals go no further."""


class Leases:
    """The claims one store holds, renewed in the database while held (see the module)."""

    def __init__(self, clock: Clock, lease: float = LEASE) -> None:
        self._clock = clock
        self.lease = lease
        self._held: dict[str, _Held] = {}
        self.lost = 0
        """Claims found taken over by a renewal (tests count them)."""
        self._round = anyio.Event()

    def __len__(self) -> int:
        return len(self._held)

    def database_lease(self, now: int, wanted: float) -> int:
        """When a claim made at ``now`` (micros) for ``wanted`` seconds expires in the database, at first."""
        return now + int(min(wanted, self.lease) * 1_000_000)

    def held(self, jobs: Sequence[Job], now: int, wanted: float) -> None:
        """``jobs`` were claimed at ``now`` for ``wanted`` seconds: renew them while held, if that is longer."""
        if wanted <= self.lease:
            return
        until = now + int(wanted * 1_000_000)
        for job in jobs:
            self._held[job.job_id] = _Held(job, until)

    def released(self, job_id: str) -> None:
        """The claim of ``job_id`` is no longer held (its outcome is being recorded, or it was cancelled)."""
        self._held.pop(job_id, None)

    async def renew(self, pool: asyncpg.Pool) -> None:
        """Renew every claim held; drop those that ended or were claimed again, and those past their end."""
        now = codec.to_micros(self._clock.now())
        for job_id in [job_id for job_id, held in self._held.items() if held.until <= now]:
            del self._held[job_id]  # the worker's own lease is over: it runs out in the database too
        if not self._held:
            return
        held = list(self._held.values())
        try:
            rows = await pool.fetch(
                _RENEW,
                now + int(self.lease * 1_000_000),
                [h.job.job_id for h in held],
                [h.job.lease_token for h in held],
                [h.until for h in held],
            )
        except Exception as exc:  # wrapped: a database that is away now is retried at the next renewal
            raise wrap(exc) from None
        renewed = {row[0] for row in rows}
        for h in held:
            if h.job.job_id in renewed or h.job.job_id not in self._held:
                continue  # renewed, or released meanwhile (its outcome recorded)
            del self._held[h.job.job_id]
            self.lost += 1
            log.warning(
                "job %s (%s on %s): its lease was taken over (claimed again by another daemon, or ended);"
                " the attempt's outcome will be refused",
                h.job.job_id,
                h.job.function,
                h.job.stream,
            )

    async def run(self, pool: asyncpg.Pool) -> None:
        """Renew every :data:`RENEW` seconds (a third of the lease given) until cancelled."""
        while True:
            await anyio.sleep(self.lease / 3)
            try:
                await self.renew(pool)
            except OrchestratorError as exc:
                log.warning("could not renew the leases of %d running job(s): %s", len(self._held), exc)
            done, self._round = self._round, anyio.Event()
            done.set()

    async def next_round(self) -> None:
        """Return after the next round of renewals (tests await it rather than sleep)."""
        await self._round.wait()
