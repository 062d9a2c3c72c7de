-- The outbox: asynchronous function runs, written in the same transaction as their event.

CREATE TABLE jobs (
    job_id       TEXT    PRIMARY KEY,
    stream       TEXT    NOT NULL,
    function     TEXT    NOT NULL,
    event        TEXT    NOT NULL,
    causation_id TEXT    NOT NULL,     -- the lifecycle record the function runs for
    payload      TEXT    NOT NULL,     -- JSON
    traceparent  TEXT    NOT NULL DEFAULT '',
    run_at       INTEGER NOT NULL,     -- microseconds since the epoch: not before
    attempt      INTEGER NOT NULL DEFAULT 0,
    lease_until  INTEGER,              -- NULL: not claimed
    lease_token  INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX jobs_due ON jobs (run_at);
CREATE INDEX jobs_by_stream ON jobs (stream);
