"""The SQLite log's file: created whole and private, owned by one daemon, checked before it is written.

- **Creating.** A missing log is built complete (every migration applied)
  under a temporary name beside it, then linked into place: no crash leaves
  an empty or half-made file where a log is expected. Directories made for
  it are ``0700``, the files ``0600`` (SQLite gives ``-wal`` and ``-shm`` the
  database file's mode).
- **Owning.** One daemon owns a log: it holds an ``flock`` on the database
  file itself, found through any symlinks, so neither another path to the
  same file nor a deleted lock file lets a second daemon in. ``<file>.lock``
  beside it holds the owner's pid (for the refusal message) and is locked
  too, as releases before this one locked only it.
- **Checking.** An existing file with no log in it (0 bytes, or an SQLite
  database with nothing in it) is refused unless ``init``; one holding other
  tables is refused always; ``PRAGMA quick_check``, bounded in time, refuses
  a damaged file before anything is written to it.

Everything here blocks: callers run it off the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

from orchestrator.clock import Clock
from orchestrator.errors import LogInUse, StoreError
from orchestrator.store._migrations import migrate_sqlite

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
CHECK_BUDGET = 10.0
"""Seconds ``quick_check`` may take at start (about 0.1 s per 100,000 records from the page cache, 1 s cold)."""
RECOVERY = "see 'A damaged event log' in docs/operations.md"


def damaged(path: Path, detail: str) -> StoreError:
    """The refusal of a damaged log: the file, what SQLite found, and what to do."""
    return StoreError(
        f"the event log {path} is damaged ({detail}): the daemon will not write to it; stop every process using it,"
        f" keep a copy of it (with its -wal file, if any) and recover it: {RECOVERY}"
    )


def _os_error(action: str, exc: OSError) -> StoreError:
    where = f" {exc.filename}" if exc.filename else ""
    return StoreError(f"cannot {action}{where}: {exc.strerror or exc}")


# -- creating -------------------------------------------------------------------------------


def make_directories(directory: Path) -> None:
    """Create ``directory`` and any missing parents, each ``0700`` (existing ones are left as they are)."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error("create the directory", exc) from exc


def create(path: Path, clock: Clock) -> None:
    """Create a new log at ``path``, complete: built under a temporary name, then linked into place.

    If another process created ``path`` meanwhile, theirs is kept (and this one discarded).
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        _remove(temporary)  # a leftover of a crash of a process that had this pid
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
        # Rollback-journal mode while it is built: each commit is then in the file itself,
        # so the link below never leaves committed pages behind in a -wal file.
        db = sqlite3.connect(temporary, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous = FULL")
            migrate_sqlite(db, path, clock)
        finally:
            db.close()
        try:
            os.link(temporary, path)
        except FileExistsError:
            log.info("%s was created by another process meanwhile; using it", path)
        _sync_directory(path.parent)
    except OSError as exc:
        raise StoreError(f"cannot create the event log {path}: {exc.strerror or exc} (in {path.parent})") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"cannot create the event log {path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):  # what could not be made cannot be removed either
            _remove(temporary)


def _remove(path: Path) -> None:
    for name in (path, path.with_name(path.name + "-journal")):
        with contextlib.suppress(FileNotFoundError):
            name.unlink()


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- owning ---------------------------------------------------------------------------------


_held: set[tuple[int, int]] = set()
"""The (device, inode) of every database file this process holds locked."""
_held_guard = threading.RLock()


class Lock:
    """An ``flock`` on the database file itself (symlinks resolved), and on ``<file>.lock``, which holds our pid.

    Closing any descriptor of the database file drops every POSIX lock this
    process holds on it, SQLite's included. So :meth:`release` comes after
    every SQLite connection of the owner is closed, and a file this process
    already holds is refused without being opened again.
    """

    def __init__(self, path: Path, shown: Path) -> None:
        self.path = path
        """The database file's real path."""
        self._shown = shown
        self._pid_path = path.with_name(path.name + ".lock")
        self._fds: list[int] = []
        self._key: tuple[int, int] | None = None
        self.status: os.stat_result | None = None
        """The database file's status, taken once it is locked."""

    def acquire(self) -> None:
        """Take both locks, or raise :class:`StoreError` (in use, or not a file)."""
        with _held_guard:
            self._acquire()

    def _acquire(self) -> None:
        try:
            known = os.stat(self.path)
            if (known.st_dev, known.st_ino) in _held:
                raise self._in_use(known)
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _os_error("open the event log", exc) from exc
        self._fds.append(fd)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise StoreError(f"{self._shown} is not a file: --database names the event log's file")
            if not _try_lock(fd):
                raise self._in_use(status)
            try:
                pid_fd = os.open(self._pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            except OSError as exc:
                # SQLite must create the -wal and -shm files there too: the directory must be writable.
                raise _os_error("create the lock file", exc) from exc
            self._fds.append(pid_fd)
            if not _try_lock(pid_fd):  # a release before this one, which locks only this file
                raise self._in_use(status)
            os.ftruncate(pid_fd, 0)
            os.write(pid_fd, str(os.getpid()).encode())
            self.status = os.fstat(fd)
            self._key = (status.st_dev, status.st_ino)
            _held.add(self._key)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Drop both locks (closing the descriptors releases them)."""
        with _held_guard:
            while self._fds:
                os.close(self._fds.pop())
            if self._key is not None:
                _held.discard(self._key)
                self._key = None

    def _in_use(self, status: os.stat_result) -> StoreError:
        holder = _pid_in(self._pid_path) or flock_holder(status) or "another process"
        also = f" (that is {self.path})" if self.path != self._shown else ""
        return LogInUse(
            f"the event log {self._shown}{also} is in use by pid {holder}:"
            " one daemon owns an SQLite log (use PostgreSQL to run several)",
            path=self._shown,
            holder=holder,
        )


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _pid_in(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def flock_holder(status: os.stat_result) -> str:
    """The pid holding an ``flock`` on the file (Linux's /proc/locks), or ``""``."""
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if "->" not in fields and len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return fields[4]
    return ""


# -- checking -------------------------------------------------------------------------------


def refuse_zero_length(path: Path, status: os.stat_result, *, init: bool) -> None:
    """A 0-byte file where a log was expected: refused unless ``init`` (SQLite would take it for a new database)."""
    if status.st_size == 0 and not init:
        raise _empty(path, "is empty (0 bytes)")


def check_quickly(db: sqlite3.Connection, path: Path, *, budget: float | None = None) -> None:
    """``PRAGMA quick_check``, given ``budget`` seconds (:data:`CHECK_BUDGET`); a problem is :func:`damaged`."""
    budget = CHECK_BUDGET if budget is None else budget
    started = time.monotonic()
    deadline = started + budget
    db.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(5)")]
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_INTERRUPT:
            raise damaged(path, str(exc)) from exc
        log.warning(
            "the event log %s was checked in part: PRAGMA quick_check did not end within %.0f s;"
            " run it while the daemon is stopped to check it all (docs/operations.md)",
            path,
            budget,
        )
        return
    except sqlite3.DatabaseError as exc:  # not a database, malformed: before it could report
        raise damaged(path, str(exc)) from exc
    finally:
        db.set_progress_handler(None, 0)
    if problems != ["ok"]:
        # One line: a finding may span several ("*** in database main ***\nPage 9: ...\nPage 8: ...").
        found = [line.strip() for p in problems for line in p.splitlines()]
        detail = "; ".join(line for line in found if line and not line.startswith("***"))
        raise damaged(path, f"PRAGMA quick_check: {detail}")
    log.info("checked the event log %s (quick_check) in %.2f s", path, time.monotonic() - started)


def check_is_a_log(db: sqlite3.Connection, path: Path, *, init: bool) -> None:
    """Refuse a database that is not an event log: empty (unless ``init``), or holding other things."""
    names = [row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'")]
    if "schema_migrations" in names:
        return
    if names:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise StoreError(
            f"{path} is not an orchestrator event log (it holds {shown}, and no schema_migrations table):"
            " point --database at the event log, or at a new file"
        )
    if not init:
        raise _empty(path, "is empty (an SQLite database with no tables)")


def _empty(path: Path, what: str) -> StoreError:
    wal = path.with_name(path.name + "-wal")
    leftover = ""
    with contextlib.suppress(OSError):
        if wal.stat().st_size:
            leftover = f"; {wal.name} is not empty: keep a copy of it"
    return StoreError(
        f"{path} {what}, where an event log was expected{leftover}: if the log was lost, restore it from a backup"
        f" (docs/operations.md); to start a new log in this file, run `orchestrator serve --init` once"
    )
