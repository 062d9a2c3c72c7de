"""Size limits on every field a caller sends, checked before anything is written."""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator import codec
from orchestrator.errors import InvalidArgument, ResourceExhausted
from orchestrator.model import MAX_IDEMPOTENCY_KEY, EmitRequest, JSONObject

MAX_CONFIG_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_CREDENTIALS = 64
MAX_CREDENTIAL_NAME = 128
MAX_CREDENTIAL_VALUE = 16 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024
"""The largest gRPC message the daemon accepts (the sum of the above fits)."""
MAX_METADATA_WRITE_BYTES = 64 * 1024
"""The largest metadata a function may write at once (as JSON)."""
MAX_METADATA_BYTES = 256 * 1024
"""The largest metadata a connection may hold (as JSON), so that every reply that carries it stays small."""
MAX_PAGE_BYTES = 4 * 1024 * 1024
"""A ListConnections page stops growing past this many bytes of metadata and config (a shorter page, a token)."""
MAX_JSON_DEPTH = 20
"""How deep objects and arrays may nest in connection_config and payload. Protobuf's decoders
refuse a message nested past 100 levels, and a log record holds the config 5 levels down, each
object 3 more: a config nested 32 deep was accepted, then no record of it could be read back."""
MAX_REPLY_VALUE_BYTES = MAX_MESSAGE_BYTES
"""The most bytes one JSON value (a record's data, a connection's metadata or config) takes in a reply.
Every value written under the limits above fits; a larger one, written before they existed, is
replaced in replies by a note saying how to read it (see ``rpc.wire``), so that no reply outgrows
a client's 4 MiB message limit and no record becomes unreadable."""
MAX_REPLY_DEPTH = MAX_JSON_DEPTH + 5
"""How deep a JSON value in a reply may nest (a record holds a config or metadata a few levels down)."""
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def _json_size(field: str, value: JSONObject, limit: int) -> None:
    size = len(codec.dumps(value).encode())
    if size > limit:
        raise ResourceExhausted(f"{field} is {size} bytes as JSON; the limit is {limit}")


def depth(value: object) -> int:
    """How deep objects and arrays nest in a JSON value (a scalar is 0, ``{}`` is 1)."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, at = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, at)
            level.extend((child, at + 1) for child in children)
    return deepest


def check_depth(field: str, value: JSONObject) -> None:
    """Raise :class:`InvalidArgument` when ``value`` nests deeper than :data:`MAX_JSON_DEPTH`."""
    levels = depth(value)
    if levels > MAX_JSON_DEPTH:
        raise InvalidArgument(f"{field} nests objects and arrays {levels} levels deep; the limit is {MAX_JSON_DEPTH}")


def check_credentials(credentials: Mapping[str, str]) -> None:
    """Raise :class:`ResourceExhausted` or :class:`InvalidArgument` when credentials break a limit (values unsaid)."""
    if len(credentials) > MAX_CREDENTIALS:
        raise ResourceExhausted(f"credentials has {len(credentials)} entries; the limit is {MAX_CREDENTIALS}")
    for name, value in credentials.items():
        if not name or len(name) > MAX_CREDENTIAL_NAME or not name.isprintable():
            raise InvalidArgument(f"credentials: every name must be 1 to {MAX_CREDENTIAL_NAME} printable characters")
        if len(value) > MAX_CREDENTIAL_VALUE:
            # Never echo the value: it is a secret.
            raise ResourceExhausted(f"credentials[{name!r}] is longer than {MAX_CREDENTIAL_VALUE} characters")


def check_emit(request: EmitRequest) -> None:
    """Raise :class:`InvalidArgument` or :class:`ResourceExhausted` naming the first bad field."""
    key = request.idempotency_key
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"idempotency_key is {len(key)} characters long; the maximum is {MAX_IDEMPOTENCY_KEY}")
    if key and not key.isprintable():
        raise InvalidArgument("idempotency_key contains a control or non-printable character")
    if request.expected_version is not None and request.expected_version < 0:
        raise InvalidArgument(f"expected_version must be 0 or more, not {request.expected_version}")
    check_depth("connection_config", request.config)
    check_depth("payload", request.payload)
    _json_size("connection_config", request.config, MAX_CONFIG_BYTES)
    _json_size("payload", request.payload, MAX_PAYLOAD_BYTES)
    check_credentials(request.credentials)


def check_metadata(write: JSONObject, after: JSONObject) -> None:
    """Raise :class:`ResourceExhausted` naming the limit when a metadata write, or the metadata after it, is too big."""
    _json_size("a metadata write", write, MAX_METADATA_WRITE_BYTES)
    _json_size("the connection's metadata after this write", after, MAX_METADATA_BYTES)


def page_bytes(metadata: JSONObject, config: JSONObject) -> int:
    """What one connection weighs in a page (its metadata and config as JSON)."""
    return len(codec.dumps(metadata).encode()) + len(codec.dumps(config).encode())


def clamp_page_size(page_size: int) -> int:
    """0 means the default; above the maximum is clamped, not refused."""
    if page_size < 0:
        raise InvalidArgument(f"page_size must be 0 or more, not {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
