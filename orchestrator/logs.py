"""Logging for the daemon: JSON lines when not on a terminal, with trace and span ids.

At INFO and above, one line per thing an operator acts on: a refused emit, a
connection rejected, a function attempt that failed (WARNING), new
credentials, a job retried or cancelled by a caller, a job parked, the
daemon's start and stop. Each lifecycle event and each successful attempt
also gets a line at DEBUG (``--log-level debug``): those are built only when
DEBUG is on (``logger.isEnabledFor``). Never a secret (only names, ids and
outcomes are logged); docs/operations.md lists the lines.
``--log-file`` writes to a file that SIGHUP reopens (for logrotate). What a
caller can repeat at will (a request that does not decode) is logged through a
:class:`Throttle`, so that a flood of bad requests cannot flood the log.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import trace

from orchestrator import tracing

# Attributes every LogRecord has; anything else passed with ``extra=`` is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if tracing.traces_on():
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                out["trace_id"] = format(span.trace_id, "032x")
                out["span_id"] = format(span.span_id, "016x")
        out.update((k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human lines for a terminal, with the ``extra`` fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        return f"{line} {extra}" if extra else line


class ReopenableFileHandler(logging.FileHandler):
    """A file handler whose file is closed and opened again on :meth:`reopen` (SIGHUP); a new file is made 0600."""

    def _open(self) -> io.TextIOWrapper:
        # The log names connections and functions: readable by the daemon's user only, like the event log.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it)."""
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup(level: str, *, fmt: str = "auto", file: Path | None = None) -> ReopenableFileHandler | None:
    """Configure the root logger; returns the file handler to reopen on SIGHUP, if any."""
    handler: logging.Handler
    file_handler = None
    if file is not None:
        handler = file_handler = ReopenableFileHandler(file, encoding="utf-8", delay=False)
        tty = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        tty = sys.stderr.isatty()
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    handler.setFormatter(JSONFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_levels(level)
    return file_handler


def set_levels(level: str) -> None:
    """The root logger's level, with the libraries that would log secrets held at WARNING."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # httpx logs every request's full URL at INFO, query-string credentials included:
    # the provider proxy records its calls itself, without them.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Throttle:
    """At most one line per ``interval`` seconds for each kind of line; the next one says how many were left out.

    Kinds are a few fixed strings chosen by the caller (never a value a client
    sends), so that the table stays small.
    """

    def __init__(
        self, logger: logging.Logger, *, interval: float = 10.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self.interval = interval
        self._monotonic = monotonic
        self._kinds: dict[str, tuple[float, int]] = {}
        """kind -> (when its last line was written, lines left out since)."""

    def log(self, level: int, kind: str, message: str, *args: object) -> bool:
        """Write ``message % args`` unless a line of ``kind`` was written less than ``interval`` seconds ago."""
        now = self._monotonic()
        last = self._kinds.get(kind)
        if last is not None and now - last[0] < self.interval:
            self._kinds[kind] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._kinds[kind] = (now, 0)
        if suppressed:
            message += " (%d more like it were not logged in the last %.0f s)"
            args = (*args, suppressed, now - last[0] if last is not None else 0.0)
        self._logger.log(level, message, *args, extra={"kind": kind, "suppressed": suppressed})
        return True
