"""The crash loop: the real daemon killed with SIGKILL at random moments under load, restarted, many times over.

Each cycle starts ``orchestrator serve`` on the same SQLite file with the crash
loop's plugin (``plugin/orchestrator_crashloop.py``, found through an entry
point written for the daemon's ``PYTHONPATH``: no pip) against a local webhook
provider (:mod:`._provider`: slow enough to have calls in flight, answering
some 503). Client threads, each owning a few connections, emit validations,
creations and deletions with idempotency keys and note every acknowledged
answer; after a random 0.3-1.5 s the daemon is killed (or, now and then,
stopped with SIGTERM). A call the kill cut off is sent again, with the same
key, after the restart; a deletion answered "a job to cancel has started
meanwhile; retry" is sent again at once. A last run with a healthy provider
lets every job finish; then the checks below read the log, the outbox and the
provider's calls.

The seed is printed (and reported); ``ORCHESTRATOR_RELIABILITY_SEED=<seed>``
replays the same cycles, choices and provider, all but the OS's timing.
``--long`` runs 200 cycles instead of 30. The figures are printed at the end
of the run and written to ``$ORCHESTRATOR_RELIABILITY_REPORT`` when set.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.support.plugins import install, pythonpath
from tests.support.process import STOP_TIMEOUT, Daemon, Result, environment, run, sqlite_url

from . import _log
from ._log import CREATE, DELETE, VALIDATE, Entry, Ledger
from ._provider import CLEANUP, REGISTER, Call, CrashLoopProvider
from ._report import report

# The module's own bound is for the CI mode; with --long the folder's conftest gives an hour.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CYCLES = 30
LONG_CYCLES = 200
LOAD_SECONDS = (0.3, 1.5)
"""The random moment of the kill, in seconds of load after the daemon is ready."""
STOP_SHARE = 0.15
"""Share of cycles that end with SIGTERM (a drain) instead of SIGKILL."""
CLIENTS = 4
CONNECTIONS = 12
"""Connections per client: each connection is driven by one client, one call at a time."""
STICKY = 0.5
"""Chance that a client's next call is for the same connection (a creation then its deletion: a race)."""
REJECT_SHARE = 0.1
"""Share of validations whose payload asks the validate function to reject."""
CALL_TIMEOUT = 20.0
SETTLE_TIMEOUT = 60.0
"""Seconds the last run may take to finish every job."""
RETRY_MESSAGE = "a job to cancel has started meanwhile; retry"
RETRIES = 100
"""Times a client sends a deletion answered :data:`RETRY_MESSAGE` before it counts as unexpected."""
SEED_ENV = "ORCHESTRATOR_RELIABILITY_SEED"
ISOLATION_ENV = "ORCHESTRATOR_RELIABILITY_ISOLATION"
"""``process``: the daemons run their functions in worker processes (``--isolation process``); ``thread`` else."""

INTEGRATION = "crashloop"
PLUGIN = Path(__file__).resolve().parent / "plugin"
FUNCTIONS = {
    "check-instance": "orchestrator_crashloop:check_instance",
    "register-webhook": "orchestrator_crashloop:register_webhook",
    "delete-webhook": "orchestrator_crashloop:delete_webhook",
}
CREATION_FUNCTIONS = ("register-webhook",)
CLEANUP_FUNCTIONS = ("delete-webhook",)
DAEMON_OPTIONS = (
    "--retry-max-attempts",
    "10",
    "--retry-initial-interval",
    "0.05",
    "--retry-max-interval",
    "0.5",
    "--attempt-timeout",
    "5",
    "--validate-deadline",
    "5",
    "--deletion-deadline",
    "5",
)
EVENTS = {
    VALIDATE: pb.LIFECYCLE_EVENT_VALIDATE_CONNECTION,
    CREATE: pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION,
    DELETE: pb.LIFECYCLE_EVENT_PRE_CONNECTION_DELETION,
}
GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
"""How a call ends when the daemon dies under it (or refuses it while draining)."""
KNOWN_ERRORS = ("Failed to detach context",)
"""Errors the daemon logs today that the crash loop reports without failing: when a client cancels a follow
(``ReadEvents``, as :func:`settle` does), the RPC's span, opened in the async generator, is closed from another
context and OpenTelemetry logs "Failed to detach context" with a traceback (orchestrator/rpc/server.py)."""
# -- the plugin, installed for a subprocess without pip ------------------------------------


def plugin_path(directory: Path) -> str:
    """Write a ``*.dist-info`` naming the plugin's functions; the ``PYTHONPATH`` that lets a daemon discover them."""
    return pythonpath(PLUGIN, install(directory, "orchestrator-crashloop", FUNCTIONS))


def write_config(path: Path, provider_url: str) -> Path:
    """The daemon's TOML: the crashloop integration at ``{provider_url}/{instance}``, no auth, no proxy retries."""
    path.write_text(
        f'[integrations.{INTEGRATION}]\nbase_url = "{provider_url}/{{instance}}"\nauth = "none"\nretries = 0\n'
    )
    return path


# -- the clients ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One emit a client makes; the same message every time it is sent."""

    connection: str
    event: str
    key: str
    reject: bool = False

    @property
    def stream(self) -> str:
        """The connection's stream in the log."""
        return f"dev/{INTEGRATION}/{self.connection}"

    def message(self) -> pb.EmitLifecycleEventRequest:
        """The request message."""
        message = pb.EmitLifecycleEventRequest(
            connection=pb.ConnectionRef(environment="dev", integration=INTEGRATION, connection_id=self.connection),
            event=EVENTS[self.event],
            idempotency_key=self.key,
        )
        message.connection_config.update({"instance": self.connection})
        if self.reject:
            message.payload.update({"reject": True})
        return message


@dataclass(frozen=True)
class Ack:
    """An acknowledged emit and what the daemon answered."""

    request: Request
    cycle: int
    event_id: str
    position: int
    version: int
    state: str
    deduplicated: bool


@dataclass
class Client:
    """Drives its own connections through the state table, one call at a time; its choices come from its seed."""

    index: int
    seed: int
    rng: random.Random = field(init=False)
    states: dict[str, str] = field(init=False)
    current: str = field(init=False)
    pending: Request | None = None
    """The call to send next: a new one, or one a kill left unanswered (sent again with its key)."""
    sent: int = 0
    acks: list[Ack] = field(default_factory=list)
    retried: int = 0
    """Deletions answered :data:`RETRY_MESSAGE` and sent again."""
    interrupted: int = 0
    """Calls the kill (or the drain) left unanswered."""
    unexpected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}/client/{self.index}")
        self.states = {f"c{self.index}-{n}": "none" for n in range(CONNECTIONS)}
        self.current = self.rng.choice(sorted(self.states))

    def next_request(self) -> Request:
        """A new call the connection's current state allows (this client is its only writer)."""
        if self.rng.random() >= STICKY:
            self.current = self.rng.choice(sorted(self.states))
        state, roll = self.states[self.current], self.rng.random()
        if state in ("none", "deleted"):
            event = VALIDATE if roll < 0.6 else CREATE
        elif state == "rejected":  # a new incarnation, or the deletion that finishes the rejection's cleanup
            event = VALIDATE if roll < 0.4 else CREATE if roll < 0.7 else DELETE
        elif state == "pending":
            event = VALIDATE if roll < 0.15 else CREATE if roll < 0.7 else DELETE
        else:
            event = DELETE if roll < 0.5 else CREATE if roll < 0.75 else VALIDATE
        reject = event == VALIDATE and self.rng.random() < REJECT_SHARE
        self.sent += 1
        return Request(self.current, event, f"k{self.index}-{self.sent}", reject)

    def run(self, address: str, cycle: int, gone: threading.Event, *, resend_only: bool = False) -> None:
        """Call until the daemon goes (``gone`` is set before it is signalled) or, ``resend_only``, once resent."""
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.OrchestratorStub(channel)
            while not gone.is_set():
                if self.pending is None:
                    if resend_only:
                        return
                    self.pending = self.next_request()
                if not self._send(stub, self.pending, cycle, gone):
                    return
                self.pending = None

    def _send(self, stub: pb_grpc.OrchestratorStub, request: Request, cycle: int, gone: threading.Event) -> bool:
        """Send ``request`` until it is answered; whether it was acknowledged."""
        for _ in range(RETRIES):
            try:
                response = stub.EmitLifecycleEvent(request.message(), timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
                if request.event == DELETE and RETRY_MESSAGE in details:
                    self.retried += 1
                    continue
                if gone.is_set() and code in GONE:
                    self.interrupted += 1
                else:
                    self.unexpected.append(f"cycle {cycle}: {request}: {code} {details}")
                return False
            state = pb.ConnectionState.Name(response.state).removeprefix("CONNECTION_STATE_").lower()
            answer = (response.event_id, response.position, response.version, state, response.deduplicated)
            self.acks.append(Ack(request, cycle, *answer))
            self.states[request.connection] = state
            return True
        self.unexpected.append(f"cycle {cycle}: {request}: still {RETRY_MESSAGE!r} after {RETRIES} sends")
        return False


# -- the loop -------------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything the crash loop saw, for the checks."""

    seed: int
    cycles: int
    clients: list[Client]
    exits: list[tuple[int, signal.Signals, int]] = field(default_factory=list)
    """(run, signal sent, exit code) of each daemon: run ``cycles`` is the last, clean one."""
    errors: list[str] = field(default_factory=list)
    """Lines the daemons logged at level error."""
    known_errors: list[str] = field(default_factory=list)
    """Error lines of :data:`KNOWN_ERRORS`, reported but not failing the test."""
    warnings: list[str] = field(default_factory=list)
    """Lines the daemons logged at level warning, but for function outcomes (the provider's 503s, rejections)."""
    before_final: Ledger | None = None
    """The log folded as the last cycle left it (before the clean run)."""
    jobs_before_final: list[dict[str, Any]] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    """The whole log, at the end."""
    ledger: Ledger | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    """The outbox, at the end."""
    unsettled: set[tuple[str, str]] = field(default_factory=set)
    """Runs still owing an outcome when the last run gave up waiting."""
    verify: Result | None = None
    calls: list[Call] = field(default_factory=list)
    webhooks: dict[str, Call] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def acks(self) -> list[Ack]:
        """Every acknowledged answer, client by client, in the order each client got them."""
        return [ack for client in self.clients for ack in client.acks]


@contextmanager
def daemon_on(database: Path, config: Path, env: dict[str, str], outcome: Outcome, number: int) -> Iterator[Daemon]:
    """A daemon on ``database`` running the crash loop's plugin, ready; killed at the end if still running.

    Its error lines, and its warnings other than the functions' failures, are noted in ``outcome`` once it exited.
    """
    daemon = Daemon(database, "--config", str(config), *DAEMON_OPTIONS, env=env)
    try:
        yield daemon
    finally:
        daemon.signal(signal.SIGKILL)
        for line in daemon.stderr.lines:
            if '"level": "error"' in line and any(known in line for known in KNOWN_ERRORS):
                outcome.known_errors.append(f"daemon {number}: {line}")
            elif '"level": "error"' in line:
                outcome.errors.append(f"daemon {number}: {line}")
            elif '"level": "warning"' in line and '"message": "function ' not in line:
                outcome.warnings.append(f"daemon {number}: {line}")


def end(daemon: Daemon, signum: signal.Signals, outcome: Outcome, number: int) -> None:
    """Send ``signum`` and wait for the exit; note the exit code."""
    outcome.exits.append((number, signum, daemon.signal(signum, STOP_TIMEOUT)))


def settle(address: str, ledger: Ledger) -> set[tuple[str, str]]:
    """Follow the log from the ledger's head until no run is open (bounded); the runs still open."""
    waiting = ledger.open()
    if not waiting:
        return waiting
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        request = pb.ReadEventsRequest(from_position=ledger.head + 1, follow=True)
        follow = stub.ReadEvents(request, timeout=SETTLE_TIMEOUT)
        try:
            for record in follow:
                entry = _log.from_pb(record)
                changed = ledger.add(entry)  # the runs it opens: a creation's, a rejection's cleanup
                if entry.type.startswith("function-"):
                    changed.append((entry.causation_id, str(entry.data.get("function", ""))))
                for key in changed:
                    if ledger.is_open(key):
                        waiting.add(key)
                    else:
                        waiting.discard(key)
                if not waiting:
                    return waiting
        except grpc.RpcError as exc:
            if not isinstance(exc, grpc.Call) or exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            follow.cancel()
    return waiting


def crash(tmp: Path, seed: int, cycles: int) -> Outcome:
    """Run the loop: ``cycles`` kills (or stops) under load, then a clean last run; what it saw."""
    started = time.monotonic()
    rng = random.Random(seed)
    database = tmp / "events.db"
    isolation = os.environ.get(ISOLATION_ENV) or "thread"
    env = environment(PYTHONPATH=plugin_path(tmp / "site"), ORCHESTRATOR_ISOLATION=isolation)
    outcome = Outcome(seed, cycles, [Client(n, seed) for n in range(CLIENTS)])
    with CrashLoopProvider(seed) as provider, ThreadPoolExecutor(CLIENTS) as pool:
        config = write_config(tmp / "orchestrator.toml", provider.url)
        for cycle in range(cycles):
            provider.run = cycle
            with daemon_on(database, config, env, outcome, cycle) as daemon:
                if cycle == 0:
                    loaded = {m[1] for m in re.finditer(rf"function (\S+): {INTEGRATION} ", daemon.stderr.text)}
                    assert loaded == set(FUNCTIONS), f"the plugin's functions were not all loaded:\n{daemon}"
                gone = threading.Event()
                clients = [pool.submit(c.run, daemon.address, cycle, gone) for c in outcome.clients]
                time.sleep(rng.uniform(*LOAD_SECONDS))  # the random moment of the kill: the point of the test
                signum = signal.SIGTERM if rng.random() < STOP_SHARE else signal.SIGKILL
                gone.set()
                end(daemon, signum, outcome, cycle)
                for running in clients:
                    running.result(timeout=CALL_TIMEOUT + STOP_TIMEOUT)

        outcome.before_final = Ledger(CREATION_FUNCTIONS, CLEANUP_FUNCTIONS).extend(_log.read(database))
        outcome.jobs_before_final = _log.read_jobs(database)
        provider.faults, provider.run = False, cycles
        with daemon_on(database, config, env, outcome, cycles) as daemon:
            gone = threading.Event()
            resent = [pool.submit(c.run, daemon.address, cycles, gone, resend_only=True) for c in outcome.clients]
            for running in resent:
                running.result(timeout=SETTLE_TIMEOUT)
            ledger = Ledger(CREATION_FUNCTIONS, CLEANUP_FUNCTIONS).extend(_log.read(database))
            outcome.unsettled = settle(daemon.address, ledger)
            end(daemon, signal.SIGTERM, outcome, cycles)
        outcome.calls, outcome.webhooks = provider.snapshot()
    outcome.entries = _log.read(database)
    outcome.ledger = Ledger(CREATION_FUNCTIONS, CLEANUP_FUNCTIONS).extend(outcome.entries)
    outcome.jobs = _log.read_jobs(database)
    outcome.verify = run("replay", "--verify", "--database", sqlite_url(database))
    outcome.seconds = time.monotonic() - started
    return outcome


# -- what the checks count -------------------------------------------------------------


def orphans(outcome: Outcome) -> list[Call]:
    """Registrations (webhooks created) that arrived after the cleanup call of their incarnation's ending (the
    rejection of the active incarnation, or its deletion)."""
    assert outcome.ledger is not None
    first = first_cleanups(outcome)
    late = []
    for call in outcome.calls:
        if call.kind != REGISTER or call.status != 201:
            continue
        ending = outcome.ledger.ending_of(call.record)
        cleanup = first.get(ending.event_id) if ending is not None else None
        if cleanup is not None and cleanup.seq < call.seq:
            late.append(call)
    return late


def first_cleanups(outcome: Outcome) -> dict[str, Call]:
    """The first cleanup call of each deletion or rejection (by the deletion's or rejecting validation's event id)."""
    first: dict[str, Call] = {}
    for call in outcome.calls:
        if call.kind == CLEANUP:
            first.setdefault(call.record, call)
    return first


def stale_cleanups(outcome: Outcome) -> list[tuple[Entry, Call]]:
    """(deletion or rejection, its first cleanup call) where the cleanup asked for another webhook than the log
    held before its record.

    The cleanup runs after the deletion (or the rejection of an active
    connection) has waited for the connection's running creation attempts, so
    it should see the webhook they recorded.
    """
    ledger = outcome.ledger
    assert ledger is not None
    first = first_cleanups(outcome)
    stale = []
    for ending in [*ledger.deletions.values(), *ledger.rejections.values()]:
        call = first.get(ending.event_id)
        held = ledger.metadata_before[ending.event_id].get("webhook_id") or "none"
        if call is not None and call.target != held:
            stale.append((ending, call))
    return stale


def leaks(outcome: Outcome) -> Counter[str]:
    """Webhooks left at the provider by incarnations that ended (rejected once active, or deleted), by cause.

    ``after_cleanup``: registered after the cleanup call (an orphan);
    ``unrecorded``: its id never reached the log (the attempt that made it was
    killed first: at-least-once); ``held_at_deletion``: the connection's
    webhook just before the ending's record, yet the cleanup did not delete it
    (a stale cleanup, or one that gave up: superseded by a new incarnation
    before it ran); ``replaced``: recorded, then replaced in the metadata by
    another creation job's webhook (two jobs of one connection ran at once);
    ``recorded_after_deletion``: recorded after the ending's record.
    """
    ledger = outcome.ledger
    assert ledger is not None
    late = {call.seq for call in orphans(outcome)}
    recorded: dict[str, int] = {}
    for entry in outcome.entries:
        if entry.type == "metadata-updated" and entry.data.get("function") in CREATION_FUNCTIONS:
            webhook = entry.data.get("metadata", {}).get("webhook_id")
            if webhook:
                recorded.setdefault(str(webhook), entry.position)
    causes: Counter[str] = Counter()
    for webhook_id, webhook in outcome.webhooks.items():
        deletion = ledger.ending_of(webhook.record) if webhook.record in ledger.lifecycle else None
        if deletion is None:
            continue  # the connection still exists: its webhook is in use
        if webhook.seq in late:
            causes["after_cleanup"] += 1
        elif webhook_id not in recorded:
            causes["unrecorded"] += 1
        elif ledger.metadata_before[deletion.event_id].get("webhook_id") == webhook_id:
            causes["held_at_deletion"] += 1
        elif recorded[webhook_id] < deletion.position:
            causes["replaced"] += 1
        else:
            causes["recorded_after_deletion"] += 1
    return causes


def figures(outcome: Outcome) -> dict[str, Any]:
    """The crash loop's figures, for the report."""
    ledger = outcome.ledger
    assert ledger is not None and outcome.before_final is not None
    registrations = [c for c in outcome.calls if c.kind == REGISTER and c.status == 201]
    registered = Counter(c.record for c in registrations)
    duplicates = sum(n - 1 for n in registered.values())
    same_run = Counter((c.record, c.run) for c in registrations)
    creation_runs = [r for r in ledger.runs.values() if ledger.kind(r) == CREATE]
    ended = Counter(r.ended[0].type.removeprefix("function-") for r in creation_runs if r.ended)
    leaked = leaks(outcome)
    kills = sum(signum == signal.SIGKILL for _, signum, _ in outcome.exits)
    by_creation: dict[str, list[Call]] = {}
    for call in outcome.calls:
        if call.kind == REGISTER:
            by_creation.setdefault(call.record, []).append(call)
    across = sum(
        any(a.status == 503 and b.run > a.run for a, b in itertools.pairwise(calls)) for calls in by_creation.values()
    )
    return {
        "seed": outcome.seed,
        "isolation": os.environ.get(ISOLATION_ENV) or "thread",
        "cycles": outcome.cycles,
        "kills": kills,
        "stops": sum(signum == signal.SIGTERM for _, signum, _ in outcome.exits[:-1]),
        "seconds": round(outcome.seconds, 1),
        "acknowledged": len(outcome.acks),
        "acknowledged_on_resend": sum(a.deduplicated for a in outcome.acks),
        "interrupted_calls": sum(c.interrupted for c in outcome.clients),
        "deletions_retried": sum(c.retried for c in outcome.clients),
        "records": len(outcome.entries),
        "creations": len(creation_runs),
        "deletions": len(ledger.deletions),
        "rejections_with_cleanup": len(ledger.rejections),
        "cleanups_superseded": sum(
            e.type == "function-gave-up" and e.data.get("reason") == "superseded" for e in outcome.entries
        ),
        "creation_runs_ended": dict(sorted(ended.items())),
        "jobs_after_last_kill": len(outcome.jobs_before_final),
        "registration_calls": sum(c.kind == REGISTER for c in outcome.calls),
        "jobs_registered": len(registered),
        "duplicate_registrations": duplicates,
        "duplicate_rate": round(duplicates / len(registered), 4) if registered else 0.0,
        "duplicates_per_kill": round(duplicates / kills, 2) if kills else 0.0,
        "duplicates_within_a_run": sum(n - 1 for n in same_run.values()),
        "retries_across_restarts": across,
        "late_successes": len(ledger.late_successes()),
        "orphan_registrations": len(orphans(outcome)),
        "stale_cleanups": len(stale_cleanups(outcome)),
        "leaked_webhooks": dict(sorted(leaked.items())),
        "daemon_error_lines": len(outcome.errors),
        "daemon_known_error_lines": len(outcome.known_errors),
        "daemon_other_warnings": len(outcome.warnings),
    }


@pytest.fixture(scope="module")
def crash_loop(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Outcome:
    """The crash loop, run once for the checks below (seeded; the seed is printed and reported)."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    cycles = LONG_CYCLES if pytestconfig.getoption("--long") else CYCLES
    print(f"crash loop: seed {seed} ({SEED_ENV}={seed} replays it), {cycles} cycles")
    outcome = crash(tmp_path_factory.mktemp("crash-loop"), seed, cycles)
    measured = figures(outcome)
    report(pytestconfig, "crash_loop", measured)
    print("crash loop:", measured)
    return outcome


# -- the checks -----------------------------------------------------------------------


def test_every_acknowledged_event_is_in_the_log_exactly_once(crash_loop: Outcome) -> None:
    """Each acknowledged answer names a record that is in the log once, by event_id and by idempotency key."""
    by_id = Counter(e.event_id for e in crash_loop.entries)
    by_key = {(e.stream, e.idempotency_key): e for e in crash_loop.entries if e.idempotency_key}
    assert crash_loop.acks, "nothing was acknowledged"
    versions = Counter((e.stream, e.version) for e in crash_loop.entries)
    missing, wrong = [], []
    for ack in crash_loop.acks:
        record = by_key.get((ack.request.stream, ack.request.key))
        if record is None or by_id[ack.event_id] != 1:
            missing.append(ack)
        elif (record.event_id, record.position, record.type) != (ack.event_id, ack.position, ack.request.event) or not (
            # The answer's version is the stream's after the call: at or past its lifecycle record, and in the log.
            ack.version >= record.version and versions[(ack.request.stream, ack.version)] == 1
        ):
            wrong.append((ack, record))
    assert missing == [], f"seed {crash_loop.seed}: {len(missing)} acknowledged events not in the log once"
    assert wrong == [], f"seed {crash_loop.seed}: acknowledged answers that differ from the log: {wrong[:5]}"


def test_the_log_is_numbered_without_gaps_and_keeps_each_connections_order(crash_loop: Outcome) -> None:
    """Positions run 1..n, versions 1..n per stream, ids and keys are unique, and acks are in the order sent."""
    assert _log.numbering(crash_loop.entries) == [], f"seed {crash_loop.seed}"
    for client in crash_loop.clients:
        positions: dict[str, list[int]] = {}
        for ack in client.acks:
            positions.setdefault(ack.request.stream, []).append(ack.position)
        for stream, seen in positions.items():
            assert seen == sorted(set(seen)), f"seed {crash_loop.seed}: {stream} acknowledged out of order: {seen}"


def test_replay_verify_finds_the_read_model_matches_the_log(crash_loop: Outcome) -> None:
    """``orchestrator replay --verify`` on the crashed-and-restarted log exits 0."""
    verify = crash_loop.verify
    assert verify is not None
    assert (verify.code, verify.out) == (0, "read model matches the log\n"), str(verify)


def test_no_job_is_lost_and_none_is_stuck(crash_loop: Outcome) -> None:
    """After the last kill every open run has its job queued; after the last run every run has ended."""
    before, after = crash_loop.before_final, crash_loop.ledger
    assert before is not None and after is not None
    queued = {(j["causation_id"], j["function"]) for j in crash_loop.jobs_before_final}
    assert before.open() - queued == set(), f"seed {crash_loop.seed}: runs with neither an outcome nor a job"
    assert queued - before.open() == set(), f"seed {crash_loop.seed}: jobs of runs that had ended"
    assert crash_loop.unsettled == set(), f"seed {crash_loop.seed}: runs still open after {SETTLE_TIMEOUT:.0f}s"
    assert after.open() == set() and crash_loop.jobs == [], f"seed {crash_loop.seed}: jobs left at the end"
    creations = [r for r in after.runs.values() if after.kind(r) == CREATE]
    assert len(creations) == len(CREATION_FUNCTIONS) * sum(e.type == CREATE for e in crash_loop.entries), (
        "a creation owes one run per creation function"
    )
    assert [r for r in creations if len(r.ended) != 1] == [], f"seed {crash_loop.seed}: runs that ended twice"


def test_the_daemon_answered_and_exited_as_expected(crash_loop: Outcome) -> None:
    """Every answer was an ack, a kill's cut or a retryable deletion; SIGKILL exits -9, SIGTERM 0; no error logged."""
    unexpected = [line for client in crash_loop.clients for line in client.unexpected]
    assert unexpected == [], f"seed {crash_loop.seed}: {unexpected[:10]}"
    wrong = [(cycle, s.name, code) for cycle, s, code in crash_loop.exits if code != (0 if s == signal.SIGTERM else -s)]
    assert wrong == [], f"seed {crash_loop.seed}: daemons that exited otherwise"
    assert crash_loop.errors == [], f"seed {crash_loop.seed}: the daemons logged errors"


def test_no_creation_succeeds_or_provisions_after_its_cleanup_began(crash_loop: Outcome) -> None:
    """No creation function succeeds after its incarnation's ending (the rejection of the active incarnation, or its
    deletion), nor registers after the ending's cleanup call."""
    assert crash_loop.ledger is not None
    late = crash_loop.ledger.late_successes()
    orphaned = orphans(crash_loop)
    assert (len(late), len(orphaned)) == (0, 0), (
        f"seed {crash_loop.seed}: {len(late)} creation successes after the rejection or deletion record,"
        f" {len(orphaned)} registrations after the cleanup call; e.g. {late[:2]} {orphaned[:2]}"
    )


def test_a_cleanup_sees_the_webhook_the_creations_it_awaited_recorded(crash_loop: Outcome) -> None:
    """Each deletion's (and each rejection's) cleanup asks to delete the webhook the log held just before its
    record."""
    ledger = crash_loop.ledger
    stale = stale_cleanups(crash_loop)
    assert stale == [], (
        f"seed {crash_loop.seed}: {len(stale)} of {len(ledger.deletions) + len(ledger.rejections) if ledger else 0}"
        f" cleanups asked for another webhook than the log held; e.g. {stale[:2]}"
    )
