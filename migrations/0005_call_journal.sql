-- Schema version 5: the call journal (design.md, "Downstream calls").

-- The final answer of each step of a (delivery, handler) pair's downstream calls, with the
-- fingerprint of the request that got it. Written first-writer-wins (`ON CONFLICT DO
-- NOTHING`) without waiting for the WAL flush: a crash before it is written is closed by
-- the partner's own key. It goes with its pair (retention deletes the delivery, the pair,
-- and so this).
CREATE TABLE inbox_calls (
    source          text    NOT NULL,
    id              text    NOT NULL,
    handler         text    NOT NULL,
    step            text    NOT NULL,
    -- The CallRecord as JSON (status, content type, location, body up to
    -- calls.journal_max_bytes, attempts, when, how often replayed).
    record          text    NOT NULL,
    PRIMARY KEY (source, id, handler, step),
    FOREIGN KEY (source, id, handler) REFERENCES inbox_jobs ON DELETE CASCADE
);
