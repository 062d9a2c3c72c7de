-- The event log and the read model kept in step with it.

CREATE TABLE events (
    position        INTEGER PRIMARY KEY,          -- global, strictly increasing, from 1
    stream          TEXT    NOT NULL,             -- environment/integration/connection_id
    version         INTEGER NOT NULL,             -- 1, 2, 3... per stream
    event_id        TEXT    NOT NULL UNIQUE,      -- UUIDv7
    type            TEXT    NOT NULL,
    data            TEXT    NOT NULL,             -- JSON object
    recorded_at     INTEGER NOT NULL,             -- microseconds since the Unix epoch, UTC
    causation_id    TEXT    NOT NULL DEFAULT '',
    traceparent     TEXT    NOT NULL DEFAULT '',
    idempotency_key TEXT    NOT NULL DEFAULT '',
    schema_version  INTEGER NOT NULL,
    UNIQUE (stream, version)
);

-- Keys are scoped to one connection and kept for ever (not a time-limited cache).
CREATE UNIQUE INDEX events_idempotency ON events (stream, idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX events_recorded_at ON events (recorded_at);

CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only: records are never updated'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only: records are never deleted'); END;

-- The read model: one row per connection, written in the append's transaction.
CREATE TABLE connections (
    stream        TEXT    PRIMARY KEY,
    environment   TEXT    NOT NULL,
    integration   TEXT    NOT NULL,
    connection_id TEXT    NOT NULL,
    state         TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    last_position INTEGER NOT NULL,
    body          TEXT    NOT NULL               -- the whole connection as JSON (orchestrator.codec)
) WITHOUT ROWID;

CREATE INDEX connections_by_integration ON connections (environment, integration, stream);
CREATE INDEX connections_by_state ON connections (state, stream);
