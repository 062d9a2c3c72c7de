"""Storage faults on the SQLite event log, each reproduced as an adversary caused it, and the daemon's answer.

- a full disk: writes are refused with UNAVAILABLE ("disk full: ..."), the cause is logged once, nothing
  acknowledged is lost, and writing resumes by itself once there is room;
- a second daemon on the same file, through a symlink or after ``events.db.lock`` was deleted: refused,
  and the first one's job leases are left alone;
- files are created private (0600, directories 0700), and an unwritable directory is one line on stderr;
- an empty file where a log was expected is refused unless ``serve --init``;
- a damaged file is refused at start, naming it and the recovery, whose documented steps are run here.

Disk-full faults are injected two ways: deterministically with ``PRAGMA
max_page_count`` on the writer's own connection (SQLite then answers
SQLITE_FULL, "database or disk is full", exactly as on a full disk), and for
real on a small tmpfs when this process may mount one (root), skipped
otherwise. In-process tests run under blockbuster (tests/conftest.py): their
file I/O goes through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf import struct_pb2

from orchestrator import logs, worker
from orchestrator.errors import StoreError, Unavailable
from orchestrator.ids import uuid7
from orchestrator.model import ConnectionRef, LifecycleEvent, NewJob
from orchestrator.records import NewEvent
from orchestrator.store import EventStore, open_store
from orchestrator.store._sqlite_writer import Writer
from orchestrator.store.sqlite import SQLiteEventStore
from tests.support import grpc as api
from tests.support.clock import FakeClock
from tests.support.daemon import serving
from tests.support.engine import CREATE, SpyStore, function, running
from tests.support.process import READY, STARTUP_TIMEOUT, Process, drained, environment, run, sqlite_url

ACME = ConnectionRef("dev", "acme", "c1")
GLOBEX = ConnectionRef("dev", "acme", "c2")
GOLDEN = Path(__file__).parent.parent / "golden" / "e915399-failures"
GOLDEN_RECORDS = 48
SCRIBBLE = 4096
BLOB = "x" * 20_000
"""A payload that needs new pages (overflow pages) wherever it is stored."""
NO_LIMIT = 1_073_741_823
"""SQLite's largest max_page_count: no limit."""


# -- helpers ------------------------------------------------------------------------------------


def lifecycle(event: LifecycleEvent, payload: dict[str, Any] | None = None) -> NewEvent:
    """A lifecycle record as the service writes it."""
    return NewEvent(event_id=str(uuid7()), type=event.value, data={"config": {}, "payload": payload or {}})


def created(payload: dict[str, Any] | None = None) -> list[NewEvent]:
    """A post-connection-creation record."""
    return [lifecycle(LifecycleEvent.POST_CONNECTION_CREATION, payload)]


def blob() -> struct_pb2.Struct:
    """A payload of :data:`BLOB`, for an emit."""
    payload = struct_pb2.Struct()
    payload.update({"blob": BLOB})
    return payload


def a_job() -> NewJob:
    """A creation job, due at once."""
    due = datetime(2020, 1, 1, tzinfo=UTC)
    return NewJob(str(uuid7()), "register", LifecycleEvent.POST_CONNECTION_CREATION, "", {}, due)


def writer_of(store: EventStore) -> Writer:
    """The SQLite store's writer."""
    assert isinstance(store, SQLiteEventStore) and store._writer is not None
    return store._writer


async def on_writer(writer: Writer, sql: str) -> Any:
    """Run one statement on the writer's own connection, in its thread (the fault injector); its first value."""

    def execute() -> Any:
        assert writer._db is not None
        row = writer._db.execute(sql).fetchone()
        return row[0] if row else None

    return await writer._thread.call(execute)


async def fill_up(writer: Writer) -> None:
    """Make the database full: SQLite answers SQLITE_FULL to a write that needs one more page."""
    await on_writer(writer, f"PRAGMA max_page_count = {await on_writer(writer, 'PRAGMA page_count')}")


async def free_space(writer: Writer) -> None:
    """Lift the limit :func:`fill_up` set."""
    await on_writer(writer, f"PRAGMA max_page_count = {NO_LIMIT}")


def url(path: Path) -> str:
    """The ``sqlite://`` URL of an absolute path (``sqlite_url`` resolves it: a blocking call, for sync tests)."""
    assert path.is_absolute()
    return f"sqlite://{path}"


def scribble(path: Path, offset: int, *, seed: int = 7) -> None:
    """Overwrite 4 KiB of ``path`` at ``offset`` with random bytes, as a bad disk or a stray write would."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(random.Random(seed).randbytes(SCRIBBLE))


def golden_copy(path: Path) -> Path:
    """A copy of a golden log written by an earlier release (48 records)."""
    shutil.copyfile(GOLDEN / "events.db", path)
    return path


def mode(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


@dataclass(frozen=True)
class Start:
    """How one ``serve`` went: whether it reached SERVING (then it was stopped), its exit code and stderr."""

    served: bool
    code: int
    err: str

    def error_line(self) -> str:
        """The one ``orchestrator: error:`` line a refused start ends with (exit 1, no traceback)."""
        assert not self.served, f"it started serving:\n{self.err}"
        assert self.code == 1, self.err
        assert "Traceback" not in self.err, self.err
        lines = self.err.rstrip("\n").splitlines()
        assert lines and lines[-1].startswith("orchestrator: error: "), self.err
        assert sum(line.startswith("orchestrator: error: ") for line in lines) == 1, self.err
        return lines[-1]


def start(url: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Start:
    """``orchestrator serve`` on ``url``: stopped (SIGTERM) if it reaches SERVING, else left to exit by itself."""
    process = Process("serve", "--listen", "127.0.0.1:0", "--database", url, *args, cwd=cwd, env=env)
    try:
        process.stderr.wait_for(READY, STARTUP_TIMEOUT)
    except EOFError:  # it exited without serving
        code = process.wait()
        return Start(False, code, process.stderr.text)
    code = process.signal(signal.SIGTERM)
    return Start(True, code, process.stderr.text)


@contextmanager
def tmpfs(
    path: Path, size: str, *, files: Callable[[Path], None] | None = None, readonly: bool = False
) -> Iterator[Path]:
    """A small tmpfs at ``path`` for the block (``files`` put in it first, then remounted read-only if asked)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root, and this test runs as another user")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        if files is not None:
            files(path)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def read_only_directory(path: Path, *, files: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A directory this process cannot write to: a read-only tmpfs for root (who ignores modes), else mode 0555."""
    if os.geteuid() == 0:
        with tmpfs(path, "1m", files=files, readonly=True) as directory:
            yield directory
        return
    path.mkdir()
    if files is not None:
        files(path)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


# -- a damaged file -----------------------------------------------------------------------------


def middle(database: Path) -> int:
    """The offset of the middle of the file (in the golden log: a page of an index)."""
    return database.stat().st_size // 2


def across_pages(database: Path) -> int:
    """An offset from which 4 KiB straddle two pages (SQLite then reports several problems)."""
    return database.stat().st_size // 2 - 2048


def records_page(database: Path) -> int:
    """The offset of a page of the events table's records (found with SQLite's dbstat table), or skip."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro&immutable=1", uri=True)) as db:
        try:
            pages = db.execute("SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf'").fetchall()
        except sqlite3.OperationalError as exc:
            pytest.skip(f"this SQLite has no dbstat table to find a page of records with ({exc})")
    return int((pages[0][0] - 1) * 4096)


@pytest.mark.parametrize("where", [middle, across_pages, records_page], ids=["middle", "across-pages", "records"])
def test_a_scribbled_log_is_refused_at_start_naming_it_and_the_way_out(
    tmp_path: Path, where: Callable[[Path], int]
) -> None:
    """A golden log with 4 KiB of garbage in it: serve exits 1 saying it is damaged and how to recover it."""
    database = golden_copy(tmp_path / "events.db")
    scribble(database, where(database))
    damaged = database.read_bytes()
    line = start(sqlite_url(database), cwd=tmp_path).error_line()
    assert line.startswith(f"orchestrator: error: the event log {database} is damaged"), line
    assert "docs/operations.md" in line, line
    assert database.read_bytes() == damaged  # not migrated, not written


@pytest.mark.anyio
async def test_a_damaged_log_is_refused_by_a_writer_with_a_store_error(tmp_path: Path) -> None:
    """Opening a scribbled log for writing raises StoreError naming the file, before anything is written."""
    database = tmp_path / "events.db"
    await anyio.to_thread.run_sync(golden_copy, database)
    await anyio.to_thread.run_sync(lambda: scribble(database, middle(database)))
    with pytest.raises(StoreError, match=rf"the event log {re.escape(str(database))} is damaged .*operations\.md"):
        async with open_store(url(database)):
            pass


@pytest.mark.anyio
async def test_the_start_check_is_bounded_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When quick_check outlasts its budget the log is opened anyway, with a warning saying it was checked in part."""
    database = tmp_path / "events.db"
    await anyio.to_thread.run_sync(golden_copy, database)
    from orchestrator.store import _sqlite_file

    monkeypatch.setattr(_sqlite_file, "CHECK_BUDGET", 0.0)
    async with open_store(url(database)) as store:
        assert await store.head() == GOLDEN_RECORDS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checked in part" in w and str(database) in w for w in warnings), warnings


# -- the documented recovery ------------------------------------------------------------------------


# The commands of docs/operations.md, "A damaged event log", step 3, as written there (run in the copy's folder).
RECOVER = 'sqlite3 events.db ".recover" > recovered.sql'
DUMP = "sqlite3 events.db \".dump\" | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' > recovered.sql"
LOAD = "sqlite3 recovered.db < recovered.sql"


def test_the_recovery_commands_tested_here_are_those_of_the_docs() -> None:
    """The salvage commands run below appear word for word in docs/operations.md."""
    docs = (Path(__file__).parent.parent.parent / "docs" / "operations.md").read_text()
    for command in (RECOVER, DUMP, LOAD, "chmod 600 recovered.db"):
        assert command in docs, command


def salvage(folder: Path) -> Path:
    """Step 3 in ``folder`` (which holds the copy, events.db): .recover, or .dump where the shell cannot recover."""
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 command-line shell is not installed (apt-get install sqlite3)")
    recovered = subprocess.run(["bash", "-c", RECOVER], cwd=folder, capture_output=True, text=True, check=False)
    if recovered.returncode != 0:  # a shell built without sqlite_dbpage (Debian's): "SQL logic error"
        subprocess.run(["bash", "-o", "pipefail", "-c", DUMP], cwd=folder, check=True)
    subprocess.run(["bash", "-c", f"{LOAD} && chmod 600 recovered.db"], cwd=folder, check=True)
    return folder / "recovered.db"


def copy_aside(database: Path) -> Path:
    """Step 2: the log and its -wal and -shm files, if any, copied to a new folder beside it."""
    aside = database.parent / "damaged"
    aside.mkdir(mode=0o700)
    for file in database.parent.glob(database.name + "*"):
        shutil.copy2(file, aside / file.name)
    return aside


def test_the_documented_recovery_brings_a_damaged_log_back(tmp_path: Path) -> None:
    """The recovery steps of docs/operations.md, run for real on a scribbled golden log: verify passes, serve starts."""
    database = golden_copy(tmp_path / "events.db")
    scribble(database, middle(database))  # a page of an index: every record survives
    assert not start(sqlite_url(database), cwd=tmp_path).served  # 1. it is refused (stopped)
    recovered = salvage(copy_aside(database))  # 2. and 3.
    verified = run("replay", "--database", sqlite_url(recovered), "--verify", cwd=tmp_path)  # 4.
    assert verified.code == 0, str(verified)
    for stale in ("events.db", "events.db-wal", "events.db-shm"):  # 5.
        (tmp_path / stale).unlink(missing_ok=True)
    recovered.rename(database)
    assert mode(database) == 0o600
    with drained(database) as daemon:
        client = api.Api(daemon.address)
        try:
            assert len(list(client.stub.ReadEvents(api.read_request(), timeout=api.WAIT))) == GOLDEN_RECORDS
        finally:
            client.close()


def test_a_recovery_that_lost_records_fails_verify(tmp_path: Path) -> None:
    """When the scribble hit records, the recovered file lacks them and replay --verify exits 1, as the docs warn."""
    database = golden_copy(tmp_path / "events.db")
    scribble(database, records_page(database))  # a page of records: they are lost
    assert not start(sqlite_url(database), cwd=tmp_path).served
    recovered = salvage(copy_aside(database))
    verified = run("replay", "--database", sqlite_url(recovered), "--verify", cwd=tmp_path)
    assert verified.code == 1, str(verified)
    assert "difference(s)" in verified.out + verified.err, str(verified)


# -- an empty file where a log was expected ---------------------------------------------------------------


def zero_length(path: Path) -> None:
    """A file of 0 bytes, as a failed copy or a truncation leaves it."""
    path.write_bytes(b"")


def empty_database(path: Path) -> None:
    """An SQLite database with nothing in it (its header only)."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute("DROP TABLE t")


def foreign_database(path: Path) -> None:
    """Some other program's SQLite database."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.commit()


@pytest.mark.anyio
@pytest.mark.parametrize("make", [zero_length, empty_database], ids=["zero-length", "empty-database"])
async def test_an_empty_file_is_refused_unless_init(tmp_path: Path, make: Callable[[Path], None]) -> None:
    """An existing file with no log in it is refused (StoreError saying --init); with init it becomes a new log."""
    database = tmp_path / "events.db"
    await anyio.to_thread.run_sync(make, database)
    before = await anyio.Path(database).read_bytes()
    with pytest.raises(StoreError, match=rf"{re.escape(str(database))} is empty.*--init"):
        async with open_store(url(database)):
            pass
    assert await anyio.Path(database).read_bytes() == before  # untouched
    async with open_store(url(database), init=True) as store:
        await store.append(ACME, 0, created())
    async with open_store(url(database)) as store:  # a log now: no --init needed
        assert await store.head() == 1


@pytest.mark.anyio
async def test_a_foreign_database_is_refused_even_with_init(tmp_path: Path) -> None:
    """An SQLite database holding other tables is not an event log: refused, with or without init, and left alone."""
    database = tmp_path / "events.db"
    await anyio.to_thread.run_sync(foreign_database, database)
    before = await anyio.Path(database).read_bytes()
    for init in (False, True):
        with pytest.raises(StoreError, match=rf"{re.escape(str(database))} is not an orchestrator event log.*users"):
            async with open_store(url(database), init=init):
                pass
    assert await anyio.Path(database).read_bytes() == before


@pytest.mark.anyio
async def test_a_missing_log_is_created_whole_without_init(tmp_path: Path) -> None:
    """A missing file is created as before (no --init), complete, leaving no temporary file behind."""
    database = tmp_path / "data" / "events.db"
    async with open_store(url(database)) as store:
        await store.append(ACME, 0, created())
    names = sorted(p.name for p in await anyio.to_thread.run_sync(lambda: list(database.parent.iterdir())))
    assert names == ["events.db", "events.db.lock"], names


@pytest.mark.parametrize("how", ["flag", "environment", "config file"])
def test_serve_init_starts_a_log_in_an_empty_file(tmp_path: Path, how: str) -> None:
    """serve refuses a 0-byte file naming --init; --init, ORCHESTRATOR_INIT=1 or TOML init = true start a log in it."""
    database = tmp_path / "events.db"
    database.write_bytes(b"")
    log_url = sqlite_url(database)
    line = start(log_url, cwd=tmp_path).error_line()
    assert line.startswith(f"orchestrator: error: {database} is empty (0 bytes)"), line
    assert "--init" in line, line
    args: tuple[str, ...] = ()
    env = environment()
    if how == "flag":
        args = ("--init",)
    elif how == "environment":
        env["ORCHESTRATOR_INIT"] = "1"
    else:
        (tmp_path / "orchestrator.toml").write_text("init = true\n")
        args = ("--config", str(tmp_path / "orchestrator.toml"))
    initialised = start(log_url, *args, cwd=tmp_path, env=env)
    assert initialised.served and initialised.code == 0, initialised.err
    again = start(log_url, cwd=tmp_path)  # a log now: it starts without --init
    assert again.served and again.code == 0, again.err


# -- a second daemon on the same file -------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_second_writer_through_a_symlink_is_refused_and_leases_are_kept(tmp_path: Path) -> None:
    """Opening the log through a symlink while it is open for writing raises 'in use'; the owner's job lease stays."""
    database = tmp_path / "events.db"
    link = tmp_path / "elsewhere" / "link.db"
    await anyio.Path(link.parent).mkdir()
    await anyio.Path(link).symlink_to(database)
    async with open_store(url(database)) as first:
        await first.append(ACME, 0, created(), jobs=[a_job()])
        [claimed] = await first.claim_jobs(limit=1, lease=600)
        with pytest.raises(StoreError, match="in use"):
            async with open_store(url(link)):
                pass
        [job] = await first.jobs()
        assert job.leased and job.lease_token == claimed.lease_token
        assert (await first.append(GLOBEX, 0, created())).records[0].position == 2


@pytest.mark.anyio
async def test_a_second_writer_is_refused_after_the_lock_file_is_removed(tmp_path: Path) -> None:
    """Deleting events.db.lock does not let a second writer in: the lock is held on the database file itself."""
    database = tmp_path / "events.db"
    async with open_store(url(database)) as first:
        await first.append(ACME, 0, created(), jobs=[a_job()])
        await first.claim_jobs(limit=1, lease=600)
        await anyio.Path(tmp_path / "events.db.lock").unlink()
        with pytest.raises(StoreError, match="in use"):
            async with open_store(url(database)):
                pass
        [job] = await first.jobs()
        assert job.leased


def test_a_second_daemon_is_refused_through_a_symlink_and_without_the_lock_file(tmp_path: Path) -> None:
    """serve through a symlink, or after events.db.lock was removed, exits 1 'in use by pid N'; the first serves on."""
    database = tmp_path / "events.db"
    link = tmp_path / "link.db"
    link.symlink_to(database)
    with drained(database) as first:
        pid = first.process.pid
        through_link = start(url(link), cwd=tmp_path).error_line()  # not resolved: through the link
        assert f"is in use by pid {pid}" in through_link, through_link
        (tmp_path / "events.db.lock").unlink()
        without_lock = start(sqlite_url(database), cwd=tmp_path).error_line()
        assert f"the event log {database} is in use by pid {pid}" in without_lock, without_lock
        client = api.Api(first.address)
        try:
            assert client.emit("validate-connection", "c1", "acme")["position"] == 1
        finally:
            client.close()


# -- a full disk ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_disk_full_refuses_appends_with_unavailable_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLITE_FULL fails a whole batch with Unavailable 'disk full', logged once at ERROR; writes resume with space."""
    async with open_store(url(tmp_path / "events.db")) as store:
        first = await store.append(ACME, 0, created())
        await fill_up(writer_of(store))
        refused: list[Exception] = []

        async def append(ref: ConnectionRef) -> None:
            try:
                await store.append(ref, None, created({"blob": BLOB}))
            except Exception as exc:
                refused.append(exc)

        for _ in range(2):  # two rounds of concurrent appends: group-committed batches
            async with anyio.create_task_group() as tg:
                for n in range(5):
                    tg.start_soon(append, ConnectionRef("dev", "acme", f"full-{n}"))
        assert len(refused) == 10
        assert all(isinstance(e, Unavailable) and str(e).startswith("disk full: ") for e in refused), refused
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "database or disk is full" in errors[0].getMessage()
        await free_space(writer_of(store))
        again = await store.append(GLOBEX, 0, created({"blob": BLOB}))
        assert again.records[0].position == 2
        assert [r.event_id for r in await store.read()] == [first.records[0].event_id, again.records[0].event_id]


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> list[Writer]:
    """Every SQLite writer made during the test (to inject faults into an in-process daemon's)."""
    made: list[Writer] = []
    original = Writer.__init__

    def init(self: Writer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Writer, "__init__", init)
    return made


@pytest.mark.anyio
async def test_disk_full_is_unavailable_over_grpc_and_nothing_acknowledged_is_lost(
    tmp_path: Path, writers: list[Writer]
) -> None:
    """With the disk full an emit is UNAVAILABLE 'disk full: ...'; once space returns the daemon writes again."""
    async with serving(tmp_path) as daemon:
        acknowledged = [await api.emit(daemon.stub, api.VALIDATE, "c1")]
        [writer] = writers
        await fill_up(writer)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await api.emit(daemon.stub, api.CREATE, "c1", payload=blob())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert refused.value.details().startswith("disk full: "), refused.value.details()
        await free_space(writer)
        acknowledged.append(await api.emit(daemon.stub, api.CREATE, "c1", payload=blob()))
        log = await api.records(daemon.stub)  # what was acknowledged, and nothing of the refused emits
        assert [r.type for r in log] == ["validate-connection", "connection-validated", "post-connection-creation"]
        assert {(a.event_id, a.position) for a in acknowledged} <= {(r.event_id, r.position) for r in log}


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its filesystem is full; the file."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:  # unbuffered: nothing is left to flush on close
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def test_a_full_filesystem_refuses_emits_with_unavailable_until_space_returns(tmp_path: Path) -> None:
    """On a real full disk (a 2 MiB tmpfs) emits are UNAVAILABLE 'disk full', logged once; then it recovers."""
    with tmpfs(tmp_path / "disk", "2m") as disk, drained(disk / "events.db") as daemon:
        client = api.Api(daemon.address)
        try:
            client.emit("validate-connection", "c1", "acme")
            filler = fill(disk)
            refused: list[grpc.RpcError] = []
            for _ in range(200):  # the WAL grows until a frame finds no room
                try:
                    client.emit("post-connection-creation", "c1", "acme", config={"blob": BLOB})
                except grpc.RpcError as exc:
                    refused.append(exc)
                    if len(refused) == 2:
                        break
            assert len(refused) == 2, "the disk never filled up"
            for exc in refused:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert exc.details().startswith("disk full: "), exc.details()
            filler.unlink()
            after = client.emit("post-connection-creation", "c1", "acme")
            assert after["state"] == "active"
        finally:
            client.close()
    errors = [line for line in daemon.stderr.lines if '"level": "error"' in line]
    assert len(errors) == 1 and "database or disk is full" in errors[0], errors


class ClaimsRefused(SpyStore):
    """The memory store whose job claims fail with Unavailable (a full disk) while ``full`` is set."""

    full = False

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> Any:
        """See :meth:`MemoryEventStore.claim_jobs`; Unavailable while :attr:`full`."""
        if self.full:
            raise Unavailable("disk full: the event log could not be written (database or disk is full)")
        return await super().claim_jobs(limit=limit, lease=lease, exclude=exclude)


@pytest.mark.anyio
async def test_a_refused_claim_pauses_the_worker_instead_of_ending_it() -> None:
    """A job claim refused by the store (disk full) is retried after a pause: the daemon's worker does not end."""
    clock = FakeClock()
    store = ClaimsRefused(clock)

    async def register(ctx: Any) -> None:
        """Succeeds."""

    async with running(function("register", CREATE, register), worker=True, store=store, clock=clock) as h:
        store.full = True
        await h.emit(CREATE)  # schedules the job and wakes the worker, whose claim is refused
        await clock.sleeping()  # the worker waits out its pause on the clock
        store.full = False
        clock.advance(worker.CLAIM_RETRY + 1)
        log = await h.records_up_to(2)
        assert [r.type for r in log] == ["post-connection-creation", "function-succeeded"]


# -- file modes and an unwritable directory ------------------------------------------------------------


@pytest.mark.anyio
async def test_the_log_files_and_the_directories_made_for_them_are_private(tmp_path: Path) -> None:
    """Directories created for the log are 0700; events.db, -wal, -shm and the lock file are 0600 (umask 022)."""
    database = tmp_path / "a" / "b" / "events.db"
    previous = os.umask(0o022)
    try:
        async with open_store(url(database)) as store:
            await store.append(ACME, 0, created())
            modes = await anyio.to_thread.run_sync(
                lambda: {
                    p.relative_to(tmp_path).as_posix(): mode(p)
                    for p in (database.parent.parent, database.parent, *database.parent.iterdir())
                }
            )
    finally:
        os.umask(previous)
    assert modes == {
        "a": 0o700,
        "a/b": 0o700,
        "a/b/events.db": 0o600,
        "a/b/events.db-wal": 0o600,
        "a/b/events.db-shm": 0o600,
        "a/b/events.db.lock": 0o600,
    }


def test_the_log_file_of_serve_is_private(tmp_path: Path) -> None:
    """serve --log-file creates its log file 0600 (umask 022), and so does the reopen on SIGHUP after a rotation.

    ``serve --check`` checks that it could, and makes none.
    """
    log = tmp_path / "orchestrator.log"
    env = environment()
    checked = run("serve", "--check", "--log-file", str(log), cwd=tmp_path, env=env)
    assert checked.code == 0, str(checked)
    assert not log.exists()
    # The log file is opened first thing: a start refused later (here, for its log's missing folder) has made it.
    refused = run("serve", "--log-file", str(log), "--database", str(tmp_path / "nowhere" / "events.db"), env=env)
    assert refused.code == 1, str(refused)
    assert mode(log) == 0o600
    log.rename(tmp_path / "orchestrator.log.1")  # logrotate moves it, then SIGHUP reopens it
    previous = os.umask(0o022)
    try:
        handler = logs.ReopenableFileHandler(log, encoding="utf-8")
        try:
            log.unlink()
            handler.reopen()
            assert mode(log) == 0o600
        finally:
            handler.close()
    finally:
        os.umask(previous)


def put_a_log(directory: Path) -> None:
    """A golden log in ``directory``."""
    golden_copy(directory / "events.db")


@pytest.mark.parametrize(
    ("what", "files", "args"),
    [
        ("a new log", None, ("--database", "{dir}/events.db")),
        ("a new log in a new directory", None, ("--database", "{dir}/data/events.db")),
        ("an existing log", put_a_log, ("--database", "{dir}/events.db")),
        ("the log file", None, ("--log-file", "{dir}/orchestrator.log")),
    ],
    ids=["new-log", "new-directory", "existing-log", "log-file"],
)
def test_a_read_only_directory_is_one_line_and_exit_1(
    tmp_path: Path, what: str, files: Callable[[Path], None] | None, args: tuple[str, ...]
) -> None:
    """serve with the log (or its log file) in an unwritable directory exits 1 with one error line, no traceback."""
    with read_only_directory(tmp_path / "ro", files=files) as directory:
        argv = [a.format(dir=directory) for a in args]
        if "--database" not in argv:
            argv += ["--database", sqlite_url(tmp_path / "events.db")]
        result = run("serve", "--listen", "127.0.0.1:0", *argv, cwd=tmp_path)
    assert result.code == 1, f"{what}: {result}"
    assert "Traceback" not in result.err, str(result)
    lines = result.err.strip().splitlines()
    assert lines[-1].startswith("orchestrator: error: "), str(result)
    assert str(directory) in lines[-1], str(result)
    assert sum(line.startswith("orchestrator: error: ") for line in lines) == 1, str(result)
