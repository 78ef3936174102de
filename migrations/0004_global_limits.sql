-- Schema version 4: a handler's `concurrency` and `rate` hold across every replica.

-- `concurrency`: a start counts the handler's pairs running under a lease (under the
-- handler's advisory lock); this keeps that count to the running pairs.
CREATE INDEX inbox_jobs_running ON inbox_jobs (handler) WHERE status = 'running';

-- `rate`: the earliest next start of the handler, moved on by one interval per start, from
-- whichever replica starts it.
ALTER TABLE inbox_handlers ADD COLUMN next_start_ms bigint;
