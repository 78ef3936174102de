-- webhook-inbox on PostgreSQL, schema version 1. What each table and column is for, and
-- why the statements that use them are safe across replicas: src/store/postgres/mod.rs.

-- One row per (source, delivery id): the dedup key is the primary key, so a claim is an
-- `INSERT … ON CONFLICT DO NOTHING`.
CREATE TABLE inbox_deliveries (
    source          text    NOT NULL,
    id              text    NOT NULL,
    received_at_ms  bigint  NOT NULL,
    -- The DeliveryRecord as JSON (fingerprint, headers, the first answer, the processed-mode
    -- lease); text, not jsonb, so the stored answer comes back byte for byte.
    record          text    NOT NULL,
    -- Set on an alias made by body dedup: the id of the first delivery of that body.
    alias_of        text,
    body            bytea   NOT NULL,
    PRIMARY KEY (source, id)
);
-- Retention and admin listings walk deliveries in received order.
CREATE INDEX inbox_deliveries_received ON inbox_deliveries (received_at_ms, source, id);

-- One row per (delivery, handler), written with the claim. `due_ms` is the queue entry.
CREATE TABLE inbox_jobs (
    source          text    NOT NULL,
    id              text    NOT NULL,
    handler         text    NOT NULL,
    -- pending | running | succeeded | failed | dead
    status          text    NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    retry_base      integer NOT NULL DEFAULT 0,
    last_error      text,
    -- When the pair is due to run; NULL when it is not queued.
    due_ms          bigint,
    -- NULL until the pair first changes (a pending pair with no state yet).
    updated_ms      bigint,
    -- While running: which replica runs it, and until when (renewed while the handler
    -- runs); a lapsed lease belongs to a replica that died.
    lease_owner     bigint,
    lease_until_ms  bigint,
    -- A dispatcher that has taken the pair from the queue and is about to start it, so
    -- that replicas reading the queue at once take different pairs.
    reserved_by     bigint,
    reserved_until_ms bigint,
    PRIMARY KEY (source, id, handler),
    FOREIGN KEY (source, id) REFERENCES inbox_deliveries ON DELETE CASCADE
);
-- Dispatch reads only the front of the queue.
CREATE INDEX inbox_jobs_queue ON inbox_jobs (due_ms) WHERE due_ms IS NOT NULL;
-- Dead letters and bulk retry of failed pairs.
CREATE INDEX inbox_jobs_unsettled ON inbox_jobs (status, source, handler)
    WHERE status IN ('failed', 'dead');

-- Body dedup: which delivery first carried a body. Once that delivery expired the row is
-- kept (with the first answer) for `storage.fingerprint_retention`.
CREATE TABLE inbox_fingerprints (
    source          text    NOT NULL,
    fingerprint     text    NOT NULL,
    id              text    NOT NULL,
    received_at_ms  bigint  NOT NULL,
    -- The first answer as JSON, set when the delivery expired; NULL while it is stored.
    kept_response   text,
    PRIMARY KEY (source, fingerprint)
);
CREATE INDEX inbox_fingerprints_kept ON inbox_fingerprints (received_at_ms)
    WHERE kept_response IS NOT NULL;
