"""Where a log is to be, checked before anything opens it: what ``serve`` and ``serve --check`` see of the path.

:func:`locate` makes the checks on the path that opening the log would make
(a malformed or unsupported URL, a directory where the file should be, a
parent directory that does not exist), and one more: a missing directory is
made only when the caller says so (the default ``./.orchestrator/``), so a
mistyped ``--database`` is refused instead of starting a new, empty log.
:func:`inspect` reads what is in an existing file, as the daemon checks it
once it owns it (empty, not a log, in use), through an immutable read-only
SQLite connection. Neither creates, locks nor changes anything.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from orchestrator.errors import InvalidArgument, StoreError
from orchestrator.store import _sqlite_file

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SUPPORTED = "use sqlite:///path/to/events.db, postgresql://user@host:port/database (or memory: for tests)"


@dataclass(frozen=True, slots=True)
class Location:
    """The log a URL names, as its path stands now."""

    url: str
    path: Path | None
    """The SQLite file (None for ``memory:`` and PostgreSQL)."""
    exists: bool = False
    size: int = 0
    directories: tuple[Path, ...] = ()
    """The directories opening it will make, the outermost first (only when allowed)."""
    holder: str = ""
    """The pid of the process that owns the log now, if one does (Linux: ``/proc/locks``)."""

    def describe(self) -> str:
        """One line on what opening it will do."""
        if self.path is None:
            if is_postgres(self.url):
                return f"the PostgreSQL database {shown(self.url)} (checked once the daemon connects)"
            return "in memory (gone when the daemon stops)"
        if self.exists:
            owner = f"; in use by pid {self.holder}" if self.holder else ""
            return f"{self.path} exists ({self.size:,} bytes{owner})"
        made = f", with the directory {self.directories[0]}" if self.directories else ""
        return f"{self.path} does not exist: a new log will be created{made}"


def locate(url: str, *, create_directory: bool = False, write: bool = True) -> Location:
    """The log ``url`` names, checked as opening it would check it; :class:`InvalidArgument` or :class:`StoreError`.

    A missing parent directory is refused unless ``create_directory``; an existing file must be
    readable, and writable when ``write``.
    """
    from orchestrator.store import sqlite_path

    path = sqlite_path(url)
    if path is None:
        if url.startswith("memory:"):
            return Location(url, None)
        if is_postgres(url):
            check_url(url)
            return Location(url, None)
        raise InvalidArgument(f"database URL {url!r} is not supported: {SUPPORTED}")
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise StoreError(f"cannot find the event log {path}: {exc}") from exc
    try:
        status = os.stat(real)
    except FileNotFoundError:
        return _missing(url, path, real, create_directory)
    except OSError as exc:
        raise StoreError(f"cannot open the event log {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(status.st_mode):
        raise InvalidArgument(
            f"the event log {path} is a directory: --database names the log's file, e.g. sqlite://{real}/events.db"
        )
    if not stat.S_ISREG(status.st_mode):
        raise StoreError(f"{path} is not a file: --database names the event log's file")
    if not os.access(real, os.R_OK | (os.W_OK if write else 0)):
        raise StoreError(f"cannot open the event log {path}: permission denied")
    return Location(url, path, exists=True, size=status.st_size, holder=_sqlite_file.flock_holder(status))


def _missing(url: str, path: Path, real: Path, create_directory: bool) -> Location:
    missing: list[Path] = []
    for folder in (real.parent, *real.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise InvalidArgument(f"cannot create the event log {path}: {folder} is not a directory")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StoreError(f"cannot create the event log {path}: permission denied (in {folder})")
            break
        missing.append(folder)
    if missing and not create_directory:
        raise InvalidArgument(
            f"the directory of the event log {path} does not exist ({real.parent}): create it, or correct"
            " --database (a log is created only in an existing directory)"
        )
    return Location(url, path, exists=False, directories=tuple(reversed(missing)))


def inspect(location: Location, *, init: bool) -> None:
    """Refuse an existing file the daemon would refuse once it owns it: empty (unless ``init``), or not a log.

    A log in use is not inspected (its owner checked it). Read through an immutable read-only
    connection: no ``-wal``, ``-shm`` or lock is made.
    """
    path = location.path
    if path is None or not location.exists or location.holder:
        return
    if location.size == 0:
        if init:
            return
        _sqlite_file.refuse_zero_length(path, os.stat(path), init=init)
    try:
        db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the event log at {path}: {exc}") from exc
    try:
        _sqlite_file.check_is_a_log(db, path, init=init)
    except sqlite3.DatabaseError as exc:
        raise _sqlite_file.damaged(path, str(exc)) from exc
    finally:
        db.close()


def is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return url.startswith(POSTGRES_SCHEMES)


def check_url(url: str) -> None:
    """Refuse a PostgreSQL URL that names no database (:class:`InvalidArgument`)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # parsed for its check: a port that is not a number raises ValueError
    except ValueError as exc:
        raise InvalidArgument(f"database URL {shown(url)!r} is malformed: {exc}") from None
    if not parts.path.strip("/"):
        raise InvalidArgument(
            f"database URL {shown(url)!r} names no database: use postgresql://user@host:port/database"
        )


def shown(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: fit for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("@", 1)[-1] if "@" in url else url
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
