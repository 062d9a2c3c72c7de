-- The event log, the read model kept in step with it, the outbox of jobs and the sealed credentials.
-- The columns are those of the SQLite log (orchestrator/store/_sqlite_rows.py maps the rows of both);
-- times are microseconds since the Unix epoch, UTC (to_timestamp(recorded_at / 1e6) shows one).
-- Keys are compared byte by byte (COLLATE "C"), so that listings page in the order every backend uses.

CREATE TABLE events (
    position        BIGINT  PRIMARY KEY,                 -- global, from 1, in commit order, no gaps
    stream          TEXT    COLLATE "C" NOT NULL,        -- environment/integration/connection_id
    version         INTEGER NOT NULL,                    -- 1, 2, 3... per stream
    event_id        TEXT    NOT NULL UNIQUE,             -- UUIDv7
    type            TEXT    NOT NULL,
    data            TEXT    NOT NULL,                    -- JSON object (orchestrator.codec), as the SQLite log keeps it
    recorded_at     BIGINT  NOT NULL,
    causation_id    TEXT    NOT NULL DEFAULT '',
    traceparent     TEXT    NOT NULL DEFAULT '',
    idempotency_key TEXT    NOT NULL DEFAULT '',
    schema_version  INTEGER NOT NULL,
    UNIQUE (stream, version)
);

-- Keys are scoped to one connection and kept for ever (not a time-limited cache).
CREATE UNIQUE INDEX events_idempotency ON events (stream, idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX events_recorded_at ON events (recorded_at);

CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: records are never %',
        CASE TG_OP WHEN 'UPDATE' THEN 'updated' WHEN 'DELETE' THEN 'deleted' ELSE 'truncated' END;
END
$$;
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_append_only_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- The head of the log: one row, locked by every append from the moment it takes its positions until it
-- commits, so that positions are given in commit order (docs/event-log.md, "Positions on PostgreSQL").
CREATE TABLE log_head (
    one         BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    position    BIGINT  NOT NULL,                        -- the last position committed
    recorded_at BIGINT  NOT NULL                         -- its recorded_at: no later record is stamped earlier
);
INSERT INTO log_head (one, position, recorded_at) VALUES (TRUE, 0, 0);

-- The read model: one row per connection, written in the append's transaction.
CREATE TABLE connections (
    stream        TEXT    COLLATE "C" PRIMARY KEY,
    environment   TEXT    COLLATE "C" NOT NULL,
    integration   TEXT    COLLATE "C" NOT NULL,
    connection_id TEXT    COLLATE "C" NOT NULL,
    state         TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    last_position BIGINT  NOT NULL,
    body          TEXT    NOT NULL                       -- the whole connection as JSON (orchestrator.codec)
);

CREATE INDEX connections_by_integration ON connections (environment, integration, stream);
CREATE INDEX connections_by_state ON connections (state, stream);

-- The outbox: asynchronous function runs, written in the same transaction as their event, kept once they end.
CREATE TABLE jobs (
    job_id       TEXT    COLLATE "C" PRIMARY KEY,
    stream       TEXT    COLLATE "C" NOT NULL,
    function     TEXT    NOT NULL,
    event        TEXT    NOT NULL,
    causation_id TEXT    NOT NULL,                       -- the lifecycle record the function runs for
    payload      TEXT    NOT NULL,                       -- JSON
    traceparent  TEXT    NOT NULL DEFAULT '',
    run_at       BIGINT  NOT NULL,                       -- not before
    attempt      INTEGER NOT NULL DEFAULT 0,
    lease_until  BIGINT,                                 -- NULL: not claimed; renewed while its claim is held
    lease_token  BIGINT  NOT NULL DEFAULT 0,             -- the fencing token: bumped by every claim
    status       TEXT    NOT NULL DEFAULT 'queued',      -- queued, running, succeeded, gave-up, cancelled
    last_error   TEXT    NOT NULL DEFAULT '',            -- of the last failed attempt
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    incarnation  INTEGER NOT NULL                        -- of the connection, when it was scheduled
);

-- The claims and due times look at jobs still to run only.
CREATE INDEX jobs_due ON jobs (run_at) WHERE status IN ('queued', 'running');
-- Listing, in (stream, job id) order: of one connection or environment, and by status.
CREATE INDEX jobs_by_stream ON jobs (stream, job_id);
CREATE INDEX jobs_by_status ON jobs (status, stream, job_id);

-- Credentials, sealed (orchestrator/sealing.py): one row per connection, never in the clear. Written in the
-- transaction of the record that brought them (credentials-updated), deleted in the transaction that appends
-- credentials-destroyed (crypto-shredding).
CREATE TABLE credentials (
    stream      TEXT    COLLATE "C" PRIMARY KEY,
    incarnation INTEGER NOT NULL,                        -- bound into the ciphertext's associated data
    key_id      TEXT    NOT NULL,                        -- the key it is sealed under (a short hash of the key)
    nonce       BYTEA   NOT NULL,                        -- 12 bytes, random per seal
    ciphertext  BYTEA   NOT NULL,                        -- AES-256-GCM, tag included
    fingerprint TEXT    NOT NULL,                        -- keyed (HMAC-SHA256), as its credentials-updated record states it
    version     INTEGER NOT NULL,                        -- the stream version of that record
    updated_at  BIGINT  NOT NULL
);

CREATE INDEX credentials_by_key ON credentials (key_id);
