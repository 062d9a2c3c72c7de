-- Jobs are kept once they end (succeeded, gave up, cancelled), to be listed (ListJobs) and
-- retried (RetryJob). Only queued and running ones are claimed, or count as "left" to the
-- shredding rule; a running job is one with a lease.

ALTER TABLE jobs ADD COLUMN status TEXT NOT NULL DEFAULT 'queued';  -- queued, running, succeeded, gave-up, cancelled
ALTER TABLE jobs ADD COLUMN last_error TEXT NOT NULL DEFAULT '';   -- of the last failed attempt
ALTER TABLE jobs ADD COLUMN incarnation INTEGER NOT NULL DEFAULT 0; -- of the connection, when it was scheduled
ALTER TABLE jobs ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;  -- microseconds since the epoch

UPDATE jobs SET status = 'running' WHERE lease_until IS NOT NULL;
UPDATE jobs SET updated_at = created_at;
-- Jobs in the outbox today belong to their connection's current incarnation.
UPDATE jobs SET incarnation = COALESCE(
    (SELECT json_extract(c.body, '$.incarnation') FROM connections c WHERE c.stream = jobs.stream), 0);

-- The worker's claims and due times look at jobs still to run only.
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (run_at) WHERE status IN ('queued', 'running');
-- Listing, in (stream, job id) order: of one connection or environment, and by status.
DROP INDEX jobs_by_stream;
CREATE INDEX jobs_by_stream ON jobs (stream, job_id);
CREATE INDEX jobs_by_status ON jobs (status, stream, job_id);
