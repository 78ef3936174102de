-- Schema version 2: per-handler dispatch (delivery control).

-- The dispatcher reads the front of each handler's queue that it may run now (not paused,
-- under its limits), never past the backlog of one it may not.
CREATE INDEX inbox_jobs_queue_by_handler ON inbox_jobs (handler, due_ms)
    WHERE due_ms IS NOT NULL;

-- Operator state per handler; a row exists once a handler was first paused.
CREATE TABLE inbox_handlers (
    name        text    PRIMARY KEY,
    paused      boolean NOT NULL,
    updated_ms  bigint  NOT NULL
);
