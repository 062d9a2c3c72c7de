"""The files a command line names for input, read by one helper: whatever goes wrong is one line and exit 2.

``@file`` JSON arguments, ``--credentials-file``, ``--config`` (the TOML
settings), and the client's ``--token-file`` and ``--tls-*`` files. A file that
does not exist, a directory, one that may not be read, one larger than
:data:`MAX_BYTES` (``/dev/zero`` included) or text that is not UTF-8 is refused
as :class:`~orchestrator.cli._exit.BadInput` naming the option and the path,
before the command does anything. A pipe (``@/dev/stdin``) is read like a file.

The files ``serve`` runs with (TLS, tokens, the key file, the log) are the
daemon's, reread on SIGHUP: they are checked where they are used, and a
problem with them is a failure (exit 1), not a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.cli._exit import BadInput

MAX_BYTES = 16 * 1024 * 1024
"""The largest input file read (16 MiB): more than any request the daemon accepts."""


def read_bytes(option: str, path: str | Path, *, limit: int = MAX_BYTES) -> bytes:
    """The content of ``path``, named by ``option``; :class:`BadInput` when it cannot be read or is too large."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise BadInput(f"{option}: {path} does not exist") from None
    except IsADirectoryError:
        raise BadInput(f"{option}: {path} is a directory, not a file") from None
    except PermissionError:
        raise BadInput(f"{option}: {path} cannot be read: permission denied") from None
    except OSError as exc:
        raise BadInput(f"{option}: {path} cannot be read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character, which no path holds
        raise BadInput(f"{option}: {path!r} is not a path (it holds a NUL character)") from None
    if len(data) > limit:
        raise BadInput(f"{option}: {path} is larger than {_size(limit)}")
    return data


def read_text(option: str, path: str | Path, *, limit: int = MAX_BYTES) -> str:
    """The content of ``path`` as UTF-8 text; :class:`BadInput` as :func:`read_bytes`, or when it is not UTF-8."""
    data = read_bytes(option, path, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"{option}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def read_json(option: str, path: str | Path) -> Any:
    """The JSON document in ``path``; :class:`BadInput` as :func:`read_text`, or when it is not JSON."""
    text = read_text(option, path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{option}: {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadInput(f"{option}: {path} nests too deeply to be read") from None


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"
